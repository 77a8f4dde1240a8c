//! The publisher peer connection: the client offers, we answer. What a section carries is
//! what the client announced with `pending_track`; whether it is published follows the
//! section's direction in each offer (the SDK never says "unpublish" in words).

use std::collections::HashMap;
use std::time::Instant;

use str0m::change::SdpOffer;
use str0m::media::{Direction, MediaKind, Mid, Rid};

use crate::{PeerKind, PubTrack, Sfu, SfuError, SfuEvent, TrackKind, speakers};

impl Sfu {
    /// Records `pending_track`: the section `mid` of the member's next offer is `tid`.
    pub fn pending_track(
        &mut self,
        member: &str,
        mid: &str,
        tid: &str,
        kind: TrackKind,
        muted: bool,
    ) {
        let Ok(i) = self.idx(member) else { return };
        let m = self.member_mut(i);
        let mid = Mid::from(mid);
        // A tid re-announced on another mid (reconnect re-publish) moves there.
        m.announced.retain(|_, (t, _, _)| t != tid);
        m.announced.insert(mid, (tid.to_string(), kind, muted));
    }

    /// Mute state of a published track: automatic mode prefers unmuted publishers.
    pub fn set_muted(&mut self, member: &str, tid: &str, muted: bool, now: Instant) {
        let Ok(i) = self.idx(member) else { return };
        let m = self.member_mut(i);
        for (t, _, pending_muted) in m.announced.values_mut() {
            if t == tid {
                *pending_muted = muted;
            }
        }
        let mut changed = false;
        for t in m.tracks.values_mut().filter(|t| t.tid == tid) {
            changed |= t.muted != muted;
            t.muted = muted;
        }
        if changed {
            let room = m.room.clone();
            self.renegotiate_automatic(&room, now);
        }
    }

    /// The publisher's offer; returns our answer. Tracks whose sections became receiving
    /// are published, sections no longer sending are unpublished, and the room's
    /// subscribers are renegotiated.
    pub fn offer(&mut self, member: &str, sdp: &str, now: Instant) -> Result<String, SfuError> {
        let i = self.idx(member)?;
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| SfuError::BadSdp(e.to_string()))?;
        self.ensure_peer(i, PeerKind::Publisher, now);
        let m = self.member_mut(i);
        let Some(peer) = m.publisher.as_mut() else {
            return Err(SfuError::NoPeer);
        };
        let answer = peer
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| SfuError::Rejected(e.to_string()))?;
        // Which announced sections now receive media.
        let mut published = Vec::new();
        let mut unpublished = Vec::new();
        let mut stopped = Vec::new();
        let announced: Vec<(Mid, String, TrackKind, bool)> = m
            .announced
            .iter()
            .map(|(mid, (tid, k, muted))| (*mid, tid.clone(), *k, *muted))
            .collect();
        for (mid, tid, kind, muted) in announced {
            let Some(media) = peer.rtc.media(mid) else {
                continue;
            };
            let receiving = matches!(media.direction(), Direction::RecvOnly | Direction::SendRecv)
                && MediaKind::from(kind) == media.kind();
            let rids: Vec<Rid> = match media.rids_rx() {
                str0m::media::Rids::Specific(r) => r.clone(),
                _ => Vec::new(),
            };
            let entry = m.tracks.entry(mid).or_insert_with(|| PubTrack {
                tid: tid.clone(),
                kind,
                active: false,
                muted: false,
                rids: Vec::new(),
                live_rids: HashMap::new(),
                last_keyframe_request: HashMap::new(),
                level: speakers::Level::new(now),
            });
            entry.rids = rids;
            if receiving && (!entry.active || entry.tid != tid) {
                if entry.active {
                    unpublished.push(entry.tid.clone());
                }
                entry.tid = tid.clone();
                entry.active = true;
                entry.muted = muted;
                published.push(tid);
            } else if !receiving && entry.active {
                entry.active = false;
                unpublished.push(entry.tid.clone());
                // Publishing again takes a new `pending_track`, as the SDK always sends
                // (it never reuses a transceiver); a bare re-activation stays unforwarded.
                stopped.push(mid);
            }
        }
        for mid in stopped {
            m.announced.remove(&mid);
        }
        // Sections the client did not announce stay unforwarded (the reference: answer
        // the offer, leave the section alone).
        let room = m.room.clone();
        let name = m.name.clone();
        let changed = !published.is_empty() || !unpublished.is_empty();
        for tid in unpublished {
            self.events.push_back(SfuEvent::TrackUnpublished {
                room: room.clone(),
                member: name.clone(),
                tid,
            });
        }
        for tid in published {
            self.events.push_back(SfuEvent::TrackPublished {
                room: room.clone(),
                member: name.clone(),
                tid,
            });
        }
        let answer = answer.to_sdp_string();
        self.note_ufrag(i, PeerKind::Publisher, &answer);
        self.drive(i, PeerKind::Publisher, now);
        if changed {
            self.renegotiate_room(&room, now);
        }
        Ok(answer)
    }
}
