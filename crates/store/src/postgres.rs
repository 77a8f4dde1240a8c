//! The cluster's store: PostgreSQL, shared by every node.
//!
//! The schema lives in `migrations/postgres/` as sqlx migrations, embedded in the binary
//! and applied on start under PostgreSQL's advisory lock, so nodes starting together queue
//! for it and each migration runs once.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use spacegate_proto::{AccessTokenId, EnvironmentId, KeyId, SessionId, SpaceId};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::model::*;
use crate::rows::{SPACE_COLUMNS, SqlRow, TOKEN_COLUMNS, corrupt};
use crate::rows::{key_from_row, space_from_row, token_from_row};
use crate::{Result, Store, StoreError};

/// Versioned migrations, in order. Append only: sqlx keeps each one's checksum and refuses
/// to start on a database whose applied migration was edited afterwards.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "initial",
    include_str!("../migrations/postgres/0001_initial.sql"),
)];

fn migrator() -> Migrator {
    let migrations: Vec<Migration> = MIGRATIONS
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                Cow::Borrowed(description),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect();
    Migrator {
        migrations: Cow::Owned(migrations),
        ignore_missing: false,
        // pg_advisory_lock around the whole run: two nodes starting at once do not both
        // migrate.
        locking: true,
        no_tx: false,
    }
}

const MARK_ACTIVE: &str = "UPDATE spaces SET status = 'active', active_session_id = $1 \
     WHERE id = $2 AND status = 'idle'";
const MARK_IDLE: &str = "UPDATE spaces SET status = 'idle', active_session_id = NULL \
     WHERE id = $1 AND status = 'active'";
/// [`MARK_ACTIVE`] for many spaces: two parallel arrays, space ids and their sessions.
const MARK_ACTIVE_MANY: &str = "UPDATE spaces SET status = 'active', active_session_id = v.s \
     FROM unnest($1::text[], $2::text[]) AS v(id, s) \
     WHERE spaces.id = v.id AND spaces.status = 'idle'";
const MARK_IDLE_MANY: &str = "UPDATE spaces SET status = 'idle', active_session_id = NULL \
     WHERE status = 'active' AND id = ANY($1::text[])";
const MARK_ALL_IDLE: &str =
    "UPDATE spaces SET status = 'idle', active_session_id = NULL WHERE status = 'active'";

/// How the PostgreSQL store connects.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Connections per node.
    pub max_connections: u32,
    /// How long a request waits for a connection (PostgreSQL down or saturated) before it
    /// fails as unavailable: REST answers a retryable 503 instead of hanging.
    pub acquire_timeout: Duration,
    /// Longest a statement may run on the server.
    pub statement_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(10),
        }
    }
}

/// The store on PostgreSQL: every node of a cluster shares it.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

