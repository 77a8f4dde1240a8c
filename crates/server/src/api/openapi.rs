//! The OpenAPI document, generated from the handlers' annotations so it cannot drift from
//! the code (a test calls every documented path against the router).

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::{ErrorBody, ErrorDetail};
use super::signing_keys::{self, SigningKey, SigningKeyListResponse, SigningKeyResponse};
use super::spaces::{self, Broadcast, CreateSpaceRequest, Space, SpaceListResponse, SpaceResponse};

#[derive(OpenApi)]
#[openapi(
    info(title = "spacegate", description = "Self-hosted, Mux-compatible real-time video API"),
    paths(
        spaces::create, spaces::list, spaces::retrieve, spaces::delete,
        spaces::create_broadcast, spaces::broadcast, spaces::delete_broadcast,
        spaces::start_broadcast, spaces::stop_broadcast,
        signing_keys::create, signing_keys::list, signing_keys::retrieve, signing_keys::delete,
    ),
    components(schemas(Space, Broadcast, CreateSpaceRequest, SpaceResponse, SpaceListResponse,
        SigningKey, SigningKeyResponse, SigningKeyListResponse, ErrorBody, ErrorDetail)),
    modifiers(&BasicAuth, &SystemSigningKeys),
)]
struct ApiDoc;

struct BasicAuth;

impl Modify for BasicAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "basic_auth",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build()),
        );
    }
}

/// The `/system/v1` signing-key paths are the same operations as `/video/v1`; copy them
/// rather than annotate every handler twice.
struct SystemSigningKeys;

impl Modify for SystemSigningKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let copies: Vec<_> = openapi
            .paths
            .paths
            .iter()
            .filter_map(|(path, item)| {
                path.strip_prefix("/video/v1/signing-keys")
                    .map(|rest| (format!("/system/v1/signing-keys{rest}"), item.clone()))
            })
            .collect();
        for (path, mut item) in copies {
            for op in [&mut item.get, &mut item.post, &mut item.delete]
                .into_iter()
                .flatten()
            {
                op.operation_id = op.operation_id.as_ref().map(|id| format!("{id}_system"));
            }
            openapi.paths.paths.insert(path, item);
        }
    }
}

pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(document())
}
