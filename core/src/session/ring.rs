//! The per-session replay ring: every DATA frame the server sent that the client has not yet
//! acknowledged, in SEQ order, so it can be replayed after a resume.
//!
//! Memory is allocated lazily in small chunks that grow (512 B, 1 KiB, … up to 16 KiB) as the
//! ring fills, and is given back as soon as the ring is empty: an idle session with nothing
//! unacknowledged holds no ring memory at all (`size_of::<ReplayRing>()` bytes inline). Records
//! are `seq u32 | len u32 | payload` and may straddle chunk boundaries.

use crate::proto::seq;
use std::cell::RefCell;
use std::collections::VecDeque;

const REC_HDR: usize = 8;
const FIRST_CHUNK: usize = 512;
const MAX_CHUNK: usize = 16 * 1024;

/// Storage of emptied rings (a chunk index holding one `FIRST_CHUNK` chunk), kept per thread
/// for the next ring that fills: an interactive session's ring goes from empty to one record
/// and back on every round trip, which would otherwise cost two allocations and two frees
/// each time. Bounded, so at most `SPARE_MAX × ~600` bytes (about 2.4 MB) per thread stay
/// allocated after a burst of activity; the rings themselves still hold nothing while empty.
/// Sized for 10,000 interactive sessions on a shard (at 1,024 the pool overflowed and malloc
/// was back at 4 % of the shard's CPU).
const SPARE_MAX: usize = 4096;

thread_local! {
    static SPARE: RefCell<Vec<VecDeque<Box<[u8]>>>> = const { RefCell::new(Vec::new()) };
}

/// Storage for a ring's first chunk: a pooled one, or a fresh allocation.
fn take_storage() -> VecDeque<Box<[u8]>> {
    let pooled = SPARE
        .try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
        .ok()
        .flatten();
    pooled.unwrap_or_else(|| {
        let mut d = VecDeque::with_capacity(4);
        d.push_back(vec![0u8; FIRST_CHUNK].into_boxed_slice());
        d
    })
}

/// Gives an emptied ring's storage back to the pool (or frees it). Only a first-size chunk is
/// kept; its stale bytes are never read (a ring reads only what it wrote).
fn give_storage(mut d: VecDeque<Box<[u8]>>) {
    d.retain(|c| c.len() == FIRST_CHUNK);
    d.truncate(1);
    if d.len() != 1 || d.capacity() > 8 {
        return;
    }
    let _ = SPARE.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if p.len() < SPARE_MAX {
                p.push(d);
            }
        }
    });
}

/// What [`ReplayRing::push`] had to drop to stay within its cap.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Frames dropped.
    pub frames: u32,
    /// SEQ of the newest frame dropped (meaningful when `frames > 0`).
    pub last_seq: u32,
}

/// A bounded, chunked FIFO of `(seq, payload)` records.
#[derive(Default)]
pub struct ReplayRing {
    chunks: VecDeque<Box<[u8]>>,
    /// Offset of the first live byte in `chunks[0]`.
    head: u32,
    /// Bytes used in the last chunk.
    tail: u32,
    /// Payload bytes held (what the cap counts).
    payload: u32,
    /// Records held.
    frames: u32,
}

impl ReplayRing {
    /// An empty ring; allocates nothing.
    pub const fn new() -> Self {
        ReplayRing {
            chunks: VecDeque::new(),
            head: 0,
            tail: 0,
            payload: 0,
            frames: 0,
        }
    }

    /// Payload bytes held.
    pub fn payload_bytes(&self) -> usize {
        self.payload as usize
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.frames as usize
    }

