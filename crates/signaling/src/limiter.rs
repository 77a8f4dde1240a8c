/// A token bucket in integer milli-tokens: `rate` events per second, bursts of `rate`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    milli_tokens: u64,
    last_ms: u64,
}

impl TokenBucket {
    pub fn full(rate: u32, now_ms: u64) -> Self {
        TokenBucket {
            milli_tokens: u64::from(rate) * 1000,
            last_ms: now_ms,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, rate: u32, now_ms: u64) -> bool {
        let capacity = u64::from(rate) * 1000;
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = now_ms.max(self.last_ms);
        // elapsed ms × rate/s = milli-tokens earned.
        self.milli_tokens =
            (self.milli_tokens + elapsed.saturating_mul(u64::from(rate))).min(capacity);
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
    fn allows_bursts_of_rate_then_refills_at_rate() {
        let mut b = TokenBucket::full(10, 0);
        assert_eq!((0..20).filter(|_| b.try_take(10, 0)).count(), 10);
        assert!(!b.try_take(10, 99), "0.99 tokens after 99 ms");
        assert!(b.try_take(10, 100), "one token per 100 ms at 10/s");
        assert!(!b.try_take(10, 100));
        assert_eq!(
            (0..20).filter(|_| b.try_take(10, 10_000)).count(),
            10,
            "capped at the burst"
        );
        assert!(
            !TokenBucket::full(0, 0).try_take(0, 1_000_000),
            "rate 0 admits nothing"
        );
    }
}
