//! `clawterm`: the interactive ClawTerm client. Sessions survive network loss: the connection
//! is re-established by itself, output is replayed exactly once and typed input is delivered
//! after the reconnect.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use clawterm_client::creds::{unix_now, valid_name};
use clawterm_client::transport::parse_pin;
use clawterm_client::tty::{self, EscapeCmd, EscapeFilter, RawMode};
use clawterm_client::{
    ClientError, Credentials, Event, LocalState, Options, Session, StateRecord, Store, Target,
    TlsTrust, Transport,
};
use clawterm_poll as poll;

const DEFAULT_PORT: u16 = 7220;
const DEFAULT_QUIC_PORT: u16 = 7221;

/// The ClawTerm client: terminal sessions that survive network loss.
///
/// While connected, at the start of a line (after Enter):
///   ~.  detach: leave the session running on the server (resume it later)
///   ~X  end the session (the agent is told; it cannot be resumed)
///   ~~  send one '~'
///   ~?  this help
///
/// Transport: TLS 1.3 by default, trusting the system's CA roots; --ca FILE trusts the
/// certificates in FILE instead, --pin SHA256 accepts exactly the server certificate with that
/// SHA-256; --plaintext uses plain TCP (server run with --insecure-plaintext); --quic uses QUIC
/// (UDP, default port 7221): the connection then survives changes of this machine's address
/// without even a reconnect.
///
/// Exit status: 0 normal end or detach, 2 usage, 3 server unreachable, 4 authentication
/// failed, 5 session expired or unknown, 6 taken over by another device, 7 TLS failure
/// (certificate not trusted, pin mismatch, no TLS 1.3), 1 other errors.
#[derive(Parser, Debug)]
#[command(name = "clawterm", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Open a new interactive session and save its credentials under NAME.
    Connect {
        /// Server address, HOST[:PORT] (default port 7220; 7221 with --quic).
        endpoint: String,
        /// Tenant id.
        #[arg(long, value_name = "T")]
        tenant: u32,
        /// Agent id.
        #[arg(long, value_name = "A")]
        agent: u32,
        /// Tenant token, 64 hex digits.
        #[arg(
            long,
            value_name = "HEX",
            env = "CLAWTERM_TOKEN",
            hide_env_values = true
        )]
        token: Option<String>,
        /// File holding the token (first line with 64 hex digits).
        #[arg(long, value_name = "FILE", conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// Name to save the session under (default: its id in hex).
        #[arg(long)]
        name: Option<String>,
        /// Use plaintext TCP instead of TLS 1.3 (the server must run with --insecure-plaintext).
        #[arg(long, conflicts_with_all = ["ca", "pin", "quic"])]
        plaintext: bool,
        /// Use QUIC (UDP; TLS 1.3 inside) instead of TCP: the connection survives this
        /// machine changing address or network (connection migration).
        #[arg(long)]
        quic: bool,
        #[command(flatten)]
        trust: TrustArgs,
        /// Also append every byte received from the agent to FILE.
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
    },
    /// Reattach to a saved session (taking it over from any other device).
    Resume {
        name: String,
        /// Switch the saved session to QUIC (same trust), e.g. for a roaming device.
        #[arg(long, conflicts_with = "tcp")]
        quic: bool,
        /// Switch the saved session to TLS over TCP.
        #[arg(long)]
        tcp: bool,
        /// Replace the saved TLS trust (e.g. after the server's certificate changed).
        #[command(flatten)]
        trust: TrustArgs,
        /// Also append every byte received from the agent to FILE.
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
    },
    /// List saved sessions.
    List,
    /// Print a saved session as a one-line blob to import on another device (it holds the
    /// session's secret resume token: treat it like a password).
    Export { name: String },
    /// Save a session from an export blob.
    Import {
        blob: String,
        /// Name to save it under (default: the name in the blob).
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete a saved session's credentials (the session itself is not ended).
    Forget { name: String },
}

/// TLS trust options.
#[derive(clap::Args, Debug)]
struct TrustArgs {
    /// Trust the certificates in FILE (PEM: the server's CA, or its self-signed certificate)
    /// instead of the system roots.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Accept exactly the server certificate whose SHA-256 (of the DER) is SHA256 (64 hex
    /// digits, ':' allowed); the chain is then not checked.
    #[arg(long, value_name = "SHA256")]
    pin: Option<String>,
}

impl TrustArgs {
    fn given(&self) -> bool {
        self.ca.is_some() || self.pin.is_some()
    }

