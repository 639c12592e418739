//! `shards`: a thread-per-core runtime.
//!
//! Each shard is one OS thread (optionally pinned to a CPU) running one reactor that owns a
//! slab of connections. The data plane is io_uring (via the `io-uring` crate, multishot
//! accept + multishot recv into a provided-buffer ring) or, when io_uring is unavailable,
//! epoll (level-triggered, one per-shard scratch buffer). Both backends implement the same
//! [`Handler`] semantics. The crate knows nothing about any application protocol.
//!
//! # Deviations from the original API sketch (forced by Rust or added for tests)
//!
//! * [`Runtime`] and [`Remote`] are generic over the cross-shard message type `M`
//!   (`Runtime::start` returns `Runtime<H::Msg>`), so `remote()` can hand out a typed sender.
//! * [`Remote::send`] returns `bool` (`false` when the shard index is out of range or the shard
//!   has already ended; the message is dropped in that case).
//! * [`Ctx::conn_count`] (live connection slots on this shard, including ones still closing)
//!   was added for tests and stats.
//! * [`ConnId::index`] / [`ConnId::generation`] accessors were added (handy for per-shard
//!   side tables indexed by slot).
//! * `Ctx::connect_unix` performs the (non-blocking) AF_UNIX `connect(2)` synchronously — for
//!   AF_UNIX stream sockets the kernel completes or fails it immediately (a full listen backlog
//!   yields `EAGAIN`, reported as an error). The outcome is always reported through
//!   [`Handler::on_connected`] after the current callback returns; `connect_unix` itself only
//!   fails when no socket could be created or the path is too long.
//! * For a peer EOF the runtime calls `on_closed(None)` and then still flushes output that was
//!   queued before (bounded), then closes; errors drop queued output.

pub mod timer;

mod bufring;
mod config;
mod cpu;
mod epoll;
mod handler;
mod reactor;
mod runtime;
pub mod sim;
mod sys;
mod udp;
mod uring;

pub use config::{parse_cpu_list, Backend, Config, IoMode};
pub use cpu::{allowed_cpus, confine_current_thread};
pub use handler::{ConnId, Context, Ctx, Handler};
pub use runtime::{Inherited, Remote, Runtime};
pub use udp::BpfInsn;

/// Ok if io_uring works here and supports what the uring backend needs (ring setup,
/// IORING_FEAT_EXT_ARG, ACCEPT/RECV/SEND/READ/ASYNC_CANCEL opcodes, provided-buffer rings and
/// multishot recv — which implies multishot accept, both verified by a live multishot recv on
/// a socketpair). `Err(reason)` otherwise.
pub fn probe_uring() -> Result<(), String> {
    uring::probe()
}
