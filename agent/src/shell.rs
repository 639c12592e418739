//! `claw-agent shell`: a login shell in a PTY per session (80x24 until the client says
//! otherwise). RESIZE sets the window size; PAUSE stops reading the terminal (the program
//! waits, nothing is lost); the shell keeps running while the client is away. The shell's exit
//! closes the session; closing the session hangs up its terminal (SIGHUP to every process of
//! the terminal's session, then SIGKILL after 2 s).
//!
//! A session outlives its link if the link ends without a CLOSE for it (the daemon exited or
//! crashed) and the listener has a daemon grace: the shell keeps running, its output waits in
//! its terminal (unread: once the terminal is full the shell blocks), and a REOPEN of the
//! session on any link of the listener within the grace continues it there, same shell, its
//! output in order; otherwise it is hung up as by a CLOSE when the grace ends.
//!
//! No thread per session: the sessions of a link share one event loop thread (`ptyloop.rs`),
//! which waits (epoll) on every session's PTY master and on a pidfd per shell, so a session
//! costs two descriptors in the agent and no thread. Shells are started with `posix_spawn`
//! ([`PtyCommand`]), not `fork()`, so starting one doesn't copy the agent's page tables.

use super::pty::PtyCommand;
use super::ptyloop::{Io, LoopSessions, NewSession};
use super::{input_queue, Agent, CloseReason, OpenInfo, Orphan, Outbox, SessionId};
use std::path::PathBuf;
use std::sync::Arc;

/// Initial window size of a session's terminal (until the first RESIZE).
const SHELL_COLS: u16 = 80;
const SHELL_ROWS: u16 = 24;

/// The shell to run: `--shell`, else $SHELL, else /bin/sh.
pub fn shell_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| {
        std::env::var_os("SHELL")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| PathBuf::from("/bin/sh"))
}

/// `shell`: a login shell in a PTY per session.
///
/// Its sessions cannot move to another node (ClawRoam): a running process cannot be put into
/// STATE, so its links keep HELLO version 1 ([`Agent::movable`](crate::Agent::movable) is
/// `false`) and a move happens only when the operator forces it, restarting the program on the
/// target. See the crate docs, "Empty state, and cannot export".
pub struct ShellAgent {
    shell: Arc<PathBuf>,
    /// The link's event loop and each session's place in it.
    sessions: LoopSessions,
}

impl ShellAgent {
    /// An agent that starts `shell` as a login shell in a PTY for each session.
    pub fn new(shell: Arc<PathBuf>) -> ShellAgent {
        ShellAgent {
            shell,
            sessions: LoopSessions::default(),
        }
    }

    fn spawn(&mut self, s: SessionId, info: &OpenInfo, out: &Outbox) -> std::io::Result<()> {
        let shell = &*self.shell;
        let name = shell
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "sh".to_owned());
        let mut cmd = PtyCommand::new(shell);
        cmd.arg0(format!("-{name}")) // a login shell
            .env("CLAW_TENANT", info.tenant.to_string())
            .env("CLAW_AGENT", info.agent.to_string())
            .env("CLAW_SESSION", s.to_string())
            .env("CLAW_PEER", &info.peer);
        if std::env::var_os("TERM").is_none() {
            cmd.env("TERM", "xterm-256color");
        }
        let lp = self.sessions.start_loop(out)?;
        let child = cmd.spawn(SHELL_COLS, SHELL_ROWS)?;
        let pid = child.pid;
        let (tx, rx) = input_queue(s, out);
        let key = lp.add(NewSession {
            s,
            io: Io::Pty(child.master),
            pid,
            input: rx,
        })?;
        tracing::debug!(session = s, pid, reopen = info.reopen, "shell: started");
        self.sessions.insert(s, key, tx);
        Ok(())
    }
}

