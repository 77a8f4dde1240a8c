//! The authentication half of a join: token → verified claims, checked against the store.
//! The WebSocket gateway calls this before any connection state exists.

use spacegate_auth::{AuthError, JoinClaims, VerifyOptions};
use spacegate_proto::EnvironmentId;
use spacegate_store::Store;

use crate::keys::{KeyCache, KeyLookupError};

#[derive(Debug, thiserror::Error)]
pub enum JoinAuthError {
    #[error(transparent)]
    Token(#[from] AuthError),
    /// The store failed: not the client's fault, and retrying may help.
    #[error("key lookup failed: {0}")]
    Internal(#[from] KeyLookupError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmittedToken {
    pub claims: JoinClaims,
    pub environment_id: EnvironmentId,
}

/// Verifies `token` at time `now`: signature with the stored key of its `kid`, the claim
/// rules, and that its space exists in the key's environment.
pub async fn verify_join_token(
    store: &dyn Store,
    keys: &KeyCache,
    token: &str,
    now: u64,
    options: &VerifyOptions,
) -> Result<AdmittedToken, JoinAuthError> {
    let unverified = spacegate_auth::decode(token)?;
    let Some(key) = keys.get(store, unverified.kid()).await? else {
        return Err(AuthError::UnknownKey.into());
    };
    let claims = unverified.verify(&key.key, now, options)?;
    let space_env = keys
        .space_environment(store, &claims.space_id)
        .await
        .map_err(KeyLookupError::from)?;
    match space_env {
        None => Err(AuthError::UnknownSpace.into()),
        Some(env) if *env != key.environment_id => Err(AuthError::WrongEnvironment.into()),
        Some(_) => Ok(AdmittedToken {
            claims,
            environment_id: key.environment_id.clone(),
        }),
    }
}
