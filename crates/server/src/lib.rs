//! The spacegate server: the only crate that wires the others to sockets, clocks and disks.
//!
//! Owns: configuration, the HTTP router (Mux-compatible REST API, health, OpenAPI), access
//! token handling, the signing-key cache of the join path, and the `spacegate` CLI. The
//! server is a library function, [`run`], so tests start it on port 0 in-process.

pub mod api;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod gateway;
pub mod ids;
pub mod join;
pub mod keys;
mod listen;
pub mod media;
pub mod metrics;
pub mod tls;
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
///
/// Our own accept loop rather than `axum::serve`: that one rebuilds the router (cloning
/// every route) for each connection, and a join is one connection, so that clone was ~5 %
/// of a join's CPU (perf). Joins are answered by [`listen`] itself; every other request
/// goes to hyper and the router, built once.
pub async fn run(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with_tls(state, listener, None, shutdown).await
}

/// [`run`], with HTTPS and WSS when `tls` is given: every accepted connection does the TLS
/// handshake first (within the head timeout), with the certificate in use at that moment.
pub async fn run_with_tls(
    state: AppState,
    listener: TcpListener,
    tls: Option<Arc<tls::Tls>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let ready = state.ready.clone();
    let gateway = state.gateway.clone();
    let router = api::router(state.clone());
    // Every connection task holds a receiver: `closed()` resolves once all have ended.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let shutdown = std::pin::pin!(shutdown);
    let mut shutdown = shutdown;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors (or similar): back off instead of spinning, as
                // the connections that hold them must end first.
                if !is_connection_error(&e) {
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        // No Nagle: a message written while the previous one is unacknowledged would wait
        // for that ACK (with delayed ACKs, 40 ms).
        let _ = tcp.set_nodelay(true);
        let (state, router, stopped) = (state.clone(), router.clone(), stopped.clone());
        let peer = tcp.peer_addr().ok().map(|a| a.ip());
        match &tls {
            None => {
                tokio::spawn(listen::connection(state, router, tcp, peer, stopped));
            }
            Some(tls) => {
                let acceptor = tls.acceptor();
                tokio::spawn(async move {
                    let timeout = state.gateway.config.head_timeout;
                    // A handshake that never finishes holds a socket like a slow head.
                    let Ok(Ok(stream)) = tokio::time::timeout(timeout, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    listen::connection(state, router, stream, peer, stopped).await;
                });
            }
        }
    }
    ready.store(false, Ordering::Relaxed);
    tracing::info!(
        connections = gateway.connection_count(),
        "shutting down: draining WebSocket clients, finishing in-flight requests"
    );
    drop(listener);
    gateway.drain(gateway.config.drain_timeout).await;
    let _ = stop.send(true);
    drop(stopped);
    stop.closed().await;
    Ok(())
}

/// Errors of one incoming connection (it went away before we took it), as opposed to the
/// listener's own (out of descriptors).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    )
}