impl Agent for ShellAgent {
    fn open(&mut self, s: SessionId, info: &OpenInfo, out: &Outbox) {
        self.sessions.forget_finished();
        self.sessions.end(s);
        if let Err(e) = self.spawn(s, info, out) {
            tracing::warn!(session = s, error = %e, "shell: cannot start the shell");
            let msg = format!("claw-agent: cannot run {}: {e}\r\n", self.shell.display());
            let _ = out.data(s, msg.as_bytes());
            let _ = out.close(s, CloseReason::Error);
        }
    }

    fn data(&mut self, s: SessionId, bytes: &[u8], _out: &Outbox) {
        self.sessions.input(s, bytes);
    }

    fn resize(&mut self, s: SessionId, cols: u16, rows: u16, _out: &Outbox) {
        self.sessions.resize(s, cols, rows);
    }

    fn pause(&mut self, s: SessionId, _out: &Outbox) {
        self.sessions.pause(s, true);
    }

    fn resume_output(&mut self, s: SessionId, _out: &Outbox) {
        self.sessions.pause(s, false);
    }

    fn close(&mut self, s: SessionId, _reason: CloseReason, _out: &Outbox) {
        self.sessions.end(s);
        self.sessions.forget_finished();
    }

    fn orphan(&mut self, s: SessionId) -> Option<Orphan> {
        self.sessions.orphan(s)
    }

    fn rebind(&mut self, s: SessionId, info: &OpenInfo, orphan: Orphan, out: &Outbox) {
        self.sessions.forget_finished();
        self.sessions.end(s);
        match self.sessions.rebind(s, orphan, out) {
            Ok(true) => tracing::debug!(session = s, "shell: re-bound to a new link"),
            Ok(false) => {
                tracing::debug!(
                    session = s,
                    "shell: the kept session is gone; starting afresh"
                );
                self.open(s, info, out);
            }
            Err(e) => {
                tracing::warn!(session = s, error = %e, "shell: cannot re-bind the session");
                let _ = out.close(s, CloseReason::Error);
            }
        }
    }

    fn link_closed(&mut self, _out: &Outbox) {
        self.sessions.link_closed();
    }
}

#[cfg(test)]
mod tests {
    //! The event loop with real PTYs and shells, over a `UnixStream::pair()` link: many
    //! sessions on one loop thread, exit, resize, PAUSE/CONTINUE, kill, and what a session
    //! costs in descriptors and threads. These tests count process-wide resources (loop
    //! threads, PTY masters, pidfds), so they run one at a time.
    use super::*;
    use clawterm_core::podlink::Msg;
    use std::time::{Duration, Instant};

    use crate::testutil::*;

    #[test]
    fn many_sessions_share_one_loop_thread_and_two_descriptors_each() {
        let _g = serial();
        let base = loop_threads_ptys_pidfds();
        let mut d = Daemon::start(ShellAgent::new(Arc::new(PathBuf::from("/bin/sh"))));
        const N: u32 = 40;
        for sid in 1..=N {
            d.open(sid);
            d.input(sid, &format!("echo ready-$(({sid}*1000+7))\n"));
        }
        for sid in 1..=N {
            d.wait_for(sid, &format!("ready-{}", sid * 1000 + 7));
        }
        // One loop thread for the link, one master and one pidfd per session.
        let (threads, ptys, pidfds) = loop_threads_ptys_pidfds();
        assert_eq!(threads, base.0 + 1, "one loop thread per link");
        assert_eq!(ptys, base.1 + N as usize, "one PTY master per session");
        assert_eq!(pidfds, base.2 + N as usize, "one pidfd per session");
        // Each session got only its own output.
        for sid in 1..=N {
            let other = format!("ready-{}", (sid % N + 1) * 1000 + 7);
            assert!(!d.text(sid).contains(&other), "{sid}: {:?}", d.text(sid));
        }
        // Half exit by themselves, half are closed by the daemon: nothing is left behind.
        for sid in 1..=N {
            if sid % 2 == 0 {
                d.input(sid, "exit\n");
            } else {
                d.send(sid, &Msg::Close(CloseReason::ClientDisconnect));
            }
        }
        for sid in (2..=N).step_by(2) {
            assert_eq!(d.wait_close(sid), CloseReason::Normal);
        }
        settle((base.0 + 1, base.1, base.2));
        assert_eq!(d.after_close, 0, "DATA after CLOSE");
        for sid in (1..=N).step_by(2) {
            assert!(
                !d.closed.contains_key(&sid),
                "CLOSE for a daemon-closed session"
            );
        }
        // The link's end ends the loop thread.
        d.end();
        settle(base);
    }

