//! Wires the sans-IO SFU to one UDP socket, the clock, and the gateway.
//!
//! One task owns the `Sfu`: connection tasks send it commands (joins, leaves, the media
//! messages the signaling state machine passed on), datagrams arrive on the socket, and
//! timers fire. Everything the SFU produces is delivered in the order it was made: frames
//! to connections' queues, and track changes through the space's state machine, so a
//! subscriber always hears `add_track` before the `sub_offer` that carries the track.

use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::{Arc, Weak};
use std::time::Instant;

use spacegate_proto::signaling::{
    ClientMessage, ConnectionTracks, ConnectionsRequest, Envelope, ErrorBody, RequestErrorType,
    ServerMessage, SfuDescription, SpeakingTrack, SubscriptionReply, TrackKind,
};
use spacegate_proto::{ConnectionId, SpaceId};
use spacegate_sfu::{Sfu, SfuConfig, SfuEvent, SfuStats, SubscriptionMode};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::gateway::Gateway;

/// The one subscriber peer connection each client gets; the publisher PC borrows its id,
/// as the SDK takes the pub PC's `sfu_id` from `sub_sfus[0]`.
pub const SFU_ID: &str = "sfu-0";

#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// The UDP address all peers' media uses. Port 0 picks a free one.
    pub listen: SocketAddr,
    /// The address clients reach `listen` at, when it differs (NAT, containers).
    pub public_ip: Option<IpAddr>,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_ip: None,
        }
    }
}

#[derive(Debug)]
pub enum Command {
    Join {
        room: SpaceId,
        member: ConnectionId,
        mode: SubscriptionMode,
    },
    Leave {
        member: ConnectionId,
    },
    Message {
        member: ConnectionId,
        message: ClientMessage,
    },
    Stats(oneshot::Sender<SfuStats>),
}

/// The gateway's side of the media task.
#[derive(Debug)]
pub struct MediaHandle {
    tx: mpsc::UnboundedSender<Command>,
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
    ) -> (Self, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = MediaHandle {
            tx,
            local_addr,
            candidate,
        };
        (handle, rx)
    }

    pub fn send(&self, c: Command) {
        // Fails only when the media task is gone (runtime shutdown).
        let _ = self.tx.send(c);
    }

    pub async fn stats(&self) -> Option<SfuStats> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Stats(tx));
        rx.await.ok()
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

/// Binds the media socket; [`spawn`] starts the task once the gateway exists.
pub fn bind(config: &MediaConfig) -> std::io::Result<(StdUdpSocket, SocketAddr, SocketAddr)> {
    let socket = StdUdpSocket::bind(config.listen)?;
    socket.set_nonblocking(true)?;
    let local = socket.local_addr()?;
    Ok((socket, local, candidate_addr(local, config.public_ip)))
}

/// Runs the SFU until the gateway is dropped.
pub fn spawn(
    socket: StdUdpSocket,
    candidate: SocketAddr,
    mut rx: mpsc::UnboundedReceiver<Command>,
    gateway: Weak<Gateway>,
) {
    use tracing::Instrument as _;
    let span = tracing::debug_span!("media", %candidate);
    tokio::spawn(async move {
        let socket = match UdpSocket::from_std(socket) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "media socket unusable; media disabled");
                return;
            }
        };
        let mut sfu = Sfu::new(SfuConfig::new(candidate), Instant::now());
        let mut buf = vec![0u8; 2048];
        loop {
            let deadline = tokio::time::Instant::from_std(sfu.poll_timeout());
            tokio::select! {
                r = socket.recv_from(&mut buf) => {
                    if let Ok((n, source)) = r {
                        sfu.receive(Instant::now(), source, &buf[..n]);
                        // Drain what else is queued before the timers and events: one
                        // wakeup per batch, not per datagram.
                        for _ in 0..64 {
                            match socket.try_recv_from(&mut buf) {
                                Ok((n, source)) => sfu.receive(Instant::now(), source, &buf[..n]),
                                Err(_) => break,
                            }
                        }
                    }
                }
                c = rx.recv() => {
                    let Some(c) = c else { return };
                    let Some(gw) = gateway.upgrade() else { return };
                    command(&mut sfu, &gw, c);
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::trace!("tick");
                    sfu.handle_timeout(Instant::now())
                }
            }
            while let Some(t) = sfu.poll_transmit() {
                // A full socket buffer drops the datagram, as the network would; RTP
                // recovers (NACK, keyframes) and blocking here would stall every peer.
                let _ = socket.try_send_to(&t.contents, t.destination);
            }
            let Some(gw) = gateway.upgrade() else { return };
            while let Some(e) = sfu.poll_event() {
                event(&gw, e);
            }
        }
    }.instrument(span));
}

fn frame(m: ServerMessage) -> Arc<str> {
    Envelope::new(m).to_json().into()
}

fn error(message: impl Into<String>) -> Arc<str> {
    frame(ServerMessage::Error(ErrorBody::request(
        RequestErrorType::Unknown,
        message,
        None,
    )))
}

