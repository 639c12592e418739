//! ClawTerm's sans-IO core: everything about the protocol that can be decided without a
//! socket, a thread or a system clock.
//!
//! * [`proto`]: the ClawTerm v1 frame codec (client ↔ daemon): zero-copy incremental decoder,
//!   encoder into caller buffers, typed payloads, handshake refusals decided from the header.
//! * [`podlink`]: the pod-link codec (daemon ↔ agent pod).
//! * [`session`]: the session state machine, replay ring, session table, ids and resume tokens,
//!   driven by method calls that carry the current time (an injected clock).
//!
//! The crate forbids `unsafe` and does no I/O: the server (`clawterm`), the client library and
//! the fuzz targets all drive the same code, and every rule of PROTOCOL.md §2–§4 and
//! POD-LINK.md §3–§4 that lives here is tested without sockets.

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod podlink;
pub mod proto;
pub mod session;
