//! The join gateway: `GET /v1?token=…` upgrades to a WebSocket that speaks the
//! `@mux/spaces-web` 1.2.0 protocol.
//!
//! A connection's life: (1) upgrade unconditionally, so a refusal can always be told to the
//! SDK (it hangs forever on a failed upgrade or a silent close); (2) verify the token and
//! claim the participant in the registry before any space state exists; on refusal send
//! the SDK's `error` and close with 4000, which stops its reconnect loop; (3) join the
//! space's state machine and pump frames both ways until the socket closes, the peer stops
//! answering pings, it floods us, it reads too slowly, or the server drains.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use spacegate_auth::{AuthError, VerifyOptions};
use spacegate_proto::signaling::{
    ClientMessage, Envelope, ErrorBody, JoinErrorType, MAX_DISPLAY_NAME, MAX_FRAME_BYTES,
    RequestErrorType, ServerMessage, SfuDescription,
};
use spacegate_proto::{ConnectionId, ParticipantId, SessionId, SpaceId};
use spacegate_session::{Registry, ReserveError, ReserveMode, ReserveRequest};
use spacegate_signaling::{
    FloodGuard, Joiner, Liveness, LivenessAction, Output, Space, SpaceConfig,
};
use tokio::sync::{Notify, mpsc, watch};

use crate::AppState;
use crate::ids::random_base62;
use crate::join::{JoinAuthError, verify_join_token};

/// Close code that tells the SDK not to reconnect.
pub const CLOSE_NO_RECONNECT: u16 = 4000;
/// "Service restart": the SDK reconnects, to us or a sibling.
pub const CLOSE_RESTART: u16 = 1012;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub max_participants: u32,
    pub space: Arc<SpaceConfig>,
    pub ping_interval: Duration,
    /// A connection silent this long (no frame, no pong) is dead: a half-open TCP
    /// connection otherwise holds its participant id forever.
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
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_participants: 100,
            space: Arc::new(SpaceConfig::default()),
            ping_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(12),
            outbound_queue: 256,
            inbound_per_second: 50,
            leeway_secs: 30,
            reconnect_grace: Duration::from_secs(300),
            media: crate::media::MediaConfig::default(),
        }
    }
}

struct Conn {
    tx: mpsc::Sender<Arc<str>>,
    /// Set when the connection must go: replaced by a reconnect, or too slow.
    kill: Arc<Notify>,
    /// Set when the client should come back (close 1012): its media peers broke.
    restart: Arc<Notify>,
}

struct Slot {
    space: Mutex<Space>,
    /// Set under the gateway's `spaces` lock when the slot is dropped from the map; a
    /// joiner that raced with that retries with a fresh slot.
    retired: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
enum Activity {
    Active(SpaceId, SessionId),
    Idle(SpaceId),
}

/// All live connections and spaces of this node.
pub struct Gateway {
    pub registry: Arc<dyn Registry>,
    pub config: GatewayConfig,
    spaces: Mutex<HashMap<SpaceId, Arc<Slot>>>,
    conns: Mutex<HashMap<ConnectionId, Conn>>,
    /// Participants that left recently: (space, participant) → (when, credential). Lets a
    /// reconnect with an expired token through, within `reconnect_grace`.
    departed: Mutex<HashMap<(SpaceId, ParticipantId), (Instant, String)>>,
    activity: mpsc::UnboundedSender<Activity>,
    drain: watch::Sender<bool>,
    started: Instant,
    pub media: crate::media::MediaHandle,
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
    /// Creates the gateway, binds the media socket, and spawns the media task and the task
    /// that applies idle/active transitions to the store in the order they happened.
    pub fn new(
        registry: Arc<dyn Registry>,
        store: Arc<dyn spacegate_store::Store>,
        config: GatewayConfig,
    ) -> std::io::Result<Arc<Self>> {
        let (socket, local_addr, candidate) = crate::media::bind(&config.media)?;
        let (activity, mut rx) = mpsc::unbounded_channel::<Activity>();
        tokio::spawn(async move {
            while let Some(a) = rx.recv().await {
                let result = match &a {
                    Activity::Active(space, session) => {
                        store.mark_space_active(space, session).await
                    }
                    Activity::Idle(space) => store.mark_space_idle(space).await,
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, ?a, "could not record space activity");
                }
            }
        });
        let (media, media_rx) = crate::media::MediaHandle::new(local_addr, candidate);
        let gateway = Arc::new(Gateway {
            registry,
            config,
            spaces: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            departed: Mutex::new(HashMap::new()),
            activity,
            drain: watch::channel(false).0,
            started: Instant::now(),
            media,
        });
        // Started only once the gateway exists: the task stops when it can no longer
        // reach the gateway, and a task spawned inside `Arc::new_cyclic` could run before
        // the Arc is complete, find nothing, and stop for good.
        crate::media::spawn(socket, candidate, media_rx, Arc::downgrade(&gateway));
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

