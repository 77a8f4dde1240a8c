//! One task per joined WebSocket: frames out of its bounded queue, frames in through the
//! space's state machine, pings, and the ways it ends (close, silence, flood, kill, media
//! restart, drain).

use std::time::{Duration, Instant};

use spacegate_proto::SessionId;
use spacegate_proto::signaling::{
    ClientMessage, Envelope, ErrorBody, RequestErrorType, ServerMessage,
};
use spacegate_signaling::{FloodGuard, Liveness, LivenessAction};

use super::CLOSE_NO_RECONNECT;
use super::admission::Admitted;
use super::membership::Membership;
use super::outbox::Next;
use super::ws::{Message, Ws};
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

/// Puts an admitted connection into its space (all synchronous), and returns the task
/// that serves it from then on. Only what that task needs goes into it: whatever an async
/// fn holds (its arguments included) is reserved in every idle connection's task for its
/// whole life, and the task's size decides the allocator's size class it lands in.
pub(super) fn serve(
    state: AppState,
    a: Admitted,
    socket: Ws,
    started: Instant,
    // Held for the connection's life: its slot under `max_connections`.
    permit: super::limits::Permit,
) -> impl Future<Output = ()> + Send + 'static {
    let gw = state.gateway.clone();
    drop(state);
    let Admitted {
        mut membership,
        space,
        joiner,
        credential,
        outbox,
    } = a;
    let session = SessionId::new(random_base62(24))
        .unwrap_or_else(|_| SessionId::new("session").expect("valid"));
    let now = gw.now_ms();
    let stage = Instant::now();
    // Also hands the member to the media plane, if its space has media.
    gw.with_space(&space, |s, out| s.join(joiner, session, now, out));
    membership.joined(credential);
    gw.metrics.join_stage(JoinStage::Space, stage.elapsed());
    gw.metrics.join(JoinOutcome::Joined, started.elapsed());

    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    // Its first ping at a random point of the interval (from its random connection id),
    // so a crowd that joined together is not pinged together.
    let phase = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), membership.conn());
    let liveness = Liveness::new(
        gw.now_ms(),
        ms(gw.config.ping_interval),
        ms(gw.config.idle_timeout),
    )
    .with_first_ping_after(phase);
    let flood = FloodGuard::new(gw.config.inbound_per_second, gw.now_ms());
    run(
        Connection {
            tick: liveness_tick_ms(ms(gw.config.ping_interval)),
            gw,
            membership,
            outbox,
            liveness,
            flood,
            _permit: permit,
        },
        socket,
    )
}

/// What a joined connection's task holds besides its socket.
struct Connection {
    gw: std::sync::Arc<super::Gateway>,
    membership: Membership,
    outbox: std::sync::Arc<super::outbox::Outbox>,
    liveness: Liveness,
    flood: FloodGuard,
    tick: u64,
    _permit: super::limits::Permit,
}

