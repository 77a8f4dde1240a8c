//! One typed, strict configuration. Sources, highest precedence first: command-line flags,
//! `SPACEGATE_*` environment variables, the TOML file named by `--config` /
//! `SPACEGATE_CONFIG`, built-in defaults. Unknown keys in the file are an error, so a typo
//! never silently falls back to a default.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "./spacegate-data";
pub const DEFAULT_ENVIRONMENT: &str = "default";
pub const DEFAULT_MAX_PARTICIPANTS: u32 = 100;
pub const DEFAULT_CLUSTER: &str = "spacegate";
pub const DEFAULT_NODE_LEASE_MS: u64 = 6000;
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 5000;

/// A node id for a node that was given none: the host name would repeat when a container
/// restarts under the same name while its predecessor's lease is still alive, so a random
/// suffix makes each run a node of its own.
fn generated_node_id() -> String {
    let mut bytes = [0u8; 6];
    // Without randomness the process id still separates concurrent nodes on one host.
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return format!("node-{}", std::process::id());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("node-{hex}")
}

/// The file form: every key optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub environment: Option<String>,
    pub log: Option<String>,
    pub max_participants: Option<u32>,
    pub media_listen: Option<SocketAddr>,
    pub media_public_ip: Option<IpAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub ice_servers: Option<Vec<IceServerConfig>>,
    pub simulcast: Option<SimulcastConfig>,
    pub max_connections: Option<usize>,
    pub join_rate_per_ip: Option<u32>,
    pub join_burst_per_ip: Option<u32>,
    pub trust_forwarded_for: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    pub node_id: Option<String>,
    pub cluster: Option<String>,
    pub node_lease_ms: Option<u64>,
    pub internal_url: Option<String>,
    pub drain_timeout_ms: Option<u64>,
}

/// Simulcast layers the SDK is told to send (`joined.simulcast`), lowest first.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulcastConfig {
    #[serde(default)]
    pub camera: Vec<EncodingConfig>,
    #[serde(default)]
    pub screenshare: Vec<EncodingConfig>,
}

/// One simulcast layer; zero leaves a value to the browser.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodingConfig {
    pub rid: String,
    #[serde(default)]
    pub max_bitrate: f64,
    #[serde(default)]
    pub scale_resolution_down_by: f64,
    #[serde(default)]
    pub max_framerate: f64,
}