    /// No frames held.
    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// Heap bytes held by the ring (its chunks and the chunk index).
    pub fn heap_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.len()).sum::<usize>()
            + self.chunks.capacity() * std::mem::size_of::<Box<[u8]>>()
    }

    /// Appends a record, first dropping the oldest records until the payload fits in `cap`
    /// bytes. A payload larger than `cap` on its own is dropped itself (and reported).
    pub fn push(&mut self, seq: u32, payload: &[u8], cap: usize) -> Dropped {
        self.push_noting(seq, payload, cap, |_| {})
    }

    /// [`ReplayRing::push`], calling `dropped(seq)` for each record dropped, oldest first.
    pub fn push_noting(
        &mut self,
        seq: u32,
        payload: &[u8],
        cap: usize,
        mut on_drop: impl FnMut(u32),
    ) -> Dropped {
        if payload.len() > cap {
            on_drop(seq);
            // The ring cannot hold it; everything older was still sent, so keep the rest.
            return Dropped {
                frames: 1,
                last_seq: seq,
            };
        }
        let dropped = self.trim_noting(cap - payload.len(), on_drop);
        self.append_unbounded(seq, payload);
        dropped
    }

    /// Drops the oldest records until at most `cap` payload bytes are held, calling `on_drop`
    /// with each dropped SEQ, oldest first.
    pub fn trim_noting(&mut self, cap: usize, mut on_drop: impl FnMut(u32)) -> Dropped {
        let mut dropped = Dropped::default();
        while self.payload as usize > cap {
            match self.pop_front() {
                Some((s, _)) => {
                    dropped.frames += 1;
                    dropped.last_seq = s;
                    on_drop(s);
                }
                None => break,
            }
        }
        dropped
    }

    /// Appends a record without enforcing any cap (the caller enforces its own bound).
    pub fn append_unbounded(&mut self, seq: u32, payload: &[u8]) {
        let mut hdr = [0u8; REC_HDR];
        hdr[..4].copy_from_slice(&seq.to_be_bytes());
        hdr[4..].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        self.write(&hdr);
        self.write(payload);
        self.payload += payload.len() as u32;
        self.frames += 1;
    }

    fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = match self.chunks.back() {
                Some(c) => c.len() - self.tail as usize,
                None => 0,
            };
            if room == 0 {
                match self.chunks.back() {
                    Some(c) => {
                        let size = (c.len() * 2).min(MAX_CHUNK);
                        self.chunks.push_back(vec![0u8; size].into_boxed_slice());
                    }
                    None => self.chunks = take_storage(),
                }
                self.tail = 0;
                continue;
            }
            let n = room.min(bytes.len());
            let t = self.tail as usize;
            if let Some(c) = self.chunks.back_mut() {
                c[t..t + n].copy_from_slice(&bytes[..n]);
            }
            self.tail += n as u32;
            bytes = &bytes[n..];
        }
    }

    /// Copies `n` bytes starting `off` bytes after the head into `dst` (or skips them when `dst`
    /// is `None`); returns the position after them as (chunk index, offset).
    fn read_at(
        &self,
        mut ci: usize,
        mut off: usize,
        mut n: usize,
        mut dst: Option<&mut [u8]>,
    ) -> (usize, usize) {
        let mut written = 0;
        while n > 0 {
            let c = &self.chunks[ci];
            let end = if ci + 1 == self.chunks.len() {
                self.tail as usize
            } else {
                c.len()
            };
            let avail = end - off;
            if avail == 0 {
                ci += 1;
                off = 0;
                continue;
            }
            let k = avail.min(n);
            if let Some(d) = dst.as_deref_mut() {
                d[written..written + k].copy_from_slice(&c[off..off + k]);
            }
            written += k;
            off += k;
            n -= k;
        }
        (ci, off)
    }

    fn header_at(&self, ci: usize, off: usize) -> (u32, usize, usize, usize) {
        let mut hdr = [0u8; REC_HDR];
        let (ci, off) = self.read_at(ci, off, REC_HDR, Some(&mut hdr));
        let s = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let len = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
        (s, len, ci, off)
    }

    /// SEQ of the oldest record.
    pub fn front_seq(&self) -> Option<u32> {
        if self.frames == 0 {
            return None;
        }
        Some(self.header_at(0, self.head as usize).0)
    }

    /// Removes the oldest record, returning its SEQ and payload length.
    pub fn pop_front(&mut self) -> Option<(u32, usize)> {
        if self.frames == 0 {
            return None;
        }
        let (s, len, ci, off) = self.header_at(0, self.head as usize);
        let (ci, off) = self.read_at(ci, off, len, None);
        self.frames -= 1;
        self.payload -= len as u32;
        if self.frames == 0 {
            // Give all memory back: an idle session holds no ring chunks.
            give_storage(std::mem::take(&mut self.chunks));
            self.head = 0;
            self.tail = 0;
        } else {
            for _ in 0..ci {
                self.chunks.pop_front();
            }
            self.head = off as u32;
        }
        Some((s, len))
    }

    /// Removes every record with SEQ ≤ `through` (serial arithmetic); returns how many.
    pub fn remove_through(&mut self, through: u32) -> u32 {
        let mut n = 0;
        while let Some(s) = self.front_seq() {
            if !seq::le(s, through) {
                break;
            }
            self.pop_front();
            n += 1;
        }
        n
    }

    /// Iterates the records oldest first as `(seq, first part, second part…)`: the payload is
    /// handed out as the list of contiguous pieces it occupies.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            ring: self,
            ci: 0,
            off: self.head as usize,
            left: self.frames,
        }
    }
}

/// Iterator over the ring's records; see [`ReplayRing::iter`].
pub struct Iter<'a> {
    ring: &'a ReplayRing,
    ci: usize,
    off: usize,
    left: u32,
}

/// One record: its SEQ and the payload as up to a few contiguous pieces.
pub struct Record<'a> {
    /// The record's SEQ.
    pub seq: u32,
    /// Payload length in bytes.
    pub len: usize,
    ring: &'a ReplayRing,
    ci: usize,
    off: usize,
}

