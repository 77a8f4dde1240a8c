//! Driving str0m peer connections, and the timer set that wakes only the due ones.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

use crate::{PeerKind, Sfu, SfuEvent};

#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) rtc: Rtc,
    pub(crate) connected: bool,
    /// When str0m wants `handle_timeout`; mirrored in [`Timers`].
    pub(crate) timeout: Instant,
    /// Flood guard: tokens left and when they were last refilled.
    pub(crate) tokens: f64,
    pub(crate) refilled: Instant,
}

/// Every peer's next deadline, soonest first. A scan of every peer per wakeup made an
/// idle node's loop cost grow with its population; this keeps both the next-deadline
/// query and an update O(log n).
#[derive(Debug, Default)]
pub(crate) struct Timers(BTreeSet<(Instant, usize, PeerKind)>);

impl Timers {
    fn moved(&mut self, i: usize, kind: PeerKind, from: Instant, to: Instant) {
        self.0.remove(&(from, i, kind));
        self.0.insert((to, i, kind));
    }

    pub(crate) fn remove(&mut self, i: usize, kind: PeerKind, at: Instant) {
        self.0.remove(&(at, i, kind));
    }

    fn next(&self) -> Option<Instant> {
        self.0.first().map(|(t, _, _)| *t)
    }

    /// Takes every entry due at `now`. Entries a peer re-arms while these are handled go
    /// back into the set and wait for the next call, so one call always ends.
    fn take_due(&mut self, now: Instant) -> Vec<(usize, PeerKind)> {
        let mut due = Vec::new();
        while let Some(&(t, i, kind)) = self.0.first() {
            if t > now {
                break;
            }
            self.0.pop_first();
            due.push((i, kind));
        }
        due
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

impl Sfu {
    /// Member `i`'s peer of `kind`, created (ICE-lite, our one host candidate) if missing.
    pub(crate) fn ensure_peer(&mut self, i: usize, kind: PeerKind, now: Instant) {
        let config: &RtcConfig = &self.rtc_config;
        let candidate = self.config.candidate;
        let packets = f64::from(self.config.packets_per_second);
        let Some(Some(m)) = self.members.get_mut(i) else {
            return;
        };
        let slot = match kind {
            PeerKind::Publisher => &mut m.publisher,
            PeerKind::Subscriber => &mut m.subscriber,
        };
        if slot.is_none() {
            *slot = Some(Box::new(new_peer(config.clone(), candidate, packets, now)));
            self.timers.0.insert((now, i, kind));
            self.with_peers.insert(i);
            self.peers += 1;
        }
    }

    /// Closes and forgets member `i`'s peers (the member is leaving). A graceful close
    /// sends RTCP BYE and DTLS close_notify, so a client that is still there (an evicted
    /// ghost) learns at once instead of timing out.
    pub(crate) fn close_peers(&mut self, i: usize) {
        let Some(Some(m)) = self.members.get_mut(i) else {
            return;
        };
        for (kind, peer) in [
            (PeerKind::Publisher, m.publisher.take()),
            (PeerKind::Subscriber, m.subscriber.take()),
        ] {
            let Some(mut peer) = peer else { continue };
            self.peers -= 1;
            self.timers.remove(i, kind, peer.timeout);
            if peer.rtc.close().is_ok() {
                for _ in 0..64 {
                    match peer.rtc.poll_output() {
                        Ok(Output::Transmit(t)) => self.transmits.push_back(t),
                        Ok(Output::Event(_)) => {}
                        Ok(Output::Timeout(_)) | Err(_) => break,
                    }
                }
            }
            peer.rtc.disconnect();
        }
        self.with_peers.remove(&i);
    }

    /// When [`Sfu::handle_timeout`] must be called next. Without any peer connection the
    /// answer is an hour away: an idle node does not wake up.
    pub fn poll_timeout(&self) -> Instant {
        let ticks = (!self.with_peers.is_empty()).then_some(self.next_speaker_tick);
        match (self.timers.next(), ticks) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => self.next_speaker_tick + Duration::from_secs(3600),
        }
    }

    /// Advances every peer whose timer is due, and the speaker and layer pass.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.stats.timer_wakeups += 1;
        for (i, kind) in self.timers.take_due(now) {
            let Some(Some(m)) = self.members.get_mut(i) else {
                continue;
            };
            let Some(p) = m.peer_mut(kind) else { continue };
            let _ = p.rtc.handle_input(Input::Timeout(now));
            self.drive(i, kind, now);
        }
        if !self.with_peers.is_empty() && now >= self.next_speaker_tick {
            self.next_speaker_tick = now + self.config.speaker_interval;
            self.update_speakers(now);
            self.update_layers(now);
        }
    }

