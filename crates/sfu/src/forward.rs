//! Forwarding: the index from a published track to the subscriber sections that carry it,
//! the per-frame write into each subscriber's peer, and simulcast layer choice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::media::{KeyframeRequestKind, MediaData, MediaTime, Rid};

use crate::{PeerKind, Sfu, TrackKey, TrackKind};

/// A layer that sent nothing for this long is no longer offered to subscribers.
const LAYER_FRESH: Duration = Duration::from_millis(1500);

/// Track → (subscriber, slot index) for every negotiated section. Updated one track at a
/// time as sections are negotiated or stopped (a whole-node rebuild per change made every
/// join and leave cost the node's population). Lists are shared, so the per-frame path
/// takes a reference count, not a copy, and a list stays valid if forwarding re-enters (a
/// keyframe request drains the publisher).
#[derive(Debug, Default)]
pub(crate) struct Index {
    by_track: HashMap<TrackKey, Arc<[(usize, usize)]>>,
    entries: usize,
}

impl Index {
    pub(crate) fn add(&mut self, key: TrackKey, target: (usize, usize)) {
        let mut list: Vec<_> = self
            .by_track
            .get(&key)
            .map(|l| l.to_vec())
            .unwrap_or_default();
        if !list.contains(&target) {
            list.push(target);
            self.entries += 1;
        }
        self.by_track.insert(key, list.into());
    }

    pub(crate) fn remove(&mut self, key: TrackKey, target: (usize, usize)) {
        let Some(list) = self.by_track.get(&key) else {
            return;
        };
        let kept: Vec<_> = list.iter().copied().filter(|t| *t != target).collect();
        self.entries -= list.len() - kept.len();
        if kept.is_empty() {
            self.by_track.remove(&key);
        } else {
            self.by_track.insert(key, kept.into());
        }
    }

    /// Drops a track and every section that carried it (its publisher left).
    pub(crate) fn remove_track(&mut self, key: TrackKey) {
        if let Some(list) = self.by_track.remove(&key) {
            self.entries -= list.len();
        }
    }

    fn get(&self, key: &TrackKey) -> Option<Arc<[(usize, usize)]>> {
        self.by_track.get(key).cloned()
    }

    pub(crate) fn len(&self) -> usize {
        self.entries
    }
}

impl Sfu {
    /// One received frame from a publisher, written to every subscriber of its track.
    pub(crate) fn forward(&mut self, p: usize, data: MediaData, now: Instant) {
        let key = (p, self.member(p).joined_seq, data.mid);
        let (kind, keyframe) = {
            let pm = self.member_mut(p);
            let Some(track) = pm.tracks.get_mut(&data.mid) else {
                return;
            };
            if !track.active {
                return;
            }
            if let Some(level) = data.ext_vals.audio_level {
                track.level.sample(level, now);
            }
            if let Some(rid) = data.rid {
                track.live_rids.insert(rid, now);
            }
            (track.kind, is_keyframe(&data))
        };
        if !data.contiguous && kind == TrackKind::Video {
            // Loss the publisher's stream could not repair: everyone downstream needs a
            // fresh keyframe to decode again.
            self.request_keyframe(key, data.rid, KeyframeRequestKind::Fir, now);
        }
        let Some(targets) = self.forwards.get(&key) else {
            return;
        };
        for &(s, slot_i) in targets.iter() {
            let Some(Some(sm)) = self.members.get_mut(s) else {
                continue;
            };
            if !sm.subscriber.as_ref().is_some_and(|p| p.connected) {
                // Nothing is sent before DTLS is up, so a keyframe must not be spent on
                // a layer switch that nobody sees.
                continue;
            }
            let Some(slot) = sm.slots.get_mut(slot_i) else {
                continue;
            };
            if data.rid.is_some() || slot.layer.is_some() || slot.want_layer.is_some() {
                // Simulcast: switch to the wanted layer only at one of its keyframes.
                if slot.want_layer != slot.layer && data.rid == slot.want_layer && keyframe {
                    let incoming = data.time.numer() as i64;
                    let next = slot
                        .last_out
                        .map(|(t, at)| {
                            let gap = now.saturating_duration_since(at).as_micros() as i64;
                            t as i64 + (gap * i64::from(data.time.denom()) / 1_000_000).max(1)
                        })
                        .unwrap_or(incoming);
                    slot.time_offset = next - incoming;
                    slot.layer = slot.want_layer;
                }
                if data.rid != slot.layer {
                    continue;
                }
            }
            let Some(peer) = sm.subscriber.as_mut() else {
                continue;
            };
            let out_time = (data.time.numer() as i64 + slot.time_offset).max(0) as u64;
            let Some(writer) = peer.rtc.writer(slot.mid) else {
                continue;
            };
            let Some(pt) = writer.match_params(data.params) else {
                continue;
            };
            let mut w = writer;
            if let Some(level) = data.ext_vals.audio_level {
                w = w.audio_level(level, data.ext_vals.voice_activity.unwrap_or(false));
            }
            let time = MediaTime::new(out_time, data.time.frequency());
            // Our clock, not the frame's arrival time: str0m orders a section's pending
            // writes by it, and a frame the publisher repaired by retransmission arrives
            // with an older network time than frames already written.
            if w.write(pt, now, time, data.data.clone()).is_ok() {
                slot.last_out = Some((out_time, now));
                slot.started |= keyframe || kind == TrackKind::Audio;
                self.stats.forwarded_frames += 1;
                self.stats.forwarded_bytes += data.data.len() as u64;
            }
            self.drive(s, PeerKind::Subscriber, now);
        }
    }

