//! The spacegate server: the only crate that wires the others to sockets, clocks and disks.
//!
//! Owns: configuration, the HTTP router (Mux-compatible REST API, health, OpenAPI), access
//! token handling, the signing-key cache of the join path, and the `spacegate` CLI. The
//! server is a library function, [`run`], so tests start it on port 0 in-process.

pub mod api;
pub mod config;
pub mod gateway;
pub mod ids;
pub mod join;
pub mod keys;
pub mod media;
pub mod metrics;
pub mod tokens;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use spacegate_store::Store;
use tokio::net::TcpListener;

pub use config::Config;

/// Everything a request handler can reach. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub keys: Arc<keys::KeyCache>,
    pub gateway: Arc<gateway::Gateway>,
    /// False once shutdown has begun, so `/readyz` steers load balancers away first.
    ready: Arc<AtomicBool>,
}

impl AppState {
    /// A single-node state: in-memory registry, default gateway settings. Must be called
    /// inside a Tokio runtime (the gateway spawns its store-update task).
    pub fn new(store: Arc<dyn Store>) -> std::io::Result<Self> {
        Self::with_gateway(
            store,
            Arc::new(spacegate_session::MemoryRegistry::default()),
            gateway::GatewayConfig::default(),
        )
    }

    pub fn with_gateway(
        store: Arc<dyn Store>,
        registry: Arc<dyn spacegate_session::Registry>,
        config: gateway::GatewayConfig,
    ) -> std::io::Result<Self> {
        Ok(Self {
            gateway: gateway::Gateway::new(registry, store.clone(), config)?,
            store,
            keys: Arc::new(keys::KeyCache::default()),
            ready: Arc::new(AtomicBool::new(true)),
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Unix time in seconds; the one clock read of the control plane.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Serves the API and the join gateway on `listener` until `shutdown` resolves. Then it
/// reports not-ready, tells every WebSocket client to reconnect elsewhere (close 1012, up
/// to 5 s for them to go), stops accepting, lets in-flight requests finish and returns.
pub async fn run(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let ready = state.ready.clone();
    let gateway = state.gateway.clone();
    let app = api::router(state);
    use axum::serve::ListenerExt as _;
    // No Nagle: WebSocket messages over 256 bytes go out as several small frames, and
    // Nagle would hold each one back until the previous was acknowledged (with delayed
    // ACKs, 40 ms apiece). Set per connection, whoever made the listener.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            ready.store(false, Ordering::Relaxed);
            tracing::info!(
                connections = gateway.connection_count(),
                "shutting down: draining WebSocket clients, finishing in-flight requests"
            );
            gateway.drain(std::time::Duration::from_secs(5)).await;
        })
        .await
}
