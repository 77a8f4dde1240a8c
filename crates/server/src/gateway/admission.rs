//! Everything a join must pass before any connection state exists: the token, the query
//! parameters, the media plane's capacity, the registry's claim. A refusal is the SDK's
//! `error` frame and close 4000.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::response::Response;
use spacegate_auth::{AuthError, VerifyOptions};
use spacegate_proto::signaling::{
    Envelope, ErrorBody, JoinErrorType, MAX_DISPLAY_NAME, MAX_FRAME_BYTES, ServerMessage,
    SfuDescription,
};
use spacegate_proto::{ConnectionId, ParticipantId, SpaceId};
use spacegate_session::{ReserveError, ReserveMode, ReserveRequest};
use spacegate_signaling::Joiner;

use super::connection::{close_gracefully, send_text_timed, serve};
use super::membership::Membership;
use super::outbox::Outbox;
use super::ws::{Message, Ws};
use super::{CLOSE_NO_RECONNECT, Gateway, lock};
use crate::AppState;
use crate::ids::random_base62;
use crate::join::{JoinAuthError, verify_join_token};
use crate::metrics::{JoinOutcome as O, JoinStage};

impl Gateway {
    /// Remembers, in the registry (shared by the cluster's nodes), that `participant` left
    /// `space` holding `credential`: within `reconnect_grace` it may come back on an
    /// expired token, on any node. A failure only costs that grace, so it is logged, not
    /// passed on.
    pub(super) async fn record_departure(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        credential: &str,
    ) {
        let now_ms = self.now_ms();
        if let Err(e) = self
            .registry
            .record_departure(
                space,
                participant,
                credential,
                self.config.reconnect_grace,
                now_ms,
            )
            .await
        {
            tracing::warn!(error = %e, "departure record not written");
        }
    }

    /// Whether `participant` was in `space` recently enough, with this credential, to come
    /// back on an expired token. A registry that cannot answer says no: the client
    /// reconnects with a fresh token instead.
    async fn departed_recently(
        &self,
        space: &SpaceId,
        participant: &ParticipantId,
        credential: &str,
    ) -> bool {
        self.registry
            .departed_recently(space, participant, credential, self.now_ms())
            .await
            .unwrap_or(false)
    }
}

/// `/v1` query parameters. Everything is optional at this layer so that a missing token
/// is answered with the SDK's error, not with an HTTP 400 the SDK cannot see.
///
/// Its `Debug` leaves the token out: it is one `?params` away from a log line.
#[derive(Default, serde::Deserialize)]
pub struct JoinParams {
    pub(super) token: Option<String>,
    pub(super) sdk_version: Option<String>,
    pub(super) managed_subscriptions: Option<String>,
    pub(super) reconnect_id: Option<String>,
    pub(super) display_name: Option<String>,
    /// Set by the node that carried this join here (`relay::RELAYED_PARAM`): host it or
    /// refuse it, never carry it on.
    pub(super) relayed: Option<String>,
    /// Where the join comes from (see `limits::source_address`); not from the query.
    #[serde(skip)]
    pub(crate) source: Option<std::net::IpAddr>,
}

impl std::fmt::Debug for JoinParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinParams")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("sdk_version", &self.sdk_version)
            .field("managed_subscriptions", &self.managed_subscriptions)
            .field("reconnect_id", &self.reconnect_id)
            .field("display_name", &self.display_name)
            .finish_non_exhaustive()
    }
}

/// The router's `/v1`: 101 and the join on its own task, or the HTTP error of a request that
/// is not a WebSocket upgrade. Joins on a fresh connection are answered before the router
/// by `crate::listen`; this one answers the rest (an upgrade that listener refused, a join
/// on a keep-alive connection).
pub async fn upgrade(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
) -> Response {
    // A malformed query still upgrades, and the missing token is refused in-protocol.
    let mut params = Query::<JoinParams>::try_from_uri(request.uri())
        .map(|Query(p)| p)
        .unwrap_or_default();
    let peer = request.extensions().get::<PeerIp>().map(|p| p.0);
    let forwarded = request
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    params.source =
        super::limits::source_address(peer, forwarded, state.gateway.config.trust_forwarded_for);
    let response = match super::ws::handshake(request.method(), request.headers()) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    drop(request);
    tokio::spawn(async move {
        let started = Instant::now();
        let Some(socket) = Box::pin(Ws::from_upgrade(on_upgrade, MAX_FRAME_BYTES)).await else {
            return;
        };
        join(state, params, socket, started).await;
    });
    response
}

