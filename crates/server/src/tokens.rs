//! Access tokens: the (id, secret) pairs of HTTP Basic auth. Shared by the first-start
//! bootstrap, the `tokens` CLI and the request authenticator.

use aws_lc_rs::digest::{SHA256, digest};
use spacegate_proto::AccessTokenId;
use spacegate_store::{AccessTokenRecord, Permissions, Store, StoreError};

use crate::ids;

/// A token as handed to its owner: the only moment its secret exists outside their hands.
#[derive(Debug, serde::Serialize)]
pub struct IssuedToken {
    pub id: AccessTokenId,
    pub secret: Secret,
    pub environment: String,
    pub permissions: Vec<&'static str>,
}

/// A secret that does not print in `Debug` output, so it cannot leak through a log line.
#[derive(Clone, serde::Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

pub fn hash_secret(secret: &str) -> [u8; 32] {
    let d = digest(&SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Compares in time independent of where the inputs differ (aws-lc's comparison: a
/// hand-written fold is one optimiser pass away from an early exit).
pub fn secret_matches(secret: &str, stored: &[u8; 32]) -> bool {
    constant_time_eq(&hash_secret(secret), stored)
}

/// Equality of two secret-derived values in time independent of their contents.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// Creates a token in `environment` (created if new).
pub async fn create(
    store: &dyn Store,
    environment: &str,
    permissions: Permissions,
    name: Option<String>,
    now: i64,
) -> Result<IssuedToken, StoreError> {
    let env = store
        .ensure_environment(&ids::new_id(), environment, now)
        .await?;
    // 64 base62 characters: ~381 bits, far beyond guessing.
    let secret = ids::random_base62(64);
    let record = AccessTokenRecord {
        id: ids::new_id(),
        environment: env,
        name,
        permissions,
        secret_sha256: hash_secret(&secret),
        created_at: now,
    };
    store.insert_access_token(&record).await?;
    Ok(IssuedToken {
        id: record.id,
        secret: Secret(secret),
        environment: record.environment.name,
        permissions: permissions.names(),
    })
}

/// On a store with no access token at all, creates a read+write one in `environment` so a
/// fresh install is usable at once. Returns it so the caller can print it, once.
pub async fn bootstrap(
    store: &dyn Store,
    environment: &str,
    now: i64,
) -> Result<Option<IssuedToken>, StoreError> {
    if !store.list_access_tokens().await?.is_empty() {
        return Ok(None);
    }
    create(
        store,
        environment,
        Permissions::READ_WRITE,
        Some("bootstrap".into()),
        now,
    )
    .await
    .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_matching_is_exact() {
        let stored = hash_secret("s3cret");
        assert!(secret_matches("s3cret", &stored));
        assert!(!secret_matches("s3cres", &stored));
        assert!(!secret_matches("", &stored));
        assert_eq!(
            format!("{:?}", Secret("s3cret".into())),
            "Secret(<redacted>)"
        );
    }
}
