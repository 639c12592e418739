//! Reconnect delays: exponential backoff with "full jitter".
//!
//! The n-th delay (n = 0, 1, …) is drawn uniformly from `[base, min(cap, base · 2ⁿ)]`, so a
//! reconnect never happens sooner than `base` (never a tight loop) nor later than `cap`, and
//! the window doubles after each failed attempt. [`Backoff::reset`] starts over after a
//! successful reconnect.

use std::time::Duration;

/// Exponential backoff with full jitter. Pure: the randomness comes from a caller-supplied
/// source, so the bounds are testable.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Default for Backoff {
    /// 100 ms base, 3 s cap. The cap bounds how long a client waits, after the network is
    /// back, before its next attempt (on average half the cap once an outage has lasted a few
    /// seconds; see docs/CLIENT.md for the measured figure). The price is at most one connect
    /// attempt per 100 ms – 3 s (1.55 s on average) from each client while a server is
    /// unreachable.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(3))
    }
}

impl Backoff {
    /// `base` is clamped to at least 1 ms and `cap` to at least `base`.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        let base = base.max(Duration::from_millis(1));
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    pub fn base(&self) -> Duration {
        self.base
    }

    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// Failed attempts since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The upper bound of the next delay's window: `min(cap, base · 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u64 << self.attempt.min(30);
        let nanos = (self.base.as_nanos() as u64).saturating_mul(factor);
        Duration::from_nanos(nanos).min(self.cap)
    }

    /// The next delay, using `unit` ∈ [0, 1] as the random draw (values outside are clamped).
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let unit = if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0)
        };
        let lo = self.base.as_secs_f64();
        let hi = self.ceiling().as_secs_f64();
        self.attempt = self.attempt.saturating_add(1);
        let d = Duration::from_secs_f64(lo + (hi - lo) * unit);
        d.clamp(self.base, self.cap)
    }

    /// The next delay, drawn with the thread RNG.
    pub fn next_delay(&mut self) -> Duration {
        use rand::Rng;
        let u: f64 = rand::thread_rng().gen();
        self.next_with(u)
    }

    /// Back to the first window (after a successful reconnect).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_hold() {
        let mut b = Backoff::default();
        for i in 0..100 {
            let u = (i as f64 * 0.37) % 1.0;
            let d = b.next_with(u);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_secs(3));
        }
    }
}
