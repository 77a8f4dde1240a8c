//! The `spacegate` command: `serve` (the default), `tokens`, `sign`, `verify`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use spacegate_auth::{PrivateKey, SignOptions, VerifyOptions};
use spacegate_proto::signaling::{IceServer, SignalEncoding, Simulcast};
use spacegate_proto::{AccessTokenId, KeyId, ParticipantId, Role, SpaceId};
use spacegate_server::config::{Config, FileConfig, Overrides};
use spacegate_server::gateway::GatewayConfig;
use spacegate_server::media::MediaConfig;
use spacegate_server::{AppState, keys::KeyCache, now_secs, tokens};
use spacegate_session::{LeaseRenewal, RedisRegistry};
use spacegate_signaling::SpaceConfig;
use spacegate_store::{Permissions, PostgresOptions, PostgresStore, SqliteStore, Store};

#[derive(Debug, Parser)]
#[command(
    name = "spacegate",
    version,
    about = "Self-hosted, Mux-compatible real-time video gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default when no command is given).
    Serve(Box<ServeArgs>),
    /// Manage access tokens (works while the server is stopped).
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Sign a join token for a space, like `mux spaces:sign`.
    Sign(SignArgs),
    /// Check a join token against the stored signing keys and spaces.
    Verify(VerifyArgs),
}

#[derive(Debug, Args, Clone, Default)]
struct StoreArgs {
    /// TOML config file.
    #[arg(long, env = "SPACEGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Directory of the embedded store [default: ./spacegate-data].
    #[arg(long, env = "SPACEGATE_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// PostgreSQL instead of the embedded store: postgres://USER[:PASSWORD]@HOST:PORT/DB
    /// (cluster mode; migrations run on start).
    #[arg(
        long,
        env = "SPACEGATE_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    database_url: Option<String>,
}

#[derive(Debug, Args, Clone, Default)]
struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Address to listen on, ADDR:PORT; port 0 picks a free one [default: 127.0.0.1:8080].
    #[arg(long, env = "SPACEGATE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Environment of the access token created on first start [default: default].
    #[arg(long, env = "SPACEGATE_ENVIRONMENT")]
    environment: Option<String>,
    /// Log filter, e.g. `info` or `debug`.
    #[arg(long, env = "SPACEGATE_LOG")]
    log: Option<String>,
    /// Most participants in one space at once [default: 100].
    #[arg(long, env = "SPACEGATE_MAX_PARTICIPANTS")]
    max_participants: Option<u32>,
    /// UDP address for all media, ADDR:PORT [default: the --listen address and port].
    #[arg(long, env = "SPACEGATE_MEDIA_LISTEN")]
    media_listen: Option<SocketAddr>,
    /// IP that clients reach the media port at (NAT, containers) [default: the bound one].
    #[arg(long, env = "SPACEGATE_MEDIA_PUBLIC_IP")]
    media_public_ip: Option<std::net::IpAddr>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics [default: off].
    #[arg(long, env = "SPACEGATE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Most WebSocket connections at once; beyond, joins are told to try again
    /// [default: the open-file limit less 256].
    #[arg(long, env = "SPACEGATE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Joins per second one source address may start; 0 for no limit [default: 20].
    #[arg(long, env = "SPACEGATE_JOIN_RATE_PER_IP")]
    join_rate_per_ip: Option<u32>,
    /// Burst of joins one source address may start at once [default: 200].
    #[arg(long, env = "SPACEGATE_JOIN_BURST_PER_IP")]
    join_burst_per_ip: Option<u32>,
    /// Take a join's source address from X-Forwarded-For (only behind a trusted proxy).
    #[arg(long, env = "SPACEGATE_TRUST_FORWARDED_FOR")]
    trust_forwarded_for: Option<bool>,
    /// PEM certificate chain: serve HTTPS and WSS (with --tls-key); re-read on SIGHUP.
    #[arg(long, env = "SPACEGATE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SPACEGATE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Redis for the session registry shared by the cluster's nodes: redis://HOST:PORT
    /// [default: in memory, one node].
    #[arg(long, env = "SPACEGATE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// This node's id in the cluster [default: generated].
    #[arg(long, env = "SPACEGATE_NODE_ID")]
    node_id: Option<String>,
    /// Cluster name: the prefix of every Redis key [default: spacegate].
    #[arg(long, env = "SPACEGATE_CLUSTER")]
    cluster: Option<String>,
    /// Milliseconds this node's participants stay claimed in Redis after its last lease
    /// renewal: a node that dies frees their ids within this [default: 6000].
    #[arg(long, env = "SPACEGATE_NODE_LEASE_MS")]
    node_lease_ms: Option<u64>,
    /// Where the other nodes reach this one to carry joins for spaces homed here:
    /// ws://HOST:PORT [default: ws:// + the address it listens on].
    #[arg(long, env = "SPACEGATE_INTERNAL_URL")]
    internal_url: Option<String>,
    /// On SIGTERM, milliseconds clients (told to reconnect) get to go before the process
    /// exits [default: 5000].
    #[arg(long, env = "SPACEGATE_DRAIN_TIMEOUT_MS")]
    drain_timeout_ms: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Create an access token; prints its secret once.
    Create {
        #[command(flatten)]
        store: StoreArgs,
        /// Environment of the token (created if new).
        #[arg(long, default_value = "default")]
        environment: String,
        /// Comma-separated: read, write.
        #[arg(long, default_value = "read,write")]
        permissions: String,
        /// A label for humans.
        #[arg(long)]
        name: Option<String>,
        /// Print JSON: {"id","secret","environment","permissions"}.
        #[arg(long)]
        json: bool,
    },
    /// List access tokens (never their secrets).
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
    /// Revoke an access token; requests with it fail at once.
    Revoke {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
    },
}