/// A STUN or TURN server handed to clients in `joined.ice_servers`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceServerConfig {
    pub urls: Vec<String>,
    pub username: Option<String>,
    pub credential: Option<String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|reason| ConfigError::Parse {
            path: path.to_path_buf(),
            reason,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(s) = &file.simulcast {
            for l in s.camera.iter().chain(&s.screenshare) {
                // Browsers refuse other rids (RFC 8851 and the one-byte header extension).
                let ok = (1..=16).contains(&l.rid.len())
                    && l.rid.bytes().all(|b| b.is_ascii_alphanumeric());
                if !ok {
                    return Err(format!(
                        "simulcast rid {:?} must be 1 to 16 letters or digits",
                        l.rid
                    ));
                }
            }
        }
        Ok(file)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("invalid config file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// The resolved configuration the server runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the API (and, later, the WebSocket gateway) listens. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Directory of the embedded SQLite store.
    pub data_dir: PathBuf,
    /// Environment of the access token created on first start.
    pub environment: String,
    /// `tracing` filter, e.g. `info` or `spacegate_server=debug`.
    pub log: String,
    /// Most participants connected to one space at once.
    pub max_participants: u32,
    /// The one UDP address all media uses. Defaults to the `listen` address and port, so
    /// HTTP, WebSocket and media share one port number (TCP and UDP).
    pub media_listen: SocketAddr,
    /// The address clients reach the media port at, when NAT or a container hides it.
    pub media_public_ip: Option<IpAddr>,
    /// Where Prometheus metrics are served (`GET /metrics`); `None` (the default): off.
    /// A separate listener, so metrics are never exposed where clients connect.
    pub metrics_listen: Option<SocketAddr>,
    /// Given to clients as `ice_servers`. Empty means none: the server's ICE-lite host
    /// candidate is reachable directly, and Google's default STUN is not used.
    pub ice_servers: Vec<IceServerConfig>,
    /// Empty (the default): browsers send one encoding per video track.
    pub simulcast: SimulcastConfig,
    /// Most WebSocket connections at once; `None`: derived from the open-file limit.
    pub max_connections: Option<usize>,
    /// Joins per second from one source address (0: no limit), in bursts of
    /// `join_burst_per_ip`.
    pub join_rate_per_ip: u32,
    pub join_burst_per_ip: u32,
    /// Take a join's source address from `X-Forwarded-For` (behind a trusted proxy only).
    pub trust_forwarded_for: bool,
    /// PEM certificate chain and private key: HTTPS and WSS on the listener (both or
    /// neither). Re-read on SIGHUP.
    pub tls: Option<TlsFiles>,
    /// `postgres://…`: the control plane on PostgreSQL instead of the embedded SQLite
    /// store. Holds a password: never logged.
    pub database_url: Option<String>,
    /// `redis://…`: the session registry on Redis, shared by every node of the cluster
    /// (participant uniqueness across nodes). Never logged either.
    pub redis_url: Option<String>,
    /// This node's name in the cluster: it owns the registry entries of its participants.
    pub node_id: String,
    /// Prefix of every Redis key, so several clusters can share one Redis.
    pub cluster: String,
    /// How long this node's registry entries outlive its last lease renewal (renewed every
    /// third of it): a node that dies frees its participants' ids within this.
    pub node_lease: std::time::Duration,
    /// Where the other nodes of a cluster reach this one (`ws://host:port`) to carry joins
    /// for the spaces it is home to; default: the address it listens on.
    pub internal_url: Option<String>,
    /// On SIGTERM, how long clients (told to reconnect) get to go before the process
    /// exits.
    pub drain_timeout: std::time::Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Values from flags or environment variables (clap merges those two).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub environment: Option<String>,
    pub log: Option<String>,
    pub max_participants: Option<u32>,
    pub media_listen: Option<SocketAddr>,
    pub media_public_ip: Option<IpAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub max_connections: Option<usize>,
    pub join_rate_per_ip: Option<u32>,
    pub join_burst_per_ip: Option<u32>,
    pub trust_forwarded_for: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    pub node_id: Option<String>,
    pub cluster: Option<String>,
    pub node_lease_ms: Option<u64>,
    pub internal_url: Option<String>,
    pub drain_timeout_ms: Option<u64>,
}

impl Config {
    pub fn resolve(file: FileConfig, over: Overrides) -> Result<Config, String> {
        let tls = match (
            over.tls_cert.or(file.tls_cert),
            over.tls_key.or(file.tls_key),
        ) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => return Err("tls_cert and tls_key go together: give both or neither".into()),
        };
        let listen = over.listen.or(file.listen).unwrap_or_else(|| {
            DEFAULT_LISTEN
                .parse()
                .expect("default listen address is valid")
        });
        let cluster = over
            .cluster
            .or(file.cluster)
            .unwrap_or_else(|| DEFAULT_CLUSTER.to_string());
        let node_id = over.node_id.or(file.node_id);
        for (what, value) in [("cluster", Some(&cluster)), ("node_id", node_id.as_ref())] {
            // Both become parts of Redis key names: keep them to characters that cannot
            // break the key layout (':' separates its parts).
            if let Some(v) = value
                && (v.is_empty()
                    || v.len() > 64
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'))
            {
                return Err(format!(
                    "{what} {v:?}: 1 to 64 characters of A-Z a-z 0-9 - _ ."
                ));
            }
        }
        Ok(Config {
            tls,
            database_url: over.database_url.or(file.database_url),
            redis_url: over.redis_url.or(file.redis_url),
            internal_url: over.internal_url.or(file.internal_url),
            drain_timeout: std::time::Duration::from_millis(
                over.drain_timeout_ms
                    .or(file.drain_timeout_ms)
                    .unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS),
            ),
            node_id: node_id.unwrap_or_else(generated_node_id),
            cluster,
            node_lease: std::time::Duration::from_millis(
                over.node_lease_ms
                    .or(file.node_lease_ms)
                    .unwrap_or(DEFAULT_NODE_LEASE_MS),
            ),
            max_connections: over.max_connections.or(file.max_connections),
            join_rate_per_ip: over
                .join_rate_per_ip
                .or(file.join_rate_per_ip)
                .unwrap_or(crate::gateway::DEFAULT_JOIN_RATE_PER_IP),
            join_burst_per_ip: over
                .join_burst_per_ip
                .or(file.join_burst_per_ip)
                .unwrap_or(crate::gateway::DEFAULT_JOIN_BURST_PER_IP),
            trust_forwarded_for: over
                .trust_forwarded_for
                .or(file.trust_forwarded_for)
                .unwrap_or(false),
            listen,
            media_listen: over.media_listen.or(file.media_listen).unwrap_or(listen),
            media_public_ip: over.media_public_ip.or(file.media_public_ip),
            metrics_listen: over.metrics_listen.or(file.metrics_listen),
            ice_servers: file.ice_servers.unwrap_or_default(),
            simulcast: file.simulcast.unwrap_or_default(),
            data_dir: over
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            environment: over
                .environment
                .or(file.environment)
                .unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_string()),
            log: over.log.or(file.log).unwrap_or_else(|| "info".to_string()),
            max_participants: over
                .max_participants
                .or(file.max_participants)
                .unwrap_or(DEFAULT_MAX_PARTICIPANTS),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../../deploy/spacegate.example.toml");
        let file = FileConfig::parse(text).expect("example config is valid");
        assert!(file.listen.is_some() && file.data_dir.is_some());
        assert!(file.media_listen.is_some() && file.ice_servers.is_some());
        let layers = file.simulcast.expect("simulcast example").camera;
        assert_eq!(
            layers.iter().map(|l| l.rid.as_str()).collect::<Vec<_>>(),
            ["l", "h"]
        );
    }

    #[test]
    fn simulcast_rids_browsers_would_refuse_are_refused() {
        let err =
            FileConfig::parse("[[simulcast.camera]]\nrid = \"hi-res!\"\n").expect_err("bad rid");
        assert!(err.contains("hi-res!"), "{err}");
    }

    #[test]
    fn tls_needs_both_files() {
        let over = Overrides {
            tls_cert: Some("/c.pem".into()),
            ..Default::default()
        };
        let err = Config::resolve(FileConfig::default(), over).expect_err("half a TLS setup");
        assert!(err.contains("tls_key"), "{err}");
        let file = FileConfig::parse("tls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"").expect("valid");
        let c = Config::resolve(file, Overrides::default()).expect("valid");
        assert_eq!(
            c.tls,
            Some(TlsFiles {
                cert: "/c.pem".into(),
                key: "/k.pem".into()
            })
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = FileConfig::parse("listn = \"127.0.0.1:1\"").expect_err("typo must fail");
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn flags_beat_file_beats_default() {
        let file =
            FileConfig::parse("listen = \"127.0.0.1:9000\"\ndata_dir = \"/f\"").expect("valid");
        let over = Overrides {
            data_dir: Some("/flag".into()),
            ..Default::default()
        };
        let c = Config::resolve(file, over).expect("valid");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.data_dir, PathBuf::from("/flag"));
        assert_eq!(c.environment, DEFAULT_ENVIRONMENT);
        let d = Config::resolve(FileConfig::default(), Overrides::default()).expect("valid");
        assert_eq!(d.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(
            d.media_listen, d.listen,
            "media shares the port number by default"
        );
        assert!(d.ice_servers.is_empty() && d.media_public_ip.is_none());
        assert!(
            d.listen.ip().is_loopback(),
            "default listens on loopback only"
        );
    }
}
