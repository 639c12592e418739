//! `claw-agent exec -- CMD...`: one process per session, on pipes (no PTY). Session input is
//! its stdin (through a bounded [`input_queue`](super::input_queue)), its stdout and stderr
//! both come back as DATA, its exit closes the session; closing the session kills its process
//! group (SIGTERM, then SIGKILL after 2 s).

use super::{input_queue, Agent, CloseReason, InputSender, OpenInfo, Outbox, SessionId};
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `exec`: one process per session, on pipes.
pub struct ExecAgent {
    argv: Arc<Vec<OsString>>,
    procs: HashMap<SessionId, Proc>,
}

struct Proc {
    stdin: InputSender,
    pgid: libc::pid_t,
    exited: Arc<AtomicBool>,
}

impl Proc {
    /// SIGTERM the process group now, SIGKILL it 2 s later if the process is still running.
    fn kill(self) {
        drop(self.stdin);
        // SAFETY: plain syscalls; errors (ESRCH: already gone) are ignored.
        unsafe { libc::killpg(self.pgid, libc::SIGTERM) };
        if self.exited.load(Ordering::SeqCst) {
            return;
        }
        let (pgid, exited) = (self.pgid, self.exited);
        let _ = std::thread::Builder::new()
            .name("claw-agent-kill".into())
            .spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(2);
                while Instant::now() < deadline {
                    if exited.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                // SAFETY: as above.
                unsafe { libc::killpg(pgid, libc::SIGKILL) };
            });
    }
}

impl ExecAgent {
    /// An agent that runs `argv` (the command and its arguments) once per session.
    pub fn new(argv: Arc<Vec<OsString>>) -> ExecAgent {
        ExecAgent {
            argv,
            procs: HashMap::new(),
        }
    }

    fn spawn(&self, s: SessionId, info: &OpenInfo, out: &Outbox) -> std::io::Result<Proc> {
        use std::os::unix::process::CommandExt;
        let Some((cmd, args)) = self.argv.split_first() else {
            return Err(std::io::Error::other("no command given"));
        };
        let mut child = Command::new(cmd)
            .args(args)
            .env("CLAW_TENANT", info.tenant.to_string())
            .env("CLAW_AGENT", info.agent.to_string())
            .env("CLAW_SESSION", s.to_string())
            .env("CLAW_PEER", &info.peer)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()?;
        let pgid = child.id() as libc::pid_t;
        let exited = Arc::new(AtomicBool::new(false));

        // stdin: fed from DATA by its own thread, so a process that doesn't read can't stall
        // the link. The queue is bounded: past INPUT_HIGH bytes the session's input is PAUSEd
        // (the daemon stops reading that client) until the process has read it down.
        let (tx, rx) = input_queue(s, out);
        if let Some(mut stdin) = child.stdin.take() {
            std::thread::Builder::new()
                .name(format!("exec-{s}-stdin"))
                .spawn(move || {
                    while let Some(chunk) = rx.recv() {
                        let written = stdin.write_all(&chunk);
                        rx.done(chunk.len());
                        if written.is_err() {
                            break;
                        }
                    }
                })?;
        }

        // stdout and stderr: both sent as DATA; reading waits while the session is paused.
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        ];
        for (i, pipe) in pipes.into_iter().enumerate() {
            let Some(mut pipe) = pipe else { continue };
            let (out, done) = (out.clone(), done_tx.clone());
            std::thread::Builder::new()
                .name(format!("exec-{s}-out{i}"))
                .spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while out.wait_sendable(s) {
                        match pipe.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if out.data(s, &buf[..n]).is_err() {
                                    break;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                    drop(done);
                })?;
        }
        drop(done_tx);

        // The process's exit closes the session, after its output (give the pipes up to 2 s
        // to drain, in case a leftover child keeps them open).
        let (out, exited2) = (out.clone(), Arc::clone(&exited));
        std::thread::Builder::new()
            .name(format!("exec-{s}-wait"))
            .spawn(move || {
                let status = child.wait();
                exited2.store(true, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(2);
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    done_rx.recv_deadline(deadline)
                {
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                tracing::debug!(session = s, ?status, "exec: process exited");
                let _ = out.close(s, CloseReason::Normal);
            })?;

        Ok(Proc {
            stdin: tx,
            pgid,
            exited,
        })
    }
}

impl Agent for ExecAgent {
    fn open(&mut self, s: SessionId, info: &OpenInfo, out: &Outbox) {
        // Forget sessions whose process has exited (their CLOSE has been sent).
        self.procs.retain(|_, p| !p.exited.load(Ordering::SeqCst));
        if let Some(old) = self.procs.remove(&s) {
            old.kill();
        }
        match self.spawn(s, info, out) {
            Ok(p) => {
                self.procs.insert(s, p);
            }
            Err(e) => {
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
    }

    fn data(&mut self, s: SessionId, bytes: &[u8], _out: &Outbox) {
        if let Some(p) = self.procs.get_mut(&s) {
            p.stdin.push(bytes);
        }
    }

    fn close(&mut self, s: SessionId, _reason: CloseReason, _out: &Outbox) {
        if let Some(p) = self.procs.remove(&s) {
            p.kill();
        }
    }

    fn link_closed(&mut self, _out: &Outbox) {
        for (_, p) in self.procs.drain() {
            p.kill();
        }
    }
}
