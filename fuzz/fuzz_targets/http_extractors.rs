//! The REST API as a stranger reaches it: one request per input through the real router
//! (`spacegate_server::api::router`) of one `AppState` over a SQLite store, built once per
//! process. Method, path (ids of existing and made-up objects, or a raw path), query,
//! headers (Basic auth valid, read-only, of another environment, wrong, malformed; upgrade
//! headers for `/v1`; `X-Forwarded-For`) and JSON body all come from the input.
//!
//! Input: six control bytes (method, auth, route, flags, query and body shape), then
//! strings, each a length byte (255: a little-endian u16 follows) and that many bytes.
//!
//! Checked: no panic, no hang (5 s); no 5xx other than 501, 503 and 507; every 4xx (except
//! `/v1`'s plain-text upgrade refusals, and HEAD) carries Mux's JSON error body;
//! every JSON response parses. A 500 is reported on stderr and the input saved under
//! `$HTTP_FUZZ_FINDINGS` (default: a `spacegate-fuzz-findings` dir in the temp dir), not
//! treated as a crash.
//!
//! Not exercised: signing-key creation with a write token (it generates an RSA key, about
//! 100 ms; its body goes through the same `json_body` as space creation). Such a request is
//! sent with a read-only token instead, which is refused before the key is made.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use spacegate_proto::{EnvironmentId, KeyId, SessionId, SpaceId};
use spacegate_server::gateway::GatewayConfig;
use spacegate_server::{AppState, now_secs, tokens};
use spacegate_store::{
    Permissions, SigningKeyRecord, SpaceRecord, SpaceStatus, SqliteStore, Store,
};
use tower_service::Service;

/// The objects every input can name; restored after any input deletes them.
const SPACE: &str = "fuzzSpace01";
const ACTIVE_SPACE: &str = "fuzzActiveSpace";
const KEY: &str = "fuzzKey01";
const OTHER_SPACE: &str = "otherEnvSpace";

struct Env {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    store: Arc<dyn Store>,
    env_id: EnvironmentId,
    other_env_id: EnvironmentId,
    /// (id, secret): read+write, read-only, read+write in another environment.
    rw: (String, String),
    ro: (String, String),
    other: (String, String),
    findings: PathBuf,
}

/// A data directory on tmpfs when there is one (SQLite fsyncs every write).
fn data_dir() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    // Directories of earlier fuzzing processes that are gone.
    if let Ok(entries) = std::fs::read_dir(&base) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("spacegate-fuzz-http-") {
                if !std::path::Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    base.join(format!("spacegate-fuzz-http-{}", std::process::id()))
}

