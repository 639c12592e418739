//! Measures the bytes of memory an idle session costs in the session table: a counting global
//! allocator records heap bytes in use before and after creating N idle sessions (empty rings),
//! and the figure is (heap delta) / N. The table's inline slots are heap memory too, so they are
//! included; nothing is estimated from `size_of`.
//!
//! Run: `cargo bench --bench session_memory`

use clawterm::session::{IdSpace, Session, SessionTable};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;

static IN_USE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        IN_USE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        IN_USE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        IN_USE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` with layout `l`.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn main() {
    println!(
        "size_of::<Session>() = {} bytes (inline, before table overhead)",
        std::mem::size_of::<Session>()
    );
    let mut worst = 0.0f64;
    for n in [1_000usize, 10_000, 100_000, 1_000_000] {
        let before = IN_USE.load(Ordering::Relaxed);
        let mut t = SessionTable::new(IdSpace::new(0, 1));
        for _ in 0..n {
            t.create(|id, tok| Session::new(id, 7, 42, 0, tok, 0));
        }
        let after = IN_USE.load(Ordering::Relaxed);
        let per = (after - before) as f64 / n as f64;
        worst = worst.max(per);
        println!("idle sessions: {n:>9}  heap bytes per session in the table: {per:7.1}");
        drop(t);
    }
    println!("worst: {worst:.1} bytes per idle session (goal: at most 256)");
    if std::env::args().any(|a| a == "--json") {
        println!("{{\"bytes_per_idle_session_worst\": {worst:.1}}}");
    }
}
