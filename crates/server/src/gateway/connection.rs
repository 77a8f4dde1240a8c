//! One task per joined WebSocket: frames out of its bounded queue, frames in through the
//! space's state machine, pings, and the ways it ends (close, silence, flood, kill, media
//! restart, drain).

use std::time::{Duration, Instant};

use spacegate_proto::SessionId;
use spacegate_proto::signaling::{
    ClientMessage, Envelope, ErrorBody, RequestErrorType, ServerMessage,
};
use spacegate_signaling::{FloodGuard, Liveness, LivenessAction};

use super::admission::Admitted;
use super::outbox::Next;
use super::ws::{Message, Ws};
use super::{CLOSE_NO_RECONNECT, lock};
use crate::AppState;
use crate::ids::random_base62;
use crate::metrics::{JoinOutcome, JoinStage};

/// Sends a close frame and reads until the peer's close (briefly). Dropping the socket
/// straight away would reset the TCP connection while the peer still has data in flight,
/// and a reset can destroy the error and close frames we just sent.
pub(super) async fn close_gracefully(socket: &mut Ws, code: u16) {
    let closed = tokio::time::timeout(SEND_TIMEOUT, socket.close(code)).await;
    if !matches!(closed, Ok(Ok(()))) {
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

pub(super) async fn serve(state: AppState, a: Admitted, mut socket: Ws, started: Instant) {
    let gw = state.gateway.clone();
    let Admitted {
        space,
        joiner,
        credential,
        outbox,
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
    let stage = Instant::now();
    gw.with_space(&space, |s, out| s.join(joiner, session, now, out));
    gw.metrics.join_stage(JoinStage::Space, stage.elapsed());
    // After the join: the media plane may offer tracks only to a client that knows them.
    let stage = Instant::now();
    // Boxed, like every await that is not the idle wait: inline, each would grow every
    // idle connection's task by its size.
    Box::pin(gw.media.send(crate::media::Command::Join {
        room: space.clone(),
        member: conn.clone(),
        mode,
    }))
    .await;
    gw.metrics.join_stage(JoinStage::Media, stage.elapsed());
    gw.metrics.join(JoinOutcome::Joined, started.elapsed());

    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut liveness = Liveness::new(
        gw.now_ms(),
        ms(gw.config.ping_interval),
        ms(gw.config.idle_timeout),
    );
    let mut flood = FloodGuard::new(gw.config.inbound_per_second, gw.now_ms());
    let close_code = loop {
        tokio::select! {
            next = outbox.next() => match next {
                Next::Frame(frame) => {
                    if Box::pin(send_text_timed(&mut socket, &frame)).await.is_err() {
                        break None;
                    }
                }
                Next::Close(code) => break Some(code),
            },
            incoming = socket.recv() => {
                liveness.heard(gw.now_ms());
                match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Binary(_))) => {
                        if !flood.admit(gw.now_ms()) { break Some(Box::pin(flooded(&mut socket)).await); }
                        let body = ErrorBody::request(RequestErrorType::Unknown, "binary frames are not supported; send JSON text frames", None);
                        let _ = Box::pin(send_text_timed(&mut socket, &Envelope::new(ServerMessage::Error(body)).to_json())).await;
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
                                let _ = Box::pin(send_text_timed(&mut socket, &Envelope::new(ServerMessage::Error(body)).to_json())).await;
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
                        if Box::pin(send_timed(&mut socket, Message::Ping(Default::default()))).await.is_err() {
                            break None;
                        }
                    }
                    LivenessAction::Wait => {}
                }
            }
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
    Box::pin(gw.media.send(crate::media::Command::Leave {
        member: conn.clone(),
    }))
    .await;
    if let Err(e) = gw.registry.release(&space, &participant, &conn).await {
        tracing::error!(error = %e, "registry release failed");
    }
}

/// A write that cannot complete in this time means the peer stopped reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

async fn send_timed(socket: &mut Ws, m: Message) -> Result<(), ()> {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(m)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

pub(super) async fn send_text_timed(socket: &mut Ws, text: &str) -> Result<(), ()> {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send_text(text)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

async fn flooded(socket: &mut Ws) -> u16 {
    let body = ErrorBody {
        fatal: true,
        ..ErrorBody::request(
            RequestErrorType::Unknown,
            "too many messages; disconnected",
            None,
        )
    };
    let _ = send_text_timed(socket, &Envelope::new(ServerMessage::Error(body)).to_json()).await;
    CLOSE_NO_RECONNECT
}