async fn restore(store: &dyn Store, env_id: &EnvironmentId, other_env_id: &EnvironmentId) {
    let space = |id: &str, env: &EnvironmentId, active: bool| SpaceRecord {
        id: SpaceId::new(id).expect("space id"),
        environment_id: env.clone(),
        passthrough: Some("fuzz".into()),
        status: if active {
            SpaceStatus::Active
        } else {
            SpaceStatus::Idle
        },
        active_session_id: active.then(|| SessionId::new("fuzzSession").expect("session id")),
        created_at: 1_700_000_000,
    };
    for (id, env, active) in [
        (SPACE, env_id, false),
        (ACTIVE_SPACE, env_id, true),
        (OTHER_SPACE, other_env_id, false),
    ] {
        let record = space(id, env, active);
        if store
            .space(env, &record.id)
            .await
            .expect("store read")
            .is_none()
        {
            store.insert_space(&record).await.expect("insert space");
        }
    }
    let kid = KeyId::new(KEY).expect("key id");
    if store
        .signing_key(env_id, &kid)
        .await
        .expect("store read")
        .is_none()
    {
        let key = SigningKeyRecord {
            id: kid,
            environment_id: env_id.clone(),
            public_key_der: vec![0x30, 0x00],
            created_at: 1_700_000_000,
        };
        store.insert_signing_key(&key).await.expect("insert key");
    }
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = data_dir();
        let findings = std::env::var_os("HTTP_FUZZ_FINDINGS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::temp_dir()
                    .join("spacegate-fuzz-findings")
                    .join("http_extractors")
            });
        let (router, store, env_id, other_env_id, rw, ro, other) = rt.block_on(async {
            let store = SqliteStore::open_dir(&dir).await.expect("store");
            let store: Arc<dyn Store> = Arc::new(store);
            let now = now_secs();
            let issue = |env: &'static str, perms: &'static str| {
                let store = store.clone();
                async move {
                    let t = tokens::create(
                        store.as_ref(),
                        env,
                        Permissions::parse(perms).expect("permissions"),
                        None,
                        now,
                    )
                    .await
                    .expect("token");
                    let record = store
                        .access_token(&t.id)
                        .await
                        .expect("read token")
                        .expect("token exists");
                    (
                        (t.id.to_string(), t.secret.expose().to_string()),
                        record.environment.id,
                    )
                }
            };
            let (rw, env_id) = issue("default", "read,write").await;
            let (ro, _) = issue("default", "read").await;
            let (other, other_env_id) = issue("other", "read,write").await;
            restore(store.as_ref(), &env_id, &other_env_id).await;
            let config = GatewayConfig {
                // So that X-Forwarded-For is parsed (operators behind a proxy turn it on).
                trust_forwarded_for: true,
                ..GatewayConfig::default()
            };
            let state = AppState::with_gateway(
                store.clone(),
                Arc::new(spacegate_session::MemoryRegistry::default()),
                config,
            )
            .expect("app state");
            let router = spacegate_server::api::router(state);
            (router, store, env_id, other_env_id, rw, ro, other)
        });
        Env {
            rt,
            router,
            store,
            env_id,
            other_env_id,
            rw,
            ro,
            other,
            findings,
        }
    })
}

/// `HTTP_FUZZ_DEBUG=1` prints each request and its status.
fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("HTTP_FUZZ_DEBUG").is_some())
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn bytes(&mut self) -> &'a [u8] {
        let len = match self.byte() {
            255 => usize::from(u16::from_le_bytes([self.byte(), self.byte()])),
            n => usize::from(n),
        };
        let (s, rest) = self.data.split_at(len.min(self.data.len()));
        self.data = rest;
        s
    }

    fn string(&mut self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }
}

/// Percent-encodes every byte outside RFC 3986's unreserved set.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes only what a URI cannot carry as is, keeping `/ ? & = %` and the other
/// delimiters, so a raw path or query keeps its structure.
fn encode_loosely(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
}

struct Built {
    request: Request<Body>,
    join_path: bool,
    head: bool,
    summary: String,
}

