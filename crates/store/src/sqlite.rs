use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use spacegate_proto::{AccessTokenId, EnvironmentId, KeyId, SessionId, SpaceId};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::model::*;
use crate::rows::{key_from_row, space_from_row, token_from_row};

/// idle → active with a session id; a no-op for a space already active (or missing).
const MARK_ACTIVE: &str =
    "UPDATE spaces SET status = 'active', active_session_id = ? WHERE id = ? AND status = 'idle'";
/// active → idle; a no-op for a space already idle (or missing).
const MARK_IDLE: &str = "UPDATE spaces SET status = 'idle', active_session_id = NULL WHERE id = ? AND status = 'active'";
/// [`MARK_ACTIVE`] for many spaces at once: the parameter is a JSON object of space id →
/// session id.
const MARK_ACTIVE_MANY: &str = "UPDATE spaces SET status = 'active', active_session_id = j.value \
     FROM json_each(?) AS j WHERE j.key = spaces.id AND spaces.status = 'idle'";
const MARK_ALL_IDLE: &str =
    "UPDATE spaces SET status = 'idle', active_session_id = NULL WHERE status = 'active'";
/// [`MARK_IDLE`] for many spaces at once: the parameter is a JSON array of space ids.
const MARK_IDLE_MANY: &str = "UPDATE spaces SET status = 'idle', active_session_id = NULL \
     WHERE status = 'active' AND id IN (SELECT value FROM json_each(?))";
use crate::rows::{SPACE_COLUMNS, SqlRow, TOKEN_COLUMNS, corrupt};
use crate::{Result, Store, StoreError};

/// Schema migrations, applied in order inside one transaction each. Append only: a shipped
/// step is never edited, so every database walks the same path.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE environments (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE access_tokens (
    id             TEXT PRIMARY KEY,
    environment_id TEXT NOT NULL REFERENCES environments(id),
    name           TEXT,
    permissions    TEXT NOT NULL,
    secret_sha256  BLOB NOT NULL,
    created_at     INTEGER NOT NULL
);
CREATE TABLE signing_keys (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL UNIQUE,
    environment_id TEXT NOT NULL REFERENCES environments(id),
    public_key     BLOB NOT NULL,
    created_at     INTEGER NOT NULL
);
CREATE INDEX signing_keys_by_env ON signing_keys(environment_id, seq);
CREATE TABLE spaces (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    environment_id    TEXT NOT NULL REFERENCES environments(id),
    passthrough       TEXT,
    status            TEXT NOT NULL CHECK (status IN ('idle', 'active')),
    active_session_id TEXT,
    created_at        INTEGER NOT NULL
);
CREATE INDEX spaces_by_env ON spaces(environment_id, seq);
"#];

/// The embedded default store: one SQLite file in the data directory.
///
/// Durability: WAL with `synchronous=FULL`, so every acknowledged write has been fsynced and
/// survives `kill -9` or a power cut.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn backend(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            return StoreError::Conflict(db.message().to_string());
        }
        sqlx::Error::Database(db) => {
            // SQLite's (extended) result code; the primary code is its low byte.
            let primary = db
                .code()
                .and_then(|c| c.parse::<i64>().ok())
                .map(|c| c & 0xff);
            match primary {
                // SQLITE_FULL: the disk, or `max_page_count`.
                Some(13) => return StoreError::Full(db.message().to_string()),
                // SQLITE_READONLY.
                Some(8) => return StoreError::ReadOnly(db.message().to_string()),
                // SQLITE_BUSY, SQLITE_LOCKED: another connection holds the database.
                Some(5 | 6) => return StoreError::Unavailable(db.message().to_string()),
                _ => {}
            }
        }
        sqlx::Error::PoolTimedOut => return StoreError::Unavailable(e.to_string()),
        _ => {}
    }
    StoreError::Backend(e.to_string())
}

/// How the embedded store is opened.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// How long a statement waits for another connection's lock (the CLI may write while
    /// the server runs) before failing as unavailable.
    pub busy_timeout: Duration,
    /// Largest the database may grow, in bytes; beyond, writes fail as on a full disk.
    pub max_bytes: Option<u64>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(10),
            max_bytes: None,
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `spacegate.db` in `dir` and brings its schema up to date.
    pub async fn open_dir(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Backend(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        Self::open_file(&dir.join("spacegate.db")).await
    }

    pub async fn open_file(path: &Path) -> Result<Self> {
        Self::open_file_with(path, &SqliteOptions::default()).await
    }

    /// [`SqliteStore::open_dir`] with options.
    pub async fn open_dir_with(dir: &Path, o: &SqliteOptions) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Backend(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        Self::open_file_with(&dir.join("spacegate.db"), o).await
    }

    pub async fn open_file_with(path: &Path, o: &SqliteOptions) -> Result<Self> {
        let mut options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(backend)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            // Writers queue on SQLite's lock instead of failing: the CLI may write while
            // the server runs.
            .busy_timeout(o.busy_timeout);
        if let Some(max) = o.max_bytes {
            // Pages of SQLite's default 4 KiB; writes beyond fail as a full disk would.
            options = options.pragma("max_page_count", (max / 4096).max(1).to_string());
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(backend)?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(backend)?;
        let current = usize::try_from(current.unwrap_or(0)).unwrap_or(0);
        if current > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "database schema version {current} is newer than this spacegate ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(current) {
            sqlx::raw_sql(step)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            sqlx::query("INSERT INTO schema_version (version) VALUES (?)")
                .bind(i as i64 + 1)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)
    }
}

