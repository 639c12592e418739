//! ClawTerm: a session server that keeps interactive AI-agent sessions alive through network
//! drops, device switches, reconnects and pod restarts.
//!
//! The protocol logic never touches a socket: it lives in the `clawterm-core` crate (`core/`,
//! no I/O, no `unsafe`), re-exported here as
//! * [`proto`]: the ClawTerm frame codec (client ↔ daemon);
//! * [`podlink`]: the pod-link codec (daemon ↔ agent pod);
//! * [`session`]: the sans-IO session core — state machine, replay ring, timers, session
//!   table, resume tokens — driven by an injected clock.

pub mod auth;
pub mod cluster;
pub mod pods;
pub mod server;
pub mod state;
pub mod upgrade;

pub use clawterm_core::{podlink, proto, session};
