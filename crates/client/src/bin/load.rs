//! `spacegate-load`: join-throughput, population-scale and idle-connection load against a
//! running spacegate.
//!
//!   spacegate-load join --url http://127.0.0.1:8080 --token-id ID --token-secret S \
//!       --concurrency 100 --joins 5000 [--spaces 10]
//!   spacegate-load hold --url … --connections 15000 --spaces 150
//!   spacegate-load scale --url … --server-pid P --spaces 1000 --populations 0,1000,15000 \
//!       --concurrency 10,100,1000 --joins 5000 [--metrics-url URL] [--csv FILE]
//!   spacegate-load media --url … --subscribers 10 --secs 20 [--idle 5000] [--server-pid P]
//!
//! All create a signing key and spaces through the REST API and sign every token before
//! the clock starts, so only joining (or forwarding) is measured. Output is one JSON
//! object per line.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use serde_json::{Value, json};
use spacegate_auth::{PrivateKey, SignOptions};
use spacegate_client::{ClientError, JoinOptions, RestClient, Session};
use spacegate_proto::Role;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Parser)]
#[command(name = "spacegate-load", about = "Load generator for spacegate")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join and leave as fast as possible; report joins/s and join latency.
    Join {
        #[command(flatten)]
        common: Common,
        /// Joins in flight at once.
        #[arg(long, default_value_t = 100)]
        concurrency: usize,
        /// Total joins.
        #[arg(long, default_value_t = 5000)]
        joins: usize,
        /// Base URLs the joins enter through, round robin, instead of --url (which still
        /// makes the spaces and keys): the nodes of a cluster, as a load balancer would
        /// spread clients over them.
        #[arg(long, value_delimiter = ',')]
        via: Vec<String>,
        /// Before the churn, one participant per space joins through --url and stays, so
        /// every space is hosted there (in a cluster, --url's node is their home): churn
        /// through --via other nodes then measures carried joins.
        #[arg(long)]
        hold_per_space: bool,
        /// Custom events each joined connection sends (one at a time, each awaiting its
        /// echo) before it leaves: the cost of signaling messages (at most 10, the
        /// per-participant rate).
        #[arg(long, default_value_t = 0)]
        messages: usize,
    },
    /// Open idle joined connections and keep them (answering pings) for a while.
    Hold {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Seconds to hold after all are joined.
        #[arg(long, default_value_t = 30)]
        hold_secs: u64,
        /// Joins in flight while ramping up.
        #[arg(long, default_value_t = 200)]
        ramp_concurrency: usize,
    },
    /// One node at scale, in one process and one server run: churn rounds (join, leave at
    /// once) at each concurrency while 0, then more, idle participants are held in the same
    /// spaces, and again after all of them left; server CPU per join, latency and server
    /// RSS per idle connection for each phase.
    Scale(ScaleArgs),
    /// One publisher (webrtc-rs, synthetic audio + video) and N subscribers in one space;
    /// report forwarded RTP packets/s, and with --server-pid the server's CPU µs per
    /// forwarded packet and memory per peer connection.
    Media {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        /// Seconds measured, after every subscriber receives video.
        #[arg(long, default_value_t = 20)]
        secs: u64,
        /// Video packets per second (one synthetic frame per packet); audio is 50/s.
        #[arg(long, default_value_t = 300)]
        video_pps: u32,
        /// Video frame (= packet payload) size in bytes.
        #[arg(long, default_value_t = 1000)]
        frame_bytes: usize,
        /// Signaling-only participants held connected in other spaces during the
        /// measurement (the media plane should not pay for them).
        #[arg(long, default_value_t = 0)]
        idle: usize,
        /// Spaces the --idle participants are spread over.
        #[arg(long, default_value_t = 100)]
        idle_spaces: usize,
        /// Joins in flight while ramping up the --idle participants.
        #[arg(long, default_value_t = 200)]
        ramp_concurrency: usize,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// Base URL of the server (http://…); the WebSocket URL is derived from it.
    #[arg(long)]
    url: String,
    #[arg(long, env = "MUX_TOKEN_ID")]
    token_id: String,
    #[arg(long, env = "MUX_TOKEN_SECRET", hide_env_values = true)]
    token_secret: String,
    /// Spread participants over this many spaces (fan-out per join grows with space size).
    /// Default: 1000 for `scale`, 1 otherwise.
    #[arg(long)]
    spaces: Option<usize>,
    /// Tokens without participant_id, a small pool reused round-robin (every join gets a
    /// server-made id). Skips signing one token per join, for long profiling runs.
    #[arg(long)]
    anonymous: bool,
    /// PID of a server on this machine: report its CPU time per join (from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Once every token is signed (on all cores), move this process onto these CPUs
    /// (`taskset -c` syntax, e.g. `1`), so the measured part runs beside a pinned server.
    #[arg(long)]
    pin_cpus: Option<String>,
}

#[derive(Debug, Args)]
struct ScaleArgs {
    #[command(flatten)]
    common: Common,
    /// Idle participants held in each phase, ascending; each phase adds to the previous
    /// one's (round-robin over the spaces, so every space holds the same number).
    #[arg(long, value_delimiter = ',', default_value = "0,1000,15000")]
    populations: Vec<usize>,
    /// Concurrencies of the churn rounds run in every phase.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    concurrency: Vec<usize>,
    /// Joins per churn round; 0 runs no churn (holding and RSS only).
    #[arg(long, default_value_t = 5000)]
    joins: usize,
    /// Joins in flight while ramping up a held population.
    #[arg(long, default_value_t = 200)]
    ramp_concurrency: usize,
    /// Joins (100 in flight) before anything is measured, so the first phase does not
    /// pay for the server's cold start (first allocations, caches, worker threads).
    #[arg(long, default_value_t = 1000)]
    warmup_joins: usize,
    /// Churn only while nobody is held (the first phase if it is 0, and after the
    /// release), as a soak does before its ramp and after it.
    #[arg(long)]
    churn_only_idle: bool,
    /// Skip releasing the held participants and churning again afterwards.
    #[arg(long)]
    no_release_phase: bool,
    /// Churn in this many spaces of its own (empty in every phase, so each join
    /// activates one and each leave idles it), apart from the held population's: what a
    /// join costs then cannot depend on the size of the room it lands in, only on what
    /// the node holds. 0: churn lands in the held population's spaces.
    #[arg(long, default_value_t = 0)]
    churn_spaces: usize,
    /// Seconds to keep the largest population connected before its churn rounds (a
    /// soak), sampling server RSS and CPU every --sample-secs.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
    #[arg(long, default_value_t = 10)]
    sample_secs: u64,
    /// The server's Prometheus endpoint: scraped around each churn round for a per-stage
    /// breakdown of join time (histograms whose name contains `join` and `stage`).
    #[arg(long)]
    metrics_url: Option<String>,
    /// Also append every measurement to this CSV file (header written when it is new).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Name of this run, in every output line (to tell runs apart in one CSV).
    #[arg(long, default_value = "scale")]
    label: String,
    /// The server counts as settled once its CPU share over 250 ms is at most this.
    #[arg(long, default_value_t = 0.05)]
    quiet_share: f64,
}

/// The signing key and spaces a run joins with.
struct Target {
    ws_base: String,
    kid: String,
    key: Arc<PrivateKey>,
    spaces: Vec<String>,
}

