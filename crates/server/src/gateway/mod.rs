//! The join gateway: `GET /v1?token=…` upgrades to a WebSocket that speaks the
//! `@mux/spaces-web` 1.2.0 protocol.
//!
//! A connection's life: (1) upgrade unconditionally, so a refusal can always be told to the
//! SDK (it hangs forever on a failed upgrade or a silent close); (2) `admission`: verify the
//! token and claim the participant in the registry before any space state exists; on
//! refusal send the SDK's `error` and close with 4000, which stops its reconnect loop; (3)
//! `connection`: join the space's state machine and pump frames both ways until the socket
//! closes, the peer stops answering pings, it floods us, it reads too slowly, or the server
//! drains.
//!
//! Modules: `admission` (the checks before anything exists), `connection` (one task per
//! WebSocket), `spaces` (the per-space state machines and delivery of their outputs),
//! `activity` (idle/active transitions written to the store). The media plane reaches the
//! gateway only through [`crate::media::MediaEvents`].

mod activity;
mod admission;
mod connection;
mod limits;
mod membership;
mod outbox;
mod relay;
mod spaces;
pub(crate) mod ws;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spacegate_proto::{ConnectionId, SpaceId};
use spacegate_session::Registry;
use spacegate_signaling::SpaceConfig;

use crate::media::{MediaEvent, MediaEvents};

pub use admission::{JoinParams, upgrade};
pub(crate) use admission::{PeerIp, join};
pub(crate) use limits::source_address;
/// The largest message a client may send.
pub(crate) use spacegate_proto::signaling::MAX_FRAME_BYTES;
pub use spaces::{DeleteClaim, SpaceBusy};
pub(crate) use ws::{Ws, switching_protocols};

/// Close code that tells the SDK not to reconnect.
pub const CLOSE_NO_RECONNECT: u16 = 4000;
/// "Service restart": the SDK reconnects, to us or a sibling.
pub const CLOSE_RESTART: u16 = 1012;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub max_participants: u32,
    pub space: Arc<SpaceConfig>,
    /// How often a connection is pinged. With tens of thousands of idle participants the
    /// pings are the idle node's cost: each connection's pings start at a random point of
    /// the interval, and they are sent on a coarse grid (a fortieth of the interval), so
    /// they come as a steady trickle of small batches, one wakeup per batch (15 000
    /// connections at 40 s: 1 % of a core here). 40 s stays under the idle timeouts of
    /// common proxies and load balancers (55–60 s), so a quiet connection is never cut by
    /// them.
    pub ping_interval: Duration,
    /// A connection silent this long (no frame, no pong) is dead: a half-open TCP
    /// connection otherwise holds its participant id forever. A reconnect with the same
    /// credential replaces such a ghost at once, so this bounds only how late the others
    /// hear that a participant whose network vanished has left.
    pub idle_timeout: Duration,
    /// Frames waiting for a slow reader; beyond this it is disconnected rather than
    /// letting it slow the space down or grow our memory.
    pub outbound_queue: usize,
    /// Frames per second a client may send (burst of twice that); beyond, it is cut off.
    pub inbound_per_second: u32,
    pub leeway_secs: u64,
    /// How long after its token expired, or after it was last seen, a participant may still
    /// come back through the SDK's reconnect (`reconnect_id`) with the token it joined
    /// with. The SDK cannot fetch a new token mid-reconnect, so without this a network blip
    /// late in a meeting would end it for good.
    pub reconnect_grace: Duration,
    pub media: crate::media::MediaConfig,
    /// Most WebSocket connections (joined or being admitted) this node holds; beyond, a
    /// join is refused with the SDK's "try again" before any work is spent on it. Keep it
    /// below the process's open-file limit, or accept() fails instead (and no client is
    /// told anything).
    pub max_connections: usize,
    /// Joins per second one source address may start, in bursts of `join_burst_per_ip`;
    /// 0 turns the limit off. Refused with "try again".
    pub join_rate_per_ip: u32,
    pub join_burst_per_ip: u32,
    /// Behind a reverse proxy, take the source address of a join from the last
    /// `X-Forwarded-For` entry (the one our proxy appended). Only when every connection
    /// comes through that proxy: otherwise a client names its own address.
    pub trust_forwarded_for: bool,
    /// The whole admission (token check, store lookups, registry) must finish within this,
    /// or the join is refused with "try again": a slow store must not hold sockets forever.
    pub admission_timeout: Duration,
    /// A client must send its whole HTTP request head within this (slowloris).
    pub head_timeout: Duration,
    /// Every REST request is answered within this, with a 503 if the store did not
    /// answer in time; `/readyz` waits at most this (and at most 2 s) for the store.
    pub request_timeout: Duration,
    /// On shutdown (SIGTERM), how long clients told to reconnect (1012) get to go before
    /// the process exits anyway.
    pub drain_timeout: Duration,
    /// The wall clock of token checks and `created_at` (tests move it).
    pub clock: crate::clock::Clock,
}

