//! The provided-buffer ring (`IORING_REGISTER_PBUF_RING`): one per io_uring shard, a ring of
//! buffer descriptors and the buffers themselves, `mmap`ed once. Multishot receives pick a
//! buffer from it as data arrives, so an idle connection holds no receive buffer; the shard
//! gives a buffer back ([`BufRing::recycle`]) once its handler has seen the bytes.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

use crate::sys;

/// The buffer group id the shard's receives select from.
pub(crate) const BGID: u16 = 0;

/// A provided-buffer ring (`IORING_REGISTER_PBUF_RING`) plus its buffers.
pub(crate) struct BufRing {
    ring: *mut BufRingEntry,
    ring_len: usize,
    bufs: *mut u8,
    bufs_len: usize,
    buf_size: usize,
    entries: u16,
    tail: u16,
}

impl BufRing {
    pub fn new(entries: u16, buf_size: usize) -> io::Result<BufRing> {
        assert!(entries.is_power_of_two());
        let ring_len = entries as usize * std::mem::size_of::<BufRingEntry>();
        let ring = sys::mmap_anon(ring_len)? as *mut BufRingEntry;
        let bufs_len = entries as usize * buf_size;
        let bufs = match sys::mmap_anon(bufs_len) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: `ring` was just mapped with `ring_len` and is referenced nowhere.
                unsafe { sys::munmap(ring as *mut u8, ring_len) };
                return Err(e);
            }
        };
        Ok(BufRing {
            ring,
            ring_len,
            bufs,
            bufs_len,
            buf_size,
            entries,
            tail: 0,
        })
    }

    /// Register with `ring` and hand every buffer to the kernel.
    ///
    /// # Safety
    /// `self` must stay alive (not unmapped) until `ring` is dropped or the group is
    /// unregistered, and until no op that may select a buffer is in flight.
    pub unsafe fn register(&mut self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: the ring memory is page-aligned (mmap) and holds `entries` entries; the
        // lifetime requirement is forwarded to our caller.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.ring as u64,
                self.entries,
                BGID,
                0,
            )?;
        }
        for bid in 0..self.entries {
            self.recycle(bid);
        }
        Ok(())
    }

    /// Give buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        debug_assert!(bid < self.entries);
        let slot = (self.tail & (self.entries - 1)) as usize;
        // SAFETY: `slot < entries`, so the pointer is inside the mapping. Entries between the
        // kernel's head and our tail are ours to write; the kernel reads an entry only after
        // the Release store of the tail below publishes it. We write addr/len/bid only, never
        // the `resv` field that doubles as the tail in entry 0.
        let e = unsafe { &mut *self.ring.add(slot) };
        e.set_addr(self.bufs as u64 + bid as u64 * self.buf_size as u64);
        e.set_len(self.buf_size as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: `BufRingEntry::tail` needs the ring base, which `self.ring` is; the tail is
        // a naturally aligned u16 shared with the kernel, so an atomic store is the right
        // access.
        unsafe {
            let tail = BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The first `len` bytes of buffer `bid`, which the kernel just filled and handed to us.
    pub fn data(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid < self.entries && len <= self.buf_size);
        // SAFETY: in-bounds (checked above). The kernel completed the write before posting the
        // CQE we got `bid` from and will not touch this buffer again until `recycle(bid)`,
        // which needs `&mut self` and so cannot happen while the slice is borrowed.
        unsafe { std::slice::from_raw_parts(self.bufs.add(bid as usize * self.buf_size), len) }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: owners drop a BufRing only after the io_uring it was registered with is gone
        // (or it was never registered), so nothing references the mappings any more.
        unsafe {
            sys::munmap(self.ring as *mut u8, self.ring_len);
            sys::munmap(self.bufs, self.bufs_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffers are handed out by id, in bounds, and recycling wraps the tail around the ring
    /// (no kernel needed: the entries are plain memory until registered).
    #[test]
    fn recycle_wraps_and_data_stays_in_bounds() {
        let mut r = BufRing::new(4, 64).expect("mmap");
        for round in 0..3u16 {
            for bid in 0..4 {
                r.recycle(bid);
            }
            assert_eq!(r.tail, 4 * (round + 1));
        }
        for bid in 0..4 {
            let d = r.data(bid, 64);
            assert_eq!(d.len(), 64);
            assert!(d.iter().all(|&b| b == 0), "fresh anonymous memory");
        }
        // SAFETY: reading back entry 1, which `recycle` wrote; nothing else references it.
        let e = unsafe { &*r.ring.add(1) };
        assert_eq!(e.bid(), 1);
        assert_eq!(e.len(), 64);
        assert_eq!(e.addr(), r.bufs as u64 + 64);
    }

    #[test]
    #[should_panic]
    fn data_beyond_a_buffer_panics() {
        let r = BufRing::new(2, 32).expect("mmap");
        let _ = r.data(0, 33);
    }
}
