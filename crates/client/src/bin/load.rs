//! `spacegate-load`: join-throughput and idle-connection load against a running spacegate.
//!
//!   spacegate-load join --url http://127.0.0.1:8080 --token-id ID --token-secret S \
//!       --concurrency 100 --joins 5000 [--spaces 10]
//!   spacegate-load hold --url … --token-id … --token-secret … --connections 15000 --spaces 150
//!
//!   spacegate-load media --url … --subscribers 10 --secs 20 [--video-pps 300] [--server-pid P]
//!
//! All create a signing key and spaces through the REST API and sign every token before
//! the clock starts, so only joining (or forwarding) is measured. Output is one JSON
//! object per line.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use spacegate_auth::{PrivateKey, SignOptions};
use spacegate_client::{ClientError, JoinOptions, RestClient, Session};
use spacegate_proto::Role;

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
    #[arg(long, default_value_t = 1)]
    spaces: usize,
    /// Tokens without participant_id, a small pool reused round-robin (every join gets a
    /// server-made id). Skips signing one token per join, for long profiling runs.
    #[arg(long)]
    anonymous: bool,
    /// PID of a server on this machine: report its CPU time per join (from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
}

struct Prepared {
    ws_base: String,
    tokens: Vec<String>,
}

impl Prepared {
    fn token(&self, i: usize, total: usize) -> Option<&String> {
        if i >= total {
            return None;
        }
        self.tokens.get(i % self.tokens.len())
    }
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

async fn prepare(c: &Common, count: usize) -> Result<Prepared> {
    let count = if c.anonymous { count.min(100) } else { count };
    let rest = RestClient::new(&c.url, &c.token_id, &c.token_secret);
    let (kid, private) = rest
        .create_signing_key()
        .await
        .context("creating a signing key")?;
    let key = Arc::new(PrivateKey::parse(&private).context("parsing the signing key")?);
    let mut spaces = Vec::new();
    for _ in 0..c.spaces.max(1) {
        spaces.push(rest.create_space().await.context("creating a space")?);
    }
    let expires_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    // Signing costs ~1 ms per token: spread it over the cores, before the clock starts.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let chunk = count.div_ceil(threads).max(1);
    let mut handles = Vec::new();
    for start in (0..count).step_by(chunk) {
        let (key, kid, spaces, anonymous) = (key.clone(), kid.clone(), spaces.clone(), c.anonymous);
        handles.push(std::thread::spawn(move || -> Result<Vec<String>> {
            (start..(start + chunk).min(count))
                .map(|i| {
                    let options = SignOptions {
                        key_id: kid.parse()?,
                        space_id: spaces[i % spaces.len()].parse()?,
                        expires_at,
                        role: Role::Publisher,
                        participant_id: if anonymous {
                            None
                        } else {
                            Some(format!("load-{i}").parse()?)
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
    let ws_base = c
        .url
        .trim_end_matches('/')
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1);
    Ok(Prepared { ws_base, tokens })
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Join {
            common,
            concurrency,
            joins,
        } => run_join(&common, concurrency, joins).await,
        Command::Hold {
            common,
            connections,
            hold_secs,
            ramp_concurrency,
        } => run_hold(&common, connections, hold_secs, ramp_concurrency).await,
        Command::Media {
            common,
            subscribers,
            secs,
            video_pps,
            frame_bytes,
        } => run_media(&common, subscribers, secs, video_pps, frame_bytes).await,
    }
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

async fn run_media(
    c: &Common,
    subscribers: usize,
    secs: u64,
    video_pps: u32,
    frame_bytes: usize,
) -> Result<()> {
    use spacegate_client::media::vp8_frame;
    use spacegate_client::participant::{Participant, TrackSpec, audio_payload};
    if subscribers == 0 || video_pps == 0 {
        bail!("--subscribers and --video-pps must be positive");
    }
    let prepared = prepare(c, subscribers + 1).await?;
    let options = JoinOptions::default();
    let rss_before = c.server_pid.and_then(rss_kb);

    let mut publisher = Participant::join(&prepared.ws_base, &prepared.tokens[0], &options)
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
    for token in &prepared.tokens[1..] {
        let mut p = Participant::join(&prepared.ws_base, token, &options)
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
    let mut out = serde_json::json!({
        "mode": "media",
        "subscribers": subscribers,
        "seconds": elapsed.as_secs_f64(),
        // Frames written (audio + video); a video frame over ~1100 bytes is several packets.
        "published_frames_per_sec": (published / elapsed.as_secs_f64()).round(),
        "forwarded_packets_per_sec": (forwarded / elapsed.as_secs_f64()).round(),
    });
    if frame_bytes <= 1100 && published > 0.0 {
        // One packet per frame: the fraction of what was sent that reached each subscriber.
        out["delivery_ratio"] = serde_json::json!(forwarded / (published * subscribers as f64));
    }
    if let (Some(a), Some(b)) = (cpu0, cpu1)
        && forwarded > 0.0
    {
        let us = (b - a) * 1e6 / forwarded;
        out["server_cpu_us_per_forwarded_packet"] = serde_json::json!((us * 100.0).round() / 100.0);
        out["forwarded_packets_per_server_core_sec"] = serde_json::json!((1e6 / us).round());
        out["server_cpu_share"] = serde_json::json!((b - a) / elapsed.as_secs_f64());
    }
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        // Publisher PC + one subscriber PC per subscriber.
        let pcs = subscribers as f64 + 1.0;
        out["server_rss_kb_per_peer_connection"] =
            serde_json::json!(((b as f64 - a as f64) / pcs).round());
    }
    println!("{out}");
    Ok(())
}

async fn run_join(c: &Common, concurrency: usize, joins: usize) -> Result<()> {
    if concurrency == 0 || joins == 0 {
        bail!("--concurrency and --joins must be positive");
    }
    let p = Arc::new(prepare(c, joins).await?);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = c.server_pid.and_then(cpu_seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (p, next) = (p.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors: Vec<String> = Vec::new();
            let options = JoinOptions::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(token) = p.token(i, joins) else {
                    break;
                };
                let t = Instant::now();
                match Session::join(&p.ws_base, token, &options).await {
                    Ok(session) => {
                        latencies.push(t.elapsed());
                        // Leave at once (close without waiting), as a churning client would.
                        session.abort_with_close().await;
                    }
                    Err(e) => errors.push(match e {
                        ClientError::Rejected { error, .. } => {
                            format!("rejected type {}", error.kind)
                        }
                        other => other.to_string(),
                    }),
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::with_capacity(joins);
    let mut errors = std::collections::BTreeMap::<String, usize>::new();
    for w in workers {
        let (l, e) = w.await?;
        latencies.extend(l);
        for e in e {
            *errors.entry(e).or_default() += 1;
        }
    }
    let elapsed = started.elapsed();
    let server_cpu = c
        .server_pid
        .and_then(cpu_seconds)
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    latencies.sort();
    println!(
        "{}",
        serde_json::json!({
            "mode": "join",
            "concurrency": concurrency,
            "joins": latencies.len(),
            "errors": errors,
            "seconds": elapsed.as_secs_f64(),
            "joins_per_sec": latencies.len() as f64 / elapsed.as_secs_f64(),
            "p50_ms": percentile(&latencies, 0.50),
            "p99_ms": percentile(&latencies, 0.99),
            "max_ms": percentile(&latencies, 1.0),
            "server_cpu_seconds": server_cpu,
            "server_cpu_us_per_join": server_cpu.map(|s| s * 1e6 / latencies.len().max(1) as f64),
        })
    );
    Ok(())
}

async fn run_hold(c: &Common, connections: usize, hold_secs: u64, ramp: usize) -> Result<()> {
    let p = Arc::new(prepare(c, connections).await?);
    let next = Arc::new(AtomicUsize::new(0));
    let joined = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (done_tx, _) = tokio::sync::watch::channel(false);
    let mut ramps = Vec::new();
    for _ in 0..ramp.max(1) {
        let (p, next, joined, failed) = (p.clone(), next.clone(), joined.clone(), failed.clone());
        let done = done_tx.subscribe();
        ramps.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(token) = p.token(i, connections) else { break };
                match Session::join(&p.ws_base, token, &JoinOptions::default()).await {
                    Ok(mut session) => {
                        joined.fetch_add(1, Ordering::Relaxed);
                        let mut done = done.clone();
                        // Keep reading so pings are answered and fan-out is consumed.
                        tokio::spawn(async move {
                            loop {
                                tokio::select! {
                                    r = session.next_within(Duration::from_secs(3600)) => if r.is_err() { break },
                                    _ = done.changed() => break,
                                }
                            }
                            session.abort();
                        });
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for r in ramps {
        r.await?;
    }
    println!(
        "{}",
        serde_json::json!({"mode": "hold", "state": "holding", "joined": joined.load(Ordering::Relaxed), "failed": failed.load(Ordering::Relaxed)})
    );
    tokio::time::sleep(Duration::from_secs(hold_secs)).await;
    let _ = done_tx.send(true);
    println!(
        "{}",
        serde_json::json!({"mode": "hold", "state": "released"})
    );
    Ok(())
}