    fn record_departure(&self, space: &SpaceId, participant: &ParticipantId, credential: String) {
        let mut departed = lock(&self.departed);
        // Forget what is past the grace period whenever the map has grown; one sweep per
        // doubling keeps this amortised O(1).
        if departed.len() >= 1024 && departed.len().is_power_of_two() {
            let grace = self.config.reconnect_grace;
            departed.retain(|_, (at, _)| at.elapsed() <= grace);
        }
        departed.insert(
            (space.clone(), participant.clone()),
            (Instant::now(), credential),
        );
    }

    /// Whether `participant` was in `space` recently enough, with this credential, to come
    /// back on an expired token.
    fn departed_recently(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        credential: &str,
    ) -> bool {
        lock(&self.departed)
            .get(&(space.clone(), participant.clone()))
            .is_some_and(|(at, c)| at.elapsed() <= self.config.reconnect_grace && c == credential)
    }

    pub fn connection_count(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Whether anyone is connected to `space` on this node right now. The store's status
    /// lags behind by one queued write; the REST API checks this too before deleting.
    pub fn is_space_live(&self, space: &SpaceId) -> bool {
        lock(&self.spaces)
            .get(space)
            .is_some_and(|slot| !lock(&slot.space).is_empty())
    }

    /// Tells every connection to close with 1012 (the SDK reconnects elsewhere) and waits
    /// up to `grace` for them to go.
    pub async fn drain(&self, grace: Duration) {
        self.drain.send_replace(true);
        let deadline = Instant::now() + grace;
        while self.connection_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Queues one frame for one connection; a full queue disconnects it.
    pub(crate) fn send_frame(&self, to: &ConnectionId, frame: Arc<str>) {
        if let Some(c) = lock(&self.conns).get(to)
            && c.tx.try_send(frame).is_err()
        {
            c.kill.notify_one();
        }
    }

    /// Closes a connection with "service restart" (1012), which makes the SDK reconnect
    /// and build new peer connections.
    pub(crate) fn ask_to_reconnect(&self, to: &ConnectionId) {
        if let Some(c) = lock(&self.conns).get(to) {
            c.restart.notify_one();
        }
    }

    /// Like `with_space`, but only if the space is live: media events for a space that
    /// emptied meanwhile must not resurrect it.
    pub(crate) fn with_existing_space(
        &self,
        id: &SpaceId,
        f: impl FnOnce(&mut Space, &mut Vec<Output>),
    ) {
        if lock(&self.spaces).contains_key(id) {
            self.with_space(id, f);
        }
    }

    /// Runs `f` on the space's state (created on first use) and delivers its outputs.
    pub(crate) fn with_space(&self, id: &SpaceId, f: impl FnOnce(&mut Space, &mut Vec<Output>)) {
        let mut out = Vec::new();
        loop {
            let slot = lock(&self.spaces)
                .entry(id.clone())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        space: Mutex::new(Space::new(id.clone(), self.config.space.clone())),
                        retired: false.into(),
                    })
                })
                .clone();
            let mut space = lock(&slot.space);
            if slot.retired.load(std::sync::atomic::Ordering::Acquire) {
                continue;
            }
            f(&mut space, &mut out);
            // Deliver while still holding the space lock, so every connection sees the
            // space's frames in the order the state machine made them.
            self.deliver(id, std::mem::take(&mut out));
            if space.is_empty() {
                drop(space);
                let mut spaces = lock(&self.spaces);
                let space = lock(&slot.space);
                if space.is_empty() && spaces.get(id).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                    slot.retired
                        .store(true, std::sync::atomic::Ordering::Release);
                    spaces.remove(id);
                }
            }
            return;
        }
    }

    fn deliver(&self, space: &SpaceId, out: Vec<Output>) {
        if out.is_empty() {
            return;
        }
        let conns = lock(&self.conns);
        for o in out {
            match o {
                Output::Send { to, frame } => {
                    if let Some(c) = conns.get(&to)
                        && c.tx.try_send(frame).is_err()
                    {
                        // Queue full: this reader cannot keep up. Cut it off rather than
                        // buffer without bound or slow the space down.
                        c.kill.notify_one();
                    }
                }
                // The receiving task lives as long as the runtime; a send error only
                // happens during shutdown, when nothing is left to record.
                Output::Activated { session_id } => {
                    let _ = self
                        .activity
                        .send(Activity::Active(space.clone(), session_id));
                }
                Output::Idle => {
                    let _ = self.activity.send(Activity::Idle(space.clone()));
                }
                Output::Media { from, message } => {
                    tracing::trace!(%from, kind = message_kind(&message), "to the media plane");
                    self.media.send(crate::media::Command::Message {
                        member: from,
                        message,
                    });
                }
            }
        }
    }
}

