//! The media plane's driver: the sans-IO SFU on its own thread, with one UDP socket.
//!
//! - **Its own thread.** DTLS handshakes, SRTP and SDP work are CPU-bound; on a two-core
//!   machine they must not starve the WebSocket tasks, nor be starved by them.
//! - **A bounded queue.** The gateway queues [`Command`]s for the thread. A client's media
//!   message that finds [`QUEUE_CAPACITY`] commands waiting is refused and that client is
//!   asked to reconnect (its session resumes); while more than half that is waiting, the
//!   gateway refuses new joins with the SDK's "try again" (see [`MediaHandle::saturated`]).
//!   Membership (join, leave) is never refused, so it is never lost, and it is queued
//!   without waiting, under the space's lock, so the media plane sees it in the order the
//!   space did: there is at most one join and one leave per connection, and joins stop
//!   while the queue is saturated, so it stays bounded too.
//! - **Only spaces with media.** A space's members enter the media plane when one of them
//!   first sends a media message (`signaling::Output::MediaJoin`): a participant of a
//!   space without media costs the media thread nothing, not even a wakeup.
//! - **Supervised.** A panic in the SFU is caught; the driver builds a fresh SFU, puts back
//!   every member that had no media (their clients notice nothing), asks every client that
//!   had a peer connection to reconnect, and reports not-ready while it is down.
//! - **One-way.** The driver emits [`MediaEvent`]s to a [`MediaEvents`] sink (the gateway);
//!   it never calls the gateway, so there is no module cycle.

mod driver;
mod translate;

use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use spacegate_proto::signaling::{ClientMessage, SpeakingTrack};
use spacegate_proto::{ConnectionId, SpaceId};
use spacegate_sfu::{SfuStats, SubscriptionMode};
use tokio::sync::{mpsc, oneshot};

pub use driver::spawn;

/// The one subscriber peer connection each client gets; the publisher PC borrows its id,
/// as the SDK takes the pub PC's `sfu_id` from `sub_sfus[0]`.
pub const SFU_ID: &str = "sfu-0";

/// Commands waiting for the media thread. At roughly 10 µs each this is under a tenth of
/// a second of work: a longer backlog would only delay every space's media.
pub const QUEUE_CAPACITY: usize = 8192;

#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// The UDP address all peers' media uses. Port 0 picks a free one.
    pub listen: SocketAddr,
    /// The address clients reach `listen` at, when it differs (NAT, containers).
    pub public_ip: Option<IpAddr>,
    /// Minimum time between keyframe requests to one publisher layer (see
    /// `spacegate_sfu::SfuConfig::keyframe_interval`).
    pub keyframe_interval: std::time::Duration,
    /// The `sfu_id` of this node's media plane (default [`SFU_ID`]; the node id in a
    /// cluster).
    pub sfu_id: String,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_ip: None,
            keyframe_interval: spacegate_sfu::SfuConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)))
                .keyframe_interval,
            sfu_id: SFU_ID.to_string(),
        }
    }
}

#[derive(Debug)]
pub enum Command {
    Join {
        room: SpaceId,
        member: ConnectionId,
        mode: SubscriptionMode,
        /// The client already answered the subscriber offer of its `joined`.
        answered_initial_offer: bool,
    },
    Leave {
        member: ConnectionId,
    },
    Message {
        member: ConnectionId,
        message: ClientMessage,
    },
    Stats(oneshot::Sender<SfuStats>),
    /// Makes the SFU panic, so tests can watch the supervisor recover. Not reachable from
    /// any client or API.
    #[doc(hidden)]
    Crash,
}

/// A command and when it was queued (the queue-wait metric).
#[derive(Debug)]
pub struct Queued {
    at: Instant,
    command: Command,
}

/// What the media plane tells the gateway, in the order it happened.
#[derive(Debug)]
pub enum MediaEvent {
    /// A frame for one connection (an answer, a server offer, a subscription reply, an
    /// error).
    Frame { to: ConnectionId, frame: Arc<str> },
    /// Tell the space before any offer names the track.
    TrackPublished {
        space: SpaceId,
        member: ConnectionId,
        tid: String,
    },
    TrackUnpublished {
        space: SpaceId,
        member: ConnectionId,
        tid: String,
    },
    ActiveSpeakers {
        space: SpaceId,
        tracks: Vec<SpeakingTrack>,
    },
    /// The client's peer connections are gone; close with 1012 so the SDK reconnects and
    /// builds new ones.
    Reconnect { member: ConnectionId },
    /// The media plane lost track of who had media: every client reconnects.
    ReconnectAll,
}

/// Where media events go: implemented by the gateway.
pub trait MediaEvents: Send + Sync + 'static {
    fn media_event(&self, event: MediaEvent);

    /// The `sfu_id` clients see in offers and must send back: the node's id in a cluster,
    /// so a client's state says which node carries its media.
    fn sfu_id(&self) -> &str {
        SFU_ID
    }
}

/// The gateway's side of the media thread.
#[derive(Debug)]
pub struct MediaHandle {
    tx: mpsc::UnboundedSender<Queued>,
    /// Commands queued and not yet taken by the media thread.
    depth: Arc<AtomicUsize>,
    up: Arc<AtomicBool>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Where the socket is bound.
    pub local_addr: SocketAddr,
    /// Our ICE host candidate.
    pub candidate: SocketAddr,
}

