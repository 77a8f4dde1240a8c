//! Admission limits that protect the node rather than a space: the node-wide connection
//! cap and the per-source join rate. Both are checked before a join costs an RSA verify,
//! and both refuse with the SDK's "try again" (type 7).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use spacegate_signaling::TokenBucket;

use super::{Gateway, lock};

/// One held WebSocket connection (being admitted or joined); dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The per-source buckets, swept of buckets that have refilled whenever the map has doubled
/// since the last sweep, so memory follows the sources of the last few seconds.
#[derive(Debug)]
pub(crate) struct JoinRates {
    buckets: HashMap<IpAddr, (TokenBucket, u64)>,
    sweep_at: usize,
}

impl Default for JoinRates {
    fn default() -> Self {
        JoinRates {
            buckets: HashMap::new(),
            sweep_at: 1024,
        }
    }
}

impl JoinRates {
    /// Takes one join from `source`'s bucket.
    pub(crate) fn admit(&mut self, source: IpAddr, rate: u32, burst: u32, now_ms: u64) -> bool {
        if self.buckets.len() >= self.sweep_at {
            // A bucket untouched for longer than it takes to refill is full again, the
            // same as no bucket at all.
            let refill_ms = u64::from(burst) * 1000 / u64::from(rate.max(1)) + 1000;
            self.buckets
                .retain(|_, (_, last)| now_ms.saturating_sub(*last) < refill_ms);
            self.sweep_at = (self.buckets.len() * 2).max(1024);
        }
        let (bucket, last) = self
            .buckets
            .entry(source)
            .or_insert_with(|| (TokenBucket::new(rate, burst, now_ms), now_ms));
        *last = now_ms;
        bucket.try_take(now_ms)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.len()
    }
}

/// Where a join comes from: the TCP peer, or, behind a trusted proxy, the last
/// `X-Forwarded-For` entry (the one that proxy appended; earlier ones are the client's
/// own claims).
pub(crate) fn source_address(
    peer: Option<IpAddr>,
    forwarded_for: Option<&str>,
    trust_forwarded_for: bool,
) -> Option<IpAddr> {
    if trust_forwarded_for
        && let Some(last) = forwarded_for.and_then(|h| h.rsplit(',').next())
        && let Ok(ip) = last.trim().parse()
    {
        return Some(ip);
    }
    peer
}

impl Gateway {
    /// A connection slot, or `None` at `max_connections`.
    pub(crate) fn take_connection(&self) -> Option<Permit> {
        let open = &self.open_connections;
        let taken = open.fetch_add(1, Ordering::AcqRel);
        let permit = Permit(open.clone());
        (taken < self.config.max_connections).then_some(permit)
    }

    /// Whether `source` may start another join now.
    pub(crate) fn admit_source(&self, source: Option<IpAddr>) -> bool {
        let (rate, burst) = (self.config.join_rate_per_ip, self.config.join_burst_per_ip);
        let Some(source) = source else { return true };
        if rate == 0 {
            return true;
        }
        let now = self.now_ms();
        lock(&self.join_rates).admit(source, rate, burst, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_has_its_own_bucket_and_idle_ones_are_swept() {
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let mut r = JoinRates::default();
        assert_eq!((0..10).filter(|_| r.admit(a, 1, 5, 0)).count(), 5);
        assert!(r.admit(b, 1, 5, 0), "another source is not affected");
        assert!(r.admit(a, 1, 5, 1000), "one more per second");
        for i in 0..2000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            r.admit(ip, 1, 5, 10_000);
        }
        // The sweep at 1024 dropped the two buckets idle since t=1 s; the rest are recent.
        assert!(r.len() <= 2000, "{}", r.len());
        assert!(!r.buckets.contains_key(&b));
    }

    #[test]
    fn forwarded_for_is_used_only_when_trusted_and_its_last_entry_wins() {
        let peer: Option<IpAddr> = Some("10.0.0.1".parse().expect("ip"));
        let header = Some("203.0.113.9, 198.51.100.7");
        assert_eq!(source_address(peer, header, false), peer);
        assert_eq!(
            source_address(peer, header, true),
            Some("198.51.100.7".parse().expect("ip"))
        );
        assert_eq!(source_address(peer, Some("garbage"), true), peer);
        assert_eq!(source_address(peer, None, true), peer);
    }
}
