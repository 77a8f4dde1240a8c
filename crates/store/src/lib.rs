//! Persistent state of the control plane: environments, access tokens, signing keys, spaces.
//!
//! Owns: the [`Store`] trait, its record types, the embedded SQLite backend (the default,
//! no services needed) and the conformance suite every backend must pass. Refuses: reading
//! clocks and making ids (callers pass `created_at` and fresh ids in), holding secrets (only
//! hashes of access-token secrets and public halves of signing keys are ever stored), and
//! any HTTP or JWT knowledge.

#[cfg(feature = "conformance")]
pub mod conformance;
mod model;
mod postgres;
mod rows;
mod sqlite;

pub use model::{
    AccessTokenRecord, DeleteSpaceOutcome, Environment, Page, Permissions, SigningKeyRecord,
    SpaceRecord, SpaceStatus,
};
pub use postgres::{PostgresOptions, PostgresStore};
pub use sqlite::{SqliteOptions, SqliteStore};

use async_trait::async_trait;
use spacegate_proto::{AccessTokenId, EnvironmentId, KeyId, SessionId, SpaceId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique id or name is already taken.
    #[error("already exists: {0}")]
    Conflict(String),
    /// Stored data that no longer parses (a row written by a newer version, a hand edit).
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The disk (or the database's size cap) is full: retrying will fail the same way
    /// until an operator frees space.
    #[error("storage is full: {0}")]
    Full(String),
    /// The database is read-only (file permissions, a read-only mount, a replica).
    #[error("storage is read-only: {0}")]
    ReadOnly(String),
    /// Busy or unreachable for now (locked, timed out): retrying may succeed.
    #[error("storage is unavailable: {0}")]
    Unavailable(String),
    #[error("storage backend failed: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Every backend (SQLite now, PostgreSQL in cluster mode) implements this, and passes
/// [`conformance::run_all`]. Methods taking an `EnvironmentId` see only that environment:
/// a record of another environment is reported exactly like a missing one.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Cheap round trip to the backend, for `/readyz`.
    async fn ping(&self) -> Result<()>;

    /// Returns the environment called `name`, creating it with `new_id` if there is none.
    async fn ensure_environment(
        &self,
        new_id: &EnvironmentId,
        name: &str,
        now: i64,
    ) -> Result<Environment>;

    async fn insert_access_token(&self, token: &AccessTokenRecord) -> Result<()>;
    async fn access_token(&self, id: &AccessTokenId) -> Result<Option<AccessTokenRecord>>;
    async fn list_access_tokens(&self) -> Result<Vec<AccessTokenRecord>>;
    /// Deletes the token; `false` if there was none.
    async fn revoke_access_token(&self, id: &AccessTokenId) -> Result<bool>;

    async fn insert_signing_key(&self, key: &SigningKeyRecord) -> Result<()>;
    async fn signing_key(
        &self,
        env: &EnvironmentId,
        id: &KeyId,
    ) -> Result<Option<SigningKeyRecord>>;
    /// The join path's lookup: a token names only its `kid`, and the record says which
    /// environment the key belongs to.
    async fn signing_key_any_environment(&self, id: &KeyId) -> Result<Option<SigningKeyRecord>>;
    async fn list_signing_keys(
        &self,
        env: &EnvironmentId,
        page: Page,
    ) -> Result<Vec<SigningKeyRecord>>;
    async fn delete_signing_key(&self, env: &EnvironmentId, id: &KeyId) -> Result<bool>;

    async fn insert_space(&self, space: &SpaceRecord) -> Result<()>;
    async fn space(&self, env: &EnvironmentId, id: &SpaceId) -> Result<Option<SpaceRecord>>;
    async fn space_any_environment(&self, id: &SpaceId) -> Result<Option<SpaceRecord>>;
    async fn list_spaces(&self, env: &EnvironmentId, page: Page) -> Result<Vec<SpaceRecord>>;
    /// Deletes an idle space. The idle check and the delete are one statement, so a join
    /// that activates the space concurrently can never lose its space underneath it.
    async fn delete_space(&self, env: &EnvironmentId, id: &SpaceId) -> Result<DeleteSpaceOutcome>;

    /// The join path's hook: idle → active with a fresh session id. Returns `false` (and
    /// changes nothing) if the space is missing or already active.
    async fn mark_space_active(&self, id: &SpaceId, session: &SessionId) -> Result<bool>;
    /// active → idle, clearing the session id. `false` if missing or already idle.
    async fn mark_space_idle(&self, id: &SpaceId) -> Result<bool>;
    /// Every active space → idle; how many were active. A single node calls it on start:
    /// after a crash (`kill -9`, power loss) nobody is connected, whatever the store says.
    async fn mark_all_spaces_idle(&self) -> Result<u64>;

    /// Active spaces with their session, in id order after `after`, at most `limit`: for
    /// a cluster's sweep of spaces whose home node died.
    async fn active_spaces(
        &self,
        after: Option<&SpaceId>,
        limit: u32,
    ) -> Result<Vec<(SpaceId, Option<SessionId>)>>;

    /// active → idle only if the space is still in `session` (a compare-and-set): a sweep
    /// that saw a space active in an old session never ends a newer one. `false` if the
    /// space is missing, idle, or in another session.
    async fn end_space_session(&self, id: &SpaceId, session: Option<&SessionId>) -> Result<bool>;

    /// Many transitions at once, each exactly as `mark_space_active` (`Some(session)`) or
    /// `mark_space_idle` (`None`) would apply it, in order. A backend with transactions
    /// applies them in one, so a burst of joins and leaves costs one durable commit, not
    /// one per space. The default applies them one by one.
    async fn record_space_activity(&self, changes: &[(SpaceId, Option<SessionId>)]) -> Result<()> {
        for (id, session) in changes {
            match session {
                Some(session) => self.mark_space_active(id, session).await?,
                None => self.mark_space_idle(id).await?,
            };
        }
        Ok(())
    }
}

/// A batch of space transitions folded per space, for backends that apply it as two
/// set-based statements (idle first, then active): the spaces that go idle, and the
/// session each space that ends up active gets. The changes apply in order, so a space
/// that goes idle and active again in one batch gets its new session, and a later
/// `Active` of a space already active changes nothing (the first session wins).
pub(crate) fn fold_activity(
    changes: &[(SpaceId, Option<SessionId>)],
) -> (Vec<&str>, Vec<(&str, &str)>) {
    let mut last: std::collections::HashMap<&str, (bool, Option<&SessionId>)> =
        std::collections::HashMap::new();
    for (id, session) in changes {
        let (idles, first_active) = last.entry(id.as_str()).or_default();
        match session {
            None => {
                *idles = true;
                *first_active = None;
            }
            Some(s) => {
                first_active.get_or_insert(s);
            }
        }
    }
    let mut idle = Vec::new();
    let mut active = Vec::new();
    for (id, (idles, first_active)) in last {
        if idles {
            idle.push(id);
        }
        if let Some(s) = first_active {
            active.push((id, s.as_str()));
        }
    }
    (idle, active)
}
