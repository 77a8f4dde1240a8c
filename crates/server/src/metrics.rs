//! Operational metrics in the Prometheus (OpenMetrics) text format, served on their own
//! listener (`metrics_listen`) so they are never exposed where clients connect.
//!
//! Event metrics (join latency and outcomes, store writes, media queue waits, forwarded
//! media) are recorded where they happen, into atomics. Level metrics (connections,
//! spaces, SFU members and peers, queue depth, process CPU and memory) are read at scrape
//! time, so nothing has to keep them in step.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::gateway::Gateway;

/// How a join attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JoinOutcome {
    Joined,
    /// A token that is malformed, badly signed, for an unknown key or space.
    InvalidToken,
    Expired,
    /// Bad query parameters (display name, subscriptions, reconnect id, early messages).
    BadRequest,
    Duplicate,
    SpaceFull,
    /// The node is saturated (media queue, connection limit): the SDK is told to try
    /// again.
    Overloaded,
    /// The source address started too many joins.
    RateLimited,
    /// Our own failure (store, registry).
    Unavailable,
}

impl JoinOutcome {
    fn label(self) -> &'static str {
        match self {
            JoinOutcome::Joined => "joined",
            JoinOutcome::InvalidToken => "invalid_token",
            JoinOutcome::Expired => "expired",
            JoinOutcome::BadRequest => "bad_request",
            JoinOutcome::Duplicate => "duplicate",
            JoinOutcome::SpaceFull => "space_full",
            JoinOutcome::Overloaded => "overloaded",
            JoinOutcome::RateLimited => "rate_limited",
            JoinOutcome::Unavailable => "unavailable",
        }
    }
}

/// Parts of a join, timed separately so a benchmark can say where a join's time goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JoinStage {
    /// Token decode, RSA verify, key and space lookup.
    Verify,
    /// The registry's atomic claim.
    Registry,
    /// The space's state machine: `joined` built, others told (and the media plane, if
    /// the space has media).
    Space,
}

impl JoinStage {
    fn label(self) -> &'static str {
        match self {
            JoinStage::Verify => "verify",
            JoinStage::Registry => "registry",
            JoinStage::Space => "space",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Stage {
    stage: &'static str,
}

fn seconds_buckets() -> Histogram {
    // 50 µs to ~3.3 s: a join's stages sit at the low end, a stalled store at the top.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 17,
    ))
}

/// The recorded metrics of one gateway.
#[derive(Debug)]
pub struct Metrics {
    join_seconds: Histogram,
    join_stage_seconds: Family<Stage, Histogram>,
    joins: Family<Outcome, Counter>,
    store_write_seconds: Histogram,
    store_write_errors: Counter,
    pub(crate) media_queue_wait_seconds: Histogram,
    pub(crate) media_restarts: Counter,
    pub(crate) media_refused_commands: Counter,
    pub(crate) forwarded_frames: Counter,
    pub(crate) forwarded_bytes: Counter,
    pub(crate) sfu_members: prometheus_client::metrics::gauge::Gauge,
    pub(crate) sfu_peer_connections: prometheus_client::metrics::gauge::Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            join_seconds: seconds_buckets(),
            join_stage_seconds: Family::new_with_constructor(seconds_buckets),
            joins: Family::default(),
            store_write_seconds: seconds_buckets(),
            store_write_errors: Counter::default(),
            media_queue_wait_seconds: seconds_buckets(),
            media_restarts: Counter::default(),
            media_refused_commands: Counter::default(),
            forwarded_frames: Counter::default(),
            forwarded_bytes: Counter::default(),
            sfu_members: Default::default(),
            sfu_peer_connections: Default::default(),
        }
    }
}

impl Metrics {
    /// A join attempt ended; `took` is from the upgrade to `joined` queued (or the refusal).
    pub fn join(&self, outcome: JoinOutcome, took: Duration) {
        self.joins
            .get_or_create(&Outcome {
                outcome: outcome.label(),
            })
            .inc();
        if outcome == JoinOutcome::Joined {
            self.join_seconds.observe(took.as_secs_f64());
        }
    }