#[derive(Debug, Args)]
struct SignArgs {
    /// The space the token admits to (`sub`).
    space_id: String,
    /// Signing key id (`kid`).
    #[arg(long, env = "MUX_SIGNING_KEY")]
    key_id: String,
    /// Private key: base64 of a PEM (as the API returns it), a PEM, or @FILE.
    #[arg(long, env = "MUX_PRIVATE_KEY", hide_env_values = true)]
    private_key: String,
    #[arg(long, default_value = "publisher")]
    role: String,
    #[arg(long)]
    participant_id: Option<String>,
    /// Lifetime with a unit: 30s, 15m, 1h, 7d.
    #[arg(long, default_value = "7d")]
    expires_in: String,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The join token (JWT).
    token: String,
}

fn load_config(store: &StoreArgs, serve: Option<&ServeArgs>) -> Result<Config> {
    let file = match &store.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let over = Overrides {
        listen: serve.and_then(|s| s.listen),
        data_dir: store.data_dir.clone(),
        environment: serve.and_then(|s| s.environment.clone()),
        log: serve.and_then(|s| s.log.clone()),
        max_participants: serve.and_then(|s| s.max_participants),
        media_listen: serve.and_then(|s| s.media_listen),
        media_public_ip: serve.and_then(|s| s.media_public_ip),
        metrics_listen: serve.and_then(|s| s.metrics_listen),
        max_connections: serve.and_then(|s| s.max_connections),
        join_rate_per_ip: serve.and_then(|s| s.join_rate_per_ip),
        join_burst_per_ip: serve.and_then(|s| s.join_burst_per_ip),
        trust_forwarded_for: serve.and_then(|s| s.trust_forwarded_for),
        tls_cert: serve.and_then(|s| s.tls_cert.clone()),
        tls_key: serve.and_then(|s| s.tls_key.clone()),
        database_url: store.database_url.clone(),
        redis_url: serve.and_then(|s| s.redis_url.clone()),
        node_id: serve.and_then(|s| s.node_id.clone()),
        cluster: serve.and_then(|s| s.cluster.clone()),
        node_lease_ms: serve.and_then(|s| s.node_lease_ms),
        internal_url: serve.and_then(|s| s.internal_url.clone()),
        drain_timeout_ms: serve.and_then(|s| s.drain_timeout_ms),
    };
    Config::resolve(file, over).map_err(|e| anyhow::anyhow!(e))
}

