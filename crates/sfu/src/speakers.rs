//! Active-speaker detection from RFC 6464 audio levels, without decoding audio.
//!
//! Each audio packet carries the sender's level in -dBov (0 loudest, 127 silence). A track's
//! loudness is smoothed per packet so one loud packet (a cough, a click) does not make a
//! speaker; a track that stops sending fades out after `silence_after`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::{Name, Sfu, SfuEvent, TrackKind};

/// Below this smoothed level (in -dBov) a track is speaking. Conversational speech sits
/// around -20 to -40 dBov; background noise of a muted-but-enabled mic is below -60.
pub const SPEAKING_DBOV: f32 = 50.0;

/// Weight of a new sample in the moving average: at 50 packets/s a speaker is detected
/// within about 100 ms and released within about 300 ms of going quiet.
const ALPHA: f32 = 0.15;

#[derive(Debug, Clone, Copy)]
pub struct Level {
    /// Smoothed loudness in -dBov (0 loudest, 127 silence).
    dbov: f32,
    last_heard: Instant,
}

impl Level {
    pub fn new(now: Instant) -> Self {
        Level {
            dbov: 127.0,
            last_heard: now,
        }
    }

    /// One packet's level (`-dBov`, the magnitude is what counts: str0m reports it negated).
    pub fn sample(&mut self, level: i8, now: Instant) {
        let dbov = f32::from(level.unsigned_abs().min(127));
        self.dbov += ALPHA * (dbov - self.dbov);
        self.last_heard = now;
    }

    /// The smoothed level if the track is speaking now, louder is smaller.
    pub fn speaking(&self, now: Instant, silence_after: Duration) -> Option<f32> {
        let fresh = now.saturating_duration_since(self.last_heard) <= silence_after;
        (fresh && self.dbov < SPEAKING_DBOV).then_some(self.dbov)
    }
}

/// Ranks `(key, level)` speakers loudest first and keeps at most `max`.
pub fn rank<K: Clone>(mut speaking: Vec<(K, f32)>, max: usize) -> Vec<K> {
    speaking.sort_by(|a, b| a.1.total_cmp(&b.1));
    speaking.into_iter().take(max).map(|(k, _)| k).collect()
}

/// A track that sent no audio for this long is not speaking.
const SILENCE_AFTER: Duration = Duration::from_millis(600);

impl Sfu {
    /// Re-evaluates speakers in every room that has media (or had speakers to clear);
    /// emits changes and re-ranks automatic mode. Rooms of signaling-only members are not
    /// visited.
    pub(crate) fn update_speakers(&mut self, now: Instant) {
        let rooms: BTreeSet<Name> = self
            .with_peers
            .iter()
            .filter_map(|i| self.members.get(*i)?.as_ref())
            .map(|m| m.room.clone())
            .collect();
        for room in rooms {
            let Some(r) = self.rooms.get(&room) else {
                continue;
            };
            let mut speaking = Vec::new();
            for &i in &r.members {
                let m = self.member(i);
                for (mid, t) in &m.tracks {
                    if t.active && t.kind == TrackKind::Audio {
                        if let Some(level) = t.level.speaking(now, SILENCE_AFTER) {
                            speaking.push(((i, *mid), level));
                        }
                    }
                }
            }
            let ranked = rank(speaking, self.config.max_speakers);
            for (i, _) in &ranked {
                self.member_mut(*i).last_spoke = Some(now);
            }
            let r = self.rooms.get_mut(&room).expect("room listed above");
            if r.speakers != ranked {
                let leader_changed = r.speakers.first() != ranked.first();
                r.speakers = ranked;
                self.emit_speakers(&room);
                if leader_changed {
                    self.renegotiate_automatic(&room, now);
                }
            }
        }
    }

    pub(crate) fn emit_speakers(&mut self, room: &Name) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let speakers = r
            .speakers
            .iter()
            .filter_map(|(i, mid)| {
                let m = self.members.get(*i)?.as_ref()?;
                Some((m.name.clone(), m.tracks.get(mid)?.tid.clone()))
            })
            .collect();
        self.events.push_back(SfuEvent::ActiveSpeakers {
            room: room.clone(),
            speakers,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_loud_packet_is_not_speech_but_a_sustained_one_is() {
        let t0 = Instant::now();
        let mut l = Level::new(t0);
        l.sample(-10, t0);
        assert!(l.speaking(t0, Duration::from_secs(1)).is_none());
        for i in 0..10 {
            l.sample(-10, t0 + Duration::from_millis(20 * i));
        }
        assert!(l.speaking(t0, Duration::from_secs(1)).is_some());
    }

    #[test]
    fn silence_and_stopping_both_end_speech() {
        let t0 = Instant::now();
        let mut l = Level::new(t0);
        for _ in 0..20 {
            l.sample(-10, t0);
        }
        assert!(l.speaking(t0, Duration::from_secs(1)).is_some());
        assert!(
            l.speaking(t0 + Duration::from_secs(2), Duration::from_secs(1))
                .is_none()
        );
        for _ in 0..30 {
            l.sample(-127, t0);
        }
        assert!(l.speaking(t0, Duration::from_secs(1)).is_none());
    }

    #[test]
    fn rank_puts_the_loudest_first_and_caps() {
        let r = rank(vec![("a", 40.0), ("b", 10.0), ("c", 30.0)], 2);
        assert_eq!(r, vec!["b", "c"]);
    }
}