    /// Drains one peer's output: datagrams queued, events acted on, until it only has a
    /// timeout left.
    pub(crate) fn drive(&mut self, i: usize, kind: PeerKind, now: Instant) {
        loop {
            let Some(Some(m)) = self.members.get_mut(i) else {
                return;
            };
            let (room, name) = (&m.room, &m.name);
            let peer = match kind {
                PeerKind::Publisher => m.publisher.as_mut(),
                PeerKind::Subscriber => m.subscriber.as_mut(),
            };
            let Some(peer) = peer else { return };
            let out = match peer.rtc.poll_output() {
                Ok(o) => o,
                Err(e) => {
                    tracing::debug!(error = %e, "peer connection failed");
                    peer.rtc.disconnect();
                    peer.connected = false;
                    let parked = now + Duration::from_secs(3600);
                    let old = std::mem::replace(&mut peer.timeout, parked);
                    self.timers.moved(i, kind, old, parked);
                    self.events.push_back(SfuEvent::PeerFailed {
                        room: room.clone(),
                        member: name.clone(),
                    });
                    return;
                }
            };
            match out {
                Output::Timeout(t) => {
                    let old = std::mem::replace(&mut peer.timeout, t);
                    self.timers.moved(i, kind, old, t);
                    return;
                }
                Output::Transmit(t) => self.transmits.push_back(t),
                Output::Event(e) => self.on_event(i, kind, e, now),
            }
        }
    }

    fn on_event(&mut self, i: usize, kind: PeerKind, e: Event, now: Instant) {
        match (kind, e) {
            (_, Event::Connected) => {
                if let Some(p) = self.members[i].as_mut().and_then(|m| m.peer_mut(kind)) {
                    p.connected = true;
                }
                if kind == PeerKind::Subscriber {
                    // Late joiners see nothing until the next keyframe: ask now.
                    let all: Vec<usize> = (0..self.member(i).slots.len()).collect();
                    self.request_keyframes_for(i, &all, now);
                }
            }
            (PeerKind::Publisher, Event::MediaData(data)) => self.forward(i, data, now),
            (PeerKind::Subscriber, Event::KeyframeRequest(req)) => {
                self.relay_keyframe_request(i, req, now)
            }
            _ => {}
        }
    }
}

pub(crate) fn new_peer(
    config: RtcConfig,
    candidate: SocketAddr,
    packets: f64,
    now: Instant,
) -> Peer {
    let mut rtc = config.build(now);
    if let Ok(c) = Candidate::host(candidate, "udp") {
        rtc.add_local_candidate(c);
    }
    Peer {
        rtc,
        connected: false,
        timeout: now,
        tokens: packets * 2.0,
        refilled: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_hand_out_only_what_is_due_in_deadline_order() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut t = Timers::default();
        t.0.insert((ms(30), 1, PeerKind::Publisher));
        t.0.insert((ms(10), 2, PeerKind::Subscriber));
        t.0.insert((ms(20), 3, PeerKind::Publisher));
        assert_eq!(t.next(), Some(ms(10)));
        assert_eq!(
            t.take_due(ms(20)),
            vec![(2, PeerKind::Subscriber), (3, PeerKind::Publisher)]
        );
        assert_eq!(t.next(), Some(ms(30)));
        // Re-arming moves the one entry; it never duplicates it.
        t.moved(1, PeerKind::Publisher, ms(30), ms(40));
        assert_eq!(t.len(), 1);
        assert!(t.take_due(ms(39)).is_empty());
        t.remove(1, PeerKind::Publisher, ms(40));
        assert_eq!(t.next(), None);
    }
}