async fn run(mut c: Connection, mut socket: Ws) {
    // Borrowed in place: moving the fields out would store them twice in this task.
    let Connection {
        gw,
        membership,
        outbox,
        liveness,
        flood,
        tick,
        ..
    } = &mut c;
    let (conn, tick) = (membership.conn(), *tick);
    let close_code = loop {
        // Decide what to do without awaiting, then await in one place: a large temporary
        // held across an await (a decoded message, a socket result) would be reserved in
        // every idle connection's task.
        let act = tokio::select! {
            next = outbox.next() => match next {
                Next::Frame(frame) => Act::Send(frame),
                Next::Close(super::PANIC_FOR_TESTS) => panic!("a test asked this connection's task to panic"),
                Next::Close(code) => Act::End(Some(code)),
            },
            incoming = socket.recv() => {
                liveness.heard(gw.now_ms());
                match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => Act::End(None),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Act::Nothing,
                    // Text or binary beyond the client's rate.
                    Some(Ok(_)) if !flood.admit(gw.now_ms()) => Act::Flooded,
                    Some(Ok(Message::Binary(_))) => {
                        Act::Reply(error_frame("binary frames are not supported; send JSON text frames".into()))
                    }
                    Some(Ok(Message::Text(text))) => match Envelope::<ClientMessage>::decode_client(&text) {
                        Ok(envelope) => {
                            let now = gw.now_ms();
                            gw.with_space(membership.space(), |s, out| s.handle(conn, envelope, now, out));
                            Act::Nothing
                        }
                        Err(e) => Act::Reply(error_frame(e.to_string())),
                    },
                }
            }
            () = tokio::time::sleep_until(gw.instant_at(on_tick(liveness.next_wakeup(), tick))) => {
                match liveness.poll(gw.now_ms()) {
                    LivenessAction::Evict => {
                        tracing::debug!(%conn, "evicting a silent connection");
                        Act::End(None)
                    }
                    LivenessAction::Ping => Act::Ping,
                    LivenessAction::Wait => Act::Nothing,
                }
            }
        };
        // Boxed, like every await that is not the idle wait: inline, each would grow every
        // idle connection's task by its size.
        let sent = match act {
            Act::Nothing => Ok(()),
            Act::Send(frame) => Box::pin(send_text_timed(&mut socket, &frame)).await,
            // An error reply that cannot be written ends nothing by itself; the next read
            // or write will.
            Act::Reply(text) => {
                let _ = Box::pin(send_text_timed(&mut socket, &text)).await;
                Ok(())
            }
            Act::Ping => Box::pin(send_timed(&mut socket, Message::Ping(Default::default()))).await,
            Act::Flooded => break Some(Box::pin(flooded(&mut socket)).await),
            Act::End(code) => break code,
        };
        if sent.is_err() {
            break None;
        }
    };
    Box::pin(leave(socket, close_code, c.membership)).await;
}

/// Liveness deadlines (pings, evictions) are rounded up to a grid of a fortieth of the ping
/// interval, at most a second (the default 40 s interval: 1 s), so the connections due
/// within one tick are pinged together, in one wakeup of the node, and their pongs come
/// back together. Pinged one by one, at 15 000 idle connections, each ping and each pong
/// woke an idle thread on its own (on a VM, an inter-processor interrupt and a halt exit
/// each): 5–10 % of a core for 375 pings a second; on the grid, 1 %.
fn liveness_tick_ms(ping_interval_ms: u64) -> u64 {
    (ping_interval_ms / 40).clamp(1, 1000)
}

fn on_tick(ms: u64, tick: u64) -> u64 {
    ms.div_ceil(tick).saturating_mul(tick)
}

/// What one turn of a connection's loop does.
enum Act {
    Nothing,
    Send(std::sync::Arc<str>),
    Reply(String),
    Ping,
    Flooded,
    End(Option<u16>),
}

fn error_frame(message: String) -> String {
    let body = ErrorBody::request(RequestErrorType::Unknown, message, None);
    Envelope::new(ServerMessage::Error(body)).to_json()
}

/// The end of a connection: close (if it was ours to close), then out of the space (and
/// with it the media plane) and the registry.
async fn leave(mut socket: Ws, close_code: Option<u16>, membership: Membership) {
    if let Some(code) = close_code {
        close_gracefully(&mut socket, code).await;
    }
    drop(socket);
    // Out of the connection map, the space (and with it the media plane) and the registry.
    membership.end().await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_deadlines_round_up_to_a_grid_scaled_to_the_interval() {
        assert_eq!(liveness_tick_ms(40_000), 1000);
        assert_eq!(liveness_tick_ms(600_000), 1000, "at most a second");
        assert_eq!(liveness_tick_ms(100), 2);
        assert_eq!(liveness_tick_ms(10), 1, "at least a millisecond");
        assert_eq!(on_tick(40_001, 1000), 41_000);
        assert_eq!(on_tick(41_000, 1000), 41_000);
        // Connections due anywhere in one tick wake together.
        assert!((40_001..=41_000).all(|due| on_tick(due, 1000) == 41_000));
    }
}