#[async_trait]
impl Store for SqliteStore {
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
        sqlx::query("INSERT INTO environments (id, name, created_at) VALUES (?, ?, ?) ON CONFLICT(name) DO NOTHING")
            .bind(new_id.as_str())
            .bind(name)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        let row = sqlx::query("SELECT id, name, created_at FROM environments WHERE name = ?")
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
        sqlx::query("INSERT INTO access_tokens (id, environment_id, name, permissions, secret_sha256, created_at) VALUES (?, ?, ?, ?, ?, ?)")
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
            "SELECT {TOKEN_COLUMNS} FROM access_tokens t JOIN environments e ON e.id = t.environment_id WHERE t.id = ?"
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
            "SELECT {TOKEN_COLUMNS} FROM access_tokens t JOIN environments e ON e.id = t.environment_id ORDER BY t.created_at, t.id"
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
        let done = sqlx::query("DELETE FROM access_tokens WHERE id = ?")
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() > 0)
    }

    async fn insert_signing_key(&self, k: &SigningKeyRecord) -> Result<()> {
        sqlx::query("INSERT INTO signing_keys (id, environment_id, public_key, created_at) VALUES (?, ?, ?, ?)")
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
        sqlx::query("SELECT id, environment_id, public_key, created_at FROM signing_keys WHERE id = ? AND environment_id = ?")
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
            "SELECT id, environment_id, public_key, created_at FROM signing_keys WHERE id = ?",
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
        sqlx::query("SELECT id, environment_id, public_key, created_at FROM signing_keys WHERE environment_id = ? ORDER BY seq LIMIT ? OFFSET ?")
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
        let done = sqlx::query("DELETE FROM signing_keys WHERE id = ? AND environment_id = ?")
            .bind(id.as_str())
            .bind(env.as_str())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() > 0)
    }

    async fn insert_space(&self, s: &SpaceRecord) -> Result<()> {
        sqlx::query("INSERT INTO spaces (id, environment_id, passthrough, status, active_session_id, created_at) VALUES (?, ?, ?, ?, ?, ?)")
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
        let sql = format!("SELECT {SPACE_COLUMNS} FROM spaces WHERE id = ? AND environment_id = ?");
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
        let sql = format!("SELECT {SPACE_COLUMNS} FROM spaces WHERE id = ?");
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
            "SELECT {SPACE_COLUMNS} FROM spaces WHERE environment_id = ? ORDER BY seq LIMIT ? OFFSET ?"
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
        let done = sqlx::query(
            "DELETE FROM spaces WHERE id = ? AND environment_id = ? AND status = 'idle'",
        )
        .bind(id.as_str())
        .bind(env.as_str())
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        if done.rows_affected() > 0 {
            return Ok(DeleteSpaceOutcome::Deleted);
        }
        // Nothing deleted: tell "not there" from "busy" for the caller's error message.
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

    async fn record_space_activity(&self, changes: &[(SpaceId, Option<SessionId>)]) -> Result<()> {
        // One transaction of two set-based statements, whatever the batch size: with
        // `synchronous=FULL` every commit is an fsync, and each statement is a round trip
        // to sqlx's worker thread (a wakeup and a context switch), so one statement per
        // space cost a join storm over small spaces ~10 % of its CPU.
        let (idle, active) = crate::fold_activity(changes);
        let idle: Vec<serde_json::Value> = idle.into_iter().map(serde_json::Value::from).collect();
        let active: serde_json::Map<String, serde_json::Value> = active
            .into_iter()
            .map(|(id, s)| (id.to_owned(), s.into()))
            .collect();
        let mut tx = self.pool.begin().await.map_err(backend)?;
        // Idle first: a space that went idle and active again gets its new session.
        let statements = [
            (
                MARK_IDLE_MANY,
                !idle.is_empty(),
                serde_json::Value::Array(idle),
            ),
            (
                MARK_ACTIVE_MANY,
                !active.is_empty(),
                serde_json::Value::Object(active),
            ),
        ];
        for (sql, any, spaces) in statements {
            if any {
                sqlx::query(sql)
                    .bind(spaces.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(backend)?;
            }
        }
        tx.commit().await.map_err(backend)
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
        let rows = sqlx::query("SELECT id, active_session_id FROM spaces WHERE status = 'active' AND id > ? ORDER BY id LIMIT ?")
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
        let done = sqlx::query("UPDATE spaces SET status = 'idle', active_session_id = NULL WHERE id = ? AND status = 'active' AND active_session_id IS ?")
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
}