    /// The simulcast layer to forward of `track`: the highest one that sent media lately,
    /// so a publisher that drops a layer (congestion, CPU) keeps its viewers on another.
    pub(crate) fn best_layer(&self, (p, generation, mid): TrackKey, now: Instant) -> Option<Rid> {
        let pm = self.members.get(p)?.as_ref()?;
        if pm.joined_seq != generation {
            return None;
        }
        let t = pm.tracks.get(&mid)?;
        let fresh = |r: &Rid| {
            t.live_rids
                .get(r)
                .is_some_and(|at| now.saturating_duration_since(*at) < LAYER_FRESH)
        };
        t.rids
            .iter()
            .rev()
            .find(|r| fresh(r))
            .or(t.rids.last())
            .copied()
    }

    /// Re-evaluates which simulcast layer each subscriber should get, and keeps asking
    /// for a keyframe (within the throttle) for every video slot that waits for one: a
    /// pending layer switch, or a section that has not forwarded anything yet. A single
    /// request can be lost or refused; video that never starts is worse than a few PLIs.
    /// Visits only members with peer connections.
    pub(crate) fn update_layers(&mut self, now: Instant) {
        let subscribers: Vec<usize> = self
            .with_peers
            .iter()
            .copied()
            .filter(|i| {
                self.members[*i]
                    .as_ref()
                    .is_some_and(|m| !m.slots.is_empty())
            })
            .collect();
        for i in subscribers {
            let wants: Vec<(usize, Option<Rid>)> = self
                .member(i)
                .slots
                .iter()
                .enumerate()
                .filter_map(|(n, s)| Some((n, self.best_layer(s.track?, now))))
                .collect();
            let connected = self
                .member(i)
                .subscriber
                .as_ref()
                .is_some_and(|p| p.connected);
            let mut ask = Vec::new();
            let m = self.member_mut(i);
            for (n, want) in wants {
                let slot = &mut m.slots[n];
                slot.want_layer = want;
                let waiting = slot.layer != slot.want_layer || !slot.started;
                if let (Some(track), true, true, TrackKind::Video) =
                    (slot.track, slot.negotiated && connected, waiting, slot.kind)
                {
                    ask.push((track, want));
                }
            }
            for (track, rid) in ask {
                self.request_keyframe(track, rid, KeyframeRequestKind::Pli, now);
            }
        }
    }
}

fn is_keyframe(data: &MediaData) -> bool {
    use str0m::format::CodecExtra;
    match data.codec_extra {
        CodecExtra::Vp8(e) => e.is_keyframe,
        CodecExtra::H264(e) => e.is_keyframe,
        CodecExtra::Vp9(e) => e.is_keyframe,
        CodecExtra::Av1(e) => e.is_keyframe,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::media::Mid;

    #[test]
    fn the_index_tracks_each_section_once_and_counts_entries() {
        let a: TrackKey = (0, 0, Mid::from("0"));
        let b: TrackKey = (1, 1, Mid::from("0"));
        let mut ix = Index::default();
        ix.add(a, (5, 0));
        ix.add(a, (5, 0));
        ix.add(a, (6, 2));
        ix.add(b, (5, 1));
        assert_eq!(ix.len(), 3);
        assert_eq!(ix.get(&a).as_deref(), Some(&[(5, 0), (6, 2)][..]));
        // A list handed out stays valid while the index changes under it.
        let held = ix.get(&a).expect("listed");
        ix.remove(a, (5, 0));
        assert_eq!(held.len(), 2);
        assert_eq!(ix.get(&a).as_deref(), Some(&[(6, 2)][..]));
        ix.remove(a, (9, 9));
        assert_eq!(ix.len(), 2);
        ix.remove_track(b);
        ix.remove(a, (6, 2));
        assert_eq!(ix.len(), 0);
        assert!(ix.get(&a).is_none());
    }
}
