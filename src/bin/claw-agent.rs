//! `claw-agent`: the reference agent pod. Listens on `DIR/TENANT_AGENT` and serves any number
//! of `clawtermd` links (see `docs/POD-LINK.md`).
//!
//! The modes are agents of the SDK (`clawterm_agent::{EchoAgent, ExecAgent, ShellAgent}`);
//! this binary only parses the command line and serves the chosen one.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use clawterm_agent::{shell_path, AgentListener, EchoAgent, ExecAgent, ShellAgent};

/// The reference ClawTerm agent pod.
///
/// Listens on the AF_UNIX socket DIR/TENANT_AGENT and serves any number of clawtermd links,
/// each multiplexing many sessions. A stale socket file there (one no process listens on) is
/// replaced; if another agent is listening there, claw-agent refuses to start. The socket file
/// is removed on exit (SIGTERM or SIGINT: exit status 0).
///
/// Sessions outlive clawtermd: when a link ends without a CLOSE for a session (the daemon
/// exited or crashed), the session is kept (see --daemon-grace) for the restarted daemon's
/// REOPEN, on any link.
///
/// Logs go to stderr (RUST_LOG, default `info`); once listening, one line
/// `claw-agent listening on PATH (mode MODE)` is printed on stdout.
#[derive(Parser, Debug)]
#[command(
    name = "claw-agent",
    version,
    verbatim_doc_comment,
    after_help = "Examples:\n  claw-agent -s /tmp/claw --tenant 1 --agent 7 echo\n  claw-agent --tenant 1 --agent 7 shell\n  claw-agent --tenant 1 --agent 7 exec -- python3 -u bot.py"
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

    /// Seconds a session outlives its link for a restarted daemon's REOPEN (0: not at all).
    ///
    /// When a link ends without a CLOSE for a session (the daemon exited or crashed), the
    /// session is kept this long; with 0 it ends with the link, as a CLOSE would end it.
    /// Meanwhile the session's program keeps running but its output is not read (once its
    /// terminal or pipe is full it blocks: nothing is lost). A REOPEN of its SESSION_ID on any
    /// link (the restarted daemon's) continues it: the same process, the output it wrote
    /// meanwhile first, in order, exactly once, and the link's input goes to it. An OPEN of
    /// that SESSION_ID ends it and starts afresh. When the grace ends, the session ends as a
    /// CLOSE would end it (shell: hang-up, SIGKILL 2 s later; exec: SIGTERM, then SIGKILL);
    /// a later REOPEN starts afresh.
    #[arg(
        long = "daemon-grace",
        value_name = "SECS",
        verbatim_doc_comment,
        default_value_t = clawterm_agent::DEFAULT_DAEMON_GRACE.as_secs()
    )]
    daemon_grace: u64,

    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Return each DATA message as one DATA message with the same bytes.
    Echo,
    /// A login shell in a PTY per session.
    ///
    /// Each session gets its own terminal (80x24 until the client says otherwise) running a
    /// login shell. RESIZE sets the window size; PAUSE stops reading the terminal (so the
    /// program waits, nothing is lost); the shell keeps running while the client is away. The
    /// shell's exit closes the session; closing the session hangs up its terminal (SIGHUP to
    /// every process of the terminal's session, then SIGKILL after 2 s). Input for a program
    /// that is not reading its terminal waits in a bounded queue: past 256 KiB the session's
    /// input is paused (the daemon stops reading that client) until the program catches up.
    ///
    /// The shell gets CLAW_TENANT, CLAW_AGENT, CLAW_SESSION and CLAW_PEER in its environment,
    /// and TERM=xterm-256color unless TERM is set.
    ///
    /// Example: claw-agent --tenant 1 --agent 7 shell --shell /bin/bash
    Shell {
        /// Shell to run (default: $SHELL, then /bin/sh).
        #[arg(long, value_name = "PATH")]
        shell: Option<PathBuf>,
    },
    /// Run CMD once per session, on pipes (no PTY).
    ///
    /// Session input is the process's stdin; its stdout and stderr are both sent back; its exit
    /// closes the session. Closing the session kills the process group (SIGTERM, then SIGKILL
    /// after 2 s). Input for a process that is not reading its stdin waits in a bounded
    /// queue: past 256 KiB the session's input is paused until the process catches up.
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
        Mode::Shell { .. } => "shell",
    };

    let stop = clawterm_agent::stop_on_signals();

    let listener = match AgentListener::bind(&cli.socket_dir, cli.tenant, cli.agent) {
        Ok(l) => l.daemon_grace(Duration::from_secs(cli.daemon_grace)),
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
    tracing::info!(
        path = %listener.path().display(),
        mode = mode_name,
        daemon_grace_s = cli.daemon_grace,
        "listening"
    );

    let served = match cli.mode {
        Mode::Echo => listener.serve(|| EchoAgent, Arc::clone(&stop)),
        Mode::Exec { command } => {
            let argv = Arc::new(command);
            listener.serve(move || ExecAgent::new(Arc::clone(&argv)), Arc::clone(&stop))
        }
        Mode::Shell { shell } => {
            let shell = Arc::new(shell_path(shell));
            tracing::info!(shell = %shell.display(), "shell mode");
            listener.serve(
                move || ShellAgent::new(Arc::clone(&shell)),
                Arc::clone(&stop),
            )
        }
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
