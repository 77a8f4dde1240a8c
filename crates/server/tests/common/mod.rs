//! A real server on port 0 in this process, with a temp data dir and the bootstrap token.
#![allow(dead_code)] // each test binary uses a different part of this

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;
use spacegate_server::gateway::GatewayConfig;
use spacegate_server::{AppState, now_secs, tokens};
use spacegate_store::{Permissions, SqliteOptions, SqliteStore};
use tokio::sync::oneshot;

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: AppState,
    pub token: (String, String),
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(GatewayConfig::default()).await
    }

    /// Starts the server on a runtime of its own (two workers, its own thread), as in
    /// production: the test's clients (webrtc-rs among them) must not be able to starve
    /// the server's tasks by occupying the runtime they share.
    pub async fn start_with(config: GatewayConfig) -> Self {
        Self::start_with_store(config, SqliteOptions::default()).await
    }

    /// With the store opened with `store` (a size cap, a short lock wait).
    pub async fn start_with_store(config: GatewayConfig, store: SqliteOptions) -> Self {
        Self::start_with_parts(
            config,
            store,
            Arc::new(spacegate_session::MemoryRegistry::default()),
        )
        .await
    }

    /// With `registry` (e.g. one that stalls, wrapped around the real one).
    pub async fn start_with_parts(
        config: GatewayConfig,
        store: SqliteOptions,
        registry: Arc<dyn spacegate_session::Registry>,
    ) -> Self {
        if let Ok(filter) = std::env::var("SPACEGATE_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .try_init();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let (ready, started) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("server runtime");
            rt.block_on(async move {
                let store = SqliteStore::open_dir_with(&path, &store)
                    .await
                    .expect("store");
                let token = tokens::bootstrap(&store, "default", now_secs())
                    .await
                    .expect("bootstrap")
                    .expect("fresh store gets a token");
                let state = AppState::with_gateway(Arc::new(store), registry, config)
                    .expect("media socket");
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let addr = listener.local_addr().expect("addr");
                let token = (token.id.to_string(), token.secret.expose().to_string());
                let _ = ready.send((state.clone(), addr, token));
                spacegate_server::run(state, listener, async move {
                    let _ = stopped.await;
                })
                .await
            })
        });
        let (state, addr, token) = started.await.expect("server started");
        TestServer {
            addr,
            state,
            token,
            http: reqwest::Client::new(),
            dir,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Triggers graceful shutdown and waits for `run` to return.
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .expect("join task")
                .expect("server thread")
                .expect("server result");
        }
    }

    /// The WebSocket base URL, as `window.MUX_SPACES_BACKEND_URL` would be set.
    pub fn ws_base(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// A signing key in the bootstrap token's environment: (kid, private key).
    pub async fn signing_key(&self) -> (String, spacegate_auth::PrivateKey) {
        let res = self
            .req(Method::POST, "/system/v1/signing-keys")
            .send()
            .await
            .expect("send");
        let key = data(res).await;
        (
            key["id"].as_str().expect("kid").to_string(),
            spacegate_auth::PrivateKey::parse(key["private_key"].as_str().expect("pk"))
                .expect("parse"),
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A request authenticated with the bootstrap (read+write, "default") token.
    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.req_as(&self.token, method, path)
    }

    pub fn req_as(&self, token: &(String, String), method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, self.url(path))
            .basic_auth(&token.0, Some(&token.1))
    }

    /// Another access token, in `environment`, with `permissions` ("read", "read,write").
    pub async fn token(&self, environment: &str, permissions: &str) -> (String, String) {
        let t = tokens::create(
            self.state.store.as_ref(),
            environment,
            Permissions::parse(permissions).expect("permissions"),
            None,
            now_secs(),
        )
        .await
        .expect("create token");
        (t.id.to_string(), t.secret.expose().to_string())
    }

    pub async fn create_space(&self, body: Value) -> Value {
        let res = self
            .req(Method::POST, "/video/v1/spaces")
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), 201);
        data(res).await
    }

    pub async fn space_count(&self) -> usize {
        let res = self
            .req(Method::GET, "/video/v1/spaces?limit=100")
            .send()
            .await
            .expect("send");
        data(res).await.as_array().expect("array").len()
    }
}

pub async fn data(res: Response) -> Value {
    let mut body: Value = res.json().await.expect("json body");
    body.get_mut("data").expect("data envelope").take()
}

/// Asserts a Mux error body of `status` and `kind`; returns its first message.
pub async fn expect_error(res: Response, status: u16, kind: &str) -> String {
    assert_eq!(res.status(), status, "status");
    let body: Value = res.json().await.expect("error body is JSON");
    assert_eq!(body["error"]["type"], kind, "error type in {body}");
    let messages = body["error"]["messages"]
        .as_array()
        .expect("messages array");
    assert!(!messages.is_empty());
    messages[0].as_str().expect("string message").to_string()
}

/// A server with one space and one signing key: where join and media tests start.
pub struct Fx {
    pub s: TestServer,
    pub space: String,
    pub kid: String,
    pub key: spacegate_auth::PrivateKey,
}

impl Fx {
    pub async fn new() -> Self {
        Self::with(GatewayConfig::default()).await
    }

    pub async fn with(config: GatewayConfig) -> Self {
        Self::with_store(config, SqliteOptions::default()).await
    }

    pub async fn with_store(config: GatewayConfig, store: SqliteOptions) -> Self {
        Self::with_parts(
            config,
            store,
            Arc::new(spacegate_session::MemoryRegistry::default()),
        )
        .await
    }

    pub async fn with_parts(
        config: GatewayConfig,
        store: SqliteOptions,
        registry: Arc<dyn spacegate_session::Registry>,
    ) -> Self {
        let s = TestServer::start_with_parts(config, store, registry).await;
        let space = s.create_space(serde_json::json!({})).await["id"]
            .as_str()
            .expect("id")
            .to_string();
        let (kid, key) = s.signing_key().await;
        Fx { s, space, kid, key }
    }

    /// A join token for this space, valid for an hour.
    pub fn token(&self, participant: Option<&str>, role: spacegate_proto::Role) -> String {
        self.token_for(&self.space, participant, role, 3600)
    }

    pub fn token_for(
        &self,
        space: &str,
        participant: Option<&str>,
        role: spacegate_proto::Role,
        ttl: i64,
    ) -> String {
        spacegate_auth::sign(
            &self.key,
            &spacegate_auth::SignOptions {
                key_id: self.kid.parse().expect("kid"),
                space_id: space.parse().expect("space"),
                expires_at: (now_secs() + ttl).max(0) as u64,
                role,
                participant_id: participant.map(|p| p.parse().expect("pid")),
            },
        )
        .expect("sign")
    }
}