/// Tokens `start..start + len` of a shared list; index `i` wraps round, so a small
/// anonymous pool serves any number of joins.
#[derive(Clone)]
struct TokenSlice {
    tokens: Arc<Vec<String>>,
    start: usize,
    len: usize,
}

impl TokenSlice {
    fn all(tokens: Vec<String>) -> Self {
        let len = tokens.len();
        TokenSlice {
            tokens: Arc::new(tokens),
            start: 0,
            len,
        }
    }

    fn slice(&self, start: usize, len: usize) -> Self {
        TokenSlice {
            tokens: self.tokens.clone(),
            start: self.start + start,
            len,
        }
    }

    fn get(&self, i: usize) -> &str {
        &self.tokens[self.start + i % self.len.max(1)]
    }
}

impl Target {
    /// Creates a signing key and `spaces` spaces through the REST API.
    async fn create(c: &Common, spaces: usize) -> Result<Target> {
        let rest = RestClient::new(&c.url, &c.token_id, &c.token_secret);
        let (kid, private) = rest
            .create_signing_key()
            .await
            .context("creating a signing key")?;
        let key = Arc::new(PrivateKey::parse(&private).context("parsing the signing key")?);
        // A few requests in flight: a thousand spaces one by one would take a while.
        let spaces: Vec<String> = futures_util::stream::iter(0..spaces.max(1))
            .map(|_| rest.create_space())
            .buffered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .context("creating a space")?;
        let ws_base = c
            .url
            .trim_end_matches('/')
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1);
        Ok(Target {
            ws_base,
            kid,
            key,
            spaces,
        })
    }

    /// Signs `count` tokens; token `i` joins space `i % spaces` as participant
    /// `{prefix}-{i}` (or without a participant id when `prefix` is `None`).
    fn sign(&self, prefix: Option<&str>, count: usize) -> Result<Vec<String>> {
        self.sign_over(prefix, count, 0..self.spaces.len())
    }

    /// [`Target::sign`] over the spaces `range` only.
    fn sign_over(
        &self,
        prefix: Option<&str>,
        count: usize,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<String>> {
        let spaces: Arc<[String]> = self.spaces[range].into();
        if spaces.is_empty() {
            bail!("no spaces to sign tokens for");
        }
        // Long enough for a soak plus the signing before it.
        let expires_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 24 * 3600;
        // Signing costs ~1 ms per token: spread it over the cores, before the clock starts.
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let chunk = count.div_ceil(threads).max(1);
        let mut handles = Vec::new();
        for start in (0..count).step_by(chunk) {
            let (key, kid, spaces) = (self.key.clone(), self.kid.clone(), spaces.clone());
            let prefix = prefix.map(str::to_owned);
            handles.push(std::thread::spawn(move || -> Result<Vec<String>> {
                (start..(start + chunk).min(count))
                    .map(|i| {
                        let options = SignOptions {
                            key_id: kid.parse()?,
                            space_id: spaces[i % spaces.len()].parse()?,
                            expires_at,
                            role: Role::Publisher,
                            participant_id: match &prefix {
                                Some(p) => Some(format!("{p}-{i}").parse()?),
                                None => None,
                            },
                        };
                        Ok(spacegate_auth::sign(&key, &options)?)
                    })
                    .collect()
            }));
        }
        let mut tokens = Vec::with_capacity(count);
        for h in handles {
            tokens.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("signing thread panicked"))??,
            );
        }
        Ok(tokens)
    }
}

/// A key, `c.spaces` spaces (default 1) and `count` signed tokens (a pool of at most 100
/// with `--anonymous`).
async fn prepare(c: &Common, count: usize) -> Result<(Target, TokenSlice)> {
    let target = Target::create(c, c.spaces.unwrap_or(1)).await?;
    let tokens = if c.anonymous {
        target.sign(None, count.min(100))?
    } else {
        target.sign(Some("load"), count)?
    };
    Ok((target, TokenSlice::all(tokens)))
}

/// Moves every thread of this process onto `cpus`; threads started later inherit it.
fn pin_self(cpus: &str) -> Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset")?;
    if !status.success() {
        bail!("taskset -a -p -c {cpus} failed: {status}");
    }
    Ok(())
}