/// Not a close code: the "close" that makes a connection's task panic, for tests only
/// (outside the 1000–4999 range a peer could ever see).
const PANIC_FOR_TESTS: u16 = 65_000;

/// Used when the open-file limit cannot be read; `main` derives the real default from it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Generous for people (a whole office behind one NAT reconnecting at once), tight for a
/// script.
pub const DEFAULT_JOIN_RATE_PER_IP: u32 = 20;
pub const DEFAULT_JOIN_BURST_PER_IP: u32 = 200;

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_participants: 100,
            space: Arc::new(SpaceConfig::default()),
            ping_interval: Duration::from_secs(40),
            idle_timeout: Duration::from_secs(100),
            outbound_queue: 256,
            inbound_per_second: 50,
            leeway_secs: 30,
            reconnect_grace: Duration::from_secs(300),
            media: crate::media::MediaConfig::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            // Off for embedders and tests, which join from one address at will; the
            // `spacegate` binary turns it on (DEFAULT_JOIN_RATE_PER_IP).
            join_rate_per_ip: 0,
            join_burst_per_ip: DEFAULT_JOIN_BURST_PER_IP,
            trust_forwarded_for: false,
            admission_timeout: Duration::from_secs(10),
            head_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            clock: crate::clock::Clock::default(),
        }
    }
}

/// All live connections and spaces of this node.
pub struct Gateway {
    pub registry: Arc<dyn Registry>,
    pub config: GatewayConfig,
    spaces: Mutex<HashMap<SpaceId, Arc<spaces::Slot>>>,
    /// Each connection's outbound queue and close signal. A full queue (a reader too
    /// slow) closes with 4000; a broken media plane asks for 1012 (the SDK reconnects).
    conns: Mutex<HashMap<ConnectionId, Arc<outbox::Outbox>>>,
    activity: Arc<activity::ActivityQueue>,
    /// Set once shutdown began: every connection, present or arriving, closes with 1012.
    draining: std::sync::atomic::AtomicBool,
    /// Wakes what is not a joined connection but must end with the drain too: the
    /// relays carrying clients to other nodes.
    drained: tokio::sync::Notify,
    started: Instant,
    pub media: crate::media::MediaHandle,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// WebSocket connections held (admitting or joined), against `max_connections`.
    open_connections: Arc<std::sync::atomic::AtomicUsize>,
    join_rates: Mutex<limits::JoinRates>,
    /// Spaces a REST delete is removing: joins that reach the registry are refused.
    deleting: Mutex<std::collections::HashSet<SpaceId>>,
    /// In a cluster: where each space lives (see `relay`). Unset on a single node.
    homes: std::sync::OnceLock<Arc<dyn spacegate_session::SpaceHomes>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("connections", &self.connection_count())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a few map operations; a panic inside one cannot leave
    // the map half-updated, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Gateway {
    /// Creates the gateway, binds the media socket, and starts the media thread and the
    /// task that applies idle/active transitions to the store.
    pub fn new(
        registry: Arc<dyn Registry>,
        store: Arc<dyn spacegate_store::Store>,
        config: GatewayConfig,
    ) -> std::io::Result<Arc<Self>> {
        let (socket, local_addr, candidate) = crate::media::bind(&config.media)?;
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let activity = activity::ActivityQueue::spawn(store, metrics.clone());
        let (media, media_rx) =
            crate::media::MediaHandle::new(local_addr, candidate, metrics.clone());
        let gateway = Arc::new(Gateway {
            registry,
            config,
            spaces: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            activity,
            draining: false.into(),
            drained: tokio::sync::Notify::new(),
            started: Instant::now(),
            media,
            metrics,
            open_connections: Arc::default(),
            join_rates: Mutex::default(),
            deleting: Mutex::default(),
            homes: std::sync::OnceLock::new(),
        });
        // Started only once the gateway exists: the thread stops when it can no longer
        // reach the gateway, and one started inside `Arc::new_cyclic` could run before the
        // Arc is complete, find nothing, and stop for good.
        let sink: Arc<dyn MediaEvents> = gateway.clone();
        crate::media::spawn(
            socket,
            &gateway.media,
            media_rx,
            Arc::downgrade(&sink),
            gateway.config.media.keyframe_interval,
        )?;
        Ok(gateway)
    }

