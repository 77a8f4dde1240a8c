//! The subscriber peer connection: we offer, the client answers. One offer is outstanding
//! at a time; whatever changes meanwhile is folded into the next one. Sections are never
//! removed: a stopped track's section goes inactive and only that track may revive it.

use std::sync::Arc;
use std::time::Instant;

use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::media::{Direction, Mid, Rid};

use crate::{
    Member, Name, PeerKind, Sfu, SfuError, SfuEvent, SubscriptionMode, TrackKey, TrackKind,
};

#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) mid: Mid,
    pub(crate) kind: TrackKind,
    /// The forwarded track; `None` while inactive.
    pub(crate) track: Option<TrackKey>,
    /// The track it last carried: only that track may bring it back to life (str0m fixes a
    /// section's stream id, the tid the SDK matches on, at creation), which keeps the SDP
    /// from growing when automatic mode swaps the same publishers in and out.
    pub(crate) last_track: Option<TrackKey>,
    /// Accepted by the client, so writable (and in the forwarding index).
    pub(crate) negotiated: bool,
    /// The simulcast layer being forwarded, and the one to switch to at its next keyframe.
    pub(crate) layer: Option<Rid>,
    pub(crate) want_layer: Option<Rid>,
    /// Output RTP time = input + offset, rebased at layer switches so time never jumps.
    pub(crate) time_offset: i64,
    pub(crate) last_out: Option<(u64, Instant)>,
    /// A keyframe (or, for audio, any frame) went out: the subscriber can decode. Until
    /// then the periodic pass keeps asking for a keyframe; a delta frame forwarded first
    /// (the keyframe asked for at the answer arrived before DTLS was up) must not count.
    pub(crate) started: bool,
}

#[derive(Debug)]
pub(crate) enum Negotiation {
    /// The no-m-line offer from `initial_offer` is out.
    Initial,
    Stable,
    Offered(SdpPendingOffer),
}

impl Sfu {
    /// The member's answer to our latest subscriber offer.
    pub fn sub_answer(&mut self, member: &str, sdp: &str, now: Instant) -> Result<(), SfuError> {
        let i = self.idx(member)?;
        let m = self.member_mut(i);
        match std::mem::replace(&mut m.negotiation, Negotiation::Stable) {
            Negotiation::Initial => {}
            Negotiation::Stable => return Err(SfuError::NoOfferOutstanding),
            Negotiation::Offered(pending) => {
                let answer = match SdpAnswer::from_sdp_string(sdp) {
                    Ok(a) => a,
                    Err(e) => {
                        m.negotiation = Negotiation::Offered(pending);
                        return Err(SfuError::BadSdp(e.to_string()));
                    }
                };
                let Some(peer) = m.subscriber.as_mut() else {
                    return Err(SfuError::NoPeer);
                };
                if let Err(e) = peer.rtc.sdp_api().accept_answer(pending, answer) {
                    // str0m has consumed the offer and applied part of it: what the client
                    // and we hold no longer agree, and nothing short of a new peer
                    // connection (the SDK reconnects) can fix that.
                    let (room, name) = (m.room.clone(), m.name.clone());
                    self.events
                        .push_back(SfuEvent::PeerFailed { room, member: name });
                    return Err(SfuError::Rejected(e.to_string()));
                }
                let mut fresh = Vec::new();
                for (n, s) in m.slots.iter_mut().enumerate() {
                    if let (Some(key), false) = (s.track, s.negotiated) {
                        s.negotiated = true;
                        fresh.push((n, key));
                    }
                }
                for (n, key) in &fresh {
                    self.forwards.add(*key, (i, *n));
                }
                self.drive(i, PeerKind::Subscriber, now);
                // Newly writable sections need a keyframe to start; the others have one.
                let fresh: Vec<usize> = fresh.into_iter().map(|(n, _)| n).collect();
                self.request_keyframes_for(i, &fresh, now);
            }
        }
        self.renegotiate(i, now);
        Ok(())
    }

    /// A trickled client candidate. We are ICE-lite: the client's own checks reveal its
    /// address, so candidates are validated and dropped. Passing them to str0m would let a
    /// client grow our ICE state without bound, and mDNS (`*.local`) ones, which browsers
    /// send when they hide their addresses, cannot be used anyway.
    pub fn candidate(&mut self, member: &str, candidate: &str) -> Result<(), SfuError> {
        self.idx(member)?;
        let text = candidate.strip_prefix("a=").unwrap_or(candidate);
        let fields = text.split_whitespace().count();
        if !text.starts_with("candidate:") || fields < 8 || text.len() > 1024 {
            return Err(SfuError::BadCandidate(
                "expected \"candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type> …\"".into(),
            ));
        }
        Ok(())
    }

    /// Manual mode: subscribe `member` to these tracks of `publisher`. Returns false (the
    /// protocol's failure list) when the publisher is unknown, in another room, or has
    /// not published one of the tids.
    pub fn subscribe(
        &mut self,
        member: &str,
        publisher: &str,
        tids: &[String],
        now: Instant,
    ) -> bool {
        let (Ok(i), Ok(p)) = (self.idx(member), self.idx(publisher)) else {
            return false;
        };
        if i == p || self.member(i).room != self.member(p).room {
            return false;
        }
        let pm = self.member(p);
        let all_known = tids
            .iter()
            .all(|tid| pm.tracks.values().any(|t| t.active && &t.tid == tid));
        if !all_known {
            return false;
        }
        let pname = pm.name.clone();
        let m = self.member_mut(i);
        for tid in tids {
            m.manual.insert((pname.clone(), tid.clone()));
        }
        self.renegotiate(i, now);
        true
    }