    fn trust(&self) -> Result<TlsTrust, String> {
        let pin = match &self.pin {
            Some(p) => Some(
                parse_pin(p)
                    .ok_or("--pin must be the 64-hex-digit SHA-256 of the server's certificate")?,
            ),
            None => None,
        };
        let ca = match &self.ca {
            // Absolute, so `clawterm resume` works from any directory.
            Some(p) => {
                Some(std::fs::canonicalize(p).map_err(|e| format!("--ca {}: {e}", p.display()))?)
            }
            None => None,
        };
        Ok(TlsTrust {
            ca,
            pin,
            server_name: None,
        })
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("clawterm: {msg}");
    ExitCode::from(2)
}

fn fail(e: &ClientError) -> ExitCode {
    eprintln!("clawterm: {e}");
    ExitCode::from(e.exit_code())
}

fn normalize_endpoint(ep: &str, port: u16) -> String {
    if ep.parse::<std::net::SocketAddr>().is_ok() {
        return ep.to_string();
    }
    if let Some((h, p)) = ep.rsplit_once(':') {
        if !h.contains(':') && p.parse::<u16>().is_ok() {
            return ep.to_string();
        }
    }
    if ep.contains(':') && !ep.starts_with('[') {
        return format!("[{ep}]:{port}");
    }
    format!("{ep}:{port}")
}

fn parse_token(s: &str) -> Option<[u8; 32]> {
    let mut t = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut t).ok()?;
    Some(t)
}

