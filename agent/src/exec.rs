//! `claw-agent exec -- CMD...`: one process per session, on pipes (no PTY). Session input is
//! its stdin (through a bounded [`input_queue`](super::input_queue)), its stdout and stderr
//! both come back as DATA, its exit closes the session; closing the session kills its process
//! group (SIGTERM, then SIGKILL after 2 s).
//!
//! Like [`ShellAgent`](super::ShellAgent), no thread per session: the sessions of a link share
//! the link's event loop (`ptyloop.rs`). A session costs the agent 3 descriptors: the process's
//! stdin, one pipe for its stdout and stderr (so their output keeps the order it was written
//! in), and a pidfd. The standard library starts the process with `posix_spawn` (no `pre_exec`
//! hook), so the agent is not forked.
//!
//! Like a shell session, an `exec` session outlives a link that ends without a CLOSE for it
//! for the listener's daemon grace: its pipe is not read meanwhile (the process blocks once it
//! is full), and a REOPEN continues it, same process, output in order.

use super::ptyloop::{Io, LoopSessions, NewSession};
use super::{input_queue, Agent, CloseReason, OpenInfo, Orphan, Outbox, SessionId};
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::Arc;

/// `exec`: one process per session, on pipes.
///
/// Its sessions cannot move to another node (ClawRoam): a running process cannot be put into
/// STATE, so its links keep HELLO version 1 ([`Agent::movable`](crate::Agent::movable) is
/// `false`) and a move happens only when the operator forces it, restarting the program on the
/// target. See the crate docs, "Empty state, and cannot export".
pub struct ExecAgent {
    argv: Arc<Vec<OsString>>,
    /// The link's event loop and each session's place in it.
    procs: LoopSessions,
}

impl ExecAgent {
    /// An agent that runs `argv` (the command and its arguments) once per session.
    pub fn new(argv: Arc<Vec<OsString>>) -> ExecAgent {
        ExecAgent {
            argv,
            procs: LoopSessions::default(),
        }
    }

    fn spawn(&mut self, s: SessionId, info: &OpenInfo, out: &Outbox) -> std::io::Result<()> {
        use std::os::unix::process::CommandExt;
        let Some((cmd, args)) = self.argv.split_first() else {
            return Err(std::io::Error::other("no command given"));
        };
        let lp = self.procs.start_loop(out)?;
        // stdout and stderr share one pipe (close-on-exec in the agent).
        let (output, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let w2 = w.try_clone()?;
        let mut command = Command::new(cmd);
        command
            .args(args)
            .env("CLAW_TENANT", info.tenant.to_string())
            .env("CLAW_AGENT", info.agent.to_string())
            .env("CLAW_SESSION", s.to_string())
            .env("CLAW_PEER", &info.peer)
            .stdin(Stdio::piped())
            .stdout(Stdio::from(w))
            .stderr(Stdio::from(w2))
            .process_group(0);
        let spawned = command.spawn();
        drop(command); // closes our copies of the pipe's write end
        let mut child = spawned?;
        let stdin = child.stdin.take().map(OwnedFd::from);
        let pid = child.id() as libc::pid_t;
        // The loop reaps it (dropping a `Child` neither waits nor kills).
        drop(child);
        let (tx, rx) = input_queue(s, out);
        let key = lp.add(NewSession {
            s,
            io: Io::Pipes { stdin, output },
            pid,
            input: rx,
        })?;
        self.procs.insert(s, key, tx);
        Ok(())
    }
}

impl Agent for ExecAgent {
    fn open(&mut self, s: SessionId, info: &OpenInfo, out: &Outbox) {
        self.procs.forget_finished();
        self.procs.end(s);
        if let Err(e) = self.spawn(s, info, out) {
            tracing::warn!(session = s, error = %e, "exec: cannot start the command");
            let msg = format!(
                "claw-agent: cannot run {:?}: {e}\r\n",
                self.argv
                    .first()
                    .map(|c| c.to_string_lossy())
                    .unwrap_or_default()
            );
            let _ = out.data(s, msg.as_bytes());
            let _ = out.close(s, CloseReason::Error);
        }
    }