/// A join's WebSocket, from admission to the end: refused (the SDK's error, close 4000), or
/// joined and served on a task of its own.
pub(crate) async fn join(state: AppState, params: JoinParams, mut socket: Ws, started: Instant) {
    let gw = &state.gateway;
    // The node's own limits first: they cost nothing, a verify costs the most.
    let admitted = match gw.take_connection() {
        None => Err(join_error(
            O::Overloaded,
            JoinErrorType::ParticipantLimitReached,
            "server at its connection limit, try again in a moment",
        )),
        Some(_) if !gw.admit_source(params.source) => Err(join_error(
            O::RateLimited,
            JoinErrorType::ParticipantLimitReached,
            "too many joins from this address, try again in a moment",
        )),
        // Boxed: the admission future (token check, store lookups) is large and must not
        // stay part of every idle connection's task for its whole life.
        Some(permit) => {
            match tokio::time::timeout(
                gw.config.admission_timeout,
                Box::pin(admit(&state, params, &mut socket)),
            )
            .await
            {
                Ok(Ok(Admission::Relay(url))) => {
                    // The space lives on another node: this connection only carries the
                    // client's signaling there, for as long as it lasts (the permit
                    // counts it against this node's connection limit meanwhile).
                    match super::relay::connect(&url).await {
                        Some(home) => {
                            let gw = state.gateway.clone();
                            tokio::spawn(async move {
                                let _permit = permit;
                                super::relay::pump(&gw, socket, home).await;
                            });
                            return;
                        }
                        None => Err(unavailable()),
                    }
                }
                Ok(Ok(Admission::Local(a))) => Ok((a, permit)),
                Ok(Err(r)) => Err(r),
                // A store or registry that hangs: the claim, if one was made, is released
                // by its guard (`Membership`).
                Err(_) => {
                    tracing::warn!("a join's admission timed out");
                    Err(unavailable())
                }
            }
        }
    };
    match admitted {
        // A task of its own: this one's state (the query, the upgrade, the boxed admission)
        // would otherwise stay reserved in every joined connection's task for its whole
        // life.
        Ok((admitted, permit)) => {
            tokio::spawn(serve(state, admitted, socket, started, permit));
        }
        Err(r) => {
            state.gateway.metrics.join(r.outcome, started.elapsed());
            Box::pin(refuse(socket, r.body)).await
        }
    }
}

/// The TCP peer's address, put in a request's extensions by the listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerIp(pub(crate) std::net::IpAddr);

/// Sends the SDK's `error`, then closes with 4000 so it does not retry.
async fn refuse(mut socket: Ws, body: ErrorBody) {
    let frame = Envelope::new(ServerMessage::Error(body)).to_json();
    if send_text_timed(&mut socket, &frame).await.is_ok() {
        close_gracefully(&mut socket, CLOSE_NO_RECONNECT).await;
    }
}

/// What admission decided for a join that is not refused.
// Not boxed: `Local` is every single-node join, and a box would be one more allocation on
// the join path for a value that is moved once.
#[allow(clippy::large_enum_variant)]
enum Admission {
    /// Hosted here.
    Local(Admitted),
    /// The space's home is another node: carry the WebSocket to this URL.
    Relay(String),
}

pub(super) struct Admitted {
    pub(super) membership: Membership,
    pub(super) space: SpaceId,
    pub(super) joiner: Joiner,
    pub(super) credential: String,
    pub(super) outbox: Arc<Outbox>,
}

/// Why a join was refused: the SDK's error, and the outcome for `/metrics`.
pub(super) struct Refusal {
    pub(super) outcome: O,
    pub(super) body: ErrorBody,
}

fn join_error(outcome: O, kind: JoinErrorType, message: impl Into<String>) -> Refusal {
    Refusal {
        outcome,
        body: ErrorBody::join(kind, message),
    }
}

/// Our own failure (store, registry). Type 7 keeps its message in the SDK (type 0 would
/// not), so the app can tell the user to try again.
fn unavailable() -> Refusal {
    join_error(
        O::Unavailable,
        JoinErrorType::ParticipantLimitReached,
        "service temporarily unavailable, try again",
    )
}

/// The node cannot take more right now (its media plane is saturated). Type 7, like
/// `unavailable`, so the app can say "try again"; the participants already here keep
/// everything.
fn overloaded() -> Refusal {
    join_error(
        O::Overloaded,
        JoinErrorType::ParticipantLimitReached,
        "server busy, try again in a moment",
    )
}

