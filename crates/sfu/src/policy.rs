//! Which tracks a subscriber should receive: what it asked for (manual mode), or the
//! tracks of the top N other publishers (automatic mode). Bounded by the room.

use crate::{Sfu, SubscriptionMode, TrackKey, TrackKind};

impl Sfu {
    /// The tracks `i` should receive now.
    pub(crate) fn desired(&self, i: usize) -> Vec<(TrackKey, TrackKind, String)> {
        let m = self.member(i);
        let Some(room) = self.rooms.get(&m.room) else {
            return Vec::new();
        };
        let tracks_of = |p: usize| {
            let pm = self.member(p);
            let mut v: Vec<_> = pm
                .tracks
                .iter()
                .filter(|(_, t)| t.active)
                .map(|(mid, t)| ((p, pm.joined_seq, *mid), t.kind, t.tid.clone()))
                .collect();
            v.sort_by(|a, b| a.2.cmp(&b.2));
            v
        };
        match m.mode {
            SubscriptionMode::Manual => {
                if m.manual.is_empty() {
                    return Vec::new();
                }
                room.members
                    .iter()
                    .filter(|p| **p != i)
                    .flat_map(|p| tracks_of(*p))
                    .filter(|(key, _, tid)| {
                        m.manual
                            .contains(&(self.member(key.0).name.clone(), tid.clone()))
                    })
                    .collect()
            }
            SubscriptionMode::Automatic(n) => {
                let speaking: Vec<usize> = room.speakers.iter().map(|(p, _)| *p).collect();
                let mut candidates: Vec<usize> = room
                    .members
                    .iter()
                    .copied()
                    .filter(|p| *p != i && self.member(*p).has_active_tracks())
                    .collect();
                // Current speakers (loudest first), then recent speakers, then members
                // with unmuted tracks, then whoever joined first.
                candidates.sort_by_key(|p| {
                    let pm = self.member(*p);
                    let speak_rank = speaking.iter().position(|s| s == p).unwrap_or(usize::MAX);
                    let recent = std::cmp::Reverse(pm.last_spoke);
                    let muted = !pm.tracks.values().any(|t| t.active && !t.muted);
                    (speak_rank, recent, muted, pm.joined_seq)
                });
                candidates
                    .into_iter()
                    .take(usize::from(n))
                    .flat_map(tracks_of)
                    .collect()
            }
        }
    }
}