fn build(data: &[u8], env: &Env) -> Option<Built> {
    let mut r = Reader { data };
    let method_b = r.byte();
    let auth_b = r.byte();
    let route_b = r.byte();
    let flags = r.byte();
    let query_b = r.byte();
    let body_b = r.byte();
    let id1 = match flags & 0x40 {
        0 => [SPACE, ACTIVE_SPACE, OTHER_SPACE, KEY][usize::from(route_b >> 6)].to_string(),
        _ => r.string(),
    };
    let id2 = r.string();
    let raw_path = r.string();
    let query_raw = r.string();
    let body_raw = r.bytes();
    let extra = r.string();

    let method = match method_b % 8 {
        0 => Method::GET,
        1 => Method::POST,
        2 => Method::DELETE,
        3 => Method::PUT,
        4 => Method::PATCH,
        5 => Method::HEAD,
        6 => Method::OPTIONS,
        _ => Method::from_bytes(extra.as_bytes()).ok()?,
    };

    // The path, with the input's pieces as given, or percent-encoded if that does not
    // make a valid URI (an HTTP client would have encoded them).
    let path_with = |id1: &str, id2: &str, raw: &str| -> String {
        let p = match route_b % 16 {
            0 => raw.to_string(),
            1 => "/video/v1/spaces".to_string(),
            2 => format!("/video/v1/spaces/{id1}"),
            3 => format!("/video/v1/spaces/{id1}/broadcasts"),
            4 => format!("/video/v1/spaces/{id1}/broadcasts/{id2}"),
            5 => format!("/video/v1/spaces/{id1}/broadcasts/{id2}/start"),
            6 => format!("/video/v1/spaces/{id1}/broadcasts/{id2}/stop"),
            7 => "/video/v1/signing-keys".to_string(),
            8 => format!("/video/v1/signing-keys/{id1}"),
            9 => "/system/v1/signing-keys".to_string(),
            10 => format!("/system/v1/signing-keys/{id1}"),
            11 => "/v1".to_string(),
            12 => "/pluto/v1".to_string(),
            13 => "/healthz".to_string(),
            14 => "/readyz".to_string(),
            _ => "/openapi.json".to_string(),
        };
        if flags & 0x20 != 0 {
            format!("{p}/")
        } else {
            p
        }
    };
    // The query, its values as given or (second try) percent-encoded.
    let query_with = |value: &dyn Fn(&str) -> String, raw: &dyn Fn(&str) -> String| {
        match query_b % 4 {
            0 => None,
            1 => Some(raw(&query_raw)),
            2 => Some(format!("limit={}&page={}", value(&query_raw), value(&id2))),
            // The join parameters of `/v1`.
            _ => Some(format!(
                "token={}&sdk_version=1.2.0&managed_subscriptions={}&display_name={}&reconnect_id={}",
                value(&query_raw),
                value(&id2),
                value(&extra),
                value(&id1)
            )),
        }
    };
    let uri_of = |path: String, query: Option<String>| match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let same = |s: &str| s.to_string();
    let uri = Uri::try_from(uri_of(
        path_with(&id1, &id2, &raw_path),
        query_with(&same, &same),
    ))
    .ok()
    .or_else(|| {
        let path = path_with(&encode(&id1), &encode(&id2), &encode_loosely(&raw_path));
        let path = if path.starts_with('/') {
            path
        } else {
            format!("/{path}")
        };
        Uri::try_from(uri_of(path, query_with(&encode, &encode_loosely))).ok()
    })?;
    // Origin-form only: hyper hands the router nothing else for these methods.
    uri.path_and_query()?;
    if uri.scheme().is_some() || uri.authority().is_some() {
        return None;
    }

    // Key creation with a write token would generate an RSA key per input: read-only.
    let key_create = method == Method::POST
        && ["/video/v1/signing-keys", "/system/v1/signing-keys"]
            .iter()
            .any(|p| uri.path() == *p || uri.path() == format!("{p}/"));
    let auth: Option<Vec<u8>> = match auth_b % 8 {
        0 => None,
        1 if key_create => Some(basic(&env.ro.0, &env.ro.1).into_bytes()),
        1 => Some(basic(&env.rw.0, &env.rw.1).into_bytes()),
        2 => Some(basic(&env.ro.0, &env.ro.1).into_bytes()),
        3 if key_create => Some(basic(&env.ro.0, &env.ro.1).into_bytes()),
        3 => Some(basic(&env.other.0, &env.other.1).into_bytes()),
        4 => Some(basic(&env.rw.0, &extra).into_bytes()),
        5 => Some(format!("Basic {}", STANDARD.encode(extra.as_bytes())).into_bytes()),
        6 => Some(extra.as_bytes().to_vec()),
        _ => Some(
            format!(
                "{} {}",
                extra,
                STANDARD.encode(format!("{}:{}", env.rw.0, env.rw.1))
            )
            .into_bytes(),
        ),
    };
    // A scheme that is "basic" in any case is a valid token: keep that from key creation.
    if key_create && auth_b % 8 == 7 && extra.trim().eq_ignore_ascii_case("basic") {
        return None;
    }

    let body: Vec<u8> = match body_b % 4 {
        0 => Vec::new(),
        1 => body_raw.to_vec(),
        _ => {
            let mut o = serde_json::Map::new();
            let text = String::from_utf8_lossy(body_raw).into_owned();
            if body_b & 4 != 0 {
                o.insert("type".into(), text.clone().into());
            }
            if body_b & 8 != 0 {
                o.insert("passthrough".into(), text.clone().into());
            }
            if body_b & 16 != 0 {
                let v: serde_json::Value = match body_b >> 5 {
                    0 => serde_json::json!([]),
                    1 => serde_json::json!([{"live_stream_id": text}]),
                    2 => serde_json::Value::Null,
                    3 => text.clone().into(),
                    _ => serde_json::json!([1, 2]),
                };
                o.insert("broadcasts".into(), v);
            }
            if body_b % 4 == 3 {
                o.insert(id2.clone(), extra.clone().into());
            }
            serde_json::to_vec(&o).expect("json")
        }
    };

    let mut builder = Request::builder().method(method.clone()).uri(uri.clone());
    if let Some(a) = auth {
        let v = HeaderValue::from_bytes(&a).ok()?;
        builder = builder.header(header::AUTHORIZATION, v);
    }
    if flags & 1 != 0 {
        builder = builder
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "Upgrade")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==");
    }
    if flags & 2 != 0 {
        builder = builder.header(header::CONTENT_TYPE, "application/json");
    }
    if flags & 4 != 0 {
        let v = HeaderValue::from_bytes(extra.as_bytes()).ok()?;
        builder = builder.header("x-forwarded-for", v);
    }
    if flags & 8 != 0 {
        builder = builder.header(header::CONTENT_LENGTH, body.len());
    }
    let request = builder.body(Body::from(body)).ok()?;
    let path = uri.path();
    // `/v1` answers a request that is no WebSocket upgrade in plain text, for browsers.
    let join_path = path == "/v1" || path == "/pluto/v1";
    Some(Built {
        summary: format!("{method} {uri} auth={}", auth_b % 8),
        head: method == Method::HEAD,
        join_path,
        request,
    })
}

