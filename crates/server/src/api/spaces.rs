//! `/video/v1/spaces`: create, list, retrieve, delete. Broadcast sub-resources answer
//! "not supported yet" until spacegate composes and pushes RTMP itself.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use spacegate_proto::SpaceId;
use spacegate_store::{DeleteSpaceOutcome, SpaceRecord, SpaceStatus};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{json_body, page, path_id};
use crate::{AppState, ids};

/// Longest `passthrough` Mux accepts.
pub const MAX_PASSTHROUGH_CHARS: usize = 255;

/// A space: the room participants join. `status` is driven by the join path.
#[derive(Debug, Serialize, ToSchema)]
pub struct Space {
    pub id: String,
    /// Unix epoch seconds, as a string (Mux's convention).
    pub created_at: String,
    /// Always `server`: all media goes through the SFU.
    #[serde(rename = "type")]
    #[schema(example = "server")]
    pub kind: &'static str,
    /// `idle` (no participant connected) or `active`.
    #[schema(example = "idle")]
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<String>,
    /// Always empty: broadcasts are not supported yet.
    pub broadcasts: Vec<Broadcast>,
    /// Set while active; a new value for every idle → active period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_session_id: Option<String>,
}

/// A broadcast of a space to a live stream (schema only: not supported yet).
#[derive(Debug, Serialize, ToSchema)]
pub struct Broadcast {
    pub id: String,
    pub live_stream_id: String,
    pub status: String,
    pub layout: String,
    pub resolution: String,
}

