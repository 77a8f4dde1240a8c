//! Session registry of the join gateway: who is connected to which space.
//!
//! Owns: the backend-neutral [`Registry`] trait, whose one operation that matters,
//! [`Registry::reserve`], checks and inserts a participant in a single atomic step; the
//! in-memory implementation (single node); and the conformance suite the Redis
//! implementation (cluster mode) must pass too. Refuses: sockets, clocks, JWTs. Ids are
//! passed in.

pub mod conformance;
mod memory;

pub use memory::MemoryRegistry;

use async_trait::async_trait;
use spacegate_proto::{ConnectionId, ParticipantId, SpaceId};

/// How a join claims its participant id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveMode {
    /// A first connect: refused if the participant is already connected.
    Fresh,
    /// The SDK's reconnect (`reconnect_id`): if the participant's old connection is still
    /// registered (the server has not noticed the drop yet), it is replaced, provided the
    /// newcomer holds the same credential. If the participant is absent it is simply
    /// joined: use this only when the credential itself names the participant, or this
    /// credential held it moments ago.
    Reconnect,
    /// Take over the participant's registered connection, provided the newcomer holds the
    /// same credential; refused with [`ReserveError::NotHeld`] if the participant is not
    /// registered at all. For a credential that does not name the participant (an
    /// anonymous token's `reconnect_id`): claiming an absent id would let any token take
    /// any identity.
    Resume,
}

#[derive(Debug, Clone)]
pub struct ReserveRequest<'a> {
    pub space: &'a SpaceId,
    pub participant: &'a ParticipantId,
    pub connection: &'a ConnectionId,
    /// What proves the right to take over this participant on reconnect. For an id named in
    /// the token, any valid token naming it will do; for a server-generated id, only the
    /// very token that created it (the SDK reconnects with the same token).
    pub credential: &'a str,
    pub mode: ReserveMode,
    /// Most participants the space may hold, this one included.
    pub max_participants: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The stale connection this reservation replaced (reconnect only). The caller must
    /// close it.
    pub replaced: Option<ConnectionId>,
    /// Participants in the space after this reservation, this one included.
    pub participants: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    #[error("participant is already connected to this space")]
    AlreadyJoined,
    #[error("participant is not connected to this space")]
    NotHeld,
    #[error("the space is full ({max} participants)")]
    SpaceFull { max: u32 },
    #[error("registry backend failed: {0}")]
    Backend(String),
}

#[async_trait]
pub trait Registry: Send + Sync + std::fmt::Debug + 'static {
    /// Atomically: refuse if the participant is connected (unless reconnecting with the
    /// same credential) or the space is full; otherwise record `connection` for it.
    async fn reserve(&self, request: ReserveRequest<'_>) -> Result<Reservation, ReserveError>;

    /// Removes the participant if, and only if, `connection` still holds it: a late release
    /// of a replaced connection must not evict its successor. Returns whether it did.
    async fn release(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        connection: &ConnectionId,
    ) -> Result<bool, ReserveError>;

    /// The participants connected to `space`, with their connections.
    async fn participants(
        &self,
        space: &SpaceId,
    ) -> Result<Vec<(ParticipantId, ConnectionId)>, ReserveError>;
}