/// PostgreSQL when a database URL is configured, else the embedded SQLite store.
async fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    if let Some(url) = &config.database_url {
        // The URL holds the password: the error names the server, not the URL.
        let store = PostgresStore::connect(url, &PostgresOptions::default())
            .await
            .context("opening the PostgreSQL store (--database-url)")?;
        return Ok(Arc::new(store));
    }
    let store = SqliteStore::open_dir(&config.data_dir)
        .await
        .with_context(|| format!("opening store in {}", config.data_dir.display()))?;
    Ok(Arc::new(store))
}

/// The session registry: in memory for one node, on Redis when a Redis URL is configured
/// (participant ids are unique across every node of the cluster).
struct OpenRegistry {
    shared: Arc<dyn spacegate_session::Registry>,
    redis: Option<Arc<RedisRegistry>>,
}

async fn open_registry(config: &Config) -> Result<OpenRegistry> {
    let Some(url) = &config.redis_url else {
        return Ok(OpenRegistry {
            shared: Arc::new(spacegate_session::MemoryRegistry::default()),
            redis: None,
        });
    };
    let redis = RedisRegistry::connect(url, &config.cluster, &config.node_id, config.node_lease)
        .await
        .context("connecting the session registry (--redis-url)")?;
    tracing::info!(node = %config.node_id, cluster = %config.cluster, lease_ms = config.node_lease.as_millis() as u64, "session registry on Redis");
    let redis = Arc::new(redis);
    Ok(OpenRegistry {
        shared: redis.clone(),
        redis: Some(redis),
    })
}

/// Renews this node's registry lease every third of it.
///
/// A node that cannot renew (Redis down, or this node cut off from it) keeps its clients
/// for as long as its lease certainly lives, so a short Redis outage costs nobody their
/// call. Past two thirds of the lease without a renewal another node may soon take its
/// spaces over (their home claims die with the lease): it stops hosting, telling every
/// client to reconnect (1012), so no space ever has two homes. If the lease lapsed anyway,
/// the same.
fn keep_node_lease(
    redis: Arc<RedisRegistry>,
    gateway: Arc<spacegate_server::gateway::Gateway>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let lease = redis.lease();
        let mut tick = tokio::time::interval(lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        // Measured from before the renewal was sent: Redis may have applied it later,
        // never earlier.
        let mut renewed_at = tokio::time::Instant::now();
        let mut hosting = true;
        let mut cpu = CpuMeter::default();
        loop {
            tick.tick().await;
            redis.set_load(load_score(gateway.load(), cpu.busy()));
            let sent = tokio::time::Instant::now();
            // Bounded by the tick: a Redis that hangs must not hold up the decision below.
            let renewed = tokio::time::timeout(lease / 3, redis.renew())
                .await
                .unwrap_or_else(|_| {
                    Err(spacegate_session::ReserveError::Backend(
                        "lease renewal timed out".into(),
                    ))
                });
            match renewed {
                Ok(LeaseRenewal::Renewed) => {
                    renewed_at = sent;
                    hosting = true;
                }
                Ok(LeaseRenewal::Lapsed) => {
                    renewed_at = sent;
                    hosting = true;
                    tracing::warn!("node lease had lapsed; every connection is asked to reconnect");
                    gateway.reconnect_all();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "node lease renewal failed");
                    if hosting && renewed_at.elapsed() >= lease * 2 / 3 {
                        hosting = false;
                        tracing::warn!(
                            "node lease about to run out without Redis; every connection is asked to reconnect"
                        );
                        gateway.reconnect_all();
                    }
                }
            }
            if !hosting {
                // Clients that got in meanwhile (none should: joins need the registry)
                // are sent away too.
                gateway.reconnect_all();
            }
        }
    })
}

/// A node whose process used at least this share of its cores since the last renewal
/// counts as busy: new spaces go elsewhere while any node is not.
const BUSY_CPU_SHARE: f64 = 0.9;