    #[test]
    fn exit_closes_after_the_output_and_the_id_can_be_reused() {
        let _g = serial();
        let mut d = Daemon::start(ShellAgent::new(Arc::new(PathBuf::from("/bin/sh"))));
        d.open(1);
        d.input(1, "echo bye-$((2+3)); exit 3\n");
        assert_eq!(d.wait_close(1), CloseReason::Normal);
        assert!(d.text(1).contains("bye-5"), "{:?}", d.text(1));
        d.closed.clear();
        d.out.clear();
        d.open(1);
        d.input(1, "echo again-$((4+4))\n");
        d.wait_for(1, "again-8");
        assert!(d.closed.is_empty());
        d.end();
    }

    #[test]
    fn resize_reaches_the_terminal() {
        let _g = serial();
        let mut d = Daemon::start(ShellAgent::new(Arc::new(PathBuf::from("/bin/sh"))));
        d.open(1);
        d.input(1, "stty size; echo s-$((1+1))\n");
        d.wait_for(1, "s-2");
        assert!(d.text(1).contains("24 80"), "{:?}", d.text(1));
        d.send(
            1,
            &Msg::Resize {
                cols: 132,
                rows: 43,
            },
        );
        d.input(1, "stty size; echo t-$((2+2))\n");
        d.wait_for(1, "t-4");
        assert!(d.text(1).contains("43 132"), "{:?}", d.text(1));
        d.end();
    }

    /// PAUSE: the loop stops reading that terminal (the program blocks, nothing is lost, the
    /// other sessions go on); CONTINUE: the rest comes, in order, then the exit's CLOSE.
    #[test]
    fn pause_holds_one_session_back_without_loss_and_without_stalling_others() {
        let _g = serial();
        let mut d = Daemon::start(ShellAgent::new(Arc::new(PathBuf::from("/bin/sh"))));
        d.open(1);
        d.open(2);
        d.input(1, "echo a-$((1+1))\n");
        d.wait_for(1, "a-2");
        d.send(1, &Msg::Pause);
        d.pump(Duration::from_millis(100));
        let before = d.out.get(&1).map_or(0, |v| v.len());
        d.input(1, "seq 1 20000; echo done-$((3+3)); exit\n");
        // Session 2 answers while 1 is paused with far more output than a terminal holds.
        d.input(2, "echo b-$((2+2))\n");
        d.wait_for(2, "b-4");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(500) {
            d.pump(Duration::from_millis(20));
        }
        assert_eq!(
            d.out.get(&1).map_or(0, |v| v.len()),
            before,
            "DATA sent while paused"
        );
        assert!(d.closed.is_empty(), "CLOSE while paused");
        d.send(1, &Msg::Continue);
        assert_eq!(d.wait_close(1), CloseReason::Normal);
        let text = d.text(1);
        let nums: Vec<u32> = text
            .split("\r\n")
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        let want: Vec<u32> = (1..=20000).collect();
        assert!(nums.ends_with(&want), "every number, in order");
        assert!(text.contains("done-6"));
        d.end();
    }