    pub fn join_stage(&self, stage: JoinStage, took: Duration) {
        self.join_stage_seconds
            .get_or_create(&Stage {
                stage: stage.label(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn store_write(&self, took: Duration, ok: bool) {
        self.store_write_seconds.observe(took.as_secs_f64());
        if !ok {
            self.store_write_errors.inc();
        }
    }

    /// Adds the SFU's running totals since the last call. A restarted SFU starts from
    /// zero again; the counter then takes the new totals whole.
    pub(crate) fn sfu_totals(&self, last: &mut (u64, u64), frames: u64, bytes: u64) {
        let delta = |now: u64, before: u64| if now >= before { now - before } else { now };
        self.forwarded_frames.inc_by(delta(frames, last.0));
        self.forwarded_bytes.inc_by(delta(bytes, last.1));
        *last = (frames, bytes);
    }
}

/// utime + stime of this process in seconds, and its resident set in bytes.
pub fn process_usage() -> Option<(f64, i64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15,
    // rss (in pages) field 24.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let pages: i64 = f.get(21)?.parse().ok()?;
    // USER_HZ is 100 and pages are 4 KiB on every Linux this runs on.
    Some((ticks / 100.0, pages * 4096))
}

/// The metrics text for one scrape.
pub fn render(gw: &Gateway) -> String {
    let m = &gw.metrics;
    let mut r = Registry::default();
    let gauge = |v: usize| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    r.register(
        "spacegate_join_duration_seconds",
        "Time from the WebSocket upgrade to `joined` queued, of successful joins",
        m.join_seconds.clone(),
    );
    r.register(
        "spacegate_join_stage_seconds",
        "Time spent in each stage of a join",
        m.join_stage_seconds.clone(),
    );
    r.register(
        "spacegate_joins",
        "Join attempts by outcome",
        m.joins.clone(),
    );
    r.register(
        "spacegate_connected_participants",
        "Joined WebSocket connections on this node",
        gauge(gw.connection_count()),
    );
    r.register(
        "spacegate_live_spaces",
        "Spaces with at least one participant on this node",
        gauge(gw.live_space_count()),
    );
    r.register(
        "spacegate_sfu_members",
        "Members of the media plane (one per joined connection)",
        m.sfu_members.clone(),
    );
    r.register(
        "spacegate_sfu_peer_connections",
        "Open WebRTC peer connections",
        m.sfu_peer_connections.clone(),
    );
    r.register(
        "spacegate_forwarded_frames",
        "Media frames forwarded to subscribers (an audio frame is one RTP packet; video frames may be several)",
        m.forwarded_frames.clone(),
    );
    r.register(
        "spacegate_forwarded_bytes",
        "Payload bytes of the forwarded media frames",
        m.forwarded_bytes.clone(),
    );
    r.register(
        "spacegate_media_queue_depth",
        "Commands waiting for the media thread",
        gauge(gw.media.queue_depth()),
    );
    r.register(
        "spacegate_media_queue_wait_seconds",
        "Time commands waited for the media thread",
        m.media_queue_wait_seconds.clone(),
    );
    r.register(
        "spacegate_media_refused_commands",
        "Client media messages refused because the media queue was full",
        m.media_refused_commands.clone(),
    );
    r.register(
        "spacegate_media_restarts",
        "Times the media plane was restarted after a panic",
        m.media_restarts.clone(),
    );
    r.register(
        "spacegate_store_write_seconds",
        "Latency of space-status writes to the store",
        m.store_write_seconds.clone(),
    );
    r.register(
        "spacegate_store_write_errors",
        "Space-status writes that failed",
        m.store_write_errors.clone(),
    );
    if let Some((cpu, rss)) = process_usage() {
        r.register(
            "process_cpu_seconds",
            "User and system CPU time of the process",
            ConstCounter::new(cpu),
        );
        r.register(
            "process_resident_memory_bytes",
            "Resident memory of the process",
            ConstGauge::new(rss),
        );
    }
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &r);
    text
}

/// The metrics listener's app: `GET /metrics`.
/// Holds the gateway weakly: a scrape after shutdown gets 503, and the listener never
/// keeps a stopped gateway (and its media thread) alive.
pub fn router(gateway: &std::sync::Arc<Gateway>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::http::header::CONTENT_TYPE;
    use axum::response::IntoResponse;
    let gateway = std::sync::Arc::downgrade(gateway);
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let gw = gateway.upgrade();
            async move {
                match gw {
                    Some(gw) => (
                        [(
                            CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        render(&gw),
                    )
                        .into_response(),
                    None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                }
            }
        }),
    )
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    gateway: &std::sync::Arc<Gateway>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(gateway))
        .with_graceful_shutdown(shutdown)
        .await
}