fn command(sfu: &mut Sfu, gw: &Gateway, c: Command) {
    let now = Instant::now();
    tracing::debug!(?c, "media command");
    match c {
        Command::Join { room, member, mode } => sfu.join(room.as_str(), member.as_str(), mode, now),
        Command::Leave { member } => sfu.leave(member.as_str(), now),
        Command::Stats(tx) => {
            let _ = tx.send(sfu.stats());
        }
        Command::Message { member, message } => {
            if let Some(reply) = message_in(sfu, &member, message, now) {
                tracing::debug!(%member, len = reply.len(), "media reply");
                gw.send_frame(&member, reply);
            }
        }
    }
}

/// One media message from a client; returns the direct reply, if any.
fn message_in(
    sfu: &mut Sfu,
    member: &ConnectionId,
    message: ClientMessage,
    now: Instant,
) -> Option<Arc<str>> {
    let m = member.as_str();
    match message {
        ClientMessage::PendingTrack(p) => {
            let kind = match p.kind {
                TrackKind::Audio => spacegate_sfu::TrackKind::Audio,
                TrackKind::Video => spacegate_sfu::TrackKind::Video,
            };
            sfu.pending_track(m, &p.mid, &p.tid, kind, p.muted);
            None
        }
        ClientMessage::Offer(sdp) => Some(match sfu.offer(m, &sdp, now) {
            Ok(answer) => frame(ServerMessage::Answer(answer)),
            Err(e) => error(format!("offer refused: {e}")),
        }),
        ClientMessage::SubAnswer(d) if d.sfu_id != SFU_ID => {
            Some(error(format!("unknown sfu_id {:?}", d.sfu_id)))
        }
        ClientMessage::SubAnswer(d) => sfu
            .sub_answer(m, &d.sdp, now)
            .err()
            .map(|e| error(format!("sub_answer refused: {e}"))),
        ClientMessage::Candidate(c) if c.sfu_id != SFU_ID => {
            Some(error(format!("unknown sfu_id {:?}", c.sfu_id)))
        }
        // ICE-lite needs no client candidates; a malformed one still gets a clear error.
        ClientMessage::Candidate(c) => sfu
            .candidate(m, &c.candidate.candidate)
            .err()
            .map(|e| error(format!("candidate refused: {e}"))),
        ClientMessage::MuteTrack(tid) => {
            sfu.set_muted(m, &tid, true, now);
            None
        }
        ClientMessage::UnmuteTrack(tid) => {
            sfu.set_muted(m, &tid, false, now);
            None
        }
        ClientMessage::SubscribeTracks(r) => Some(frame(ServerMessage::SubscribeTracks(
            subscriptions(r, |p, tids| sfu.subscribe(m, p, tids, now)),
        ))),
        ClientMessage::UnsubscribeTracks(r) => Some(frame(ServerMessage::UnsubscribeTracks(
            subscriptions(r, |p, tids| sfu.unsubscribe(m, p, tids, now)),
        ))),
        // Handled by the signaling state machine; never passed on.
        ClientMessage::SetDisplayName(_) | ClientMessage::CustomEvent(_) => None,
    }
}

fn subscriptions(
    r: ConnectionsRequest,
    mut apply: impl FnMut(&str, &[String]) -> bool,
) -> SubscriptionReply {
    let mut reply = SubscriptionReply {
        successes: Vec::new(),
        failures: Vec::new(),
    };
    for c in r.connections {
        let ok = apply(&c.connection_id, &c.track_ids);
        let entry = ConnectionTracks {
            connection_id: c.connection_id,
            track_ids: c.track_ids,
        };
        if ok {
            reply.successes.push(entry);
        } else {
            reply.failures.push(entry);
        }
    }
    reply
}

fn event(gw: &Gateway, e: SfuEvent) {
    tracing::debug!(?e, "media event");
    let conn = |m: &str| ConnectionId::new(m).ok();
    let space = |r: &str| SpaceId::new(r).ok();
    match e {
        SfuEvent::SubOffer { member, sdp, .. } => {
            if let Some(c) = conn(&member) {
                gw.send_frame(
                    &c,
                    frame(ServerMessage::SubOffer(SfuDescription {
                        sfu_id: SFU_ID.into(),
                        sdp,
                    })),
                );
            }
        }
        SfuEvent::TrackPublished { room, member, tid } => {
            if let (Some(s), Some(c)) = (space(&room), conn(&member)) {
                gw.with_existing_space(&s, |space, out| space.track_published(&c, &tid, out));
            }
        }
        SfuEvent::TrackUnpublished { room, member, tid } => {
            if let (Some(s), Some(c)) = (space(&room), conn(&member)) {
                gw.with_existing_space(&s, |space, out| space.track_unpublished(&c, &tid, out));
            }
        }
        SfuEvent::PeerFailed { member, .. } => {
            if let Some(c) = conn(&member) {
                tracing::info!(%c, "a peer connection failed; asking the client to reconnect");
                gw.ask_to_reconnect(&c);
            }
        }
        SfuEvent::ActiveSpeakers { room, speakers } => {
            if let Some(s) = space(&room) {
                let tracks = speakers
                    .into_iter()
                    .map(|(m, tid)| SpeakingTrack {
                        connection_id: m.to_string(),
                        track_id: tid,
                    })
                    .collect();
                gw.with_existing_space(&s, |space, out| space.active_speakers(tracks, out));
            }
        }
    }
}
