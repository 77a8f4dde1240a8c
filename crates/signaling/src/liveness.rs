//! Connection liveness in virtual time: when to ping, when a silent peer is dead.
//!
//! A half-open TCP connection (the peer vanished without a FIN) never errors on our side;
//! only silence gives it away. Browsers answer WebSocket pings automatically, so a peer
//! that answers nothing for `idle_timeout` is gone, and its participant id must be freed.

use crate::limiter::TokenBucket;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LivenessAction {
    /// Nothing to do before [`Liveness::next_wakeup`].
    Wait,
    /// Send a ping now.
    Ping,
    /// The peer has been silent too long: close the connection.
    Evict,
}

#[derive(Debug, Clone)]
pub struct Liveness {
    ping_interval_ms: u64,
    idle_timeout_ms: u64,
    last_heard_ms: u64,
    next_ping_ms: u64,
}

impl Liveness {
    pub fn new(now_ms: u64, ping_interval_ms: u64, idle_timeout_ms: u64) -> Self {
        Liveness {
            ping_interval_ms,
            idle_timeout_ms,
            last_heard_ms: now_ms,
            next_ping_ms: now_ms + ping_interval_ms,
        }
    }

    /// Moves the first ping to `offset_ms` (modulo the interval) from now; the ones after
    /// keep the interval. Connections that arrive together (a ramp, every client
    /// reconnecting after a restart) would otherwise be pinged together, forever: a
    /// burst of pings every interval instead of a steady trickle. The caller passes a
    /// random offset.
    pub fn with_first_ping_after(mut self, offset_ms: u64) -> Self {
        let interval = self.ping_interval_ms.max(1);
        self.next_ping_ms = self.last_heard_ms + 1 + offset_ms % interval;
        self
    }

    /// Any frame from the peer (data, pong, ping) proves it alive.
    pub fn heard(&mut self, now_ms: u64) {
        self.last_heard_ms = self.last_heard_ms.max(now_ms);
    }

    pub fn poll(&mut self, now_ms: u64) -> LivenessAction {
        if now_ms.saturating_sub(self.last_heard_ms) >= self.idle_timeout_ms {
            return LivenessAction::Evict;
        }
        if now_ms >= self.next_ping_ms {
            self.next_ping_ms = now_ms + self.ping_interval_ms;
            return LivenessAction::Ping;
        }
        LivenessAction::Wait
    }

    /// The next time [`Liveness::poll`] can return something other than `Wait`.
    pub fn next_wakeup(&self) -> u64 {
        self.next_ping_ms
            .min(self.last_heard_ms + self.idle_timeout_ms)
    }
}

/// Frames per second one client may send, with a burst; beyond it the client is flooding.
#[derive(Debug, Clone)]
pub struct FloodGuard(TokenBucket);

impl FloodGuard {
    /// `per_second` sustained, twice that in a burst.
    pub fn new(per_second: u32, now_ms: u64) -> Self {
        FloodGuard(TokenBucket::new(
            per_second,
            per_second.saturating_mul(2),
            now_ms,
        ))
    }

    /// Counts one inbound frame; `false` means the client is over its rate.
    pub fn admit(&mut self, now_ms: u64) -> bool {
        self.0.try_take(now_ms)
    }
}
