//! The HTTP surface: Mux's REST API for spaces and signing keys, health checks, OpenAPI.
//!
//! Conventions of the real Mux clients that every handler keeps (`mux-control-api.md` §1):
//! `{"data": …}` envelopes, `created_at` as a string, empty bodies read as `{}`, unknown
//! fields and query parameters ignored, an optional trailing slash, and every failure as
//! Mux's error body via [`error::ApiError`].

pub mod auth;
pub mod error;
mod extract;
mod health;
pub mod openapi;
mod signing_keys;
mod spaces;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{MethodRouter, get, post};

use crate::AppState;
use error::ApiError;

/// Request bodies are tiny (a space is a few hundred bytes); anything bigger is refused
/// before it is buffered.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

fn route(
    router: Router<AppState>,
    path: &str,
    methods: MethodRouter<AppState>,
) -> Router<AppState> {
    // mux-elixir requests `/video/v1/signing-keys/`; accept the slash everywhere.
    router
        .route(path, methods.clone())
        .route(&format!("{path}/"), methods)
}

/// The whole HTTP application, testable without a socket.
pub fn router(state: AppState) -> Router {
    let mut r = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(openapi::serve))
        // The SDK connects to `<MUX_SPACES_BACKEND_URL>/v1`; `/pluto/v1` serves a base URL
        // copied from Mux's own (`…/pluto`).
        .route("/v1", get(crate::gateway::upgrade))
        .route("/pluto/v1", get(crate::gateway::upgrade));
    r = route(
        r,
        "/video/v1/spaces",
        post(spaces::create).get(spaces::list),
    );
    r = route(
        r,
        "/video/v1/spaces/{space_id}",
        get(spaces::retrieve).delete(spaces::delete),
    );
    r = route(
        r,
        "/video/v1/spaces/{space_id}/broadcasts",
        post(spaces::create_broadcast),
    );
    r = route(
        r,
        "/video/v1/spaces/{space_id}/broadcasts/{broadcast_id}",
        get(spaces::broadcast).delete(spaces::delete_broadcast),
    );
    r = route(
        r,
        "/video/v1/spaces/{space_id}/broadcasts/{broadcast_id}/start",
        post(spaces::start_broadcast),
    );
    r = route(
        r,
        "/video/v1/spaces/{space_id}/broadcasts/{broadcast_id}/stop",
        post(spaces::stop_broadcast),
    );
    // Signing keys live under two prefixes (mux-node ≤7 and ≥8); one store behind both.
    for prefix in ["/video/v1/signing-keys", "/system/v1/signing-keys"] {
        r = route(
            r,
            prefix,
            post(signing_keys::create).get(signing_keys::list),
        );
        r = route(
            r,
            &format!("{prefix}/{{key_id}}"),
            get(signing_keys::retrieve).delete(signing_keys::delete),
        );
    }
    r.fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_timeout,
        ))
        .with_state(state)
}

/// Every request finishes within `request_timeout` or gets a 503 the client may retry: a
/// store that hangs (locked, a stalled disk) must not hold requests, and the sockets under
/// them, without end.
async fn request_timeout(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    match tokio::time::timeout(state.gateway.config.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable("the request timed out".into()).into_response(),
    }
}