fn pin_if_asked(c: &Common) -> Result<()> {
    c.pin_cpus.as_deref().map_or(Ok(()), pin_self)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn round_to(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// A join failure, by kind: what a reader of the results needs to tell causes apart.
fn error_kind(e: ClientError) -> String {
    match e {
        ClientError::Rejected { error, .. } => format!("rejected type {}", error.kind),
        other => other.to_string(),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Join {
            common,
            concurrency,
            joins,
            via,
            hold_per_space,
            messages,
        } => run_join(&common, concurrency, joins, &via, hold_per_space, messages).await,
        Command::Hold {
            common,
            connections,
            hold_secs,
            ramp_concurrency,
        } => run_hold(&common, connections, hold_secs, ramp_concurrency).await,
        Command::Scale(args) => run_scale(&args).await,
        Command::Media {
            common,
            subscribers,
            secs,
            video_pps,
            frame_bytes,
            idle,
            idle_spaces,
            ramp_concurrency,
        } => {
            let idle = IdleLoad {
                participants: idle,
                spaces: idle_spaces,
                ramp_concurrency,
            };
            run_media(&common, subscribers, secs, video_pps, frame_bytes, &idle).await
        }
    }
}

/// What one churn round measured.
struct Round {
    /// Sorted.
    latencies: Vec<Duration>,
    errors: BTreeMap<String, usize>,
    elapsed: Duration,
}

impl Round {
    fn failed(&self) -> usize {
        self.errors.values().sum()
    }

    fn to_json(&self) -> Value {
        let joins = self.latencies.len();
        json!({
            "joins": joins,
            "failed": self.failed(),
            "errors": self.errors,
            "seconds": round_to(self.elapsed.as_secs_f64(), 3),
            "joins_per_sec": round_to(joins as f64 / self.elapsed.as_secs_f64(), 1),
            "p50_ms": round_to(percentile(&self.latencies, 0.50), 3),
            "p99_ms": round_to(percentile(&self.latencies, 0.99), 3),
            "max_ms": round_to(percentile(&self.latencies, 1.0), 3),
        })
    }
}

/// `joins` joins, `concurrency` in flight; each leaves at once (close without waiting),
/// as a churning client would.
async fn churn(ws_base: &str, tokens: &TokenSlice, concurrency: usize, joins: usize) -> Round {
    churn_over(&[ws_base.to_string()], tokens, concurrency, joins, 0).await
}

/// [`churn`] with join `i` entering through `ws_bases[i % n]`.
/// Each joined connection exchanges `messages` custom events before it leaves.
async fn churn_over(
    ws_bases: &[String],
    tokens: &TokenSlice,
    concurrency: usize,
    joins: usize,
    messages: usize,
) -> Round {
    let next = Arc::new(AtomicUsize::new(0));
    let targets: Result<Vec<_>, _> = ws_bases.iter().map(|b| lean::Target::new(b)).collect();
    let targets = match targets {
        Ok(t) if !t.is_empty() => Arc::new(t),
        Ok(_) | Err(_) => {
            return Round {
                latencies: Vec::new(),
                errors: BTreeMap::from([("no usable target URL".to_string(), joins)]),
                elapsed: Duration::ZERO,
            };
        }
    };
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (tokens, next, targets) = (tokens.clone(), next.clone(), targets.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= joins {
                    break;
                }
                let t = Instant::now();
                match targets[i % targets.len()].join(tokens.get(i)).await {
                    Ok(mut socket) => {
                        latencies.push(t.elapsed());
                        if messages > 0
                            && let Err(e) = lean::exchange(&mut socket, messages).await
                        {
                            errors.push(e);
                        }
                        lean::leave(socket).await;
                    }
                    Err(e) => errors.push(e),
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::with_capacity(joins);
    let mut errors = BTreeMap::<String, usize>::new();
    for w in workers {
        match w.await {
            Ok((l, e)) => {
                latencies.extend(l);
                for e in e {
                    *errors.entry(e).or_default() += 1;
                }
            }
            Err(e) => *errors.entry(format!("worker failed: {e}")).or_default() += 1,
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Round {
        latencies,
        errors,
        elapsed,
    }
}

/// Idle joined connections, each read by its own task (so pings are answered and
/// fan-out is consumed) until [`Holders::release`].
struct Holders {
    ws_base: String,
    release: watch::Sender<bool>,
    alive: Arc<AtomicUsize>,
    /// Sessions that ended while held, by reason.
    dropped: Arc<Mutex<BTreeMap<String, usize>>>,
    readers: Vec<JoinHandle<()>>,
}

/// What one ramp of [`Holders::ramp`] did.
struct Ramp {
    joined: usize,
    errors: BTreeMap<String, usize>,
    elapsed: Duration,
}

impl Holders {
    fn new(ws_base: &str) -> Self {
        Holders {
            ws_base: ws_base.to_owned(),
            release: watch::channel(false).0,
            alive: Arc::new(AtomicUsize::new(0)),
            dropped: Arc::new(Mutex::new(BTreeMap::new())),
            readers: Vec::new(),
        }
    }

    fn alive(&self) -> usize {
        self.alive.load(Ordering::Relaxed)
    }

    fn dropped(&self) -> BTreeMap<String, usize> {
        self.dropped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Joins `count` more (tokens `0..count` of `tokens`), `concurrency` at a time; each
    /// is read from the moment it joined, so none misses a ping while the ramp goes on.
    async fn ramp(&mut self, tokens: &TokenSlice, count: usize, concurrency: usize) -> Ramp {
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..concurrency.max(1) {
            let (tokens, next) = (tokens.clone(), next.clone());
            let ws_base = self.ws_base.clone();
            let (release, alive, dropped) = (
                self.release.subscribe(),
                self.alive.clone(),
                self.dropped.clone(),
            );
            workers.push(tokio::spawn(async move {
                let (mut readers, mut errors) = (Vec::new(), Vec::new());
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    match Session::join(&ws_base, tokens.get(i), &JoinOptions::default()).await {
                        Ok(session) => {
                            alive.fetch_add(1, Ordering::Relaxed);
                            readers.push(tokio::spawn(hold_session(
                                session,
                                release.clone(),
                                alive.clone(),
                                dropped.clone(),
                            )));
                        }
                        Err(e) => errors.push(error_kind(e)),
                    }
                }
                (readers, errors)
            }));
        }
        let mut ramp = Ramp {
            joined: 0,
            errors: BTreeMap::new(),
            elapsed: Duration::ZERO,
        };
        for w in workers {
            match w.await {
                Ok((readers, errors)) => {
                    ramp.joined += readers.len();
                    self.readers.extend(readers);
                    for e in errors {
                        *ramp.errors.entry(e).or_default() += 1;
                    }
                }
                Err(e) => {
                    *ramp
                        .errors
                        .entry(format!("worker failed: {e}"))
                        .or_default() += 1
                }
            }
        }
        ramp.elapsed = started.elapsed();
        ramp
    }

    /// Every held participant leaves; returns how many were still held, once all have
    /// sent their close.
    async fn release(&mut self) -> usize {
        let held = self.alive();
        let _ = self.release.send(true);
        for r in self.readers.drain(..) {
            let _ = r.await;
        }
        held
    }
}

async fn hold_session(
    mut session: Session,
    mut release: watch::Receiver<bool>,
    alive: Arc<AtomicUsize>,
    dropped: Arc<Mutex<BTreeMap<String, usize>>>,
) {
    loop {
        tokio::select! {
            r = session.next_within(Duration::from_secs(3600)) => if let Err(e) = r {
                alive.fetch_sub(1, Ordering::Relaxed);
                *dropped.lock().unwrap_or_else(|p| p.into_inner()).entry(e.to_string()).or_default() += 1;
                return;
            },
            _ = release.changed() => break,
        }
    }
    alive.fetch_sub(1, Ordering::Relaxed);
    session.abort_with_close().await;
}

/// Signaling-only participants `media` holds in spaces of their own.
#[derive(Debug)]
struct IdleLoad {
    participants: usize,
    spaces: usize,
    ramp_concurrency: usize,
}

async fn run_media(
    c: &Common,
    subscribers: usize,
    secs: u64,
    video_pps: u32,
    frame_bytes: usize,
    idle: &IdleLoad,
) -> Result<()> {
    use spacegate_client::media::vp8_frame;
    use spacegate_client::participant::{Participant, TrackSpec, audio_payload};
    if subscribers == 0 || video_pps == 0 {
        bail!("--subscribers and --video-pps must be positive");
    }
    let (target, tokens) = prepare(c, subscribers + 1).await?;
    // The idle population gets its own key and spaces, so no media space holds any of it.
    let idle_target = if idle.participants > 0 {
        let t = Target::create(c, idle.spaces).await?;
        let tokens = TokenSlice::all(t.sign(Some("idle"), idle.participants)?);
        Some((t, tokens))
    } else {
        None
    };
    pin_if_asked(c)?;
    let mut holders = Holders::new(&target.ws_base);
    if let Some((_, idle_tokens)) = &idle_target {
        let ramp = holders
            .ramp(idle_tokens, idle.participants, idle.ramp_concurrency)
            .await;
        if ramp.joined < idle.participants {
            bail!(
                "only {} idle participants joined: {:?}",
                ramp.joined,
                ramp.errors
            );
        }
        if let Some(pid) = c.server_pid {
            settle(pid, 0.05).await;
        }
    }
    let options = JoinOptions::default();
    let rss_before = c.server_pid.and_then(rss_kb);

    let mut publisher = Participant::join(&target.ws_base, tokens.get(0), &options)
        .await
        .context("publisher join")?;
    let pc = publisher
        .publish(&[TrackSpec::audio("load-a"), TrackSpec::video("load-v")])
        .await
        .context("publish")?;
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (pc, sent) = (pc.clone(), sent.clone());
        tokio::spawn(async move {
            // Audio at 50/s and video at `video_pps`, interleaved on one 1 ms clock.
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let per_video = 1000.0 / f64::from(video_pps);
            let (mut ms, mut next_video, mut n) = (0u64, 0.0f64, 0u64);
            let mut seen_requests = 0;
            loop {
                tick.tick().await;
                ms += 1;
                if ms % 20 == 0 && pc.write("load-a", None, audio_payload(ms)).await.is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                while next_video <= ms as f64 {
                    next_video += per_video;
                    n += 1;
                    let requests = pc.keyframe_requests("load-v");
                    let key = n % 300 == 1 || requests != seen_requests;
                    seen_requests = requests;
                    let frame = vp8_frame(n as u32, key, frame_bytes);
                    if pc.write("load-v", None, frame).await.is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    // The publisher's own session must be read (pings, offers).
    let publisher_pump = tokio::spawn(async move { pump(&mut publisher).await });

    let mut subs = Vec::new();
    let mut pumps = Vec::new();
    for i in 1..=subscribers {
        let mut p = Participant::join(&target.ws_base, tokens.get(i), &options)
            .await
            .context("subscriber join")?;
        subs.push(p.sub.clone());
        pumps.push(tokio::spawn(async move { pump(&mut p).await }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !subs
        .iter()
        .all(|s| s.stats("load-v").is_some_and(|v| v.packets > 10))
    {
        if Instant::now() > deadline {
            bail!("not every subscriber received video within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_after = c.server_pid.and_then(rss_kb);
    let received = |subs: &[Arc<spacegate_client::media::SubPc>]| -> u64 {
        subs.iter()
            .map(|s| {
                s.stats("load-a").map_or(0, |a| a.packets)
                    + s.stats("load-v").map_or(0, |v| v.packets)
            })
            .sum()
    };
    let (r0, s0, t0) = (
        received(&subs),
        sent.load(Ordering::Relaxed),
        Instant::now(),
    );
    let cpu0 = c.server_pid.and_then(cpu_seconds);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (r1, s1, elapsed) = (received(&subs), sent.load(Ordering::Relaxed), t0.elapsed());
    let cpu1 = c.server_pid.and_then(cpu_seconds);
    writer.abort();
    publisher_pump.abort();
    for p in pumps {
        p.abort();
    }

    let forwarded = (r1 - r0) as f64;
    let published = (s1 - s0) as f64;
    let mut out = json!({
        "mode": "media",
        "subscribers": subscribers,
        "seconds": elapsed.as_secs_f64(),
        // Frames written (audio + video); a video frame over ~1100 bytes is several packets.
        "published_frames_per_sec": (published / elapsed.as_secs_f64()).round(),
        "forwarded_packets_per_sec": (forwarded / elapsed.as_secs_f64()).round(),
    });
    if idle.participants > 0 {
        out["idle_participants"] = json!(idle.participants);
        out["idle_spaces"] = json!(idle.spaces);
        // Held through the whole measurement: a drop would make the comparison unfair.
        out["idle_held_at_end"] = json!(holders.alive());
        out["idle_dropped"] = json!(holders.dropped());
    }
    if frame_bytes <= 1100 && published > 0.0 {
        // One packet per frame: the fraction of what was sent that reached each subscriber.
        out["delivery_ratio"] = json!(forwarded / (published * subscribers as f64));
    }
    if let (Some(a), Some(b)) = (cpu0, cpu1)
        && forwarded > 0.0
    {
        let us = (b - a) * 1e6 / forwarded;
        out["server_cpu_us_per_forwarded_packet"] = json!(round_to(us, 2));
        out["forwarded_packets_per_server_core_sec"] = json!((1e6 / us).round());
        out["server_cpu_share"] = json!((b - a) / elapsed.as_secs_f64());
    }
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        // Publisher PC + one subscriber PC per subscriber.
        let pcs = subscribers as f64 + 1.0;
        out["server_rss_kb_per_peer_connection"] = json!(((b as f64 - a as f64) / pcs).round());
    }
    println!("{out}");
    holders.release().await;
    Ok(())
}

/// Reads a participant's session (answering offers) until it closes; a quiet spell is
/// not an end.
async fn pump(p: &mut spacegate_client::participant::Participant) {
    loop {
        match p.next().await {
            Ok(_) | Err(ClientError::Timeout) => {}
            Err(_) => return,
        }
    }
}

async fn run_join(
    c: &Common,
    concurrency: usize,
    joins: usize,
    via: &[String],
    hold_per_space: bool,
    messages: usize,
) -> Result<()> {
    if messages > 10 {
        bail!("--messages is at most 10 (the per-participant custom-event rate)");
    }
    if concurrency == 0 || joins == 0 {
        bail!("--concurrency and --joins must be positive");
    }
    let (target, tokens) = prepare(c, joins).await?;
    let mut holders = Holders::new(&target.ws_base);
    if hold_per_space {
        let n = target.spaces.len();
        let held = TokenSlice::all(target.sign(Some("home"), n)?);
        let r = holders.ramp(&held, n, 100).await;
        if r.joined < n {
            bail!(
                "only {} of {n} spaces got their resident: {:?}",
                r.joined,
                r.errors
            );
        }
    }
    pin_if_asked(c)?;
    let bases: Vec<String> = if via.is_empty() {
        vec![target.ws_base.clone()]
    } else {
        via.iter()
            .map(|u| {
                u.trim_end_matches('/')
                    .replacen("http://", "ws://", 1)
                    .replacen("https://", "wss://", 1)
            })
            .collect()
    };
    let cpu_before = c.server_pid.and_then(cpu_seconds);
    let round = churn_over(&bases, &tokens, concurrency, joins, messages).await;
    holders.release().await;
    let server_cpu = c
        .server_pid
        .and_then(cpu_seconds)
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    let mut out = json!({"mode": "join", "concurrency": concurrency, "messages": messages});
    merge(&mut out, round.to_json());
    out["server_cpu_seconds"] = json!(server_cpu);
    out["server_cpu_us_per_join"] =
        json!(server_cpu.map(|s| s * 1e6 / round.latencies.len().max(1) as f64));
    println!("{out}");
    Ok(())
}

async fn run_hold(c: &Common, connections: usize, hold_secs: u64, ramp: usize) -> Result<()> {
    let (target, tokens) = prepare(c, connections).await?;
    pin_if_asked(c)?;
    let mut holders = Holders::new(&target.ws_base);
    let r = holders.ramp(&tokens, connections, ramp).await;
    println!(
        "{}",
        json!({"mode": "hold", "state": "holding", "joined": r.joined, "failed": r.errors.values().sum::<usize>(), "errors": r.errors})
    );
    tokio::time::sleep(Duration::from_secs(hold_secs)).await;
    let dropped = holders.dropped();
    holders.release().await;
    println!(
        "{}",
        json!({"mode": "hold", "state": "released", "dropped": dropped})
    );
    Ok(())
}

/// Copies `from`'s fields into `into` (both objects).
fn merge(into: &mut Value, from: Value) {
    if let (Some(into), Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

/// Waits until the server's CPU share over a 250 ms window is at most `quiet` (at most
/// 10 s). Returns whether it did, and the CPU seconds at the start of that window: the
/// end of the work that came before, without the quiet spell it took to see it.
async fn settle(pid: u32, quiet: f64) -> (bool, Option<f64>) {
    const WINDOW: Duration = Duration::from_millis(250);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let Some(a) = cpu_seconds(pid) else {
            return (false, None);
        };
        tokio::time::sleep(WINDOW).await;
        let Some(b) = cpu_seconds(pid) else {
            return (false, None);
        };
        if b - a <= quiet * WINDOW.as_secs_f64() {
            return (true, Some(a));
        }
        if Instant::now() > deadline {
            return (false, Some(b));
        }
    }
}

/// The server's CPU share (cores) over `d`, measured now.
async fn cpu_share(pid: u32, d: Duration) -> Option<f64> {
    let a = cpu_seconds(pid)?;
    tokio::time::sleep(d).await;
    Some((cpu_seconds(pid)? - a) / d.as_secs_f64())
}

/// `_sum` and `_count` of one histogram (or summary) series.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct SumCount {
    sum: f64,
    count: f64,
}

/// From Prometheus text exposition: `_sum` and `_count` of every histogram whose name
/// contains `join` and `stage`, keyed by `name{labels}` (labels as exposed).
fn join_stage_series(text: &str) -> BTreeMap<String, SumCount> {
    let mut out = BTreeMap::<String, SumCount>::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, labels, rest)) = split_sample(line) else {
            continue;
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let (base, is_sum) = if let Some(b) = name.strip_suffix("_sum") {
            (b, true)
        } else if let Some(b) = name.strip_suffix("_count") {
            (b, false)
        } else {
            continue;
        };
        let lower = base.to_ascii_lowercase();
        if !(lower.contains("join") && lower.contains("stage")) {
            continue;
        }
        let entry = out.entry(format!("{base}{labels}")).or_default();
        if is_sum {
            entry.sum = value;
        } else {
            entry.count = value;
        }
    }
    out
}

/// Splits `name{labels} value…` into the name, the label block with its braces (empty
/// when there is none) and what follows. Quoted label values may hold `}` and escapes.
fn split_sample(line: &str) -> Option<(&str, &str, &str)> {
    let name_end = line.find(|ch: char| ch == '{' || ch.is_whitespace())?;
    let name = &line[..name_end];
    if !line[name_end..].starts_with('{') {
        return Some((name, "", &line[name_end..]));
    }
    let (mut in_quotes, mut escaped) = (false, false);
    for (i, ch) in line[name_end..].char_indices() {
        match ch {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => {
                let end = name_end + i + 1;
                return Some((name, &line[name_end..end], &line[end..]));
            }
            _ => {}
        }
    }
    None
}

/// Microseconds per unit of a metric, from its name's unit suffix; Prometheus' base unit
/// (seconds) when it names none.
fn us_per_unit(name: &str) -> f64 {
    let base = name.split('{').next().unwrap_or(name);
    if base.ends_with("_microseconds") || base.ends_with("_us") {
        1.0
    } else if base.ends_with("_milliseconds") || base.ends_with("_ms") {
        1e3
    } else if base.ends_with("_nanoseconds") || base.ends_with("_ns") {
        1e-3
    } else {
        1e6
    }
}

/// Mean µs per join of every stage series between two scrapes, with how many
/// observations each join made (1 if the stage is observed once per join).
fn stage_breakdown(
    before: &BTreeMap<String, SumCount>,
    after: &BTreeMap<String, SumCount>,
    joins: usize,
) -> BTreeMap<String, (f64, f64)> {
    let joins = joins.max(1) as f64;
    after
        .iter()
        .map(|(key, a)| {
            let b = before.get(key).copied().unwrap_or_default();
            let us = (a.sum - b.sum) * us_per_unit(key) / joins;
            (key.clone(), (us, (a.count - b.count) / joins))
        })
        .collect()
}

async fn scrape(http: &reqwest::Client, url: &str) -> Result<BTreeMap<String, SumCount>> {
    let text = http
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(join_stage_series(&text))
}

/// Prints each measurement as a JSON line and, with `--csv`, appends it as a row.
struct Reporter {
    label: String,
    csv: Option<std::fs::File>,
}

/// CSV columns, in order; a measurement fills those it has.
const CSV_COLUMNS: &[&str] = &[
    "run",
    "kind",
    "phase",
    "population",
    "spaces",
    "churn_spaces",
    "concurrency",
    "joins",
    "failed",
    "seconds",
    "joins_per_sec",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "server_cpu_us_per_join",
    "server_cpu_us_per_join_net",
    "server_idle_share",
    "load_cpu_share",
    "settled",
    "per_space",
    "rss_baseline_kb",
    "rss_before_kb",
    "rss_after_kb",
    "rss_drift",
    "bytes_per_idle_connection",
    "bytes_per_idle_connection_total",
    "held",
    "dropped",
    "t_secs",
    "rss_kb",
    "server_cpu_share",
    "stage",
    "us_per_join",
    "observations_per_join",
];

fn csv_field(v: Option<&Value>) -> String {
    let s = match v {
        None | Some(Value::Null) => return String::new(),
        Some(Value::String(s)) => s.clone(),
        // Maps (errors, drop reasons) become their total.
        Some(Value::Object(m)) => m
            .values()
            .filter_map(Value::as_u64)
            .sum::<u64>()
            .to_string(),
        Some(other) => other.to_string(),
    };
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

impl Reporter {
    fn new(label: &str, csv: Option<&Path>) -> Result<Self> {
        let csv = match csv {
            None => None,
            Some(path) => {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                if f.metadata()?.len() == 0 {
                    writeln!(f, "{}", CSV_COLUMNS.join(","))?;
                }
                Some(f)
            }
        };
        Ok(Reporter {
            label: label.to_owned(),
            csv,
        })
    }

    fn emit(&mut self, kind: &str, mut v: Value) -> Result<()> {
        merge(&mut v, json!({"run": self.label, "kind": kind}));
        println!("{v}");
        if let Some(f) = &mut self.csv {
            let row: Vec<String> = CSV_COLUMNS.iter().map(|c| csv_field(v.get(c))).collect();
            writeln!(f, "{}", row.join(","))?;
        }
        Ok(())
    }
}

/// The CPU and RSS probes of a scale run, when it knows the server's PID.
struct Probe {
    pid: Option<u32>,
    quiet: f64,
}

impl Probe {
    fn rss(&self) -> Option<u64> {
        self.pid.and_then(rss_kb)
    }

    fn cpu(&self) -> Option<f64> {
        self.pid.and_then(cpu_seconds)
    }

    async fn settle(&self) -> (bool, Option<f64>) {
        match self.pid {
            Some(pid) => settle(pid, self.quiet).await,
            None => (false, None),
        }
    }
}

/// Bytes of server RSS per connection between two VmRSS readings (kB).
fn bytes_per(before: Option<u64>, after: Option<u64>, connections: usize) -> Option<f64> {
    let (b, a) = (before?, after?);
    (connections > 0).then(|| ((a as f64 - b as f64) * 1024.0 / connections as f64).round())
}

async fn run_scale(a: &ScaleArgs) -> Result<()> {
    let c = &a.common;
    if a.populations.windows(2).any(|w| w[0] > w[1]) {
        bail!("--populations must be ascending (each phase adds to the previous one)");
    }
    if a.concurrency.contains(&0) {
        bail!("--concurrency values must be positive");
    }
    let spaces = c.spaces.unwrap_or(1000);
    let peak = a.populations.iter().copied().max().unwrap_or(0);
    let churn_at = |population: usize| a.joins > 0 && (!a.churn_only_idle || population == 0);
    let churn_phases = a.populations.iter().filter(|&&p| churn_at(p)).count()
        + usize::from(!a.no_release_phase && churn_at(0));
    let rounds = churn_phases * a.concurrency.len();

    let target = Target::create(c, spaces + a.churn_spaces).await?;
    // Distinct participant ids for everyone: held `hold-N`, churning `churn-N` (a fresh
    // id per join, so no join finds its predecessor still leaving). Both go round-robin
    // over the first `spaces` spaces, so churn lands in the populated spaces, unless it
    // has spaces of its own (`--churn-spaces`).
    let signing = Instant::now();
    let held_tokens = TokenSlice::all(target.sign_over(Some("hold"), peak, 0..spaces)?);
    let churn_range = match a.churn_spaces {
        0 => 0..spaces,
        n => spaces..spaces + n,
    };
    let churn_tokens =
        TokenSlice::all(target.sign_over(Some("churn"), rounds * a.joins, churn_range)?);
    let warmup_tokens = TokenSlice::all(target.sign(Some("warm"), a.warmup_joins)?);
    eprintln!(
        "spacegate-load: signed {} tokens in {:.1} s",
        peak + rounds * a.joins + a.warmup_joins,
        signing.elapsed().as_secs_f64()
    );
    pin_if_asked(c)?;

    let mut out = Reporter::new(&a.label, a.csv.as_deref())?;
    let probe = Probe {
        pid: c.server_pid,
        quiet: a.quiet_share,
    };
    let mut holders = Holders::new(&target.ws_base);
    let mut churner = Churner {
        ws_base: &target.ws_base,
        tokens: churn_tokens,
        next_round: 0,
        spaces,
        http: spacegate_client::http_client(),
        probe: &probe,
    };
    if a.warmup_joins > 0 {
        let round = churn(&target.ws_base, &warmup_tokens, 100, a.warmup_joins).await;
        out.emit("warmup", round.to_json())?;
    }
    let mut baseline_rss = None;
    let mut held_total = 0;
    for &population in &a.populations {
        let phase = format!("pop-{population}");
        if population > held_total {
            probe.settle().await;
            let rss_before = probe.rss();
            baseline_rss = baseline_rss.or(rss_before);
            let more = population - held_total;
            let ramp = holders
                .ramp(
                    &held_tokens.slice(held_total, more),
                    more,
                    a.ramp_concurrency,
                )
                .await;
            held_total = population;
            let (settled, _) = probe.settle().await;
            let rss_after = probe.rss();
            let held = holders.alive();
            out.emit(
                "hold",
                json!({
                    "phase": phase,
                    "population": population,
                    "spaces": spaces,
                    "per_space": round_to(population as f64 / spaces as f64, 2),
                    "joins": ramp.joined,
                    "failed": ramp.errors.values().sum::<usize>(),
                    "errors": ramp.errors,
                    "seconds": round_to(ramp.elapsed.as_secs_f64(), 3),
                    "held": held,
                    "settled": settled,
                    "rss_before_kb": rss_before,
                    "rss_after_kb": rss_after,
                    "bytes_per_idle_connection": bytes_per(rss_before, rss_after, ramp.joined),
                    "rss_baseline_kb": baseline_rss,
                    "bytes_per_idle_connection_total": bytes_per(baseline_rss, rss_after, held),
                    // The generator's own memory: enough of it for the next phase?
                    "load_rss_kb": rss_kb(std::process::id()),
                }),
            )?;
            if population == peak && a.hold_secs > 0 {
                soak(&probe, &holders, a, &phase, &mut out).await?;
            }
        }
        if churn_at(population) {
            churner
                .phase(a, &phase, population, &holders, &mut out)
                .await?;
        }
    }

    let dropped = holders.dropped();
    let released = holders.release().await;
    let (settled, _) = probe.settle().await;
    out.emit(
        "release",
        json!({
            "phase": "release",
            "population": 0,
            "spaces": spaces,
            "held": released,
            "dropped": dropped,
            "settled": settled,
            "rss_kb": probe.rss(),
        }),
    )?;
    if !a.no_release_phase && churn_at(0) {
        churner
            .phase(a, "after-release", 0, &holders, &mut out)
            .await?;
    }
    Ok(())
}

/// Runs every phase's churn rounds, each on churn tokens no earlier round used.
struct Churner<'a> {
    ws_base: &'a str,
    tokens: TokenSlice,
    /// Round `r` uses churn tokens `r * joins..(r + 1) * joins`.
    next_round: usize,
    spaces: usize,
    http: reqwest::Client,
    probe: &'a Probe,
}

impl Churner<'_> {
    /// One churn round per concurrency: server CPU per join from just before the first join
    /// to the end of the server's work on the last leave (so a join's cost includes its
    /// leave), latency, and the per-stage breakdown when the server exposes one.
    async fn phase(
        &mut self,
        a: &ScaleArgs,
        phase: &str,
        population: usize,
        holders: &Holders,
        out: &mut Reporter,
    ) -> Result<()> {
        let me = std::process::id();
        for &concurrency in &a.concurrency {
            let tokens = self.tokens.slice(self.next_round * a.joins, a.joins);
            self.next_round += 1;
            self.probe.settle().await;
            // What the server spends with nobody joining (pings of the held population),
            // measured just before: the net figure leaves it out.
            let idle_share = match self.probe.pid {
                Some(pid) => cpu_share(pid, Duration::from_secs(1)).await,
                None => None,
            };
            let metrics_before = match &a.metrics_url {
                Some(url) => Some(scrape(&self.http, url).await),
                None => None,
            };
            let (load0, t0) = (cpu_seconds(me), Instant::now());
            let cpu0 = self.probe.cpu();
            let round = churn(self.ws_base, &tokens, concurrency, a.joins).await;
            let load1 = cpu_seconds(me);
            let (settled, cpu1) = self.probe.settle().await;
            let window = t0.elapsed().as_secs_f64();
            let joins = round.latencies.len();
            let server_cpu = cpu0.zip(cpu1).map(|(b, e)| e - b);
            let us_per_join = server_cpu.map(|s| s * 1e6 / joins.max(1) as f64);
            let net = us_per_join
                .zip(idle_share)
                .map(|(us, idle)| (us - idle * window * 1e6 / joins.max(1) as f64).max(0.0));

            let mut line = json!({
                "phase": phase,
                "population": population,
                "held": holders.alive(),
                "spaces": self.spaces,
                "churn_spaces": a.churn_spaces,
                "concurrency": concurrency,
            });
            merge(&mut line, round.to_json());
            merge(
                &mut line,
                json!({
                    "server_cpu_seconds": server_cpu.map(|s| round_to(s, 3)),
                    "server_cpu_us_per_join": us_per_join.map(|u| round_to(u, 1)),
                    "joins_per_server_core_sec": us_per_join.filter(|&u| u > 0.0).map(|u| round_to(1e6 / u, 1)),
                    "server_idle_share": idle_share.map(|s| round_to(s, 4)),
                    "server_cpu_us_per_join_net": net.map(|u| round_to(u, 1)),
                    "settled": settled,
                    // Near 1.0 the generator itself was the bottleneck: latency and joins/s
                    // then say more about it than about the server.
                    "load_cpu_share": load0.zip(load1).map(|(b, e)| round_to((e - b) / round.elapsed.as_secs_f64(), 3)),
                }),
            );

            let mut stage_lines = Vec::new();
            if let (Some(before), Some(url)) = (metrics_before, &a.metrics_url) {
                match (before, scrape(&self.http, url).await) {
                    (Ok(before), Ok(after)) => {
                        let stages = stage_breakdown(&before, &after, joins);
                        let sum: f64 = stages.values().map(|(us, _)| us).sum();
                        line["stages"] = stages
                            .iter()
                            .map(|(k, (us, n))| {
                                (
                                    k.clone(),
                                    json!({"us_per_join": round_to(*us, 1), "observations_per_join": round_to(*n, 3)}),
                                )
                            })
                            .collect::<serde_json::Map<_, _>>()
                            .into();
                        line["stage_sum_us_per_join"] = json!(round_to(sum, 1));
                        line["remainder_us_per_join"] =
                            json!(us_per_join.map(|u| round_to(u - sum, 1)));
                        for (k, (us, n)) in &stages {
                            stage_lines.push((k.clone(), Some(*us), Some(*n)));
                        }
                        stage_lines.push(("remainder".into(), us_per_join.map(|u| u - sum), None));
                    }
                    (Err(e), _) | (_, Err(e)) => line["metrics_error"] = json!(e.to_string()),
                }
            }
            out.emit("churn", line)?;
            for (stage, us, n) in stage_lines {
                out.emit(
                    "stage",
                    json!({
                        "phase": phase,
                        "population": population,
                        "concurrency": concurrency,
                        "stage": stage,
                        "us_per_join": us.map(|u| round_to(u, 1)),
                        "observations_per_join": n.map(|n| round_to(n, 3)),
                    }),
                )?;
            }
        }
        Ok(())
    }
}

/// Keeps the peak population connected for `--hold-secs`, sampling server RSS and CPU
/// every `--sample-secs`; then a summary: drops, RSS drift since the ramp, CPU share.
async fn soak(
    probe: &Probe,
    holders: &Holders,
    a: &ScaleArgs,
    phase: &str,
    out: &mut Reporter,
) -> Result<()> {
    let started = Instant::now();
    let (rss_start, cpu_start) = (probe.rss(), probe.cpu());
    let held_start = holders.alive();
    let sample = |t: f64, share: Option<f64>| {
        json!({
            "phase": phase,
            "t_secs": round_to(t, 1),
            "rss_kb": probe.rss(),
            "server_cpu_share": share.map(|s| round_to(s, 4)),
            "held": holders.alive(),
            "dropped": holders.dropped(),
        })
    };
    out.emit("sample", sample(0.0, None))?;
    let every = Duration::from_secs(a.sample_secs.max(1));
    let end = started + Duration::from_secs(a.hold_secs);
    let mut last = (started, cpu_start);
    while Instant::now() < end {
        let next = (last.0 + every).min(end);
        tokio::time::sleep_until(next.into()).await;
        let now = (Instant::now(), probe.cpu());
        let share = now
            .1
            .zip(last.1)
            .map(|(e, b)| (e - b) / now.0.duration_since(last.0).as_secs_f64());
        out.emit("sample", sample(started.elapsed().as_secs_f64(), share))?;
        last = now;
    }
    let (rss_end, cpu_end) = (probe.rss(), probe.cpu());
    let secs = started.elapsed().as_secs_f64();
    out.emit(
        "soak",
        json!({
            "phase": phase,
            "seconds": round_to(secs, 1),
            "held": holders.alive(),
            "held_start": held_start,
            "dropped": holders.dropped(),
            "rss_before_kb": rss_start,
            "rss_after_kb": rss_end,
            "rss_drift": rss_start.zip(rss_end).map(|(b, e)| round_to((e as f64 - b as f64) / b.max(1) as f64, 4)),
            "server_cpu_share": cpu_start.zip(cpu_end).map(|(b, e)| round_to((e - b) / secs, 4)),
        }),
    )
}

/// The churn's join, as lean as a client can be: one TCP connection, a prebuilt upgrade
/// request, frames parsed only as far as telling `joined` from `error`, a close frame. On
/// two cores the generator shares the machine with the server; with the full client
/// (tungstenite's handshake, every message decoded) it ran out of its core before the
/// server did, and then measured itself.
mod lean {
    use std::net::SocketAddr;

    use spacegate_client::tls::Io;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

    pub struct Target {
        addr: SocketAddr,
        host: String,
        path: String,
        /// `wss://`: TLS (trusting what `spacegate_client::tls` trusts).
        tls: bool,
    }

    impl Target {
        pub fn new(ws_base: &str) -> Result<Target, String> {
            let (tls, rest) = match ws_base.split_once("://") {
                Some(("ws", rest)) => (false, rest),
                Some(("wss", rest)) => (true, rest),
                _ => {
                    return Err(format!(
                        "the lean churn speaks ws:// and wss://, not {ws_base}"
                    ));
                }
            };
            let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
                .map_err(|e| format!("resolving {host}: {e}"))?
                .next()
                .ok_or_else(|| format!("{host} has no address"))?;
            let prefix = prefix.trim_end_matches('/');
            let path = if prefix.is_empty() {
                "/v1".to_owned()
            } else {
                format!("/{prefix}/v1")
            };
            Ok(Target {
                addr,
                host: host.to_owned(),
                path,
                tls,
            })
        }

        /// Joins with `token`; the socket once `joined` arrived, or why not (a refusal
        /// as "rejected type N", as the full client reports it).
        pub async fn join(&self, token: &str) -> Result<Box<dyn Io>, String> {
            match tokio::time::timeout(TIMEOUT, self.join_inner(token)).await {
                Ok(r) => r,
                Err(_) => Err("timed out".into()),
            }
        }

        /// On loopback, from 127.0.0.2: the held population's connections (from
        /// 127.0.0.1) hold most of the ports the kernel hands out for connects to this
        /// server, and with 15 000 of them it scanned thousands of taken ports on every
        /// connect (`__inet_hash_connect`, 86 % of the generator's core). From another
        /// source address no port is taken.
        async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
            let tcp = match self.addr {
                SocketAddr::V4(a) if a.ip().is_loopback() => {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.bind(SocketAddr::from(([127, 0, 0, 2], 0)))?;
                    socket.connect(self.addr).await?
                }
                _ => TcpStream::connect(self.addr).await?,
            };
            // The certificate names the host without its port.
            let name = self
                .host
                .rsplit_once(':')
                .map_or(self.host.as_str(), |(h, _)| h);
            spacegate_client::tls::wrap(tcp, name, self.tls).await
        }

        async fn join_inner(&self, token: &str) -> Result<Box<dyn Io>, String> {
            let mut socket = self.connect().await.map_err(|e| format!("connect: {e}"))?;
            // Tokens are base64url and dots: nothing to escape in a query.
            let request = format!(
                "GET {}?token={token}&sdk_version=1.2.0&managed_subscriptions=16 HTTP/1.1\r\n\
                 Host: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                self.path, self.host
            );
            socket
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("send: {e}"))?;
            let mut buf = Vec::with_capacity(4096);
            let head_end = loop {
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
                read_more(&mut socket, &mut buf).await?;
            };
            if !buf.starts_with(b"HTTP/1.1 101") {
                let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
                return Err(format!(
                    "upgrade refused: {}",
                    String::from_utf8_lossy(line)
                ));
            }
            buf.drain(..head_end);
            // Frames until the first text message (reassembled if fragmented).
            let mut message = Vec::new();
            loop {
                let Some((fin, opcode, start, end)) = frame_at(&buf) else {
                    read_more(&mut socket, &mut buf).await?;
                    continue;
                };
                if matches!(opcode, 0x1 | 0x0) {
                    message.extend_from_slice(&buf[start..end]);
                }
                buf.drain(..end);
                if opcode == 0x8 {
                    return Err("closed before joined".into());
                }
                if fin && matches!(opcode, 0x1 | 0x0) {
                    break;
                }
            }
            if message.starts_with(b"{\"joined\"") {
                Ok(socket)
            } else if message.starts_with(b"{\"error\"") {
                let kind = serde_json::from_slice::<serde_json::Value>(&message)
                    .ok()
                    .and_then(|v| v["error"]["type"].as_u64());
                Err(match kind {
                    Some(k) => format!("rejected type {k}"),
                    None => "rejected".into(),
                })
            } else {
                Err("expected joined first".into())
            }
        }
    }

    /// `n` custom events, each sent once the previous one's echo came back (the server
    /// echoes them to their author): signaling messages through whatever carries the
    /// connection. At most the space's `custom_events_per_second` (10) per second.
    pub async fn exchange(socket: &mut Box<dyn Io>, n: usize) -> Result<(), String> {
        let mut buf = Vec::with_capacity(512);
        for i in 0..n {
            let text = format!(
                "{{\"custom_event\":{{\"id\":\"m{i}\",\"payload\":\"x\",\"scope\":1}},\"request_id\":\"m{i}\"}}"
            );
            // FIN + text, masked with key 0 (the payload goes as it is); always < 126 bytes.
            let mut frame = vec![0x81, 0x80 | text.len() as u8, 0, 0, 0, 0];
            frame.extend_from_slice(text.as_bytes());
            socket
                .write_all(&frame)
                .await
                .map_err(|e| format!("send: {e}"))?;
            let wanted = format!("\"request_id\":\"m{i}\"");
            loop {
                let Some((_, opcode, start, end)) = frame_at(&buf) else {
                    read_more(socket, &mut buf).await?;
                    continue;
                };
                let echoed = opcode == 0x1
                    && buf[start..end]
                        .windows(wanted.len())
                        .any(|w| w == wanted.as_bytes());
                let closed = opcode == 0x8;
                buf.drain(..end);
                if closed {
                    return Err("closed during the exchange".into());
                }
                if echoed {
                    break;
                }
            }
        }
        Ok(())
    }

    /// A close frame (masked, as from a client), then waits for the server to close the
    /// TCP connection, as browsers do (RFC 6455 §7.1.1: the server closes first). A client
    /// that closed first would keep every churned connection's port in TIME_WAIT: with
    /// 15 000 more held, the kernel then spent most of the generator's core looking for a
    /// free port on each connect (`__inet_hash_connect`), and the server saw its joins
    /// trickle in.
    pub async fn leave(mut socket: Box<dyn Io>) {
        // FIN + close, masked, empty payload, mask key 0.
        if socket.write_all(&[0x88, 0x80, 0, 0, 0, 0]).await.is_err() {
            return;
        }
        let mut sink = [0u8; 256];
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }

    async fn read_more(socket: &mut Box<dyn Io>, buf: &mut Vec<u8>) -> Result<(), String> {
        match socket.read_buf(buf).await {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// The first whole server frame in `buf`: (fin, opcode, payload start, end).
    fn frame_at(buf: &[u8]) -> Option<(bool, u8, usize, usize)> {
        let (&b0, &b1) = (buf.first()?, buf.get(1)?);
        let (len, start) = match b1 & 0x7f {
            126 => (
                u64::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
                4,
            ),
            127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
            n => (u64::from(n), 2),
        };
        let end = start + usize::try_from(len).ok()?;
        (buf.len() >= end).then_some((b0 & 0x80 != 0, b0 & 0x0f, start, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP spacegate_join_stage_seconds Time per join stage.
# TYPE spacegate_join_stage_seconds histogram
spacegate_join_stage_seconds_bucket{stage="verify",le="0.001"} 3
spacegate_join_stage_seconds_sum{stage="verify"} 0.5
spacegate_join_stage_seconds_count{stage="verify"} 4
spacegate_join_stage_seconds_sum{stage="odd \"}\" name"} 2.5e-3 1700000000000
spacegate_join_stage_seconds_count{stage="odd \"}\" name"} 4
join_stage_us_sum 12
join_stage_us_count 3
spacegate_joins_total 9
spacegate_leave_stage_seconds_sum{stage="x"} 1
"#;

    #[test]
    fn finds_join_stage_series_with_labels_and_units() {
        let s = join_stage_series(SCRAPE);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(
            s[r#"spacegate_join_stage_seconds{stage="verify"}"#],
            SumCount {
                sum: 0.5,
                count: 4.0
            }
        );
        // A quoted `}` does not end the label block; a trailing timestamp is ignored.
        assert_eq!(
            s[r#"spacegate_join_stage_seconds{stage="odd \"}\" name"}"#].sum,
            2.5e-3
        );
        assert_eq!(
            s["join_stage_us"],
            SumCount {
                sum: 12.0,
                count: 3.0
            }
        );
        assert!(!s.keys().any(|k| k.contains("leave") || k.contains("total")));
    }

    #[test]
    fn breakdown_is_the_delta_per_join_in_microseconds() {
        let before = join_stage_series(SCRAPE);
        let after = join_stage_series(
            &SCRAPE
                .replace("_sum{stage=\"verify\"} 0.5", "_sum{stage=\"verify\"} 0.502")
                .replace("_count{stage=\"verify\"} 4", "_count{stage=\"verify\"} 24")
                .replace("join_stage_us_sum 12", "join_stage_us_sum 212"),
        );
        let b = stage_breakdown(&before, &after, 20);
        let (us, n) = b[r#"spacegate_join_stage_seconds{stage="verify"}"#];
        assert!((us - 100.0).abs() < 1e-6, "0.002 s over 20 joins: {us}");
        assert!((n - 1.0).abs() < 1e-9);
        let (us, n) = b["join_stage_us"];
        assert!((us - 10.0).abs() < 1e-9, "200 µs over 20 joins: {us}");
        assert_eq!(n, 0.0);
        // A series that appears only after the first scrape counts from zero.
        let mut grown = after.clone();
        grown.insert(
            "new_join_stage_ms".into(),
            SumCount {
                sum: 4.0,
                count: 2.0,
            },
        );
        assert_eq!(
            stage_breakdown(&after, &grown, 2)["new_join_stage_ms"].0,
            2000.0
        );
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let s = join_stage_series("join_stage_sum{stage=\"x\" 1\njoin_stage_count abc\n{}\n");
        assert!(s.is_empty(), "{s:?}");
    }

    #[test]
    fn csv_fields_quote_commas_and_total_maps() {
        assert_eq!(
            csv_field(Some(&json!("a{x=\"1\",y=\"2\"}"))),
            "\"a{x=\"\"1\"\",y=\"\"2\"\"}\""
        );
        assert_eq!(csv_field(Some(&json!({"a": 2, "b": 3}))), "5");
        assert_eq!(csv_field(None), "");
        assert_eq!(csv_field(Some(&json!(1.5))), "1.5");
    }

    #[test]
    fn token_slices_wrap_within_their_range() {
        let all = TokenSlice::all((0..10).map(|i| i.to_string()).collect());
        let s = all.slice(4, 3);
        let got: Vec<&str> = (0..5).map(|i| s.get(i)).collect();
        assert_eq!(got, ["4", "5", "6", "4", "5"]);
    }
}