impl Record<'_> {
    /// Calls `f` with each contiguous piece of the payload, in order.
    pub fn for_each_piece(&self, mut f: impl FnMut(&[u8])) {
        let (mut ci, mut off, mut n) = (self.ci, self.off, self.len);
        while n > 0 {
            let c = &self.ring.chunks[ci];
            let end = if ci + 1 == self.ring.chunks.len() {
                self.ring.tail as usize
            } else {
                c.len()
            };
            let k = (end - off).min(n);
            if k > 0 {
                f(&c[off..off + k]);
            }
            n -= k;
            ci += 1;
            off = 0;
        }
    }

    /// The payload copied into a new vector (tests and diagnostics).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        self.for_each_piece(|p| v.extend_from_slice(p));
        v
    }
}

impl<'a> Iterator for Iter<'a> {
    type Item = Record<'a>;

    fn next(&mut self) -> Option<Record<'a>> {
        if self.left == 0 {
            return None;
        }
        let (seq, len, ci, off) = self.ring.header_at(self.ci, self.off);
        let rec = Record {
            seq,
            len,
            ring: self.ring,
            ci,
            off,
        };
        let (ci, off) = self.ring.read_at(ci, off, len, None);
        self.ci = ci;
        self.off = off;
        self.left -= 1;
        Some(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(r: &ReplayRing) -> Vec<(u32, Vec<u8>)> {
        r.iter().map(|rec| (rec.seq, rec.to_vec())).collect()
    }

    #[test]
    fn empty_ring_holds_no_memory() {
        let mut r = ReplayRing::new();
        assert_eq!(r.heap_bytes(), 0);
        r.push(1, b"hello", 1000);
        assert!(r.heap_bytes() >= FIRST_CHUNK);
        assert_eq!(r.pop_front(), Some((1, 5)));
        assert_eq!(r.heap_bytes(), 0);
    }

    #[test]
    fn grows_in_chunks_and_records_straddle() {
        let mut r = ReplayRing::new();
        let mut want = Vec::new();
        for i in 1..=300u32 {
            let p: Vec<u8> = (0..(i % 97) * 3).map(|b| (b ^ i) as u8).collect();
            r.push(i, &p, 1 << 20);
            want.push((i, p));
        }
        assert_eq!(contents(&r), want);
        assert!(r.chunks.iter().all(|c| c.len() <= MAX_CHUNK));
        assert!(r.chunks.len() > 2);
        assert_eq!(r.remove_through(150), 150);
        assert_eq!(contents(&r), want[150..].to_vec());
        assert_eq!(r.front_seq(), Some(151));
    }

    #[test]
    fn cap_drops_oldest_and_reports() {
        let mut r = ReplayRing::new();
        for i in 1..=10u32 {
            assert_eq!(r.push(i, &[0u8; 100], 1000), Dropped::default());
        }
        let d = r.push(11, &[0u8; 250], 1000);
        assert_eq!(
            d,
            Dropped {
                frames: 3,
                last_seq: 3
            }
        );
        assert_eq!(r.front_seq(), Some(4));
        assert!(r.payload_bytes() <= 1000);
        // A payload over the cap on its own is dropped, the rest kept.
        let d = r.push(12, &[0u8; 1001], 1000);
        assert_eq!(
            d,
            Dropped {
                frames: 1,
                last_seq: 12
            }
        );
        assert_eq!(r.len(), 8);
    }

    #[test]
    fn reused_storage_holds_only_what_was_written() {
        // A ring that empties gives its first chunk to the thread's pool; the next ring to
        // fill takes it, stale bytes and all, and must show only its own records.
        let mut a = ReplayRing::new();
        a.push(1, &[0xEE; 400], 1000);
        assert_eq!(a.pop_front(), Some((1, 400)));
        assert_eq!(a.heap_bytes(), 0);
        let mut b = ReplayRing::new();
        b.push(9, b"ab", 1000);
        b.push(10, b"", 1000);
        b.push(11, b"cde", 1000);
        assert_eq!(
            contents(&b),
            vec![(9, b"ab".to_vec()), (10, vec![]), (11, b"cde".to_vec())]
        );
        for k in 12..200u32 {
            b.push(k, &[k as u8; 7], 1 << 20);
        }
        assert_eq!(b.remove_through(199), 191);
        assert!(b.is_empty());
        assert_eq!(b.heap_bytes(), 0);
    }

    #[test]
    fn serial_wrap_in_remove_through() {
        let mut r = ReplayRing::new();
        for s in [u32::MAX - 1, u32::MAX, 0, 1] {
            r.push(s, b"x", 100);
        }
        assert_eq!(r.remove_through(u32::MAX), 2);
        assert_eq!(r.front_seq(), Some(0));
        assert_eq!(r.remove_through(1), 2);
        assert!(r.is_empty());
    }
}