fn token_from_file(p: &PathBuf) -> Result<[u8; 32], String> {
    let s = std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    s.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .find_map(parse_token)
        .ok_or_else(|| format!("{} holds no 64-hex-digit token", p.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let store = match Store::default_location() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    match cli.cmd {
        Cmd::Connect {
            endpoint,
            tenant,
            agent,
            token,
            token_file,
            name,
            plaintext,
            quic,
            trust,
            log,
        } => {
            let transport = if plaintext {
                Transport::Plaintext
            } else {
                match trust.trust() {
                    Ok(t) if quic => Transport::Quic(t),
                    Ok(t) => Transport::Tls(t),
                    Err(e) => return usage(&e),
                }
            };
            let token = match (token, token_file) {
                (Some(t), _) => match parse_token(&t) {
                    Some(t) => t,
                    None => return usage("--token must be 64 hex digits"),
                },
                (None, Some(f)) => match token_from_file(&f) {
                    Ok(t) => t,
                    Err(e) => return usage(&e),
                },
                (None, None) => {
                    return usage("give the tenant token with --token HEX or --token-file FILE")
                }
            };
            if let Some(n) = &name {
                if !valid_name(n) {
                    return usage("--name: use letters, digits, '-', '_', '.', '@' (max 64)");
                }
            }
            let ep = normalize_endpoint(
                &endpoint,
                if quic {
                    DEFAULT_QUIC_PORT
                } else {
                    DEFAULT_PORT
                },
            );
            let opts = Options {
                transport,
                ..Options::default()
            };
            let session = match Session::connect_with(&ep, tenant, agent, token, opts) {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            let name = name.unwrap_or_else(|| format!("{:08x}", session.session_id()));
            interactive(session, name, store, log)
        }
        Cmd::Resume {
            name,
            quic,
            tcp,
            trust,
            log,
        } => {
            let mut creds = match store.load(&name) {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            if trust.given() || quic || tcp {
                let saved = match creds.target() {
                    Ok(t) => t,
                    Err(e) => return fail(&e),
                };
                let t = if trust.given() {
                    match trust.trust() {
                        Ok(t) => t,
                        Err(e) => return usage(&e),
                    }
                } else {
                    // A plaintext session moving to QUIC/TLS trusts the system roots, as
                    // `connect` does without --ca/--pin.
                    saved.transport.trust().cloned().unwrap_or_default()
                };
                let quic = quic || (!tcp && matches!(saved.transport, Transport::Quic(_)));
                // The port changes with the protocol when it was the default one.
                let addr = match (quic, saved.addr.rsplit_once(':')) {
                    (true, Some((h, p))) if p == DEFAULT_PORT.to_string() => {
                        format!("{h}:{DEFAULT_QUIC_PORT}")
                    }
                    (false, Some((h, p))) if p == DEFAULT_QUIC_PORT.to_string() => {
                        format!("{h}:{DEFAULT_PORT}")
                    }
                    _ => saved.addr,
                };
                creds.endpoint = Target {
                    addr,
                    transport: if quic {
                        Transport::Quic(t)
                    } else {
                        Transport::Tls(t)
                    },
                }
                .to_string();
            }
            let session = match Session::resume(&creds) {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            interactive(session, name, store, log)
        }
        Cmd::List => {
            let list = match store.list() {
                Ok(l) => l,
                Err(e) => return fail(&e),
            };
            if list.is_empty() {
                println!("no saved sessions (in {})", store.dir().display());
                return ExitCode::SUCCESS;
            }
            println!(
                "{:<20} {:<24} {:<9} {:>10} {:>10} {:<8}  {:<26} LAST SEEN",
                "NAME", "ENDPOINT", "TRANSPORT", "TENANT", "AGENT", "ID", "STATE (LAST KNOWN)"
            );
            let now = unix_now();
            for c in list {
                let (addr, tr) = match c.target() {
                    Ok(t) => (t.addr, t.transport.describe()),
                    Err(_) => (c.endpoint.clone(), "?"),
                };
                let state = match store.load_state(&c.name) {
                    Some(r) => format!("{} {}", r.describe(), ago(now, r.since)),
                    None => "-".to_string(),
                };
                println!(
                    "{:<20} {:<24} {:<9} {:>10} {:>10} {:08x}  {:<26} {}",
                    c.name,
                    addr,
                    tr,
                    c.tenant,
                    c.agent,
                    c.session_id,
                    state,
                    ago(now, c.last_seen)
                );
            }
            ExitCode::SUCCESS
        }
        Cmd::Export { name } => match store.load(&name) {
            Ok(c) => {
                println!("{}", c.export());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Cmd::Import { blob, name } => {
            let mut c = match Credentials::import(&blob) {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            if let Some(n) = name {
                c.name = n;
            }
            match store.save(&c) {
                Ok(p) => {
                    let _ = store.save_state(&c.name, &StateRecord::now(LocalState::Imported));
                    eprintln!(
                        "clawterm: saved session {} ({}); resume it with: clawterm resume {}",
                        c.name,
                        p.display(),
                        c.name
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Cmd::Forget { name } => match store.remove(&name) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
    }
}

fn ago(now: u64, t: u64) -> String {
    if t == 0 {
        return "never".into();
    }
    let d = now.saturating_sub(t);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

/// The "connection down" line: on the terminal's last row (cursor saved and restored), or plain
/// lines when stderr is not a terminal.
struct StatusLine {
    tty: bool,
    shown: bool,
    last_text: String,
}

impl StatusLine {
    fn show(&mut self, text: &str) {
        if text == self.last_text && self.shown {
            return;
        }
        self.last_text = text.to_string();
        let mut err = std::io::stderr().lock();
        if self.tty {
            let (cols, rows) = tty::window_size(2).unwrap_or((80, 24));
            let t: String = text.chars().take(cols.saturating_sub(1) as usize).collect();
            if !self.shown {
                // Make room instead of drawing over the bottom row (the cursor's row, most of
                // the time: a prompt, a half-printed line): a line feed on the bottom row
                // scrolls the screen up by one, then the cursor follows its text up a row.
                let _ = write!(err, "\x1b7\x1b[{rows};1H\n\x1b8\x1b[A");
            }
            let _ = write!(err, "\x1b7\x1b[{rows};1H\x1b[2K\x1b[7m{t}\x1b[0m\x1b8");
        } else {
            let _ = writeln!(err, "{text}");
        }
        let _ = err.flush();
        self.shown = true;
    }

    fn clear(&mut self) {
        if !self.shown {
            return;
        }
        self.shown = false;
        self.last_text.clear();
        let mut err = std::io::stderr().lock();
        if self.tty {
            let rows = tty::window_size(2).map(|w| w.1).unwrap_or(24);
            let _ = write!(err, "\x1b7\x1b[{rows};1H\x1b[2K\x1b8");
        } else {
            let _ = writeln!(err, "clawterm: reconnected");
        }
        let _ = err.flush();
    }
}

/// Prints a message on its own line (raw mode needs \r\n).
fn say(raw: bool, msg: &str) {
    let mut err = std::io::stderr().lock();
    if raw {
        let _ = write!(err, "\r\n{msg}\r\n");
    } else {
        let _ = writeln!(err, "{msg}");
    }
    let _ = err.flush();
}

fn interactive(mut session: Session, name: String, store: Store, log: Option<PathBuf>) -> ExitCode {
    let save = |s: &Session| {
        let mut c = s.credentials(&name);
        c.last_seen = unix_now();
        store.save(&c)
    };
    if let Err(e) = save(&session) {
        eprintln!("clawterm: warning: session credentials not saved: {e}");
    }
    let set_state = |st: LocalState| {
        let _ = store.save_state(&name, &StateRecord::now(st));
    };
    set_state(LocalState::Attached);
    let mut log = match log {
        Some(p) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
        {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("clawterm: cannot open log file {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let stdin_tty = tty::is_tty(0);
    let via = match session.tls_info() {
        Some((v, c)) => format!("{v}, {c}"),
        None => "plaintext".to_string(),
    };
    eprintln!(
        "clawterm: session {name} (id {:08x}) at {} ({via}). Enter ~. detaches, Enter ~X ends it, \
         ~? help; resume with: clawterm resume {name}",
        session.session_id(),
        session.endpoint()
    );
    let raw = if stdin_tty {
        match RawMode::enable(0) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("clawterm: cannot put the terminal in raw mode: {e}");
                None
            }
        }
    } else {
        None
    };
    let code = run_loop(
        &mut session,
        &name,
        &mut log,
        raw.is_some(),
        &save,
        &set_state,
    );
    drop(raw);
    match code {
        Outcome::Detached => {
            let c = session.credentials(&name);
            let _ = store.save(&c);
            set_state(LocalState::Detached);
            session.detach();
            eprintln!("clawterm: detached; the session keeps running. Resume with: clawterm resume {name}");
            ExitCode::SUCCESS
        }
        Outcome::EndRequested => {
            session.end();
            let _ = store.remove(&name);
            eprintln!("clawterm: session ended");
            ExitCode::SUCCESS
        }
        Outcome::Ended => {
            let _ = store.remove(&name);
            eprintln!("clawterm: the session ended");
            ExitCode::SUCCESS
        }
        Outcome::Signal(sig) => {
            let _ = save(&session);
            set_state(LocalState::Detached);
            drop(session);
            eprintln!("clawterm: stopped by signal {sig}; the session keeps running. Resume with: clawterm resume {name}");
            ExitCode::from(128u8.wrapping_add(sig as u8))
        }
        Outcome::Error(e) => {
            if e == ClientError::NoSuchSession {
                let _ = store.remove(&name);
            } else if e == ClientError::TakenOver {
                set_state(LocalState::TakenOver);
            } else {
                let _ = save(&session);
                set_state(LocalState::Detached);
            }
            fail(&e)
        }
    }
}

enum Outcome {
    Detached,
    EndRequested,
    Ended,
    Signal(i32),
    Error(ClientError),
}

fn run_loop(
    session: &mut Session,
    name: &str,
    log: &mut Option<File>,
    raw: bool,
    save: &dyn Fn(&Session) -> Result<PathBuf, ClientError>,
    set_state: &dyn Fn(LocalState),
) -> Outcome {
    let sigfd = match tty::signal_pipe(&[libc::SIGWINCH, libc::SIGTERM, libc::SIGHUP, libc::SIGINT])
    {
        Ok(fd) => Some(fd),
        Err(e) => {
            eprintln!("clawterm: warning: no signal handling: {e}");
            None
        }
    };
    if let Some((c, r)) = tty::window_size(0).or_else(|| tty::window_size(1)) {
        let _ = session.resize(c, r);
    }
    let mut status = StatusLine {
        tty: tty::is_tty(2),
        shown: false,
        last_text: String::new(),
    };
    let mut esc = EscapeFilter::default();
    let mut stdin_open = true;
    let mut retry: Option<(Instant, String)> = None;
    let mut last_save = Instant::now();
    let mut dirty = false;
    let mut stdout = std::io::stdout().lock();
    loop {
        // Events.
        loop {
            match session.try_recv() {
                Ok(None) => break,
                Ok(Some(ev)) => match ev {
                    Event::Data(d) => {
                        let _ = stdout.write_all(&d);
                        if let Some(f) = log.as_mut() {
                            let _ = f.write_all(&d);
                        }
                        dirty = true;
                    }
                    Event::Gap => {
                        let _ = stdout.flush();
                        say(raw, "clawterm: some output was lost while disconnected (the server's replay buffer overflowed)");
                    }
                    Event::Disconnected {
                        reason,
                        retry_in,
                        attempt,
                    } => {
                        if attempt == 0 {
                            set_state(LocalState::Reconnecting);
                        }
                        retry = Some((Instant::now() + retry_in, reason));
                    }
                    Event::Reconnecting { .. } => {
                        let _ = stdout.flush();
                        let reason = retry.as_ref().map(|r| r.1.clone()).unwrap_or_default();
                        status.show(&format!(
                            "clawterm: connection lost ({reason}); reconnecting now… (~. detaches)"
                        ));
                        retry = None;
                    }
                    Event::Reconnected { .. } => {
                        retry = None;
                        status.clear();
                        let _ = save(session);
                        set_state(LocalState::Attached);
                    }
                    Event::Ended => {
                        let _ = stdout.flush();
                        return Outcome::Ended;
                    }
                },
                Err(e) => {
                    let _ = stdout.flush();
                    status.clear();
                    return Outcome::Error(e);
                }
            }
        }
        let _ = stdout.flush();
        if let Some((at, reason)) = &retry {
            // The session's own deadline: typing may have moved the retry earlier.
            let at = session.next_deadline().map_or(*at, |d| d.min(*at));
            let left = at.saturating_duration_since(Instant::now());
            status.show(&format!(
                "clawterm: connection lost ({reason}); retrying in {} s; input is queued (~. detaches)",
                left.as_secs() + u64::from(left.subsec_millis() > 0)
            ));
        }
        if dirty && last_save.elapsed() >= Duration::from_secs(2) {
            let _ = save(session);
            last_save = Instant::now();
            dirty = false;
        }

        // Wait.
        let mut wait = Duration::from_millis(1000);
        if let Some(d) = session.next_deadline() {
            wait = wait.min(d.saturating_duration_since(Instant::now()));
        }
        let ms = (wait.as_millis() as i32).max(1);
        let mut revents = [0i16; 3];
        let stdin = std::io::stdin();
        let (stdin_ix, sig_ix, n) = {
            let mut fds: Vec<(BorrowedFd<'_>, i16)> = Vec::with_capacity(3);
            let stdin_ix = stdin_open.then(|| {
                fds.push((stdin.as_fd(), libc::POLLIN));
                fds.len() - 1
            });
            let sig_ix = sigfd.as_ref().map(|f| {
                fds.push((f.as_fd(), libc::POLLIN));
                fds.len() - 1
            });
            if let Some(fd) = session.poll_fd() {
                let ev = libc::POLLIN
                    | if session.wants_write() {
                        libc::POLLOUT
                    } else {
                        0
                    };
                fds.push((fd, ev));
            }
            (
                stdin_ix,
                sig_ix,
                poll::wait(&fds, &mut revents, ms).unwrap_or(0),
            )
        };
        if n == 0 {
            continue;
        }
        if let Some(i) = sig_ix {
            if revents[i] & libc::POLLIN != 0 {
                let mut b = [0u8; 64];
                let k = sigfd
                    .as_ref()
                    .map_or(0, |mut f| f.read(&mut b).unwrap_or(0));
                for &s in b.iter().take(k) {
                    match s as i32 {
                        libc::SIGWINCH => {
                            if let Some((c, r)) =
                                tty::window_size(0).or_else(|| tty::window_size(1))
                            {
                                let _ = session.resize(c, r);
                            }
                        }
                        sig => return Outcome::Signal(sig),
                    }
                }
            }
        }
        if let Some(i) = stdin_ix {
            if revents[i] & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                let mut b = [0u8; 4096];
                // SAFETY: reading into a local buffer.
                let k = unsafe { libc::read(0, b.as_mut_ptr().cast(), b.len()) };
                let failed = k < 0 && {
                    let kind = std::io::Error::last_os_error().kind();
                    kind != std::io::ErrorKind::Interrupted
                        && kind != std::io::ErrorKind::WouldBlock
                };
                if k == 0 || failed {
                    // End of input: keep showing output until the session ends.
                    stdin_open = false;
                } else if k > 0 {
                    let input = &b[..k as usize];
                    let (bytes, cmd) = if raw {
                        esc.feed(input)
                    } else {
                        (input.to_vec(), None)
                    };
                    if !bytes.is_empty() {
                        if let Err(e) = session.send(&bytes) {
                            return Outcome::Error(e);
                        }
                        // Someone is typing while the connection is down: try again soon
                        // rather than at the end of a long backoff wait.
                        session.retry_now();
                    }
                    match cmd {
                        Some(EscapeCmd::Detach) => return Outcome::Detached,
                        Some(EscapeCmd::End) => return Outcome::EndRequested,
                        Some(EscapeCmd::Help) => say(
                            raw,
                            &format!(
                                "clawterm escapes (after Enter): ~. detach (resume: clawterm resume {name})  ~X end the session  ~~ send ~  ~? help"
                            ),
                        ),
                        None => {}
                    }
                }
            }
        }
    }
}