fn backend(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            return StoreError::Conflict(db.message().to_string());
        }
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match &*code {
                // disk_full, and out_of_memory/insufficient_resources are not "full".
                "53100" => return StoreError::Full(db.message().to_string()),
                // read_only_sql_transaction: a hot standby, or default_transaction_read_only.
                "25006" => return StoreError::ReadOnly(db.message().to_string()),
                // too_many_connections, admin_shutdown, crash_shutdown, cannot_connect_now,
                // query_canceled (our statement timeout), and class 08 (connection
                // exceptions): retrying later may succeed.
                "53300" | "57P01" | "57P02" | "57P03" | "57014" => {
                    return StoreError::Unavailable(db.message().to_string());
                }
                c if c.starts_with("08") => {
                    return StoreError::Unavailable(db.message().to_string());
                }
                _ => {}
            }
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            return StoreError::Unavailable(e.to_string());
        }
        _ => {}
    }
    StoreError::Backend(e.to_string())
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db`) and brings the schema up to date.
    pub async fn connect(url: &str, o: &PostgresOptions) -> Result<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Backend(format!("bad database URL: {}", redact(&e))))?
            .options([(
                "statement_timeout",
                format!("{}", o.statement_timeout.as_millis()),
            )]);
        let pool = PgPoolOptions::new()
            .max_connections(o.max_connections)
            .acquire_timeout(o.acquire_timeout)
            // Connections are made on use and remade after PostgreSQL restarts; the
            // migration below is the first use, so a node does not start without it.
            .connect_lazy_with(options);
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        migrator().run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => backend(e),
            sqlx::migrate::MigrateError::VersionMissing(v) => StoreError::Corrupt(format!(
                "database schema has migration {v}, which this spacegate does not know (a newer version ran on it)"
            )),
            other => StoreError::Corrupt(format!("migration: {other}")),
        })
    }
}

/// sqlx's URL errors may quote the URL, password included.
fn redact(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::Configuration(_) => "not a postgres:// URL sqlx understands",
        _ => "unparseable",
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn ensure_environment(
        &self,
        new_id: &EnvironmentId,
        name: &str,
        now: i64,
    ) -> Result<Environment> {
        sqlx::query(
            "INSERT INTO environments (id, name, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(new_id.as_str())
        .bind(name)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        let row = sqlx::query("SELECT id, name, created_at FROM environments WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        Ok(Environment {
            id: EnvironmentId::new(row.text("id")?).map_err(corrupt("environment id"))?,
            name: row.text("name")?,
            created_at: row.int("created_at")?,
        })
    }

    async fn insert_access_token(&self, t: &AccessTokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO access_tokens (id, environment_id, name, permissions, secret_sha256, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(t.id.as_str())
        .bind(t.environment.id.as_str())
        .bind(t.name.as_deref())
        .bind(t.permissions.to_string())
        .bind(&t.secret_sha256[..])
        .bind(t.created_at)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn access_token(&self, id: &AccessTokenId) -> Result<Option<AccessTokenRecord>> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM access_tokens t JOIN environments e \
             ON e.id = t.environment_id WHERE t.id = $1"
        );
        sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?
            .as_ref()
            .map(token_from_row)
            .transpose()
    }

    async fn list_access_tokens(&self) -> Result<Vec<AccessTokenRecord>> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM access_tokens t JOIN environments e \
             ON e.id = t.environment_id ORDER BY t.created_at, t.id"
        );
        sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?
            .iter()
            .map(token_from_row)
            .collect()
    }

    async fn revoke_access_token(&self, id: &AccessTokenId) -> Result<bool> {
        let done = sqlx::query("DELETE FROM access_tokens WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() > 0)
    }

    async fn insert_signing_key(&self, k: &SigningKeyRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO signing_keys (id, environment_id, public_key, created_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(k.id.as_str())
        .bind(k.environment_id.as_str())
        .bind(&k.public_key_der)
        .bind(k.created_at)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn signing_key(
        &self,
        env: &EnvironmentId,
        id: &KeyId,
    ) -> Result<Option<SigningKeyRecord>> {
        sqlx::query(
            "SELECT id, environment_id, public_key, created_at FROM signing_keys \
             WHERE id = $1 AND environment_id = $2",
        )
        .bind(id.as_str())
        .bind(env.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?
        .as_ref()
        .map(key_from_row)
        .transpose()
    }

    async fn signing_key_any_environment(&self, id: &KeyId) -> Result<Option<SigningKeyRecord>> {
        sqlx::query(
            "SELECT id, environment_id, public_key, created_at FROM signing_keys WHERE id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?
        .as_ref()
        .map(key_from_row)
        .transpose()
    }

    async fn list_signing_keys(
        &self,
        env: &EnvironmentId,
        page: Page,
    ) -> Result<Vec<SigningKeyRecord>> {
        sqlx::query(
            "SELECT id, environment_id, public_key, created_at FROM signing_keys \
             WHERE environment_id = $1 ORDER BY seq LIMIT $2 OFFSET $3",
        )
        .bind(env.as_str())
        .bind(i64::from(page.limit))
        .bind(page.offset())
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?
        .iter()
        .map(key_from_row)
        .collect()
    }

    async fn delete_signing_key(&self, env: &EnvironmentId, id: &KeyId) -> Result<bool> {
        let done = sqlx::query("DELETE FROM signing_keys WHERE id = $1 AND environment_id = $2")
            .bind(id.as_str())
            .bind(env.as_str())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() > 0)
    }

    async fn insert_space(&self, s: &SpaceRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO spaces (id, environment_id, passthrough, status, active_session_id, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(s.id.as_str())
        .bind(s.environment_id.as_str())
        .bind(s.passthrough.as_deref())
        .bind(s.status.as_str())
        .bind(s.active_session_id.as_ref().map(|x| x.as_str()))
        .bind(s.created_at)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn space(&self, env: &EnvironmentId, id: &SpaceId) -> Result<Option<SpaceRecord>> {
        let sql =
            format!("SELECT {SPACE_COLUMNS} FROM spaces WHERE id = $1 AND environment_id = $2");
        sqlx::query(&sql)
            .bind(id.as_str())
            .bind(env.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?
            .as_ref()
            .map(space_from_row)
            .transpose()
    }

    async fn space_any_environment(&self, id: &SpaceId) -> Result<Option<SpaceRecord>> {
        let sql = format!("SELECT {SPACE_COLUMNS} FROM spaces WHERE id = $1");
        sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?
            .as_ref()
            .map(space_from_row)
            .transpose()
    }

    async fn list_spaces(&self, env: &EnvironmentId, page: Page) -> Result<Vec<SpaceRecord>> {
        let sql = format!(
            "SELECT {SPACE_COLUMNS} FROM spaces WHERE environment_id = $1 ORDER BY seq \
             LIMIT $2 OFFSET $3"
        );
        sqlx::query(&sql)
            .bind(env.as_str())
            .bind(i64::from(page.limit))
            .bind(page.offset())
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?
            .iter()
            .map(space_from_row)
            .collect()
    }

    async fn delete_space(&self, env: &EnvironmentId, id: &SpaceId) -> Result<DeleteSpaceOutcome> {
        // One statement decides: a concurrent activation either lands first (nothing is
        // deleted) or after (it finds no space).
        let done = sqlx::query(
            "DELETE FROM spaces WHERE id = $1 AND environment_id = $2 AND status = 'idle'",
        )
        .bind(id.as_str())
        .bind(env.as_str())
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        if done.rows_affected() > 0 {
            return Ok(DeleteSpaceOutcome::Deleted);
        }
        Ok(match self.space(env, id).await? {
            Some(_) => DeleteSpaceOutcome::Active,
            None => DeleteSpaceOutcome::NotFound,
        })
    }

    async fn mark_space_active(&self, id: &SpaceId, session: &SessionId) -> Result<bool> {
        let done = sqlx::query(MARK_ACTIVE)
            .bind(session.as_str())
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() > 0)
    }

    async fn mark_space_idle(&self, id: &SpaceId) -> Result<bool> {
        let done = sqlx::query(MARK_IDLE)
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() > 0)
    }

    async fn active_spaces(
        &self,
        after: Option<&SpaceId>,
        limit: u32,
    ) -> Result<Vec<(SpaceId, Option<SessionId>)>> {
        let rows = sqlx::query("SELECT id, active_session_id FROM spaces WHERE status = 'active' AND id > $1 ORDER BY id LIMIT $2")
            .bind(after.map_or("", |a| a.as_str()))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|row| {
                Ok((
                    SpaceId::new(row.text("id")?).map_err(corrupt("space id"))?,
                    row.opt_text("active_session_id")?
                        .map(SessionId::new)
                        .transpose()
                        .map_err(corrupt("session id"))?,
                ))
            })
            .collect()
    }

    async fn end_space_session(&self, id: &SpaceId, session: Option<&SessionId>) -> Result<bool> {
        let done = sqlx::query("UPDATE spaces SET status = 'idle', active_session_id = NULL WHERE id = $1 AND status = 'active' AND active_session_id IS NOT DISTINCT FROM $2")
            .bind(id.as_str())
            .bind(session.map(|s| s.as_str()))
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() > 0)
    }

    async fn mark_all_spaces_idle(&self) -> Result<u64> {
        let done = sqlx::query(MARK_ALL_IDLE)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected())
    }

    async fn record_space_activity(&self, changes: &[(SpaceId, Option<SessionId>)]) -> Result<()> {
        // One transaction, two set-based statements whatever the batch size: one round trip
        // and one commit per batch instead of one per space.
        let (idle, active) = crate::fold_activity(changes);
        let (ids, sessions): (Vec<&str>, Vec<&str>) = active.into_iter().unzip();
        let mut tx = self.pool.begin().await.map_err(backend)?;
        if !idle.is_empty() {
            sqlx::query(MARK_IDLE_MANY)
                .bind(&idle)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        if !ids.is_empty() {
            sqlx::query(MARK_ACTIVE_MANY)
                .bind(&ids)
                .bind(&sessions)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)
    }
}
