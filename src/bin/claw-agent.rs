//! `claw-agent`: the reference agent pod. Listens on `DIR/TENANT_AGENT` and serves any number
//! of `clawtermd` links (see `docs/POD-LINK.md`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use clawterm::agent::{Agent, AgentListener, CloseReason, OpenInfo, Outbox, SessionId};
use crossbeam_channel::Sender;

/// The reference ClawTerm agent pod.
///
/// Listens on the AF_UNIX socket DIR/TENANT_AGENT and serves any number of clawtermd links,
/// each multiplexing many sessions. A stale socket file there (one no process listens on) is
/// replaced; if another agent is listening there, claw-agent refuses to start. The socket file
/// is removed on exit (SIGTERM or SIGINT: exit status 0).
///
/// Logs go to stderr (RUST_LOG, default `info`); once listening, one line
/// `claw-agent listening on PATH (mode MODE)` is printed on stdout.
#[derive(Parser, Debug)]
#[command(
    name = "claw-agent",
    version,
    verbatim_doc_comment,
    after_help = "Examples:\n  claw-agent -s /tmp/claw --tenant 1 --agent 7 echo\n  claw-agent --tenant 1 --agent 7 exec -- python3 -u bot.py"
)]
struct Cli {
    /// Directory holding the pod sockets (shared with clawtermd); created if missing.
    #[arg(
        short = 's',
        long = "socket-dir",
        value_name = "DIR",
        default_value = "/run/claw/sockets"
    )]
    socket_dir: PathBuf,

    /// Tenant id served (decimal u32).
    #[arg(long, value_name = "T")]
    tenant: u32,

    /// Agent id served (decimal u32).
    #[arg(long, value_name = "A")]
    agent: u32,

    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Return each DATA message as one DATA message with the same bytes.
    Echo,
    /// A login shell in a PTY per session (not implemented yet in this build).
    Shell {
        /// Shell to run (default: $SHELL, then /bin/sh).
        #[arg(long, value_name = "PATH")]
        shell: Option<PathBuf>,
    },
    /// Run CMD once per session, on pipes (no PTY).
    ///
    /// Session input is the process's stdin; its stdout and stderr are both sent back; its exit
    /// closes the session. Closing the session kills the process group (SIGTERM, then SIGKILL
    /// after 2 s).
    ///
    /// The process gets CLAW_TENANT, CLAW_AGENT, CLAW_SESSION and CLAW_PEER in its environment.
    ///
    /// Example: claw-agent --tenant 1 --agent 7 exec -- python3 -u bot.py
    Exec {
        /// The command and its arguments (put them after `--`).
        #[arg(
            value_name = "CMD",
            required = true,
            num_args = 1..,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        command: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let mode_name = match &cli.mode {
        Mode::Echo => "echo",
        Mode::Exec { .. } => "exec",
        Mode::Shell { .. } => {
            eprintln!("claw-agent: mode `shell` is not implemented yet in this build: use `echo` or `exec`");
            return ExitCode::from(2);
        }
    };

    let stop = clawterm::agent::stop_on_signals();

    let listener = match AgentListener::bind(&cli.socket_dir, cli.tenant, cli.agent) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("claw-agent: {e}");
            return ExitCode::from(1);
        }
    };
    println!(
        "claw-agent listening on {} (mode {mode_name})",
        listener.path().display()
    );
    let _ = std::io::stdout().flush();
    tracing::info!(path = %listener.path().display(), mode = mode_name, "listening");

    let served = match cli.mode {
        Mode::Echo => listener.serve(|| EchoAgent, Arc::clone(&stop)),
        Mode::Exec { command } => {
            let argv = Arc::new(command);
            listener.serve(move || ExecAgent::new(Arc::clone(&argv)), Arc::clone(&stop))
        }
        Mode::Shell { .. } => unreachable!("handled above"),
    };
    let path = listener.path().to_owned();
    drop(listener); // removes the socket file
    match served {
        Ok(()) => {
            tracing::info!(path = %path.display(), "stopped; socket removed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("claw-agent: {e}");
            ExitCode::from(1)
        }
    }
}

/// `echo`: each DATA message comes back as one DATA message.
struct EchoAgent;

impl Agent for EchoAgent {
    fn data(&mut self, s: SessionId, bytes: &[u8], out: &Outbox) {
        let _ = out.data(s, bytes);
    }
}

/// `exec`: one process per session, on pipes.
struct ExecAgent {
    argv: Arc<Vec<OsString>>,
    procs: HashMap<SessionId, Proc>,
}

struct Proc {
    stdin: Sender<Vec<u8>>,
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
    fn new(argv: Arc<Vec<OsString>>) -> ExecAgent {
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
        // the link.
        let (tx, rx) = crossbeam_channel::unbounded::<Vec<u8>>();
        if let Some(mut stdin) = child.stdin.take() {
            std::thread::Builder::new()
                .name(format!("exec-{s}-stdin"))
                .spawn(move || {
                    for chunk in rx {
                        if stdin.write_all(&chunk).is_err() {
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
        if let Some(p) = self.procs.get(&s) {
            let _ = p.stdin.send(bytes.to_vec());
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
