//! `claw-agent echo`: each DATA message comes back as one DATA message.

use super::{Agent, Export, OpenInfo, Orphan, Outbox, SessionId};

/// `echo`: each DATA message comes back as one DATA message.
///
/// An echo session holds no state, but it outlives a link that ends without a CLOSE for it like
/// any other (the listener's daemon grace): a REOPEN re-binds it, and the echoes the SDK was
/// holding for it (the old daemon had PAUSEd it) are sent on the new link.
///
/// It moves to another node (ClawRoam): its links say HELLO version 2 and it exports every
/// session with an empty state (one empty STATE; echoes the SDK was holding go out before it and
/// move with the session's replay ring).
pub struct EchoAgent;

impl Agent for EchoAgent {
    fn movable() -> bool {
        true
    }

    fn export(&mut self, _s: SessionId) -> Export {
        Export::State(Vec::new())
    }

    fn data(&mut self, s: SessionId, bytes: &[u8], out: &Outbox) {
        let _ = out.data(s, bytes);
    }

    fn orphan(&mut self, _s: SessionId) -> Option<Orphan> {
        Some(Orphan::new((), |()| {}))
    }

    fn rebind(&mut self, _s: SessionId, _info: &OpenInfo, _orphan: Orphan, _out: &Outbox) {
        // Nothing to take back: the session simply goes on here.
    }
}

#[cfg(test)]
mod tests {
    //! An echo session outlives its link for the daemon grace, with the echoes the SDK held.
    use super::*;
    use crate::testutil::*;
    use clawterm_core::podlink::Msg;
    use std::time::Duration;

    #[test]
    fn an_echo_session_is_re_bound_with_the_echoes_held_for_it() {
        let _g = serial();
        let pod = Pod::start(Duration::from_secs(60), || EchoAgent);
        let mut d = pod.connect();
        d.open(3);
        d.open(4);
        d.send(3, &Msg::Pause);
        d.input(3, "held-1 ");
        d.input(3, "held-2");
        // Messages are dispatched in order: once 4's echo is back, 3's are held.
        d.input(4, "probe");
        d.wait_for(4, "probe");
        assert_eq!(d.text(3), "");
        d.drop_link();
        pod.wait_orphans(2);

        let mut d = pod.connect();
        d.reopen(3);
        d.input(3, " after");
        d.wait_for(3, "after");
        assert_eq!(d.text(3), "held-1 held-2 after", "held echoes first, once");
        assert_eq!(pod.orphans(), 1);
        // An OPEN of the other kept one: a new session (nothing held comes back).
        d.open(4);
        d.input(4, "fresh");
        d.wait_for(4, "fresh");
        assert_eq!(d.text(4), "fresh");
        assert_eq!(pod.orphans(), 0);
        d.drop_link();
        pod.stop();
    }

    #[test]
    fn without_a_daemon_grace_the_held_echoes_end_with_the_link() {
        let _g = serial();
        let pod = Pod::start(Duration::ZERO, || EchoAgent);
        let mut d = pod.connect();
        d.open(3);
        d.send(3, &Msg::Pause);
        d.input(3, "held");
        d.open(4);
        d.input(4, "probe");
        d.wait_for(4, "probe");
        d.drop_link();
        let mut d = pod.connect();
        d.reopen(3);
        d.input(3, "new");
        d.wait_for(3, "new");
        assert_eq!(d.text(3), "new");
        assert_eq!(pod.orphans(), 0);
        d.drop_link();
        pod.stop();
    }
}