fn message_kind(m: &ClientMessage) -> &'static str {
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

// ---------------------------------------------------------------------------------------
// The connection

/// `/v1` query parameters. Everything is optional at this layer so that a missing token
/// is answered with the SDK's error, not with an HTTP 400 the SDK cannot see.
#[derive(Debug, Default, serde::Deserialize)]
pub struct JoinParams {
    token: Option<String>,
    sdk_version: Option<String>,
    managed_subscriptions: Option<String>,
    reconnect_id: Option<String>,
    display_name: Option<String>,
}

/// Small per-connection buffers: tungstenite's default 128 KiB read buffer would cost more
/// than everything else an idle participant holds.
const SOCKET_BUFFER: usize = 1024;

pub async fn upgrade(
    State(state): State<AppState>,
    params: Result<Query<JoinParams>, axum::extract::rejection::QueryRejection>,
    ws: WebSocketUpgrade,
) -> Response {
    // A malformed query still upgrades, and the missing token is refused in-protocol.
    let params = params.map(|Query(p)| p).unwrap_or_default();
    ws.read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER)
        .max_write_buffer_size(MAX_FRAME_BYTES * 4)
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move {
            let mut socket = socket;
            // Boxed: the admission future (token check, store lookups) is large and must
            // not stay part of every idle connection's task for its whole life.
            match Box::pin(admit(&state, params, &mut socket)).await {
                Ok(admitted) => serve(state, admitted, socket).await,
                Err(body) => refuse(socket, body).await,
            }
        })
}

/// Sends the SDK's `error`, then closes with 4000 so it does not retry.
async fn refuse(mut socket: WebSocket, body: ErrorBody) {
    let frame = Envelope::new(ServerMessage::Error(body)).to_json();
    if send_timed(&mut socket, Message::Text(frame.into()))
        .await
        .is_ok()
    {
        close_gracefully(&mut socket, CLOSE_NO_RECONNECT).await;
    }
}