    /// Milliseconds on the gateway's monotonic clock: the virtual time the sans-IO parts
    /// (state machine, liveness, rate limits) run on.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn instant_at(&self, ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.started + Duration::from_millis(ms))
    }

    /// Cluster mode: every space gets one home node; joins for a space homed elsewhere are
    /// carried there. Set once, before the listener starts.
    pub fn set_homes(&self, homes: Arc<dyn spacegate_session::SpaceHomes>) {
        let _ = self.homes.set(homes);
    }

    /// Resolves once a drain has begun (at once if it has).
    pub(super) async fn draining(&self) {
        let notified = self.drained.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        notified.await;
    }

    pub(super) fn homes(&self) -> Option<&Arc<dyn spacegate_session::SpaceHomes>> {
        self.homes.get()
    }

    /// What a new space would add to: participants connected here and media peer
    /// connections (each costs the media plane CPU), for the cluster's choice of homes.
    pub fn load(&self) -> u64 {
        let participants = u64::try_from(self.connection_count()).unwrap_or(u64::MAX);
        let peers = u64::try_from(self.metrics.sfu_peer_connections.get()).unwrap_or(0);
        participants.saturating_add(peers)
    }

    pub fn connection_count(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Spaces with someone in them on this node.
    pub fn live_space_count(&self) -> usize {
        lock(&self.spaces).len()
    }

    /// Whether the parts a join needs run: the media thread and the store writer.
    pub fn is_ready(&self) -> bool {
        self.media.is_up() && self.activity.is_up()
    }

    /// Tells every connection to close with 1012 (the SDK reconnects elsewhere) and waits
    /// up to `grace` for them to go.
    pub async fn drain(&self, grace: Duration) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.drained.notify_waiters();
        self.reconnect_all();
        let deadline = Instant::now() + grace;
        // Joined connections, and the relays carrying clients to other nodes (they hold a
        // connection permit too).
        while (self.connection_count() > 0
            || self
                .open_connections
                .load(std::sync::atomic::Ordering::SeqCst)
                > 0)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Their leaves made spaces idle: written before the process exits, so the store
        // is true after a restart without relying on the start-up sweep.
        if !self.activity.flushed(grace).await {
            tracing::warn!(
                "space status not fully written at shutdown; the next start marks every space idle"
            );
        }
    }

    /// Asks every connection to reconnect (1012) without draining: the registry no longer
    /// vouches for this node's claims (its lease lapsed while Redis was unreachable), so
    /// each participant must claim its id again, here or on another node.
    pub fn reconnect_all(&self) {
        for c in lock(&self.conns).values() {
            c.close(CLOSE_RESTART);
        }
    }

    /// Queues one frame for one connection; a full queue disconnects it.
    fn send_frame(&self, to: &ConnectionId, frame: Arc<str>) {
        if let Some(c) = lock(&self.conns).get(to) {
            c.push_or_close(frame, CLOSE_NO_RECONNECT);
        }
    }

    /// Closes a connection with "service restart" (1012), which makes the SDK reconnect
    /// and build new peer connections.
    fn ask_to_reconnect(&self, to: &ConnectionId) {
        if let Some(c) = lock(&self.conns).get(to) {
            c.close(CLOSE_RESTART);
        }
    }

    /// Makes one connection's task panic, to show its guard frees everything it held.
    /// Tests only.
    #[doc(hidden)]
    pub fn panic_connection_for_tests(&self, conn: &ConnectionId) {
        if let Some(c) = lock(&self.conns).get(conn) {
            c.close(PANIC_FOR_TESTS);
        }
    }

    /// Makes the media plane panic, to exercise its supervisor. Tests only.
    #[doc(hidden)]
    pub async fn crash_media_plane_for_tests(&self) {
        self.media.send(crate::media::Command::Crash);
    }
}

impl MediaEvents for Gateway {
    fn sfu_id(&self) -> &str {
        &self.config.media.sfu_id
    }

    fn media_event(&self, event: MediaEvent) {
        match event {
            MediaEvent::Frame { to, frame } => self.send_frame(&to, frame),
            MediaEvent::TrackPublished { space, member, tid } => {
                self.with_existing_space(&space, |s, out| s.track_published(&member, &tid, out))
            }
            MediaEvent::TrackUnpublished { space, member, tid } => {
                self.with_existing_space(&space, |s, out| s.track_unpublished(&member, &tid, out))
            }
            MediaEvent::ActiveSpeakers { space, tracks } => {
                self.with_existing_space(&space, |s, out| s.active_speakers(tracks, out))
            }
            MediaEvent::Reconnect { member } => self.ask_to_reconnect(&member),
            MediaEvent::ReconnectAll => {
                for c in lock(&self.conns).values() {
                    c.close(CLOSE_RESTART);
                }
            }
        }
    }
}