    /// A job that ignores SIGHUP is SIGKILLed after the grace period; the shell and a plain
    /// background job go at once.
    #[test]
    fn close_hangs_up_the_session_and_kills_what_ignores_it() {
        let _g = serial();
        let base = loop_threads_ptys_pidfds();
        let mut d = Daemon::start(ShellAgent::new(Arc::new(PathBuf::from("/bin/sh"))));
        d.open(1);
        d.input(
            1,
            "sh -c 'trap \"\" HUP; exec sleep 1000' & echo pid=$! end-$((5+6))\n",
        );
        d.wait_for(1, "end-11");
        let text = d.text(1);
        // (The typed line echoes `pid=$!`; the shell's output has the number.)
        let pid: i32 = text
            .split("pid=")
            .skip(1)
            .find_map(|r| r.split_whitespace().next().and_then(|p| p.parse().ok()))
            .expect("the job's pid");
        let alive = |p: i32| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
        };
        assert!(alive(pid));
        let t0 = Instant::now();
        d.send(1, &Msg::Close(CloseReason::ClientDisconnect));
        while alive(pid) {
            assert!(t0.elapsed() < Duration::from_secs(6), "job {pid} survived");
            d.pump(Duration::from_millis(50));
        }
        assert!(
            t0.elapsed() >= KILL_GRACE_FOR_TEST,
            "killed before the grace period: {:?}",
            t0.elapsed()
        );
        assert!(d.closed.is_empty());
        settle((base.0 + 1, base.1, base.2));
        d.end();
        settle(base);
    }

    const KILL_GRACE_FOR_TEST: Duration = Duration::from_millis(1900);

    /// Input for a program that doesn't read its terminal waits in the queue (PAUSEing the
    /// session's input) without blocking the loop for the other sessions.
    #[test]
    fn input_to_a_program_that_does_not_read_does_not_block_the_loop() {
        let _g = serial();
        let mut d = Daemon::start(ShellAgent::new(Arc::new(PathBuf::from("/bin/sh"))));
        d.open(1);
        d.open(2);
        d.input(1, "sleep 30\n");
        std::thread::sleep(Duration::from_millis(200));
        let pad = format!("#{}\n", "x".repeat(99)).repeat(4000); // 400 KB
        d.input(1, &pad);
        d.input(2, "echo quick-$((6+6))\n");
        d.wait_for(2, "quick-12");
        let t0 = Instant::now();
        while d.input_pauses.get(&1).copied().unwrap_or(0) == 0 {
            assert!(t0.elapsed() < T, "no input PAUSE for the stuck session");
            d.pump(Duration::from_millis(20));
        }
        d.send(1, &Msg::Close(CloseReason::ClientDisconnect));
        d.input(2, "echo still-$((7+7))\n");
        d.wait_for(2, "still-14");
        d.end();
    }

    // -----------------------------------------------------------------------------------------
    // Daemon restarts: a session outlives its link for the listener's daemon grace.

    fn sh_pod(grace: Duration) -> Pod {
        Pod::start(grace, || {
            ShellAgent::new(Arc::new(PathBuf::from("/bin/sh")))
        })
    }

    /// The daemon goes away while a command waits; the command then writes, with no link to
    /// read it (more than the terminal holds: the shell blocks); a new link's REOPEN gets every
    /// line written meanwhile, once, in order, and talks to the same shell.
    #[test]
    fn a_shell_outlives_its_link_and_a_reopen_gets_its_output_exactly_once() {
        let _g = serial();
        let pod = sh_pod(Duration::from_secs(60));
        let (go, mid) = (pod.dir.join("go"), pod.dir.join("mid"));
        let mut d = pod.connect();
        d.open(5);
        let pid = d.shell_pid(5);
        d.input(
            5,
            &format!(
                "echo armed-$((3+4)); while [ ! -e {go} ]; do sleep 0.05; done; \
                 seq 1 300; : > {mid}; seq 1 30000; echo tail-$((6*7))\n",
                go = go.display(),
                mid = mid.display()
            ),
        );
        d.wait_for(5, "armed-7");
        // Everything so far came on the first link; now the daemon goes away.
        d.drop_link();
        pod.wait_orphans(1);
        assert!(alive(pid), "the shell was ended with the link");
        std::fs::write(&go, b"").unwrap();
        // The shell writes with no link: the first 300 lines fit in its terminal (it goes on
        // to `mid`), the 30,000 lines after them do not (it blocks, nothing is lost).
        wait_until("the shell wrote while orphaned", || mid.exists());
        assert!(alive(pid));

        let mut d = pod.connect();
        d.reopen(5);
        d.wait_for(5, "tail-42");
        assert_eq!(pod.orphans(), 0, "re-bound");
        let text = d.text(5);
        assert!(
            !text.contains("armed"),
            "output of the old link again: {text:?}"
        );
        let want: Vec<u32> = (1..=300).chain(1..=30000).collect();
        assert!(numbers(&text) == want, "every line once, in order");
        // Same shell, and input from the new link reaches it.
        assert_eq!(d.shell_pid(5), pid);
        d.input(5, "exit\n");
        assert_eq!(d.wait_close(5), CloseReason::Normal);
        assert_eq!(d.after_close, 0);
        d.drop_link();
        pod.stop();
    }

    /// No REOPEN within the grace: the kept shell is hung up (with its jobs) as by a CLOSE; a
    /// REOPEN after that starts a new shell.
    #[test]
    fn an_orphan_is_hung_up_when_the_grace_ends_and_a_late_reopen_starts_afresh() {
        let _g = serial();
        let pod = sh_pod(Duration::from_millis(1500));
        let mut d = pod.connect();
        d.open(5);
        let pid = d.shell_pid(5);
        d.input(5, "sleep 1000 & echo bg=$! bg-end-$((1+2))\n");
        let text = d.wait_for_from(5, 0, "bg-end-3");
        let bg = number_after(&text, "bg=").expect("the job's pid");
        d.drop_link();
        pod.wait_orphans(1);
        let was_alive = alive(pid) && alive(bg);
        if pod.orphans() == 1 {
            // Still kept after the check: nothing had ended it yet.
            assert!(was_alive, "ended before the grace");
        }
        pod.wait_orphans(0);
        wait_dead(pid);
        wait_dead(bg);
        let mut d = pod.connect();
        d.reopen(5);
        let again = d.shell_pid(5);
        assert_ne!(again, pid, "a new shell");
        d.drop_link();
        pod.stop();
    }

    /// A REOPEN of a session the pod does not know opens a new one (as after a pod restart);
    /// an OPEN of a kept one (the daemon lost it) ends the kept shell and opens afresh.
    #[test]
    fn a_reopen_of_an_unknown_session_and_an_open_of_a_kept_one_start_afresh() {
        let _g = serial();
        let pod = sh_pod(Duration::from_secs(60));
        let mut d = pod.connect();
        d.open(5);
        let pid = d.shell_pid(5);
        d.drop_link();
        pod.wait_orphans(1);
        let mut d = pod.connect();
        d.reopen(9);
        let other = d.shell_pid(9);
        assert_ne!(other, pid);
        assert_eq!(pod.orphans(), 1, "5 still kept");
        d.open(5);
        let fresh = d.shell_pid(5);
        assert_ne!(fresh, pid);
        assert_eq!(pod.orphans(), 0);
        wait_dead(pid);
        d.drop_link();
        pod.stop();
    }

    /// `--daemon-grace 0`: the link's end ends its shells, as before; a REOPEN starts afresh.
    #[test]
    fn without_a_daemon_grace_the_links_end_ends_its_shells() {
        let _g = serial();
        let pod = sh_pod(Duration::ZERO);
        let mut d = pod.connect();
        d.open(5);
        let pid = d.shell_pid(5);
        d.drop_link();
        wait_dead(pid);
        assert_eq!(pod.orphans(), 0);
        let mut d = pod.connect();
        d.reopen(5);
        assert_ne!(d.shell_pid(5), pid);
        d.drop_link();
        pod.stop();
    }
}