    fn data(&mut self, s: SessionId, bytes: &[u8], _out: &Outbox) {
        self.procs.input(s, bytes);
    }

    fn pause(&mut self, s: SessionId, _out: &Outbox) {
        self.procs.pause(s, true);
    }

    fn resume_output(&mut self, s: SessionId, _out: &Outbox) {
        self.procs.pause(s, false);
    }

    fn close(&mut self, s: SessionId, _reason: CloseReason, _out: &Outbox) {
        self.procs.end(s);
        self.procs.forget_finished();
    }

    fn orphan(&mut self, s: SessionId) -> Option<Orphan> {
        self.procs.orphan(s)
    }

    fn rebind(&mut self, s: SessionId, info: &OpenInfo, orphan: Orphan, out: &Outbox) {
        self.procs.forget_finished();
        self.procs.end(s);
        match self.procs.rebind(s, orphan, out) {
            Ok(true) => tracing::debug!(session = s, "exec: re-bound to a new link"),
            Ok(false) => {
                tracing::debug!(
                    session = s,
                    "exec: the kept session is gone; starting afresh"
                );
                self.open(s, info, out);
            }
            Err(e) => {
                tracing::warn!(session = s, error = %e, "exec: cannot re-bind the session");
                let _ = out.close(s, CloseReason::Error);
            }
        }
    }

    fn link_closed(&mut self, _out: &Outbox) {
        self.procs.link_closed();
    }
}

#[cfg(test)]
mod tests {
    //! `exec` sessions on the link's event loop: no thread per session, 3 descriptors each,
    //! stdout and stderr in write order, exit, and SIGTERM then SIGKILL on close.
    use super::*;
    use crate::testutil::*;
    use clawterm_core::podlink::Msg;
    use std::time::{Duration, Instant};

    fn sh(script: &str) -> ExecAgent {
        ExecAgent::new(Arc::new(
            ["/bin/sh", "-c", script]
                .iter()
                .map(OsString::from)
                .collect(),
        ))
    }

    #[test]
    fn many_exec_sessions_share_one_loop_thread_and_three_descriptors_each() {
        let _g = serial();
        let base = loop_threads_ptys_pidfds();
        let base_pipes = pipes();
        let mut d = Daemon::start(sh(
            "echo out-$CLAW_SESSION; echo err-$CLAW_SESSION >&2; while read x; do echo got-$x; done",
        ));
        const N: u32 = 30;
        for sid in 1..=N {
            d.open(sid);
            d.input(sid, &format!("x{sid}\n"));
        }
        for sid in 1..=N {
            d.wait_for(sid, &format!("got-x{sid}"));
            let t = d.text(sid);
            let (o, e) = (format!("out-{sid}\n"), format!("err-{sid}\n"));
            assert!(t.contains(&o) && t.contains(&e), "{sid}: {t:?}");
            assert!(
                t.find(&o) < t.find(&e),
                "stdout before stderr, as written: {t:?}"
            );
        }
        let (threads, ptys, pidfds) = loop_threads_ptys_pidfds();
        assert_eq!(threads, base.0 + 1, "one loop thread per link");
        assert_eq!(ptys, base.1);
        assert_eq!(pidfds, base.2 + N as usize, "one pidfd per session");
        assert_eq!(
            pipes(),
            base_pipes + 2 * N as usize,
            "stdin and output per session"
        );
        // Closing the sessions ends the processes (SIGTERM to each group).
        for sid in 1..=N {
            d.send(sid, &Msg::Close(CloseReason::ClientDisconnect));
        }
        settle((base.0 + 1, base.1, base.2));
        assert_eq!(pipes(), base_pipes);
        d.end();
        settle(base);
    }

    #[test]
    fn exit_sends_the_output_then_close() {
        let _g = serial();
        let mut d = Daemon::start(sh("head -c 300000 /dev/zero | tr '\\0' x; echo; echo end"));
        d.open(1);
        assert_eq!(d.wait_close(1), CloseReason::Normal);
        let t = d.text(1);
        assert_eq!(t.matches('x').count(), 300000);
        assert!(
            t.ends_with("\nend\n"),
            "{:?}",
            &t[t.len().saturating_sub(20)..]
        );
        assert_eq!(d.after_close, 0);
        d.end();
    }

