//! A complete agent pod in one page: it upper-cases whatever each session sends.
//!
//! Run it next to a `clawtermd` that uses the same socket directory:
//!
//! ```text
//! cargo run --example upper_agent -- /run/claw/sockets 1 7
//! #                                   DIR               TENANT AGENT
//! ```
//!
//! It listens on `DIR/1_7` until Ctrl-C; then `clawterm connect HOST --tenant 1 --agent 7 ...`
//! talks to it. Copy this file to start your own agent: implement [`Agent::data`] (and the other
//! methods you need), reply through the [`Outbox`].

use clawterm_agent::{Agent, AgentListener, OpenInfo, Outbox, SessionId};

/// One per pod link; sees every session on that link.
struct Upper;

impl Agent for Upper {
    fn open(&mut self, s: SessionId, info: &OpenInfo, out: &Outbox) {
        let hello = format!("upper agent: session {s} from {}\r\n", info.peer);
        let _ = out.data(s, hello.as_bytes());
    }

    fn data(&mut self, s: SessionId, bytes: &[u8], out: &Outbox) {
        let _ = out.data(s, &bytes.to_ascii_uppercase());
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "/run/claw/sockets".into());
    let tenant: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let agent: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);

    let listener = AgentListener::bind(dir.as_ref(), tenant, agent)?;
    println!("upper agent listening on {}", listener.path().display());

    // Ctrl-C / SIGTERM stops it; dropping the listener then removes the socket file.
    listener.serve(|| Upper, clawterm_agent::stop_on_signals())
}
