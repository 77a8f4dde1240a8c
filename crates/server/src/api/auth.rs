//! HTTP Basic authentication with access tokens, as an extractor: a handler that takes a
//! [`Caller`] cannot run for an unauthenticated request.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use spacegate_proto::{AccessTokenId, EnvironmentId};
use spacegate_store::Permissions;

use super::error::ApiError;
use crate::AppState;
use crate::tokens::secret_matches;

/// The authenticated access token behind a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: AccessTokenId,
    pub environment_id: EnvironmentId,
    pub permissions: Permissions,
}

impl Caller {
    pub fn require_read(&self) -> Result<(), ApiError> {
        if self.permissions.read {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "This access token lacks the read permission".into(),
            ))
        }
    }

    pub fn require_write(&self) -> Result<(), ApiError> {
        if self.permissions.write {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "This access token lacks the write permission".into(),
            ))
        }
    }
}

fn credentials(parts: &Parts) -> Option<(String, String)> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let (id, secret) = credentials(parts).ok_or(ApiError::Unauthorized)?;
        let id = AccessTokenId::new(id).map_err(|_| ApiError::Unauthorized)?;
        let token = state
            .store
            .access_token(&id)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        if !secret_matches(&secret, &token.secret_sha256) {
            return Err(ApiError::Unauthorized);
        }
        Ok(Caller {
            token_id: token.id,
            environment_id: token.environment.id,
            permissions: token.permissions,
        })
    }
}
