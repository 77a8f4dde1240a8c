/// A token bucket in integer milli-tokens: `rate` events per second, bursts of `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    capacity: u64,
    milli_tokens: u64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32, now_ms: u64) -> Self {
        let capacity = u64::from(burst) * 1000;
        TokenBucket {
            rate: u64::from(rate),
            capacity,
            milli_tokens: capacity,
            last_ms: now_ms,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = now_ms.max(self.last_ms);
        // elapsed ms × rate/s = milli-tokens earned.
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(elapsed.saturating_mul(self.rate))
            .min(self.capacity);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TokenBucket;

    #[test]
    fn allows_bursts_then_refills_at_rate() {
        let mut b = TokenBucket::new(10, 10, 0);
        assert_eq!((0..20).filter(|_| b.try_take(0)).count(), 10);
        assert!(!b.try_take(99), "0.99 tokens after 99 ms");
        assert!(b.try_take(100), "one token per 100 ms at 10/s");
        assert!(!b.try_take(100));
        assert_eq!(
            (0..20).filter(|_| b.try_take(10_000)).count(),
            10,
            "capped at the burst"
        );
        let mut burst = TokenBucket::new(5, 20, 0);
        assert_eq!((0..50).filter(|_| burst.try_take(0)).count(), 20);
        assert!(
            !TokenBucket::new(0, 0, 0).try_take(1_000_000),
            "rate 0 admits nothing"
        );
    }
}