/// The load a node publishes: participants and peer connections, and far above any other
/// node's while its CPU is saturated (it is chosen only when every node is).
fn load_score(load: u64, busy: bool) -> u64 {
    if busy {
        load.saturating_add(1 << 40)
    } else {
        load
    }
}

/// The process's CPU share between two calls to [`CpuMeter::busy`].
#[derive(Default)]
struct CpuMeter {
    last: Option<(std::time::Instant, f64)>,
}

impl CpuMeter {
    fn busy(&mut self) -> bool {
        let Some((cpu, _)) = spacegate_server::metrics::process_usage() else {
            return false;
        };
        let now = std::time::Instant::now();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let busy = self.last.is_some_and(|(at, before)| {
            let wall = now.duration_since(at).as_secs_f64();
            wall > 0.0 && (cpu - before) / wall >= BUSY_CPU_SHARE * cores
        });
        self.last = Some((now, cpu));
        busy
    }
}

/// Every lease period, spaces the store says are active but that have no live home are
/// ended: their home node died with participants in them (nobody is connected to a space
/// that no node hosts). Each is ended only in the session it was seen in, so a space that
/// a node re-homes meanwhile (which starts a new session) is left alone. Every node runs
/// it; the compare-and-set makes that harmless.
fn sweep_orphaned_spaces(
    redis: Arc<RedisRegistry>,
    store: Arc<dyn Store>,
    every: std::time::Duration,
) {
    use spacegate_session::SpaceHomes as _;
    const PAGE: u32 = 500;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(std::time::Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut after = None;
            loop {
                let page = match store.active_spaces(after.as_ref(), PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::debug!(error = %e, "orphan sweep: store unavailable");
                        break;
                    }
                };
                let Some(last) = page.last() else { break };
                after = Some(last.0.clone());
                let ids: Vec<_> = page.iter().map(|(id, _)| id.clone()).collect();
                let Ok(live) = redis.live_homes(&ids).await else {
                    break;
                };
                for ((id, session), live) in page.iter().zip(live) {
                    if !live && let Ok(true) = store.end_space_session(id, session.as_ref()).await {
                        tracing::info!(space = %id, "space ended: its home node is gone");
                    }
                }
                if page.len() < PAGE as usize {
                    break;
                }
            }
        }
    });
}

