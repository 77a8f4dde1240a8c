//! The one mapping from failures to HTTP: Mux's error body
//! `{"error":{"type":…,"messages":[…]}}` with the status codes the real clients expect.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use spacegate_store::StoreError;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidParameters(String),
    #[error("Unauthorized request")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("The requested resource either doesn't exist or you don't have access to it.")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("This method is not allowed on this resource")]
    MethodNotAllowed,
    #[error("Request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    NotImplemented(String),
    #[error("internal error")]
    Internal(String),
    /// The store is busy, slow or down; the same request may succeed later.
    #[error("The service is temporarily unavailable; try again")]
    Unavailable(String),
    /// The store is full: nothing can be written until an operator frees space.
    #[error("The service cannot store this: its storage is full")]
    StorageFull(String),
    /// The store is read-only: retrying will not help.
    #[error("The service cannot store this: its storage is read-only")]
    ReadOnly(String),
}

/// Mux's error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// snake_case error type, e.g. `invalid_parameters`, `not_found`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub messages: Vec<String>,
}

impl ApiError {
    fn status_and_type(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidParameters(_) => (StatusCode::BAD_REQUEST, "invalid_parameters"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "invalid_parameters"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_parameters"),
            ApiError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            ApiError::Unavailable(_) | ApiError::ReadOnly(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable")
            }
            ApiError::StorageFull(_) => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage"),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Full(_) => ApiError::StorageFull(e.to_string()),
            StoreError::ReadOnly(_) => ApiError::ReadOnly(e.to_string()),
            StoreError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_type();
        let message = match &self {
            // Internal details go to the log, not to the caller.
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "request failed");
                "Internal server error".to_string()
            }
            ApiError::Unavailable(detail)
            | ApiError::StorageFull(detail)
            | ApiError::ReadOnly(detail) => {
                tracing::warn!(%detail, "store refused a request");
                self.to_string()
            }
            other => other.to_string(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                kind,
                messages: vec![message],
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        // mux-node 8 retries 408/409/429/5xx unless told not to. Only a failing store is
        // worth retrying; every other error will fail the same way again.
        if matches!(self, ApiError::Unavailable(_)) {
            // Said outright, for clients that only retry when told to.
            headers.insert("x-should-retry", HeaderValue::from_static("true"));
        } else if !matches!(self, ApiError::Internal(_)) {
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if matches!(self, ApiError::Unauthorized) {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"spacegate\""),
            );
        }
        response
    }
}
