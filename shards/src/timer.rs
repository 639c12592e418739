//! A hierarchical timing wheel: plain data with an injected clock.
//!
//! Six levels of 64 slots at 1 ms resolution cover 2^36 ms (about two years); a deadline further
//! out is parked in the top level and re-filed when its slot comes round. Each level keeps a
//! 64-bit occupancy mask, so finding the next deadline is a handful of bit operations and an idle
//! wheel costs nothing per tick: the reactor sleeps until [`Wheel::next_deadline`].
//!
//! Cancellation is lazy: the owner of a key remembers the deadline it armed last and ignores a
//! firing whose deadline does not match (see [`Wheel::poll`]). This keeps the wheel free of
//! per-entry handles, so an entry is just `(deadline, key)`.

const LEVELS: usize = 6;
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
/// Largest distance a deadline can be placed exactly.
const MAX_SPAN: u64 = (1 << (SLOT_BITS * LEVELS as u32)) - 1;

struct Level<K> {
    occupied: u64,
    slots: Vec<Vec<(u64, K)>>,
}

impl<K> Level<K> {
    fn new() -> Self {
        Level {
            occupied: 0,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
        }
    }
}

/// A timing wheel of keys `K` with millisecond deadlines (`u64` ms on the caller's clock).
pub struct Wheel<K> {
    /// Time up to which the wheel has been advanced.
    now: u64,
    levels: Vec<Level<K>>,
    len: usize,
}

impl<K: Copy> Wheel<K> {
    /// An empty wheel whose clock starts at `now` ms.
    pub fn new(now: u64) -> Self {
        Wheel {
            now,
            levels: (0..LEVELS).map(|_| Level::new()).collect(),
            len: 0,
        }
    }

    /// Entries held (including ones whose owners have since re-armed elsewhere).
    pub fn len(&self) -> usize {
        self.len
    }

    /// No entries held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The time the wheel has been advanced to.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Files `key` to fire at `deadline` ms. A deadline in the past fires at the next poll.
    pub fn insert(&mut self, deadline: u64, key: K) {
        self.file(deadline, key);
        self.len += 1;
    }

    fn file(&mut self, deadline: u64, key: K) {
        let place = deadline.clamp(self.now, self.now + MAX_SPAN);
        let level = level_for(self.now, place);
        let shift = level as u32 * SLOT_BITS;
        let mut slot = ((place >> shift) as usize) & (SLOTS - 1);
        let now_slot = ((self.now >> shift) as usize) & (SLOTS - 1);
        if level == LEVELS - 1 && slot == now_slot && place > self.now {
            // A full rotation of the top level ahead (or parked beyond the span): file it in the
            // furthest slot instead of the one being drained, so it is re-filed when that comes.
            slot = (now_slot + SLOTS - 1) & (SLOTS - 1);
        }
        let l = &mut self.levels[level];
        l.occupied |= 1 << slot;
        l.slots[slot].push((deadline, key));
    }

    /// The earliest time a slot is due, or `None` when the wheel is empty. Entries may be due a
    /// little later than this (a higher-level slot is re-filed when reached), never earlier.
    pub fn next_deadline(&self) -> Option<u64> {
        (0..LEVELS)
            .filter_map(|l| self.next_slot(l).map(|(_, t)| t))
            .min()
    }

    /// For level `l`: the next occupied slot and the time it starts.
    fn next_slot(&self, l: usize) -> Option<(usize, u64)> {
        let level = &self.levels[l];
        if level.occupied == 0 {
            return None;
        }
        let shift = l as u32 * SLOT_BITS;
        let now_slot = ((self.now >> shift) as usize) & (SLOTS - 1);
        let dist = level
            .occupied
            .rotate_right(now_slot as u32)
            .trailing_zeros() as usize;
        let slot = (now_slot + dist) & (SLOTS - 1);
        let level_span = 1u64 << (shift + SLOT_BITS);
        let level_start = self.now & !(level_span - 1);
        let mut t = level_start + ((slot as u64) << shift);
        if t < self.now && dist != 0 {
            t += level_span;
        }
        Some((slot, t.max(self.now)))
    }

