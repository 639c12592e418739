//! ClawTerm: a session server that keeps interactive AI-agent sessions alive through network
//! drops, device switches, reconnects and pod restarts.
//!
//! The crate is layered so the protocol logic never touches a socket:
//! * [`proto`]: the ClawTerm frame codec (client ↔ daemon).
//! * [`podlink`]: the pod-link codec (daemon ↔ agent pod).
//! * [`session`]: the sans-IO session core — state machine, replay ring, timers, session table,
//!   resume tokens, tenant tokens — driven by an injected clock.

pub mod agent;
pub mod auth;
pub mod client;
pub mod demo;
pub mod podlink;
pub mod pods;
pub mod proto;
pub mod server;
pub mod session;