impl MediaHandle {
    /// The handle and the command stream for [`spawn`].
    pub fn new(
        local_addr: SocketAddr,
        candidate: SocketAddr,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> (Self, Receiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let depth = Arc::new(AtomicUsize::new(0));
        let handle = MediaHandle {
            tx,
            depth: depth.clone(),
            up: Arc::new(AtomicBool::new(false)),
            metrics,
            local_addr,
            candidate,
        };
        (handle, Receiver { rx, depth })
    }

    /// Queues a command whatever the queue holds: membership, which must not be lost, and
    /// the rare internal commands (stats, tests).
    pub fn send(&self, command: Command) {
        let q = Queued {
            at: Instant::now(),
            command,
        };
        self.depth.fetch_add(1, Ordering::Relaxed);
        // Fails only when the media thread is gone (shutdown).
        if self.tx.send(q).is_err() {
            self.depth.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Queues a client's command if fewer than [`QUEUE_CAPACITY`] are waiting; false
    /// when the queue is full (or gone).
    pub fn try_send(&self, command: Command) -> bool {
        let ok = self.queue_depth() < QUEUE_CAPACITY && {
            self.send(command);
            true
        };
        if !ok {
            self.metrics.media_refused_commands.inc();
        }
        ok
    }

    /// Commands waiting.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// More than half the queue is waiting: new joins are refused until it drains, so the
    /// participants already here keep their media.
    pub fn saturated(&self) -> bool {
        self.queue_depth() > QUEUE_CAPACITY / 2
    }

    /// The media thread runs (false while it restarts after a panic, and before start).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub async fn stats(&self) -> Option<SfuStats> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Stats(tx));
        rx.await.ok()
    }
}

/// The media thread's end of the queue.
#[derive(Debug)]
pub struct Receiver {
    rx: mpsc::UnboundedReceiver<Queued>,
    depth: Arc<AtomicUsize>,
}

impl Receiver {
    /// Waits for commands and takes up to `limit`; 0 when the gateway is gone.
    async fn recv_many(&mut self, into: &mut Vec<Queued>, limit: usize) -> usize {
        let n = self.rx.recv_many(into, limit).await;
        self.depth.fetch_sub(n, Ordering::Relaxed);
        n
    }
}

/// The message's name, for logs that must not print its content (SDPs hold ICE passwords).
pub(crate) fn message_kind(m: &ClientMessage) -> &'static str {
    match m {
        ClientMessage::Offer(_) => "offer",
        ClientMessage::SubAnswer(_) => "sub_answer",
        ClientMessage::Candidate(_) => "candidate",
        ClientMessage::PendingTrack(_) => "pending_track",
        ClientMessage::MuteTrack(_) => "mute_track",
        ClientMessage::UnmuteTrack(_) => "unmute_track",
        ClientMessage::SubscribeTracks(_) => "subscribe_tracks",
        ClientMessage::UnsubscribeTracks(_) => "unsubscribe_tracks",
        ClientMessage::SetDisplayName(_) => "set_display_name",
        ClientMessage::CustomEvent(_) => "custom_event",
    }
}

/// The address to advertise for a socket bound to `local`.
fn candidate_addr(local: SocketAddr, public_ip: Option<IpAddr>) -> SocketAddr {
    if let Some(ip) = public_ip {
        return SocketAddr::new(ip, local.port());
    }
    if !local.ip().is_unspecified() {
        return local;
    }
    // Bound to every interface: advertise the one the default route leaves by. A UDP
    // "connect" only consults the routing table; nothing is sent.
    let probe = StdUdpSocket::bind((local.ip(), 0))
        .and_then(|s| s.connect(("192.0.2.1", 9)).map(|()| s))
        .and_then(|s| s.local_addr());
    match probe {
        Ok(a) => SocketAddr::new(a.ip(), local.port()),
        Err(_) => SocketAddr::new(IpAddr::from([127, 0, 0, 1]), local.port()),
    }
}

/// Binds the media socket; [`spawn`] starts the thread once the gateway exists.
pub fn bind(config: &MediaConfig) -> std::io::Result<(StdUdpSocket, SocketAddr, SocketAddr)> {
    let socket = StdUdpSocket::bind(config.listen)?;
    socket.set_nonblocking(true)?;
    let local = socket.local_addr()?;
    Ok((socket, local, candidate_addr(local, config.public_ip)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filling_queue_turns_saturated_at_half_and_refuses_when_full() {
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let addr = SocketAddr::from(([127, 0, 0, 1], 9));
        // No media thread: nothing drains the queue.
        let (handle, _rx) = MediaHandle::new(addr, addr, metrics);
        let leave = || Command::Leave {
            member: ConnectionId::new("c").expect("id"),
        };
        for _ in 0..QUEUE_CAPACITY / 2 {
            assert!(handle.try_send(leave()));
        }
        assert!(!handle.saturated(), "half full is not yet saturated");
        assert!(handle.try_send(leave()));
        assert!(handle.saturated(), "joins are refused from here on");
        while handle.queue_depth() < QUEUE_CAPACITY {
            assert!(handle.try_send(leave()));
        }
        assert!(!handle.try_send(leave()), "a full queue refuses");
        assert_eq!(handle.metrics.media_refused_commands.get(), 1);
    }
}
