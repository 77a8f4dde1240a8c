use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::AppState;

/// Liveness: the process answers.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the store answers, the media thread and the store writer run, and shutdown
/// has not begun.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if !state.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting_down"})),
        );
    }
    if !state.gateway.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "media_or_store_writer_down"})),
        );
    }
    // Bounded: a store that hangs is "not ready", answered at once, not a probe that
    // times out on the load balancer's side.
    let limit = state
        .gateway
        .config
        .request_timeout
        .min(std::time::Duration::from_secs(2));
    let ping = tokio::time::timeout(limit, state.store.ping())
        .await
        .unwrap_or_else(|_| {
            Err(spacegate_store::StoreError::Unavailable(
                "ping timed out".into(),
            ))
        });
    // The cluster's registry (Redis): without it no join can be admitted, though the
    // connections already here keep their signaling and media.
    let registry = tokio::time::timeout(limit, state.gateway.registry.ping())
        .await
        .unwrap_or_else(|_| {
            Err(spacegate_session::ReserveError::Backend(
                "ping timed out".into(),
            ))
        });
    if let Err(e) = registry {
        tracing::warn!(error = %e, "session registry not ready");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "degraded", "registry": "unavailable"})),
        );
    }
    match ping {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Err(e) => {
            tracing::warn!(error = %e, "store not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "store_unavailable"})),
            )
        }
    }
}
