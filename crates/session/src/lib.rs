//! Session registry of the join gateway: who is connected to which space, and who left
//! recently enough to come back on an expired token.
//!
//! Owns: the backend-neutral [`Registry`] trait, whose one operation that matters,
//! [`Registry::reserve`], checks and inserts a participant in a single atomic step; the
//! in-memory implementation (single node); the Redis implementation (cluster mode, cargo
//! feature `redis`); and the conformance suite every backend must pass (cargo feature
//! `conformance`, for tests only). Refuses: JWTs, and reading a clock for its answers:
//! departure times are passed in, or left to Redis' key expiry (the Redis backend's timers
//! only bound its waits and pace its lease renewals). Ids are passed in.

#[cfg(feature = "conformance")]
pub mod conformance;
mod memory;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
pub use self::redis::{LeaseRenewal, RedisRegistry};
pub use memory::MemoryRegistry;

use std::time::Duration;

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
    ///
    /// A successful reserve also clears the participant's departure record (see
    /// [`Registry::record_departure`]): the participant is back, and its next departure
    /// writes a new one. While it is connected, the registered entry (same credential) is
    /// what lets it reconnect.
    async fn reserve(&self, request: ReserveRequest<'_>) -> Result<Reservation, ReserveError>;

    /// Removes the participant if, and only if, `connection` still holds it: a late release
    /// of a replaced connection must not evict its successor. Returns whether it did.
    async fn release(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        connection: &ConnectionId,
    ) -> Result<bool, ReserveError>;

    /// The participants connected to `space`, with their connections, in no particular
    /// order.
    async fn participants(
        &self,
        space: &SpaceId,
    ) -> Result<Vec<(ParticipantId, ConnectionId)>, ReserveError>;

    /// Whether the backend answers, for readiness checks. In memory it always does.
    async fn ping(&self) -> Result<(), ReserveError> {
        Ok(())
    }

    /// The connection that holds `participant` in `space`, if any: the point query of
    /// "is this participant here", without fetching the whole space.
    async fn holder(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
    ) -> Result<Option<ConnectionId>, ReserveError>;

    /// Remembers that `participant` left `space` holding `credential`, for `grace` from
    /// `now_ms` (milliseconds on the caller's clock; a backend with a clock of its own, such
    /// as Redis' key expiry, may ignore it). It replaces any earlier record of that
    /// participant, whatever its credential: only the latest departure counts. A zero (or
    /// sub-millisecond) `grace` records nothing and forgets the earlier record.
    ///
    /// The records live in the registry, not in one node's memory, so that a reconnect
    /// that lands on another node (after the first one crashed) is recognised.
    async fn record_departure(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        credential: &str,
        grace: Duration,
        now_ms: u64,
    ) -> Result<(), ReserveError>;

    /// Whether `participant` left `space` less than its grace ago (as of `now_ms`, on the
    /// clock `record_departure` was given) holding this very `credential` (compared in
    /// constant time, or as digests), and has not been reserved again since.
    async fn departed_recently(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        credential: &str,
        now_ms: u64,
    ) -> Result<bool, ReserveError>;
}

/// Milliseconds of `d`, saturating; what the backends keep departure graces in.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Where a space's signaling state and media peers live in a cluster: exactly one node at
/// a time, its *home*.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Home {
    /// This node, which held the claim already.
    Here,
    /// This node, which has just claimed it: the space had no live home (it was empty, or
    /// its home node died). Whatever another node last wrote about the space (its status,
    /// its session) is from a session that is over.
    Claimed,
    /// Another live node, reached for relaying at `url` (its internal URL; empty while
    /// that node has not advertised one yet).
    There { node: String, url: String },
}

/// The cluster's claims on space homes. A claim belongs to its node's lease like a
/// registry entry: a node that dies (or cannot renew) loses every home it held, and the
/// next join re-homes the space.
#[async_trait]
pub trait SpaceHomes: Send + Sync + std::fmt::Debug + 'static {
    /// The space's home, atomically claimed for this node if it has none (or its home
    /// node is dead).
    async fn claim_home(&self, space: &SpaceId) -> Result<Home, ReserveError>;

    /// Which of `spaces` have a live home (in order): the others are hosted nowhere, so
    /// nobody is connected to them, whatever a store says.
    async fn live_homes(&self, spaces: &[SpaceId]) -> Result<Vec<bool>, ReserveError>;

    /// Gives up this node's claim on the space's home (its last participant left); a
    /// claim of another node is left alone. Whether there was one to give up.
    async fn release_home(&self, space: &SpaceId) -> Result<bool, ReserveError>;
}
