//! Request parsing with Mux-style errors. axum's own extractors answer bad input with plain
//! text; these answer with [`ApiError`], so a client always gets the body it can parse.

use std::collections::HashMap;
use std::str::FromStr;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use spacegate_store::Page;

use super::MAX_BODY_BYTES;
use super::error::ApiError;

/// The JSON body as `T`; an empty body reads as `{}` (clients send `Content-Length: 0` with
/// a JSON content type). The content type itself is not checked, as Mux did not.
pub fn json_body<T: DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(MAX_BODY_BYTES)
        } else {
            ApiError::InvalidParameters(rejection.body_text())
        }
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::InvalidParameters(format!("Invalid request body: {e}")))
}

/// One id from the path, validated as the typed id it names.
pub fn path_id<T: FromStr>(path: Result<Path<String>, PathRejection>) -> Result<T, ApiError>
where
    T::Err: std::fmt::Display,
{
    let Path(raw) = path.map_err(|r| ApiError::InvalidParameters(r.body_text()))?;
    raw.parse()
        .map_err(|e: T::Err| ApiError::InvalidParameters(format!("Failed to parse ID: {e}")))
}

/// Largest `limit` a list accepts. Mux documents the default (25) but not a maximum; 100 is
/// what Mux's other list endpoints allow and what Mux Meet asks for.
pub const MAX_LIMIT: u32 = 100;

/// `limit` and `page` from the query string; other parameters are ignored.
pub fn page(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Page, ApiError> {
    let Query(params) = query.map_err(|r| ApiError::InvalidParameters(r.body_text()))?;
    let number = |name: &str, default: u32, min: u32, max: u32| -> Result<u32, ApiError> {
        match params.get(name) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| {
                    ApiError::InvalidParameters(format!(
                        "{name} must be an integer from {min} to {max}"
                    ))
                }),
        }
    };
    Ok(Page {
        limit: number("limit", 25, 1, MAX_LIMIT)?,
        page: number("page", 1, 1, u32::MAX)?,
    })
}