impl From<SpaceRecord> for Space {
    fn from(r: SpaceRecord) -> Self {
        Space {
            id: r.id.into_string(),
            created_at: r.created_at.to_string(),
            kind: "server",
            status: r.status.as_str(),
            passthrough: r.passthrough,
            broadcasts: Vec::new(),
            active_session_id: r.active_session_id.map(|s| s.into_string()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SpaceResponse {
    pub data: Space,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SpaceListResponse {
    pub data: Vec<Space>,
}

/// Every field is optional; `{}` and an empty body create a plain space.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateSpaceRequest {
    /// Only `server` exists.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Caller metadata, at most 255 characters, echoed back.
    pub passthrough: Option<String>,
    /// Not supported yet: must be absent or empty.
    #[schema(value_type = Option<Vec<Object>>)]
    pub broadcasts: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[allow(dead_code)] // documents the query; parsing is in `extract::page`
pub struct ListParams {
    /// Items per page, 1 to 100, default 25.
    limit: Option<u32>,
    /// 1-based page number, default 1. Past the end the list is empty.
    page: Option<u32>,
}

pub(super) fn broadcasts_unsupported() -> ApiError {
    ApiError::NotImplemented(
        "Broadcasts are not supported yet by spacegate; create spaces without broadcasts".into(),
    )
}

#[utoipa::path(post, path = "/video/v1/spaces", operation_id = "create_space", tag = "spaces",
    request_body(content = CreateSpaceRequest, description = "May be empty"),
    responses(
        (status = 201, body = SpaceResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 501, body = ErrorBody, description = "Broadcasts requested")),
    security(("basic_auth" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<SpaceResponse>), ApiError> {
    caller.require_write()?;
    let req: CreateSpaceRequest = json_body(body)?;
    if let Some(kind) = &req.kind
        && kind != "server"
    {
        return Err(ApiError::InvalidParameters(format!(
            "type must be \"server\", not {kind:?}"
        )));
    }
    if let Some(p) = &req.passthrough
        && p.chars().count() > MAX_PASSTHROUGH_CHARS
    {
        return Err(ApiError::InvalidParameters(format!(
            "passthrough must be at most {MAX_PASSTHROUGH_CHARS} characters"
        )));
    }
    if req.broadcasts.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(broadcasts_unsupported());
    }
    let record = SpaceRecord {
        id: ids::new_id(),
        environment_id: caller.environment_id,
        passthrough: req.passthrough,
        status: SpaceStatus::Idle,
        active_session_id: None,
        created_at: state.gateway.config.clock.now_secs(),
    };
    state.store.insert_space(&record).await?;
    Ok((
        StatusCode::CREATED,
        Json(SpaceResponse {
            data: record.into(),
        }),
    ))
}

#[utoipa::path(get, path = "/video/v1/spaces", operation_id = "list_spaces", tag = "spaces", params(ListParams),
    responses((status = 200, body = SpaceListResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("basic_auth" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<SpaceListResponse>, ApiError> {
    caller.require_read()?;
    let page = page(query)?;
    let spaces = state
        .store
        .list_spaces(&caller.environment_id, page)
        .await?;
    Ok(Json(SpaceListResponse {
        data: spaces.into_iter().map(Space::from).collect(),
    }))
}

#[utoipa::path(get, path = "/video/v1/spaces/{SPACE_ID}", operation_id = "get_space", tag = "spaces",
    params(("SPACE_ID" = String, Path)),
    responses((status = 200, body = SpaceResponse), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("basic_auth" = [])))]
pub async fn retrieve(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<SpaceResponse>, ApiError> {
    caller.require_read()?;
    let id: SpaceId = path_id(id)?;
    let space = state
        .store
        .space(&caller.environment_id, &id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(SpaceResponse { data: space.into() }))
}

#[utoipa::path(delete, path = "/video/v1/spaces/{SPACE_ID}", operation_id = "delete_space", tag = "spaces",
    params(("SPACE_ID" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The space is active")),
    security(("basic_auth" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require_write()?;
    let id: SpaceId = path_id(id)?;
    let active = || {
        ApiError::Conflict(
            "The space is active; it can be deleted once every participant has left".into(),
        )
    };
    // The store learns of a first join a moment after it happens; the gateway knows now,
    // and refuses joins while the delete runs, so no join slips in between this check and
    // the store's delete. (Only a space of the caller's environment is "active": others'
    // spaces are a plain 404.)
    let _deleting = match state.gateway.begin_delete(&id).await {
        Ok(claim) => claim,
        Err(_) => {
            return match state.store.space(&caller.environment_id, &id).await? {
                Some(_) => Err(active()),
                None => Err(ApiError::NotFound),
            };
        }
    };
    match state
        .store
        .delete_space(&caller.environment_id, &id)
        .await?
    {
        DeleteSpaceOutcome::Deleted => {
            // After the commit, so the join path cannot re-cache the deleted space.
            state.keys.invalidate_space(&id);
            Ok(StatusCode::NO_CONTENT)
        }
        DeleteSpaceOutcome::NotFound => Err(ApiError::NotFound),
        DeleteSpaceOutcome::Active => Err(active()),
    }
}

#[utoipa::path(post, path = "/video/v1/spaces/{SPACE_ID}/broadcasts", operation_id = "create_space_broadcast", tag = "spaces",
    params(("SPACE_ID" = String, Path)),
    responses((status = 501, body = ErrorBody, description = "Not supported yet"),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("basic_auth" = [])))]
pub async fn create_broadcast(
    state: State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require_write()?;
    existing_space(&state, &caller, id).await?;
    Err(broadcasts_unsupported())
}

/// Retrieve of a broadcast (and the core of delete, start and stop): the space must exist,
/// and then the answer is "not supported yet", so a client learns the real reason, not a 404.
#[utoipa::path(get, path = "/video/v1/spaces/{SPACE_ID}/broadcasts/{BROADCAST_ID}", operation_id = "get_space_broadcast", tag = "spaces",
    params(("SPACE_ID" = String, Path), ("BROADCAST_ID" = String, Path)),
    responses((status = 501, body = ErrorBody, description = "Not supported yet"),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("basic_auth" = [])))]
pub async fn broadcast(
    state: State<AppState>,
    caller: Caller,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require_read()?;
    let Path((space_id, _)) = ids.map_err(|r| ApiError::InvalidParameters(r.body_text()))?;
    existing_space(&state, &caller, Ok(Path(space_id))).await?;
    Err(broadcasts_unsupported())
}

async fn existing_space(
    State(state): &State<AppState>,
    caller: &Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<SpaceRecord, ApiError> {
    let id: SpaceId = path_id(id)?;
    state
        .store
        .space(&caller.environment_id, &id)
        .await?
        .ok_or(ApiError::NotFound)
}

#[utoipa::path(delete, path = "/video/v1/spaces/{SPACE_ID}/broadcasts/{BROADCAST_ID}", tag = "spaces",
    operation_id = "delete_space_broadcast",
    params(("SPACE_ID" = String, Path), ("BROADCAST_ID" = String, Path)),
    responses((status = 501, body = ErrorBody, description = "Not supported yet"),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("basic_auth" = [])))]
pub async fn delete_broadcast(
    state: State<AppState>,
    caller: Caller,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require_write()?;
    broadcast(state, caller, ids).await
}

#[utoipa::path(post, path = "/video/v1/spaces/{SPACE_ID}/broadcasts/{BROADCAST_ID}/start", tag = "spaces",
    operation_id = "start_space_broadcast",
    params(("SPACE_ID" = String, Path), ("BROADCAST_ID" = String, Path)),
    responses((status = 501, body = ErrorBody, description = "Not supported yet"),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("basic_auth" = [])))]
pub async fn start_broadcast(
    state: State<AppState>,
    caller: Caller,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require_write()?;
    broadcast(state, caller, ids).await
}

#[utoipa::path(post, path = "/video/v1/spaces/{SPACE_ID}/broadcasts/{BROADCAST_ID}/stop", tag = "spaces",
    operation_id = "stop_space_broadcast",
    params(("SPACE_ID" = String, Path), ("BROADCAST_ID" = String, Path)),
    responses((status = 501, body = ErrorBody, description = "Not supported yet"),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("basic_auth" = [])))]
pub async fn stop_broadcast(
    state: State<AppState>,
    caller: Caller,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require_write()?;
    broadcast(state, caller, ids).await
}