fn is_error_body(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    v["error"]["type"].is_string()
        && v["error"]["messages"]
            .as_array()
            .is_some_and(|m| !m.is_empty() && m.iter().all(|s| s.is_string()))
}

fn report_500(env: &Env, data: &[u8], summary: &str, body: &[u8]) {
    let _ = std::fs::create_dir_all(&env.findings);
    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = env.findings.join(format!("500-{hash:016x}"));
    let _ = std::fs::write(&path, data);
    eprintln!(
        "FINDING: 500 for {summary}: {} (input saved to {})",
        String::from_utf8_lossy(body),
        path.display()
    );
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    let Some(built) = build(data, env) else {
        return;
    };
    let mut router = env.router.clone();
    let deleting = built.request.method() == Method::DELETE;
    env.rt.block_on(async {
        std::future::poll_fn(|cx| Service::<Request<Body>>::poll_ready(&mut router, cx))
            .await
            .expect("router ready");
        let response = tokio::time::timeout(Duration::from_secs(5), router.call(built.request))
            .await
            .unwrap_or_else(|_| panic!("request hung: {}", built.summary))
            .expect("infallible");
        let status = response.status();
        if debug() {
            eprintln!("{status} for {}", built.summary);
        }
        let json = response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            report_500(env, data, &built.summary, &body);
        } else if status.is_server_error() {
            assert!(
                // 507: the store is full (a real answer, not a fault of the request path).
                status == StatusCode::NOT_IMPLEMENTED
                    || status == StatusCode::SERVICE_UNAVAILABLE
                    || status == StatusCode::INSUFFICIENT_STORAGE,
                "{status} for {}: {}",
                built.summary,
                String::from_utf8_lossy(&body)
            );
        }
        if status.is_client_error() && !built.head && !built.join_path {
            assert!(
                is_error_body(&body),
                "{status} without Mux's error body for {}: {:?}",
                built.summary,
                String::from_utf8_lossy(&body)
            );
        }
        if json && !built.head && !body.is_empty() {
            assert!(
                serde_json::from_slice::<serde_json::Value>(&body).is_ok(),
                "invalid JSON in a {status} for {}",
                built.summary
            );
        }
        // Keep the store as it was: spaces made by this input go, deleted fixtures return.
        if status == StatusCode::CREATED {
            if let Some(id) = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["data"]["id"].as_str().map(str::to_string))
                .and_then(|id| SpaceId::new(id).ok())
            {
                for e in [&env.env_id, &env.other_env_id] {
                    let _ = env.store.delete_space(e, &id).await;
                }
            }
        }
        if deleting {
            restore(env.store.as_ref(), &env.env_id, &env.other_env_id).await;
        }
    });
});