    /// Advances to `now` ms, pushing every key whose deadline is `<= now` into `out`, each with
    /// the deadline it was filed under.
    pub fn poll(&mut self, now: u64, out: &mut Vec<(u64, K)>) {
        loop {
            let next = (0..LEVELS)
                .filter_map(|l| self.next_slot(l).map(|(s, t)| (t, l, s)))
                .min_by_key(|&(t, l, _)| (t, l));
            let Some((t, l, s)) = next else { break };
            if t > now {
                break;
            }
            self.now = t;
            let level = &mut self.levels[l];
            level.occupied &= !(1u64 << s);
            let entries = std::mem::take(&mut level.slots[s]);
            for (deadline, key) in entries.iter().copied() {
                if deadline <= self.now {
                    out.push((deadline, key));
                    self.len -= 1;
                } else {
                    self.file(deadline, key);
                }
            }
            // Give the (now empty) allocation back unless the slot was refilled meanwhile.
            let slot = &mut self.levels[l].slots[s];
            if slot.is_empty() {
                let mut entries = entries;
                entries.clear();
                if entries.capacity() <= 64 {
                    *slot = entries;
                }
            }
        }
        self.now = self.now.max(now);
    }
}

fn level_for(now: u64, deadline: u64) -> usize {
    let masked = (now ^ deadline) | (SLOTS as u64 - 1);
    let significant = 63 - masked.leading_zeros();
    ((significant / SLOT_BITS) as usize).min(LEVELS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(w: &mut Wheel<u32>, now: u64) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        w.poll(now, &mut out);
        out
    }

    #[test]
    fn fires_in_order_and_never_early() {
        let mut w = Wheel::new(1_000);
        let deadlines = [
            1_000u64,
            1_001,
            1_063,
            1_064,
            1_065,
            5_000,
            70_000,
            4_000_000,
            300_000_000,
        ];
        for (i, d) in deadlines.iter().enumerate() {
            w.insert(*d, i as u32);
        }
        assert_eq!(w.len(), deadlines.len());
        let mut fired = Vec::new();
        let mut now = 1_000;
        while !w.is_empty() {
            let next = w.next_deadline().unwrap();
            assert!(next >= now);
            now = next;
            for (d, k) in drain(&mut w, now) {
                assert!(d <= now, "fired {d} early at {now}");
                fired.push((d, k, now));
            }
        }
        let order: Vec<u64> = fired.iter().map(|f| f.0).collect();
        assert_eq!(order, deadlines.to_vec());
        // Exactly on time when the caller sleeps until next_deadline.
        for (d, _, at) in fired {
            assert_eq!(d, at);
        }
    }

    #[test]
    fn past_deadline_fires_at_next_poll_and_big_jumps_work() {
        let mut w = Wheel::new(10);
        w.insert(3, 7);
        assert_eq!(w.next_deadline(), Some(10));
        assert_eq!(drain(&mut w, 10), vec![(3, 7)]);
        w.insert(1 << 40, 8); // beyond the wheel's span
        w.insert(100, 9);
        assert_eq!(drain(&mut w, 1 << 39), vec![(100, 9)]);
        assert_eq!(drain(&mut w, (1 << 40) - 1), vec![]);
        assert_eq!(drain(&mut w, 1 << 40), vec![(1 << 40, 8)]);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn randomised_against_a_sorted_list() {
        // Deterministic LCG so the test needs no dependency.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rnd = move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 33
        };
        let mut w = Wheel::new(0);
        let mut expect = Vec::new();
        let mut now = 0u64;
        for round in 0..2_000u32 {
            let d = now + rnd() % [10, 1_000, 100_000, 10_000_000][(round % 4) as usize];
            w.insert(d, round);
            expect.push((d, round));
            if round % 7 == 0 {
                now += rnd() % 50_000;
                let mut got = drain(&mut w, now);
                let mut want: Vec<_> = expect.iter().copied().filter(|e| e.0 <= now).collect();
                expect.retain(|e| e.0 > now);
                got.sort();
                want.sort();
                assert_eq!(got, want, "at {now}");
            }
        }
        let mut got = drain(&mut w, u64::MAX / 2);
        got.sort();
        expect.sort();
        assert_eq!(got, expect);
    }
}
