//! The control plane's wall clock (token expiry, `created_at`), injectable so tests move
//! time instead of sleeping through it. The gateway's monotonic timers (pings, rate
//! limits) run on their own `Instant` base and are unaffected.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// The system clock, plus an offset that only tests change ([`Clock::advance`]). Cheap to
/// clone; clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_secs: Arc<AtomicI64>,
}

impl Clock {
    /// Unix time in seconds.
    pub fn now_secs(&self) -> i64 {
        crate::now_secs() + self.offset_secs.load(Ordering::Relaxed)
    }

    /// Moves this clock (and its clones) forward by `secs`: a token that expires in one
    /// second is expired after `advance(2)`, at once.
    pub fn advance(&self, secs: i64) {
        self.offset_secs.fetch_add(secs, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_moves_every_clone() {
        let a = Clock::default();
        let b = a.clone();
        let before = b.now_secs();
        a.advance(3600);
        let after = b.now_secs();
        assert!(
            (3600..3700).contains(&(after - before)),
            "{before} → {after}"
        );
    }
}
