//! Per-source-address limits, sans-IO (the caller passes the time in milliseconds).
//!
//! * New connections: a token bucket per address (`rate` per second, burst `2 × rate`).
//! * Failed authentications (AUTH_FAILED, NO_SUCH_SESSION): at most `max` per address per
//!   minute; beyond it the address's handshakes get RATE_LIMITED until the minute is over.
//!
//! Each shard keeps its own table (no shared state on the accept path), so an address spread
//! over N shards by SO_REUSEPORT gets up to N times these limits. The table is bounded: idle
//! entries are swept, and past `MAX_ENTRIES` the oldest half is dropped.

use std::collections::HashMap;
use std::net::IpAddr;

const WINDOW_MS: u64 = 60_000;
const MAX_ENTRIES: usize = 100_000;

#[derive(Clone, Copy, Debug)]
struct Entry {
    tokens: f64,
    last_ms: u64,
    fails: u32,
    fail_window_start: u64,
}

/// Limits of one shard.
#[derive(Debug)]
pub struct Limiter {
    /// New connections per second per address (0 = unlimited).
    rate: f64,
    /// Failed authentications per minute per address (0 = unlimited).
    max_fails: u32,
    table: HashMap<IpAddr, Entry>,
}

impl Limiter {
    pub fn new(conn_rate: u32, max_fails_per_min: u32) -> Limiter {
        Limiter {
            rate: conn_rate as f64,
            max_fails: max_fails_per_min,
            table: HashMap::new(),
        }
    }

    fn entry(&mut self, ip: IpAddr, now: u64) -> &mut Entry {
        if self.table.len() >= MAX_ENTRIES && !self.table.contains_key(&ip) {
            self.shrink();
        }
        let burst = (self.rate * 2.0).max(1.0);
        self.table.entry(ip).or_insert(Entry {
            tokens: burst,
            last_ms: now,
            fails: 0,
            fail_window_start: now,
        })
    }

    fn shrink(&mut self) {
        let mut ages: Vec<u64> = self.table.values().map(|e| e.last_ms).collect();
        ages.sort_unstable();
        let cut = ages[ages.len() / 2];
        self.table.retain(|_, e| e.last_ms > cut);
    }

    /// A new connection from `ip`: false when it must be refused.
    pub fn allow_connection(&mut self, ip: IpAddr, now: u64) -> bool {
        let (rate, max_fails) = (self.rate, self.max_fails);
        let e = self.entry(ip, now);
        if max_fails > 0
            && now.saturating_sub(e.fail_window_start) < WINDOW_MS
            && e.fails >= max_fails
        {
            e.last_ms = now;
            return false;
        }
        if rate <= 0.0 {
            e.last_ms = now;
            return true;
        }
        let burst = (rate * 2.0).max(1.0);
        e.tokens = (e.tokens + (now.saturating_sub(e.last_ms)) as f64 * rate / 1000.0).min(burst);
        e.last_ms = now;
        if e.tokens >= 1.0 {
            e.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A handshake from `ip` failed authentication (or named an unknown session).
    pub fn auth_failed(&mut self, ip: IpAddr, now: u64) {
        let e = self.entry(ip, now);
        if now.saturating_sub(e.fail_window_start) >= WINDOW_MS {
            e.fail_window_start = now;
            e.fails = 0;
        }
        e.fails = e.fails.saturating_add(1);
        e.last_ms = now;
    }

    /// Whether `ip` is currently locked out for failed authentications.
    pub fn locked_out(&self, ip: IpAddr, now: u64) -> bool {
        self.max_fails > 0
            && self.table.get(&ip).is_some_and(|e| {
                now.saturating_sub(e.fail_window_start) < WINDOW_MS && e.fails >= self.max_fails
            })
    }

    /// Forgets addresses idle for a minute (call periodically).
    pub fn sweep(&mut self, now: u64) {
        self.table
            .retain(|_, e| now.saturating_sub(e.last_ms) < WINDOW_MS);
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn bucket_allows_burst_then_rate() {
        let mut l = Limiter::new(10, 0);
        let allowed = (0..100).filter(|_| l.allow_connection(A, 1000)).count();
        assert_eq!(allowed, 20, "burst of 2 × rate");
        assert!(!l.allow_connection(A, 1000));
        assert!(l.allow_connection(B, 1000), "other addresses unaffected");
        // 100 ms later: one more token.
        assert!(l.allow_connection(A, 1100));
        assert!(!l.allow_connection(A, 1100));
    }

    #[test]
    fn failed_auths_lock_out_for_the_window() {
        let mut l = Limiter::new(0, 3);
        for _ in 0..3 {
            assert!(l.allow_connection(A, 0));
            l.auth_failed(A, 0);
        }
        assert!(l.locked_out(A, 10));
        assert!(!l.allow_connection(A, 10));
        assert!(l.allow_connection(B, 10));
        assert!(l.allow_connection(A, 60_001), "the window ended");
    }

    #[test]
    fn table_is_bounded_and_swept() {
        let mut l = Limiter::new(1, 0);
        for i in 0..(MAX_ENTRIES as u32 + 10) {
            l.allow_connection(IpAddr::V4(std::net::Ipv4Addr::from(i)), i as u64);
        }
        assert!(l.len() <= MAX_ENTRIES);
        l.sweep(10_000_000);
        assert!(l.is_empty());
    }
}