    /// Manual mode: stop forwarding these tracks. Unknown ones are simply not forwarded.
    pub fn unsubscribe(
        &mut self,
        member: &str,
        publisher: &str,
        tids: &[String],
        now: Instant,
    ) -> bool {
        let Ok(i) = self.idx(member) else {
            return false;
        };
        let m = self.member_mut(i);
        for tid in tids {
            m.manual.remove(&(Arc::from(publisher), tid.clone()));
        }
        self.renegotiate(i, now);
        true
    }

    pub(crate) fn renegotiate_room(&mut self, room: &Name, now: Instant) {
        self.renegotiate_where(room, now, |_| true);
    }

    pub(crate) fn renegotiate_automatic(&mut self, room: &Name, now: Instant) {
        self.renegotiate_where(room, now, |m| {
            matches!(m.mode, SubscriptionMode::Automatic(_))
        });
    }

    fn renegotiate_where(&mut self, room: &Name, now: Instant, which: impl Fn(&Member) -> bool) {
        let members = self
            .rooms
            .get(room)
            .map(|r| r.members.clone())
            .unwrap_or_default();
        for i in members {
            if which(self.member(i)) {
                self.renegotiate(i, now);
            }
        }
    }

    /// Brings member `i`'s subscriber PC toward `desired`: one offer at a time.
    pub(crate) fn renegotiate(&mut self, i: usize, now: Instant) {
        let desired = self.desired(i);
        let layers: Vec<Option<Rid>> = desired
            .iter()
            .map(|(key, _, _)| self.best_layer(*key, now))
            .collect();
        let m = self.member_mut(i);
        // Layer preferences change without any SDP.
        for ((key, _, _), layer) in desired.iter().zip(&layers) {
            if let Some(slot) = m.slots.iter_mut().find(|s| s.track == Some(*key)) {
                slot.want_layer = *layer;
            }
        }
        let stale: Vec<usize> = m
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.track.is_some_and(|k| !desired.iter().any(|d| d.0 == k)))
            .map(|(n, _)| n)
            .collect();
        let missing: Vec<_> = desired
            .iter()
            .zip(layers)
            .filter(|((key, _, _), _)| !m.slots.iter().any(|s| s.track == Some(*key)))
            .collect();
        if stale.is_empty() && missing.is_empty() {
            return;
        }
        if !matches!(m.negotiation, Negotiation::Stable) {
            // Folded into the next offer, made when this one is answered.
            return;
        }
        self.ensure_peer(i, PeerKind::Subscriber, now);
        let m = self.member_mut(i);
        let Some(peer) = m.subscriber.as_mut() else {
            return;
        };
        let mut api = peer.rtc.sdp_api();
        for n in &stale {
            api.set_direction(m.slots[*n].mid, Direction::Inactive);
        }
        let mut added = Vec::new();
        let mut revived = Vec::new();
        for ((key, kind, tid), layer) in missing {
            let dormant = m
                .slots
                .iter()
                .position(|s| s.track.is_none() && s.last_track == Some(*key));
            if let Some(n) = dormant {
                api.set_direction(m.slots[n].mid, Direction::SendOnly);
                revived.push((n, *key, layer));
                continue;
            }
            // The stream id is what the SDK matches on: it must be the publisher's tid. The
            // track id must be unique in the session: a re-published tid (reconnect) gets a
            // new section next to its old inactive one, and Chrome refuses an offer whose
            // msid repeats.
            let track_id = format!("{tid}-{}", m.slots.len() + added.len());
            let mid = api.add_media(
                (*kind).into(),
                Direction::SendOnly,
                Some(tid.clone()),
                Some(track_id),
                None,
            );
            added.push(Slot {
                mid,
                kind: *kind,
                track: Some(*key),
                last_track: Some(*key),
                negotiated: false,
                layer: None,
                want_layer: layer,
                time_offset: 0,
                last_out: None,
                started: false,
            });
        }
        let Some((offer, pending)) = api.apply() else {
            return;
        };
        let mut unindexed = Vec::new();
        for n in stale {
            let slot = &mut m.slots[n];
            if let (Some(key), true) = (slot.track, slot.negotiated) {
                unindexed.push((key, n));
            }
            slot.track = None;
            slot.negotiated = false;
        }
        for (n, key, layer) in revived {
            let slot = &mut m.slots[n];
            slot.track = Some(key);
            slot.negotiated = false;
            slot.layer = None;
            slot.want_layer = layer;
            slot.time_offset = 0;
            slot.started = false;
        }
        m.slots.extend(added);
        m.negotiation = Negotiation::Offered(pending);
        let sdp = offer.to_sdp_string();
        let event = SfuEvent::SubOffer {
            room: m.room.clone(),
            member: m.name.clone(),
            sdp: sdp.clone(),
        };
        self.events.push_back(event);
        for (key, n) in unindexed {
            self.forwards.remove(key, (i, n));
        }
        self.note_ufrag(i, PeerKind::Subscriber, &sdp);
        self.drive(i, PeerKind::Subscriber, now);
    }
}