/// Sends a close frame and reads until the peer's close (briefly). Dropping the socket
/// straight away would reset the TCP connection while the peer still has data in flight,
/// and a reset can destroy the error and close frames we just sent.
async fn close_gracefully(socket: &mut WebSocket, code: u16) {
    let frame = CloseFrame {
        code,
        reason: "".into(),
    };
    if send_timed(socket, Message::Close(Some(frame)))
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

struct Admitted {
    space: SpaceId,
    joiner: Joiner,
    credential: String,
    kill: Arc<Notify>,
    restart: Arc<Notify>,
    rx: mpsc::Receiver<Arc<str>>,
}

fn join_error(kind: JoinErrorType, message: impl Into<String>) -> ErrorBody {
    ErrorBody::join(kind, message)
}

/// Our own failure (store, registry). Type 7 keeps its message in the SDK (type 0 would
/// not), so the app can tell the user to try again.
fn unavailable() -> ErrorBody {
    join_error(
        JoinErrorType::ParticipantLimitReached,
        "service temporarily unavailable, try again",
    )
}

async fn admit(
    state: &AppState,
    params: JoinParams,
    socket: &mut WebSocket,
) -> Result<Admitted, ErrorBody> {
    let gw = &state.gateway;
    let token = params
        .token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| join_error(JoinErrorType::InvalidJwt, "missing token"))?;
    let now = u64::try_from(crate::now_secs()).unwrap_or(0);
    let options = VerifyOptions {
        leeway_secs: gw.config.leeway_secs,
    };
    let mut verified =
        verify_join_token(state.store.as_ref(), &state.keys, &token, now, &options).await;
    let mut expired_reconnect = false;
    if matches!(verified, Err(JoinAuthError::Token(AuthError::Expired)))
        && params.reconnect_id.is_some()
    {
        // An SDK reconnect reuses the token it joined with, which may have expired since.
        // Check it with the grace period as leeway; whether this participant was really
        // here is checked once we know who it is.
        let grace = VerifyOptions {
            leeway_secs: options.leeway_secs + gw.config.reconnect_grace.as_secs(),
        };
        verified = verify_join_token(state.store.as_ref(), &state.keys, &token, now, &grace).await;
        expired_reconnect = verified.is_ok();
    }
    let admitted = verified.map_err(|e| match e {
        JoinAuthError::Token(AuthError::Expired) => {
            join_error(JoinErrorType::InvalidJwt, "token has expired")
        }
        JoinAuthError::Token(e) => {
            join_error(JoinErrorType::InvalidJwt, format!("invalid token: {e}"))
        }
        JoinAuthError::Internal(e) => {
            tracing::error!(error = %e, "join check failed");
            unavailable()
        }
    })?;
    let claims = admitted.claims;

    let display_name = params.display_name.unwrap_or_default();
    if display_name.encode_utf16().count() > MAX_DISPLAY_NAME
        || display_name.chars().any(char::is_control)
    {
        return Err(join_error(
            JoinErrorType::InvalidJwt,
            format!(
                "display_name must be at most {MAX_DISPLAY_NAME} characters, without control characters"
            ),
        ));
    }
    let managed_subscriptions = match params.managed_subscriptions.as_deref() {
        None => 16,
        Some(v) => v.parse::<u8>().ok().filter(|n| *n <= 20).ok_or_else(|| {
            join_error(
                JoinErrorType::InvalidJwt,
                "managed_subscriptions must be 0 to 20",
            )
        })?,
    };
    if let Some(v) = &params.sdk_version {
        tracing::debug!(sdk_version = %v.chars().take(32).collect::<String>(), "join");
    }

    // Who this participant is, and what lets a reconnect take over a stale connection:
    // a token that names the participant proves identity by itself; a server-made id is
    // bound to the exact token it was made for (the SDK reconnects with the same token).
    // Only server-made ids need it, so it is computed only for them.
    let token_fingerprint = || {
        use std::fmt::Write as _;
        let mut hex = String::with_capacity(64);
        for b in crate::tokens::hash_secret(&token) {
            // Writing to a String cannot fail.
            let _ = write!(hex, "{b:02x}");
        }
        hex
    };
    let (participant_id, credential, mode) = match (&claims.participant_id, params.reconnect_id) {
        (Some(named), None) => (named.clone(), "token-named".to_string(), ReserveMode::Fresh),
        (Some(named), Some(r)) if r == named.as_str() => (
            named.clone(),
            "token-named".to_string(),
            ReserveMode::Reconnect,
        ),
        (Some(_), Some(_)) => {
            return Err(join_error(
                JoinErrorType::InvalidJwt,
                "reconnect_id does not match the token's participant_id",
            ));
        }
        (None, None) => (
            ParticipantId::new(random_base62(32))
                .map_err(|_| join_error(JoinErrorType::Unknown, "id"))?,
            token_fingerprint(),
            ReserveMode::Fresh,
        ),
        (None, Some(r)) => {
            let id = ParticipantId::new(r).map_err(|e| {
                join_error(
                    JoinErrorType::InvalidJwt,
                    format!("invalid reconnect_id: {e}"),
                )
            })?;
            (id, token_fingerprint(), ReserveMode::Reconnect)
        }
    };

    if expired_reconnect {
        let still_registered = gw
            .registry
            .participants(&claims.space_id)
            .await
            .map(|ps| ps.iter().any(|(p, _)| p == &participant_id))
            .unwrap_or(false);
        if !still_registered
            && !gw.departed_recently(&claims.space_id, &participant_id, &credential)
        {
            return Err(join_error(JoinErrorType::InvalidJwt, "token has expired"));
        }
    }

    let connection_id = ConnectionId::new(random_base62(32))
        .map_err(|_| join_error(JoinErrorType::Unknown, "id"))?;
    let reservation = gw
        .registry
        .reserve(ReserveRequest {
            space: &claims.space_id,
            participant: &participant_id,
            connection: &connection_id,
            credential: &credential,
            mode,
            max_participants: gw.config.max_participants,
        })
        .await
        .map_err(|e| match e {
            ReserveError::AlreadyJoined => join_error(
                JoinErrorType::DuplicateParticipantRejected,
                "a participant with this participant_id is already connected to the space",
            ),
            ReserveError::SpaceFull { max } => join_error(
                JoinErrorType::ParticipantLimitReached,
                format!("the space is full ({max} participants)"),
            ),
            ReserveError::Backend(e) => {
                tracing::error!(error = %e, "registry failed");
                unavailable()
            }
        })?;

    // The SDK sends nothing before `joined`; anything already waiting is not the SDK.
    if let Ok(Some(Ok(Message::Text(_) | Message::Binary(_)))) =
        tokio::time::timeout(Duration::ZERO, socket.recv()).await
    {
        let _ = gw
            .registry
            .release(&claims.space_id, &participant_id, &connection_id)
            .await;
        return Err(join_error(
            JoinErrorType::InvalidJwt,
            "no message may be sent before joined",
        ));
    }

    let (tx, rx) = mpsc::channel(gw.config.outbound_queue);
    let kill = Arc::new(Notify::new());
    let restart = Arc::new(Notify::new());
    lock(&gw.conns).insert(
        connection_id.clone(),
        Conn {
            tx,
            kill: kill.clone(),
            restart: restart.clone(),
        },
    );
    if let Some(old) = &reservation.replaced {
        // The stale connection of a reconnecting participant: out of the space now, and
        // its socket told to go (with 4000, so a ghost that is still alive stays away).
        gw.with_space(&claims.space_id, |space, out| space.leave(old, out));
        // Its media goes now too, before the newcomer re-publishes the same tids: the
        // ghost's own leave only comes after its socket's close handshake (seconds).
        gw.media.send(crate::media::Command::Leave {
            member: old.clone(),
        });
        if let Some(c) = lock(&gw.conns).get(old) {
            c.kill.notify_one();
        }
    }
    let sub_sfus = vec![SfuDescription {
        sfu_id: crate::media::SFU_ID.into(),
        sdp: spacegate_sfu::initial_offer(now),
    }];
    Ok(Admitted {
        credential,
        space: claims.space_id,
        joiner: Joiner {
            connection_id,
            participant_id,
            role: claims.role,
            display_name,
            managed_subscriptions,
            reconnected: reservation.replaced.is_some(),
            sub_sfus,
        },
        kill,
        restart,
        rx,
    })
}

