//! Rows to records, once for every SQL backend: the columns and their types are the same in
//! SQLite and PostgreSQL (TEXT, 64-bit integers, bytes), so one decoder serves both.

use spacegate_proto::{AccessTokenId, EnvironmentId, KeyId, SessionId, SpaceId};
use sqlx::Row;

use crate::model::*;
use crate::{Result, StoreError};

pub(crate) const TOKEN_COLUMNS: &str = "t.id, t.name, t.permissions, t.secret_sha256, \
     t.created_at, e.id AS env_id, e.name AS env_name, e.created_at AS env_created_at";

pub(crate) const SPACE_COLUMNS: &str =
    "id, environment_id, passthrough, status, active_session_id, created_at";

pub(crate) fn corrupt<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> StoreError + '_ {
    move |e| StoreError::Corrupt(format!("{what}: {e}"))
}

/// Typed column access, the one thing the decoders below need from a backend's row. A
/// column that is missing or of another type means the schema is not ours: corrupt.
pub(crate) trait SqlRow {
    fn text(&self, name: &str) -> Result<String>;
    fn opt_text(&self, name: &str) -> Result<Option<String>>;
    fn int(&self, name: &str) -> Result<i64>;
    fn bytes(&self, name: &str) -> Result<Vec<u8>>;
}

macro_rules! sql_row {
    ($row:ty) => {
        impl SqlRow for $row {
            fn text(&self, name: &str) -> Result<String> {
                self.try_get(name).map_err(corrupt(name))
            }
            fn opt_text(&self, name: &str) -> Result<Option<String>> {
                self.try_get(name).map_err(corrupt(name))
            }
            fn int(&self, name: &str) -> Result<i64> {
                self.try_get(name).map_err(corrupt(name))
            }
            fn bytes(&self, name: &str) -> Result<Vec<u8>> {
                self.try_get(name).map_err(corrupt(name))
            }
        }
    };
}

sql_row!(sqlx::sqlite::SqliteRow);
sql_row!(sqlx::postgres::PgRow);

pub(crate) fn token_from_row(row: &impl SqlRow) -> Result<AccessTokenRecord> {
    let hash = row.bytes("secret_sha256")?;
    Ok(AccessTokenRecord {
        id: AccessTokenId::new(row.text("id")?).map_err(corrupt("token id"))?,
        environment: Environment {
            id: EnvironmentId::new(row.text("env_id")?).map_err(corrupt("environment id"))?,
            name: row.text("env_name")?,
            created_at: row.int("env_created_at")?,
        },
        name: row.opt_text("name")?,
        permissions: Permissions::parse(&row.text("permissions")?)
            .map_err(corrupt("permissions"))?,
        secret_sha256: hash
            .try_into()
            .map_err(|_| StoreError::Corrupt("secret hash is not 32 bytes".into()))?,
        created_at: row.int("created_at")?,
    })
}

pub(crate) fn key_from_row(row: &impl SqlRow) -> Result<SigningKeyRecord> {
    Ok(SigningKeyRecord {
        id: KeyId::new(row.text("id")?).map_err(corrupt("key id"))?,
        environment_id: EnvironmentId::new(row.text("environment_id")?)
            .map_err(corrupt("environment id"))?,
        public_key_der: row.bytes("public_key")?,
        created_at: row.int("created_at")?,
    })
}

pub(crate) fn space_from_row(row: &impl SqlRow) -> Result<SpaceRecord> {
    let status = match row.text("status")?.as_str() {
        "idle" => SpaceStatus::Idle,
        "active" => SpaceStatus::Active,
        other => return Err(StoreError::Corrupt(format!("space status {other:?}"))),
    };
    Ok(SpaceRecord {
        id: SpaceId::new(row.text("id")?).map_err(corrupt("space id"))?,
        environment_id: EnvironmentId::new(row.text("environment_id")?)
            .map_err(corrupt("environment id"))?,
        passthrough: row.opt_text("passthrough")?,
        status,
        active_session_id: row
            .opt_text("active_session_id")?
            .map(SessionId::new)
            .transpose()
            .map_err(corrupt("session id"))?,
        created_at: row.int("created_at")?,
    })
}