async fn admit(
    state: &AppState,
    mut params: JoinParams,
    socket: &mut Ws,
) -> Result<Admission, Refusal> {
    let gw = &state.gateway;
    // Shed load before spending an RSA verify on it: while the media plane's queue is
    // more than half full, every join would only add to the backlog.
    if gw.media.saturated() {
        return Err(overloaded());
    }
    let token = params
        .token
        .take()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| join_error(O::InvalidToken, JoinErrorType::InvalidJwt, "missing token"))?;
    let now = u64::try_from(gw.config.clock.now_secs()).unwrap_or(0);
    let options = VerifyOptions {
        leeway_secs: gw.config.leeway_secs,
        expiry_grace_secs: 0,
    };
    let verify_started = Instant::now();
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
            expiry_grace_secs: gw.config.reconnect_grace.as_secs(),
            ..options
        };
        verified = verify_join_token(state.store.as_ref(), &state.keys, &token, now, &grace).await;
        expired_reconnect = verified.is_ok();
    }
    let admitted = verified.map_err(|e| match e {
        JoinAuthError::Token(AuthError::Expired) => {
            join_error(O::Expired, JoinErrorType::InvalidJwt, "token has expired")
        }
        JoinAuthError::Token(e) => join_error(
            O::InvalidToken,
            JoinErrorType::InvalidJwt,
            format!("invalid token: {e}"),
        ),
        // Random kids beyond the lookup cap: a flood, not a fault of ours to log.
        JoinAuthError::Internal(crate::keys::KeyLookupError::Busy) => overloaded(),
        JoinAuthError::Internal(e) => {
            tracing::error!(error = %e, "join check failed");
            unavailable()
        }
    })?;
    gw.metrics
        .join_stage(JoinStage::Verify, verify_started.elapsed());
    let claims = admitted.claims;

    // In a cluster the space has one home node; a join that entered elsewhere is carried
    // there (after the token check here, so garbage never costs the home node anything).
    if let Some(homes) = gw.homes() {
        match homes.claim_home(&claims.space_id).await {
            Ok(spacegate_session::Home::Here) => {}
            // A fresh home: what the store says of the space is from a session that is
            // over (its last home may have died with the space active). Ended first, so
            // this join's activation starts a session of its own; the status writer
            // applies the two in order.
            Ok(spacegate_session::Home::Claimed) => {
                gw.activity
                    .push(&claims.space_id, super::activity::Activity::Idle);
            }
            Ok(spacegate_session::Home::There { url, .. })
                if params.relayed.is_none() && !url.is_empty() =>
            {
                return Ok(Admission::Relay(super::relay::target(
                    &url, &token, &params,
                )));
            }
            // Carried here by a node that thought this one the home, but it is not (any
            // more), or the home has not said where it listens yet: the SDK's next attempt
            // finds the current home.
            Ok(spacegate_session::Home::There { .. }) => return Err(unavailable()),
            Err(e) => {
                tracing::warn!(error = %e, "space home unknown");
                return Err(unavailable());
            }
        }
    }

    let display_name = params.display_name.unwrap_or_default();
    if display_name.encode_utf16().count() > MAX_DISPLAY_NAME
        || display_name.chars().any(char::is_control)
    {
        return Err(join_error(
            O::BadRequest,
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
                O::BadRequest,
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
    let (mut participant_id, credential, mode) = match (&claims.participant_id, params.reconnect_id)
    {
        (Some(named), None) => (named.clone(), "token-named".to_string(), ReserveMode::Fresh),
        (Some(named), Some(r)) if r == named.as_str() => (
            named.clone(),
            "token-named".to_string(),
            ReserveMode::Reconnect,
        ),
        (Some(_), Some(_)) => {
            return Err(join_error(
                O::BadRequest,
                JoinErrorType::InvalidJwt,
                "reconnect_id does not match the token's participant_id",
            ));
        }
        (None, None) => (
            ParticipantId::new(random_base62(32))
                .map_err(|_| join_error(O::Unavailable, JoinErrorType::Unknown, "id"))?,
            token_fingerprint(),
            ReserveMode::Fresh,
        ),
        (None, Some(r)) => {
            let id = ParticipantId::new(r).map_err(|e| {
                join_error(
                    O::BadRequest,
                    JoinErrorType::InvalidJwt,
                    format!("invalid reconnect_id: {e}"),
                )
            })?;
            // An anonymous token proves no identity, only that it is the token this id
            // was made for. So a reconnect_id resumes an id this very token holds (still
            // registered, or left within the grace); any other id would be a takeover of
            // someone else's (`host`, a token-named user who is away), and the join gets
            // a fresh id instead, below.
            let credential = token_fingerprint();
            let mode = if gw
                .departed_recently(&claims.space_id, &id, &credential)
                .await
            {
                ReserveMode::Reconnect
            } else {
                ReserveMode::Resume
            };
            (id, credential, mode)
        }
    };

    if expired_reconnect {
        let still_registered = gw
            .registry
            .holder(&claims.space_id, &participant_id)
            .await
            .is_ok_and(|h| h.is_some());
        if !still_registered
            && !gw
                .departed_recently(&claims.space_id, &participant_id, &credential)
                .await
        {
            return Err(join_error(
                O::Expired,
                JoinErrorType::InvalidJwt,
                "token has expired",
            ));
        }
    }

    let connection_id = ConnectionId::new(random_base62(32))
        .map_err(|_| join_error(O::Unavailable, JoinErrorType::Unknown, "id"))?;
    let reserve_started = Instant::now();
    let request = |participant, mode| ReserveRequest {
        space: &claims.space_id,
        participant,
        connection: &connection_id,
        credential: &credential,
        mode,
        max_participants: gw.config.max_participants,
    };
    // The guard exists before the claim is asked for: a claim the registry made but whose
    // answer never arrived (admission timed out or cancelled mid-call, a Redis reply lost)
    // is released too. Releasing a claim this connection does not hold is a no-op.
    let mut membership = Membership::claimed(
        gw.clone(),
        claims.space_id.clone(),
        participant_id.clone(),
        connection_id.clone(),
    );
    let mut reservation = gw.registry.reserve(request(&participant_id, mode)).await;
    if matches!(reservation, Err(ReserveError::NotHeld)) {
        // A reconnect_id this token does not hold: joined as the newcomer it is, with an
        // id of its own (what the SDK gets after a server restart forgot it, too). An
        // expired token was only good for resuming.
        if expired_reconnect {
            return Err(join_error(
                O::Expired,
                JoinErrorType::InvalidJwt,
                "token has expired",
            ));
        }
        let fresh = ParticipantId::new(random_base62(32))
            .map_err(|_| join_error(O::Unavailable, JoinErrorType::Unknown, "id"))?;
        reservation = gw
            .registry
            .reserve(request(&fresh, ReserveMode::Fresh))
            .await;
        // The first attempt claimed nothing (NotHeld).
        membership.set_participant(fresh.clone());
        participant_id = fresh;
    }
    let reservation = reservation.map_err(|e| match e {
        ReserveError::AlreadyJoined => join_error(
            O::Duplicate,
            JoinErrorType::DuplicateParticipantRejected,
            "a participant with this participant_id is already connected to the space",
        ),
        ReserveError::SpaceFull { max } => join_error(
            O::SpaceFull,
            JoinErrorType::ParticipantLimitReached,
            format!("the space is full ({max} participants)"),
        ),
        ReserveError::NotHeld => join_error(
            O::Duplicate,
            JoinErrorType::DuplicateParticipantRejected,
            "reconnect_id names no participant this token holds",
        ),
        ReserveError::Backend(e) => {
            tracing::error!(error = %e, "registry failed");
            unavailable()
        }
    })?;
    gw.metrics
        .join_stage(JoinStage::Registry, reserve_started.elapsed());
    // After the claim: a delete that marked the space before it is seen here, and one
    // that marks it after sees the claim (`Gateway::begin_delete`).
    if gw.is_being_deleted(&claims.space_id) {
        return Err(join_error(
            O::InvalidToken,
            JoinErrorType::InvalidJwt,
            "invalid token: the space is being deleted",
        ));
    }

    // The SDK sends nothing before `joined`; anything already waiting is not the SDK.
    if let Ok(Some(Ok(Message::Text(_) | Message::Binary(_)))) =
        tokio::time::timeout(Duration::ZERO, socket.recv()).await
    {
        return Err(join_error(
            O::BadRequest,
            JoinErrorType::InvalidJwt,
            "no message may be sent before joined",
        ));
    }

    let outbox = Arc::new(Outbox::new(gw.config.outbound_queue));
    lock(&gw.conns).insert(connection_id.clone(), outbox.clone());
    membership.registered();
    // After the insert: a drain that began meanwhile either saw this connection or is
    // seen here.
    if gw.draining.load(std::sync::atomic::Ordering::SeqCst) {
        outbox.close(super::CLOSE_RESTART);
    }
    if let Some(old) = &reservation.replaced {
        // The stale connection of a reconnecting participant: out of the space now, and
        // its socket told to go (with 4000, so a ghost that is still alive stays away).
        // Its media goes with it (the space tells the media plane), before the newcomer
        // re-publishes the same tids: the ghost's own leave only comes after its socket's
        // close handshake (seconds).
        gw.with_space(&claims.space_id, |space, out| space.leave(old, out));
        if let Some(c) = lock(&gw.conns).get(old) {
            c.close(CLOSE_NO_RECONNECT);
        }
    }
    let sub_sfus = vec![SfuDescription {
        sfu_id: gw.config.media.sfu_id.clone(),
        sdp: spacegate_sfu::initial_offer(now),
    }];
    Ok(Admission::Local(Admitted {
        membership,
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
        outbox,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_params_never_print_the_token() {
        let params = JoinParams {
            token: Some("eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl".into()),
            reconnect_id: Some("alice".into()),
            ..JoinParams::default()
        };
        let printed = format!("{params:?}");
        assert!(!printed.contains("eyJ"), "{printed}");
        assert!(printed.contains("<redacted>") && printed.contains("alice"));
    }
}