/// mimalloc instead of glibc's malloc: a join allocates and frees a few hundred small
/// objects across tasks, and glibc spent ~9 % of a join storm's CPU in `malloc`,
/// `free` and `malloc_consolidate` (perf); its per-chunk headers also add to every idle
/// connection's memory.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(*args).await,
        Some(Command::Tokens(cmd)) => tokens_command(cmd).await,
        Some(Command::Sign(args)) => sign(args),
        Some(Command::Verify(args)) => verify(args).await,
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let config = load_config(&args.store, Some(&args))?;
    init_logging(&config.log)?;
    let store = open_store(&config).await?;
    let registry = open_registry(&config).await?;
    // A single node owns every space of its store: nobody is connected before it listens,
    // whatever the store says after a crash (kill -9 between a join and its status write,
    // or an unflushed leave). In a cluster other nodes hold participants: not this
    // node's to reset.
    let stale = if registry.redis.is_some() {
        0
    } else {
        store
            .mark_all_spaces_idle()
            .await
            .context("marking spaces idle on start")?
    };
    if stale > 0 {
        tracing::info!(
            spaces = stale,
            "spaces left active by the last run are idle again"
        );
    }
    let mut out = std::io::stdout().lock();
    if let Some(token) = tokens::bootstrap(store.as_ref(), &config.environment, now_secs()).await? {
        // Printed once, to stdout only (never to the log): the secret is not stored.
        writeln!(
            out,
            "spacegate: created an access token in environment {:?}; store it now, the secret is not shown again:\n  MUX_TOKEN_ID={}\n  MUX_TOKEN_SECRET={}",
            token.environment,
            token.id,
            token.secret.expose()
        )?;
    }
    let listener = bind(config.listen).with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    // By default media takes the same port number as HTTP, on UDP, including the port
    // picked for `--listen …:0`.
    let media_listen = if config.media_listen == config.listen {
        addr
    } else {
        config.media_listen
    };
    let state = AppState::with_gateway(
        store,
        registry.shared.clone(),
        GatewayConfig {
            max_participants: config.max_participants,
            space: Arc::new(SpaceConfig {
                ice_servers: config
                    .ice_servers
                    .iter()
                    .map(|s| IceServer {
                        urls: s.urls.clone(),
                        username: s.username.clone(),
                        credential: s.credential.clone(),
                    })
                    .collect(),
                simulcast: Simulcast {
                    camera_encodings: encodings(&config.simulcast.camera),
                    screenshare_encodings: encodings(&config.simulcast.screenshare),
                },
                ..SpaceConfig::default()
            }),
            media: MediaConfig {
                // Port 0 for HTTP means "any free port"; media gets its own free one.
                listen: media_listen,
                public_ip: config.media_public_ip,
                // In a cluster the offers name the node that carries the media.
                sfu_id: if config.redis_url.is_some() {
                    format!("sfu-{}", config.node_id)
                } else {
                    spacegate_server::media::SFU_ID.to_string()
                },
                ..MediaConfig::default()
            },
            max_connections: config
                .max_connections
                .unwrap_or_else(default_max_connections),
            join_rate_per_ip: config.join_rate_per_ip,
            join_burst_per_ip: config.join_burst_per_ip,
            trust_forwarded_for: config.trust_forwarded_for,
            drain_timeout: config.drain_timeout,
            ..GatewayConfig::default()
        },
    )
    .with_context(|| format!("binding the media socket {media_listen}"))?;
    let mut resign = None;
    if let Some(redis) = registry.redis {
        let internal = match &config.internal_url {
            Some(url) => url.clone(),
            None if addr.ip().is_unspecified() => anyhow::bail!(
                "listening on {addr}: give --internal-url, the address other nodes reach this one at"
            ),
            // Nodes carry joins to each other over plain WebSockets: a private network,
            // or a proxy in front that terminates TLS.
            None if config.tls.is_some() => anyhow::bail!(
                "with --tls-cert, give --internal-url: a ws:// address other nodes reach this one at"
            ),
            None => format!("ws://{addr}"),
        };
        redis
            .advertise(&internal)
            .await
            .context("advertising this node in the registry")?;
        state.gateway.set_homes(redis.clone());
        let keeper = keep_node_lease(redis.clone(), state.gateway.clone());
        sweep_orphaned_spaces(redis.clone(), state.store.clone(), config.node_lease);
        resign = Some((redis, keeper));
        if let Some(url) = &config.redis_url {
            spacegate_server::cluster::spawn_bus(url, &config.cluster, state.keys.clone())?;
        }
    }
    let media = &state.gateway.media;
    let shutdown = shutdown_signal();
    let tls = match &config.tls {
        None => None,
        Some(files) => {
            let tls = Arc::new(spacegate_server::tls::Tls::load(files)?);
            reload_on_sighup(tls.clone());
            Some(tls)
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    writeln!(out, "spacegate: listening on {scheme}://{addr}")?;
    writeln!(
        out,
        "spacegate: media on udp://{} (clients are told {})",
        media.local_addr, media.candidate
    )?;
    if let Some(metrics_addr) = config.metrics_listen {
        let metrics_listener = bind(metrics_addr)
            .with_context(|| format!("binding the metrics listener {metrics_addr}"))?;
        writeln!(
            out,
            "spacegate: metrics on http://{}/metrics",
            metrics_listener.local_addr()?
        )?;
        let gateway = state.gateway.clone();
        // Lives as long as the process; its listener closes when the process exits.
        tokio::spawn(async move {
            let never = std::future::pending::<()>();
            if let Err(e) =
                spacegate_server::metrics::serve(&gateway, metrics_listener, never).await
            {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
    }
    out.flush()?;
    drop(out);
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "serving");
    // On a worker thread, not on `main`'s own: `block_on` polls its future on the main
    // thread, so every accepted connection would be handed across threads (a wakeup and a
    // context switch per join; perf showed 14 % of a join storm's CPU in task switches).
    tokio::spawn(spacegate_server::run_with_tls(
        state, listener, tls, shutdown,
    ))
    .await
    .context("the server task panicked")??;
    if let Some((redis, keeper)) = resign {
        // No renewal after this: it would take a fresh lease for a node that is leaving
        // and make it look like the emptiest node to send new spaces to.
        keeper.abort();
        // Whatever this node still holds is free for the others at once, not when its
        // lease would have run out: the clients it sent away reconnect elsewhere now.
        if let Err(e) = redis.resign().await {
            tracing::warn!(error = %e, "could not give up the node lease; it runs out by itself");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// The WebRTC stack's crates log ICE credentials (`IceCreds { pass: … }`), SDPs and key
/// material at debug and trace. Whatever the filter asks for, they log at most at info:
/// nothing secret may reach a log at any level, and our own crates say at debug what an
/// operator needs (without the secrets).
const WIRE_LEVEL_CRATES: &[&str] = &[
    "str0m",
    "str0m_proto",
    "str0m_aws_lc_rs",
    "is",
    "dimpl",
    "sctp_proto",
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "h2",
];

fn init_logging(filter: &str) -> Result<()> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let wanted = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid log filter {filter:?}"))?;
    let capped = WIRE_LEVEL_CRATES
        .iter()
        .fold(Targets::new().with_default(LevelFilter::TRACE), |t, c| {
            t.with_target(*c, LevelFilter::INFO)
        });
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(wanted)
        .with_filter(capped);
    tracing_subscriber::registry().with(layer).init();
    Ok(())
}

/// The open-file limit less room for everything that is not a client connection (the
/// store, the media socket, listeners, connections being refused), so that at the limit a
/// join is told to try again instead of accept() failing without a word to the client.
fn default_max_connections() -> usize {
    // The soft limit, from /proc (Linux): the one accept() runs into. Read without
    // `unsafe` (getrlimit), which this workspace forbids.
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .and_then(|v| v.parse::<usize>().ok());
    match soft {
        Some(n) => n.saturating_sub(256).max(64),
        // "unlimited", or not Linux.
        None => spacegate_server::gateway::DEFAULT_MAX_CONNECTIONS,
    }
}

fn encodings(layers: &[spacegate_server::config::EncodingConfig]) -> Vec<SignalEncoding> {
    layers
        .iter()
        .map(|l| SignalEncoding {
            rid: l.rid.clone(),
            max_bitrate: l.max_bitrate,
            scale_resolution_down_by: l.scale_resolution_down_by,
            max_framerate: l.max_framerate,
        })
        .collect()
}

/// Binds with a deep accept queue: a burst of joins (every SDK client reconnecting after a
/// restart) must not overflow tokio's default backlog of 1024, or the kernel drops SYNs and
/// clients wait a full second for the retransmit.
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Re-reads the TLS certificate and key on every SIGHUP (certbot and friends renew the
/// files in place and signal the server). New connections get the new certificate; a file
/// that does not load is logged and the old certificate stays.
fn reload_on_sighup(tls: Arc<spacegate_server::tls::Tls>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: the TLS certificate will not reload");
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match tls.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "TLS reload failed; keeping the old certificate")
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = tls;
}

/// Registers for SIGINT and SIGTERM now, and resolves when one arrives. Registering
/// before "listening" is printed matters: a supervisor may signal as soon as it reads
/// that line, and a signal before registration would kill the process ungracefully.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (int, term) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(int) => {},
                () = wait(term) => {},
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

async fn tokens_command(cmd: TokensCommand) -> Result<()> {
    match cmd {
        TokensCommand::Create {
            store,
            environment,
            permissions,
            name,
            json,
        } => {
            let permissions = Permissions::parse(&permissions).map_err(anyhow::Error::msg)?;
            if environment.trim().is_empty() {
                bail!("--environment must not be empty");
            }
            let config = load_config(&store, None)?;
            let store = open_store(&config).await?;
            let token =
                tokens::create(store.as_ref(), &environment, permissions, name, now_secs()).await?;
            if json {
                println!("{}", serde_json::to_string(&token)?);
            } else {
                println!(
                    "MUX_TOKEN_ID={}\nMUX_TOKEN_SECRET={}\n# environment {:?}, permissions {}",
                    token.id,
                    token.secret.expose(),
                    token.environment,
                    token.permissions.join(",")
                );
            }
        }
        TokensCommand::List { store, json } => {
            let config = load_config(&store, None)?;
            let store = open_store(&config).await?;
            let list = store.list_access_tokens().await?;
            if json {
                let items: Vec<_> = list
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "id": t.id,
                            "environment": t.environment.name,
                            "permissions": t.permissions.names(),
                            "name": t.name,
                            "created_at": t.created_at.to_string(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string(&items)?);
            } else {
                for t in list {
                    println!(
                        "{}\t{}\t{}\t{}",
                        t.id,
                        t.environment.name,
                        t.permissions,
                        t.name.unwrap_or_default()
                    );
                }
            }
        }
        TokensCommand::Revoke { store, id } => {
            let id = AccessTokenId::new(id)?;
            let config = load_config(&store, None)?;
            let store = open_store(&config).await?;
            if !store.revoke_access_token(&id).await? {
                bail!("no access token {id}");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}

/// `30s`, `15m`, `1h`, `7d` → seconds. A bare number is refused: `mux spaces:sign` read it
/// as milliseconds, and guessing either way would mint tokens of the wrong lifetime.
fn parse_duration(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .with_context(|| format!("duration {text:?} needs a unit: s, m, h or d"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .with_context(|| format!("invalid duration {text:?}"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("duration {text:?} needs a unit: s, m, h or d"),
    };
    n.checked_mul(scale)
        .filter(|&s| s > 0)
        .with_context(|| format!("duration {text:?} is out of range"))
}

fn sign(args: SignArgs) -> Result<()> {
    let key_text = match args.private_key.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading private key from {path}"))?,
        None => args.private_key.clone(),
    };
    let key = PrivateKey::parse(&key_text).context("--private-key")?;
    let role: Role = args.role.parse().context("--role")?;
    let lifetime = parse_duration(&args.expires_in)?;
    let options = SignOptions {
        key_id: KeyId::new(args.key_id).context("--key-id")?,
        space_id: SpaceId::new(args.space_id).context("SPACE_ID")?,
        expires_at: u64::try_from(now_secs())
            .unwrap_or(0)
            .saturating_add(lifetime),
        role,
        participant_id: args
            .participant_id
            .map(ParticipantId::new)
            .transpose()
            .context("--participant-id")?,
    };
    println!("{}", spacegate_auth::sign(&key, &options)?);
    Ok(())
}

async fn verify(args: VerifyArgs) -> Result<()> {
    let config = load_config(&args.store, None)?;
    let store = open_store(&config).await?;
    let keys = KeyCache::default();
    let now = u64::try_from(now_secs()).unwrap_or(0);
    let admitted = spacegate_server::join::verify_join_token(
        store.as_ref(),
        &keys,
        args.token.trim(),
        now,
        &VerifyOptions::default(),
    )
    .await
    .context("token refused")?;
    let c = admitted.claims;
    println!(
        "{}",
        serde_json::json!({
            "space_id": c.space_id,
            "key_id": c.key_id,
            "role": c.role,
            "participant_id": c.participant_id,
            "expires_at": c.expires_at,
            "environment_id": admitted.environment_id,
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{load_score, parse_duration};

    #[test]
    fn a_saturated_node_loses_every_choice_of_home_to_one_that_is_not() {
        let busy_and_empty = load_score(0, true);
        let idle_and_full = load_score(10_000, false);
        assert!(idle_and_full < busy_and_empty);
        assert!(load_score(3, false) < load_score(4, false));
        assert!(
            load_score(3, true) < load_score(4, true),
            "all busy: still by load"
        );
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("90s").expect("s"), 90);
        assert_eq!(parse_duration("15m").expect("m"), 900);
        assert_eq!(parse_duration("1h").expect("h"), 3600);
        assert_eq!(parse_duration("7d").expect("d"), 604_800);
        assert!(parse_duration("3600").is_err());
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
