//! Signing keys, served at `/video/v1/signing-keys` and `/system/v1/signing-keys`.
//! The server generates the RSA pair, stores the public half and returns the private half
//! once; it is never written anywhere.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use spacegate_auth::PrivateKey;
use spacegate_proto::KeyId;
use spacegate_store::SigningKeyRecord;
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{json_body, page, path_id};
use super::spaces::ListParams;
use crate::{AppState, ids};

#[derive(Debug, Serialize, ToSchema)]
pub struct SigningKey {
    /// The `kid` of tokens signed with this key.
    pub id: String,
    pub created_at: String,
    /// Base64 of a PKCS#1 PEM RSA private key. Only in the create response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

impl From<SigningKeyRecord> for SigningKey {
    fn from(r: SigningKeyRecord) -> Self {
        SigningKey {
            id: r.id.into_string(),
            created_at: r.created_at.to_string(),
            private_key: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SigningKeyResponse {
    pub data: SigningKey,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SigningKeyListResponse {
    pub data: Vec<SigningKey>,
}

/// Create takes no parameters; old clients send `{}`, new ones nothing.
#[derive(Debug, Default, Deserialize)]
struct CreateSigningKeyRequest {}

#[utoipa::path(post, path = "/video/v1/signing-keys", operation_id = "create_signing_key", tag = "signing-keys",
    request_body(content = Object, description = "Empty or `{}`"),
    responses((status = 201, body = SigningKeyResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("basic_auth" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<SigningKeyResponse>), ApiError> {
    caller.require_write()?;
    let _: CreateSigningKeyRequest = json_body(body)?;
    // RSA key generation takes tens of milliseconds of CPU: keep it off the async workers.
    let pair = tokio::task::spawn_blocking(PrivateKey::generate_rsa2048)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let private_key = pair
        .to_mux_private_key()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let record = SigningKeyRecord {
        id: ids::new_id(),
        environment_id: caller.environment_id,
        public_key_der: pair.public_key_der(),
        created_at: state.gateway.config.clock.now_secs(),
    };
    state.store.insert_signing_key(&record).await?;
    // A token with this kid tried a moment ago must not stay "unknown".
    state.keys.created(&record);
    let mut data = SigningKey::from(record);
    data.private_key = Some(private_key);
    Ok((StatusCode::CREATED, Json(SigningKeyResponse { data })))
}

#[utoipa::path(get, path = "/video/v1/signing-keys", operation_id = "list_signing_keys", tag = "signing-keys", params(ListParams),
    responses((status = 200, body = SigningKeyListResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("basic_auth" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<SigningKeyListResponse>, ApiError> {
    caller.require_read()?;
    let page = page(query)?;
    let keys = state
        .store
        .list_signing_keys(&caller.environment_id, page)
        .await?;
    Ok(Json(SigningKeyListResponse {
        data: keys.into_iter().map(SigningKey::from).collect(),
    }))
}

#[utoipa::path(get, path = "/video/v1/signing-keys/{SIGNING_KEY_ID}", operation_id = "get_signing_key", tag = "signing-keys",
    params(("SIGNING_KEY_ID" = String, Path)),
    responses((status = 200, body = SigningKeyResponse), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("basic_auth" = [])))]
pub async fn retrieve(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<SigningKeyResponse>, ApiError> {
    caller.require_read()?;
    let id: KeyId = path_id(id)?;
    let key = state
        .store
        .signing_key(&caller.environment_id, &id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(SigningKeyResponse { data: key.into() }))
}

#[utoipa::path(delete, path = "/video/v1/signing-keys/{SIGNING_KEY_ID}", operation_id = "delete_signing_key", tag = "signing-keys",
    params(("SIGNING_KEY_ID" = String, Path)),
    responses((status = 204, description = "Deleted; its tokens stop working at once"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("basic_auth" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require_write()?;
    let id: KeyId = path_id(id)?;
    let deleted = state
        .store
        .delete_signing_key(&caller.environment_id, &id)
        .await?;
    // After the commit, so no lookup can re-read the row once the cache forgets it.
    state.keys.invalidate(&id);
    if deleted {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound)
    }
}