    #[test]
    fn close_terms_the_group_then_kills_what_ignores_it() {
        let _g = serial();
        let mut d = Daemon::start(sh("trap '' TERM; echo pid=$$; exec sleep 1000"));
        d.open(1);
        d.wait_for(1, "pid=");
        let pid: i32 = d
            .text(1)
            .split("pid=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .expect("the pid");
        let alive = |p: i32| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
        };
        let t0 = Instant::now();
        d.send(1, &Msg::Close(CloseReason::ClientDisconnect));
        while alive(pid) {
            assert!(t0.elapsed() < Duration::from_secs(6), "{pid} survived");
            d.pump(Duration::from_millis(50));
        }
        assert!(
            t0.elapsed() >= Duration::from_millis(1900),
            "SIGKILL before the grace period: {:?}",
            t0.elapsed()
        );
        assert!(d.closed.is_empty(), "CLOSE for a daemon-closed session");
        d.end();
    }

    /// The daemon goes away while the process waits, with 200 KB of input sent to it and not
    /// yet read (more than its stdin pipe holds); it then writes more than its output pipe
    /// holds, with no link to read it (it blocks); a new link's REOPEN gets all of it once, in
    /// order, the process reads every byte of the input, and talks to the new link.
    #[test]
    fn an_exec_session_outlives_its_link_with_its_output_and_its_unwritten_input() {
        let _g = serial();
        let dir =
            std::env::temp_dir().join(format!("claw-agent-exec-grace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (go, mid) = (dir.join("go"), dir.join("mid"));
        let script = format!(
            "echo pid=$$ ready; while [ ! -e {go} ]; do sleep 0.05; done; seq 1 20000; : > {mid}; \
             head -c 200000 | wc -c; while read l; do echo got-$l-$$; done",
            go = go.display(),
            mid = mid.display()
        );
        let pod = Pod::start(Duration::from_secs(60), move || sh(&script));
        let mut d = pod.connect();
        d.open(1);
        let text = d.wait_for_from(1, 0, "ready");
        let pid = number_after(&text, "pid=").expect("the pid");
        d.input(1, &"x".repeat(200_000));
        d.drop_link();
        pod.wait_orphans(1);
        assert!(alive(pid));
        std::fs::write(&go, b"").unwrap();
        // The process blocks on its full output pipe: it can't get to `mid` while orphaned.
        let mut d = pod.connect();
        d.reopen(1);
        d.wait_for(1, "200000");
        assert!(mid.exists());
        let text = d.text(1);
        assert!(!text.contains("ready"), "{text:?}");
        let want: Vec<u32> = (1..=20000).chain([200_000]).collect();
        assert!(
            numbers(&text) == want,
            "every line once, in order, then all the input"
        );
        d.input(1, "hello\n");
        d.wait_for(1, &format!("got-hello-{pid}"));
        d.send(1, &Msg::Close(CloseReason::ClientDisconnect));
        wait_dead(pid);
        d.drop_link();
        pod.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A process that exits while orphaned: its output and the CLOSE come on the new link.
    #[test]
    fn an_exec_session_that_ended_while_orphaned_closes_on_the_new_link_after_its_output() {
        let _g = serial();
        let dir = std::env::temp_dir().join(format!("claw-agent-exec-exit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let go = dir.join("go");
        let script = format!(
            "echo ready; while [ ! -e {go} ]; do sleep 0.05; done; echo bye-$((20+3))",
            go = go.display()
        );
        let pod = Pod::start(Duration::from_secs(60), move || sh(&script));
        let mut d = pod.connect();
        d.open(1);
        d.wait_for(1, "ready");
        d.drop_link();
        pod.wait_orphans(1);
        std::fs::write(&go, b"").unwrap();
        // The loop that keeps it reaps it; nothing is sent (there is no link).
        wait_until("the process has exited", || {
            loop_threads_ptys_pidfds().2 == 0
        });
        let mut d = pod.connect();
        d.reopen(1);
        assert_eq!(d.wait_close(1), CloseReason::Normal);
        assert_eq!(d.text(1), "bye-23\n");
        assert_eq!(d.after_close, 0);
        d.drop_link();
        pod.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
