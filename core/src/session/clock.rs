//! The injected clock: the core works on plain `u64` milliseconds; the reactor converts.

use std::time::{Duration, Instant};

/// Converts between `Instant` and the core's millisecond timestamps, counted from a fixed epoch.
#[derive(Copy, Clone, Debug)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    /// A clock whose zero is `epoch`.
    pub fn new(epoch: Instant) -> Clock {
        Clock { epoch }
    }

    /// Milliseconds since the epoch (0 for instants before it).
    pub fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Microseconds since the epoch (0 for instants before it).
    pub fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// The instant of a microsecond timestamp.
    pub fn instant_us(&self, us: u64) -> Instant {
        self.epoch + Duration::from_micros(us)
    }

    /// The instant of a millisecond timestamp.
    pub fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }
}
