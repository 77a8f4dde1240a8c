//! The media thread: one SFU, one UDP socket, one command queue; restarted after a panic.

use std::net::UdpSocket as StdUdpSocket;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use spacegate_proto::ConnectionId;
use spacegate_sfu::{Sfu, SfuConfig};
use tokio::net::UdpSocket;

use super::{MediaEvent, MediaEvents, MediaHandle, Receiver, translate};
use crate::metrics::Metrics;

/// Commands taken per wakeup before datagrams and timers get their turn again.
const COMMAND_BATCH: usize = 64;

/// Starts the media thread. It stops when the gateway (`events`) is dropped.
pub fn spawn(
    socket: StdUdpSocket,
    handle: &MediaHandle,
    rx: Receiver,
    events: Weak<dyn MediaEvents>,
    keyframe_interval: std::time::Duration,
) -> std::io::Result<()> {
    let (up, stats, candidate) = (handle.up.clone(), handle.metrics.clone(), handle.candidate);
    let config = SfuConfig {
        keyframe_interval,
        ..SfuConfig::new(candidate)
    };
    // Up from the moment it is started, not from when the thread first runs: `/readyz`
    // right after start must not see a plane that is merely still being scheduled.
    up.store(true, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("spacegate-media".into())
        .spawn(move || supervise(socket, config, rx, events, up, stats))?;
    Ok(())
}

fn supervise(
    socket: StdUdpSocket,
    config: SfuConfig,
    mut rx: Receiver,
    events: Weak<dyn MediaEvents>,
    up: Arc<AtomicBool>,
    stats: Arc<Metrics>,
) {
    let span = tracing::debug_span!("media", candidate = %config.candidate);
    let _enter = span.enter();
    let mut sfu = Sfu::new(config.clone(), Instant::now());
    loop {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let (runtime, socket) = match (runtime, socket.try_clone()) {
            (Ok(r), Ok(s)) => (r, s),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "media thread cannot start; media disabled");
                up.store(false, Ordering::Relaxed);
                return;
            }
        };
        up.store(true, Ordering::Relaxed);
        let turn = std::panic::catch_unwind(AssertUnwindSafe(|| {
            runtime.block_on(serve(&mut sfu, socket, &mut rx, &events, &stats))
        }));
        up.store(false, Ordering::Relaxed);
        drop(runtime);
        if turn.is_ok() {
            // The gateway is gone: shutdown.
            return;
        }
        stats.media_restarts.inc();
        tracing::error!("the media plane panicked; restarting it");
        let Some(sink) = events.upgrade() else { return };
        sfu = recover(sfu, &config, sink.as_ref());
    }
}

/// A fresh SFU holding every member of `old` that had no peer connection (their clients
/// hold nothing the new SFU lacks); members that had one are asked to reconnect.
fn recover(old: Sfu, config: &SfuConfig, sink: &dyn MediaEvents) -> Sfu {
    let now = Instant::now();
    let mut fresh = Sfu::new(config.clone(), now);
    // The old SFU panicked mid-update; reading it may panic too.
    let members = std::panic::catch_unwind(AssertUnwindSafe(|| {
        old.members()
            .map(|(room, member, mode)| {
                (
                    room.clone(),
                    member.clone(),
                    mode,
                    old.has_peers(member),
                    old.answered_initial_offer(member),
                )
            })
            .collect::<Vec<_>>()
    }));
    let Ok(members) = members else {
        sink.media_event(MediaEvent::ReconnectAll);
        return fresh;
    };
    for (room, member, mode, has_peers, answered) in members {
        if has_peers {
            if let Ok(member) = ConnectionId::new(&*member) {
                sink.media_event(MediaEvent::Reconnect { member });
            }
        } else if answered {
            fresh.join_stable(&room, &member, mode, now);
        } else {
            fresh.join(&room, &member, mode, now);
        }
    }
    fresh
}

async fn serve(
    sfu: &mut Sfu,
    socket: StdUdpSocket,
    rx: &mut Receiver,
    events: &Weak<dyn MediaEvents>,
    stats: &Metrics,
) {
    let socket = match UdpSocket::from_std(socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "media socket unusable; media disabled");
            std::future::pending::<()>().await;
            return;
        }
    };
    let mut buf = vec![0u8; 2048];
    // The SFU's running totals last copied into the metrics.
    let mut totals = (0, 0);
    loop {
        let deadline = tokio::time::Instant::from_std(sfu.poll_timeout());
        let mut commands = Vec::new();
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
            n = rx.recv_many(&mut commands, COMMAND_BATCH) => {
                if n == 0 {
                    return;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                sfu.handle_timeout(Instant::now());
            }
        }
        let Some(sink) = events.upgrade() else { return };
        for q in commands {
            stats
                .media_queue_wait_seconds
                .observe(q.at.elapsed().as_secs_f64());
            translate::command(sfu, sink.as_ref(), q.command);
            // Events in the order they were made: a command's replies before the next
            // command's.
            while let Some(e) = sfu.poll_event() {
                translate::event(sink.as_ref(), e);
            }
        }
        while let Some(t) = sfu.poll_transmit() {
            // A full socket buffer drops the datagram, as the network would; RTP
            // recovers (NACK, keyframes) and blocking here would stall every peer.
            let _ = socket.try_send_to(&t.contents, t.destination);
        }
        while let Some(e) = sfu.poll_event() {
            translate::event(sink.as_ref(), e);
        }
        let s = sfu.counters();
        stats.sfu_totals(&mut totals, s.forwarded_frames, s.forwarded_bytes);
        stats
            .sfu_members
            .set(i64::try_from(s.members).unwrap_or(i64::MAX));
        stats
            .sfu_peer_connections
            .set(i64::try_from(s.peer_connections).unwrap_or(i64::MAX));
    }
}