async fn serve(state: AppState, a: Admitted, mut socket: WebSocket) {
    let gw = state.gateway.clone();
    let Admitted {
        space,
        joiner,
        credential,
        kill,
        restart,
        mut rx,
    } = a;
    let conn = joiner.connection_id.clone();
    let participant = joiner.participant_id.clone();
    let session = SessionId::new(random_base62(24))
        .unwrap_or_else(|_| SessionId::new("session").expect("valid"));
    let now = gw.now_ms();
    let mode = match joiner.managed_subscriptions {
        0 => spacegate_sfu::SubscriptionMode::Manual,
        n => spacegate_sfu::SubscriptionMode::Automatic(n),
    };
    gw.with_space(&space, |s, out| s.join(joiner, session, now, out));
    // After the join: the media plane may offer tracks only to a client that knows them.
    gw.media.send(crate::media::Command::Join {
        room: space.clone(),
        member: conn.clone(),
        mode,
    });

    let mut drain = gw.drain.subscribe();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut liveness = Liveness::new(
        gw.now_ms(),
        ms(gw.config.ping_interval),
        ms(gw.config.idle_timeout),
    );
    let mut flood = FloodGuard::new(gw.config.inbound_per_second, gw.now_ms());
    let close_code = loop {
        tokio::select! {
            frame = rx.recv() => {
                let Some(frame) = frame else { break None };
                if send_timed(&mut socket, Message::Text((&*frame).into())).await.is_err() {
                    break None;
                }
            }
            incoming = socket.recv() => {
                liveness.heard(gw.now_ms());
                match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Binary(_))) => {
                        if !flood.admit(gw.now_ms()) { break Some(Box::pin(flooded(&mut socket)).await); }
                        let body = ErrorBody::request(RequestErrorType::Unknown, "binary frames are not supported; send JSON text frames", None);
                        let _ = send_timed(&mut socket, Message::Text(Envelope::new(ServerMessage::Error(body)).to_json().into())).await;
                    }
                    Some(Ok(Message::Text(text))) => {
                        if !flood.admit(gw.now_ms()) { break Some(Box::pin(flooded(&mut socket)).await); }
                        match Envelope::<ClientMessage>::decode_client(&text) {
                            Ok(envelope) => {
                                let now = gw.now_ms();
                                gw.with_space(&space, |s, out| s.handle(&conn, envelope, now, out));
                            }
                            Err(e) => {
                                let body = ErrorBody::request(RequestErrorType::Unknown, e.to_string(), None);
                                let _ = send_timed(&mut socket, Message::Text(Envelope::new(ServerMessage::Error(body)).to_json().into())).await;
                            }
                        }
                    }
                }
            }
            () = tokio::time::sleep_until(gw.instant_at(liveness.next_wakeup())) => {
                match liveness.poll(gw.now_ms()) {
                    LivenessAction::Evict => {
                        tracing::debug!(%conn, "evicting a silent connection");
                        break None;
                    }
                    LivenessAction::Ping => {
                        if send_timed(&mut socket, Message::Ping(Default::default())).await.is_err() {
                            break None;
                        }
                    }
                    LivenessAction::Wait => {}
                }
            }
            () = kill.notified() => break Some(CLOSE_NO_RECONNECT),
            () = restart.notified() => break Some(CLOSE_RESTART),
            () = drained(&mut drain) => break Some(CLOSE_RESTART),
        }
    };
    if let Some(code) = close_code {
        // Boxed, like the other cold paths: an await inline here would grow every idle
        // connection's task by the size of this rarely-taken future.
        Box::pin(close_gracefully(&mut socket, code)).await;
    }
    lock(&gw.conns).remove(&conn);
    gw.record_departure(&space, &participant, credential);
    gw.with_space(&space, |s, out| s.leave(&conn, out));
    gw.media.send(crate::media::Command::Leave {
        member: conn.clone(),
    });
    if let Err(e) = gw.registry.release(&space, &participant, &conn).await {
        tracing::error!(error = %e, "registry release failed");
    }
}

async fn drained(rx: &mut watch::Receiver<bool>) {
    // An error means the gateway is gone, which is a drain too.
    let _ = rx.wait_for(|d| *d).await;
}

/// A write that cannot complete in time means the peer stopped reading.
async fn send_timed(socket: &mut WebSocket, m: Message) -> Result<(), ()> {
    match tokio::time::timeout(Duration::from_secs(5), socket.send(m)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

async fn flooded(socket: &mut WebSocket) -> u16 {
    let body = ErrorBody {
        fatal: true,
        ..ErrorBody::request(
            RequestErrorType::Unknown,
            "too many messages; disconnected",
            None,
        )
    };
    let _ = send_timed(
        socket,
        Message::Text(Envelope::new(ServerMessage::Error(body)).to_json().into()),
    )
    .await;
    CLOSE_NO_RECONNECT
}
