use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use spacegate_proto::{ConnectionId, ParticipantId, SpaceId};

use crate::{Registry, Reservation, ReserveError, ReserveMode, ReserveRequest, millis};

#[derive(Debug)]
struct Entry {
    connection: ConnectionId,
    credential: String,
}

#[derive(Debug)]
struct Departure {
    credential: String,
    /// The record is good while `now_ms < until_ms`.
    until_ms: u64,
}

/// Departure records are swept (expired ones dropped) no sooner than this many records.
const FIRST_SWEEP: usize = 1024;

#[derive(Debug)]
struct State {
    spaces: HashMap<SpaceId, HashMap<ParticipantId, Entry>>,
    departed: HashMap<(SpaceId, ParticipantId), Departure>,
    /// `departed` is swept when it reaches this size, which then becomes twice what the
    /// sweep left (at least [`FIRST_SWEEP`]): each sweep is paid for by as many inserts as
    /// it visits, so recording stays amortised O(1) even when every record is still live.
    sweep_at: usize,
}

impl Default for State {
    fn default() -> Self {
        Self {
            spaces: HashMap::new(),
            departed: HashMap::new(),
            sweep_at: FIRST_SWEEP,
        }
    }
}

/// The single-node registry: maps behind one lock. The lock is held only for a map
/// operation, never across an await, so it is a plain mutex.
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    state: Mutex<State>,
}

impl MemoryRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The maps stay consistent even if a holder panicked: every update is one insert
        // or remove per map.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many departure records are kept, expired ones not yet swept included.
    #[cfg(test)]
    fn departure_records(&self) -> usize {
        self.lock().departed.len()
    }
}

/// The credentials are derived from tokens (their hash, for anonymous ones): compared in
/// constant time.
fn same_credential(a: &str, b: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn reserve(&self, r: ReserveRequest<'_>) -> Result<Reservation, ReserveError> {
        let mut state = self.lock();
        let State {
            spaces, departed, ..
        } = &mut *state;
        let space = spaces.entry(r.space.clone()).or_default();
        let mut replaced = None;
        if let Some(existing) = space.get(r.participant) {
            if r.mode == ReserveMode::Fresh || !same_credential(&existing.credential, r.credential)
            {
                return Err(ReserveError::AlreadyJoined);
            }
            replaced = Some(existing.connection.clone());
        } else if r.mode == ReserveMode::Resume {
            if space.is_empty() {
                spaces.remove(r.space);
            }
            return Err(ReserveError::NotHeld);
        } else if space.len() >= r.max_participants as usize {
            if space.is_empty() {
                spaces.remove(r.space);
            }
            return Err(ReserveError::SpaceFull {
                max: r.max_participants,
            });
        }
        space.insert(
            r.participant.clone(),
            Entry {
                connection: r.connection.clone(),
                credential: r.credential.to_string(),
            },
        );
        let participants = u32::try_from(space.len()).unwrap_or(u32::MAX);
        if !departed.is_empty() {
            departed.remove(&(r.space.clone(), r.participant.clone()));
        }
        Ok(Reservation {
            replaced,
            participants,
        })
    }

    async fn release(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        connection: &ConnectionId,
    ) -> Result<bool, ReserveError> {
        let mut state = self.lock();
        let Some(members) = state.spaces.get_mut(space) else {
            return Ok(false);
        };
        if members
            .get(participant)
            .is_none_or(|e| &e.connection != connection)
        {
            return Ok(false);
        }
        members.remove(participant);
        if members.is_empty() {
            state.spaces.remove(space);
        }
        Ok(true)
    }

    async fn participants(
        &self,
        space: &SpaceId,
    ) -> Result<Vec<(ParticipantId, ConnectionId)>, ReserveError> {
        Ok(self
            .lock()
            .spaces
            .get(space)
            .map(|m| {
                m.iter()
                    .map(|(p, e)| (p.clone(), e.connection.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn holder(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
    ) -> Result<Option<ConnectionId>, ReserveError> {
        Ok(self
            .lock()
            .spaces
            .get(space)
            .and_then(|m| m.get(participant))
            .map(|e| e.connection.clone()))
    }

    async fn record_departure(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        credential: &str,
        grace: Duration,
        now_ms: u64,
    ) -> Result<(), ReserveError> {
        let mut state = self.lock();
        let key = (space.clone(), participant.clone());
        let grace_ms = millis(grace);
        if grace_ms == 0 {
            state.departed.remove(&key);
            return Ok(());
        }
        if state.departed.len() >= state.sweep_at {
            state.departed.retain(|_, d| now_ms < d.until_ms);
            state.sweep_at = (state.departed.len() * 2).max(FIRST_SWEEP);
        }
        state.departed.insert(
            key,
            Departure {
                credential: credential.to_string(),
                until_ms: now_ms.saturating_add(grace_ms),
            },
        );
        Ok(())
    }

    async fn departed_recently(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        credential: &str,
        now_ms: u64,
    ) -> Result<bool, ReserveError> {
        let state = self.lock();
        if state.departed.is_empty() {
            return Ok(false);
        }
        Ok(state
            .departed
            .get(&(space.clone(), participant.clone()))
            .is_some_and(|d| now_ms < d.until_ms && same_credential(&d.credential, credential)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> SpaceId {
        "s".parse().expect("space id")
    }

    fn pid(i: usize) -> ParticipantId {
        format!("p{i}").parse().expect("participant id")
    }

    #[tokio::test]
    async fn departures_expire_at_the_end_of_the_grace() {
        let r = MemoryRegistry::default();
        let grace = Duration::from_millis(100);
        r.record_departure(&space(), &pid(0), "c", grace, 1_000)
            .await
            .expect("record");
        assert!(
            r.departed_recently(&space(), &pid(0), "c", 1_000)
                .await
                .expect("q")
        );
        assert!(
            r.departed_recently(&space(), &pid(0), "c", 1_099)
                .await
                .expect("q")
        );
        assert!(
            !r.departed_recently(&space(), &pid(0), "c", 1_100)
                .await
                .expect("q")
        );
        // Near the end of time the deadline saturates instead of wrapping to the past.
        r.record_departure(&space(), &pid(1), "c", grace, u64::MAX - 1)
            .await
            .expect("record");
        assert!(
            r.departed_recently(&space(), &pid(1), "c", u64::MAX - 1)
                .await
                .expect("q")
        );
    }

    /// A stream of departures that each expire before the next ones keeps the map small,
    /// and a map of live records is swept once per doubling, not on every insert.
    #[tokio::test]
    async fn departure_records_do_not_grow_without_bound() {
        let r = MemoryRegistry::default();
        let grace = Duration::from_millis(10);
        for i in 0..20_000 {
            // One new participant every 10 ms: each record outlives the next one only.
            r.record_departure(&space(), &pid(i), "c", grace, i as u64 * 10)
                .await
                .expect("record");
            assert!(r.departure_records() <= FIRST_SWEEP, "at {i}");
        }
        // The latest is still there after the sweeps.
        assert!(
            r.departed_recently(&space(), &pid(19_999), "c", 199_990)
                .await
                .expect("q")
        );

        let live = MemoryRegistry::default();
        let long = Duration::from_secs(3600);
        for i in 0..5_000 {
            live.record_departure(&space(), &pid(i), "c", long, 0)
                .await
                .expect("record");
        }
        assert_eq!(live.departure_records(), 5_000, "live records are kept");
        assert_eq!(
            live.lock().sweep_at,
            8_192,
            "the next sweep waits for a doubling"
        );
    }
}
