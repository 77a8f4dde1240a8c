use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use spacegate_proto::{ConnectionId, ParticipantId, SpaceId};

use crate::{Registry, Reservation, ReserveError, ReserveMode, ReserveRequest};

#[derive(Debug)]
struct Entry {
    connection: ConnectionId,
    credential: String,
}

/// The single-node registry: one map behind one lock. The lock is held only for a map
/// operation, never across an await, so it is a plain mutex.
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    spaces: Mutex<HashMap<SpaceId, HashMap<ParticipantId, Entry>>>,
}

impl MemoryRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SpaceId, HashMap<ParticipantId, Entry>>> {
        // The map stays consistent even if a holder panicked: every update is one insert
        // or remove.
        self.spaces.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn reserve(&self, r: ReserveRequest<'_>) -> Result<Reservation, ReserveError> {
        let mut spaces = self.lock();
        let space = spaces.entry(r.space.clone()).or_default();
        let mut replaced = None;
        if let Some(existing) = space.get(r.participant) {
            // The credential is derived from the token (its hash, for anonymous ones):
            // compared in constant time.
            let same = aws_lc_rs::constant_time::verify_slices_are_equal(
                existing.credential.as_bytes(),
                r.credential.as_bytes(),
            )
            .is_ok();
            if r.mode == ReserveMode::Fresh || !same {
                return Err(ReserveError::AlreadyJoined);
            }
            replaced = Some(existing.connection.clone());
        } else if r.mode == ReserveMode::Resume {
            if space.is_empty() {
                spaces.remove(r.space);
            }
            return Err(ReserveError::NotHeld);
        } else if space.len() >= r.max_participants as usize {
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
        Ok(Reservation {
            replaced,
            participants: u32::try_from(space.len()).unwrap_or(u32::MAX),
        })
    }

    async fn release(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        connection: &ConnectionId,
    ) -> Result<bool, ReserveError> {
        let mut spaces = self.lock();
        let Some(members) = spaces.get_mut(space) else {
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
            spaces.remove(space);
        }
        Ok(true)
    }

    async fn participants(
        &self,
        space: &SpaceId,
    ) -> Result<Vec<(ParticipantId, ConnectionId)>, ReserveError> {
        Ok(self
            .lock()
            .get(space)
            .map(|m| {
                m.iter()
                    .map(|(p, e)| (p.clone(), e.connection.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }
}
