//! `claw-agent echo`: each DATA message comes back as one DATA message.

use super::{Agent, Outbox, SessionId};

/// `echo`: each DATA message comes back as one DATA message.
pub struct EchoAgent;

impl Agent for EchoAgent {
    fn data(&mut self, s: SessionId, bytes: &[u8], out: &Outbox) {
        let _ = out.data(s, bytes);
    }
}
