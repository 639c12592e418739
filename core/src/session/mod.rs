//! The sans-IO session core: everything a shard knows about a session, as plain data driven by
//! method calls with an injected millisecond clock. No sockets, no threads, no system time.
//!
//! * [`state`]: one session's state machine (PROTOCOL.md §3–§4).
//! * [`ring`]: the replay ring.
//! * [`table`]: the shard's session table, session ids and resume tokens.
//! * [`config`]: limits and timer settings.
//! * [`clock`]: `Instant` ↔ millisecond conversion for the reactor.
//! * The timer wheel is `shards::timer::Wheel` (generic, pure data).

pub mod clock;
pub mod config;
pub mod ring;
pub mod state;
pub mod table;

pub use clock::Clock;
pub use config::{Overflow, SessionConfig};
pub use ring::ReplayRing;
pub use state::{
    Flow, FlowEvent, RecordError, ResumeFrom, Session, Sink, State, RECORD_MAGIC, RECORD_VERSION,
};
pub use table::{IdSpace, SessionTable};
