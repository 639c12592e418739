//! `clawtermd`: the ClawTerm session server (one per node).

mod demo;

use clap::builder::BoolishValueParser;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use clawterm::auth::Tokens;
use clawterm::server::{self, Auth, ServerConfig};
use clawterm::session::{Overflow, SessionConfig};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tracing::{error, info, warn};

/// ClawTerm session server: keeps interactive agent sessions alive through network drops,
/// device switches and reconnects. Clients connect over TCP and speak the ClawTerm protocol;
/// agents are pods on this node listening on Unix sockets in --socket-dir.
///
/// Every option (but --check-config) can also be set as CLAWTERM_<NAME> in the environment
/// (e.g. CLAWTERM_PORT=7220, CLAWTERM_INSECURE_PLAINTEXT=1) or as a key of the TOML file given
/// with --config (e.g. `port = 7220`). The command line wins over the environment, which wins
/// over the file. Switches take 1/0, true/false, yes/no or on/off in the environment and
/// true/false in the file.
#[derive(Parser, Debug)]
#[command(
    name = "clawtermd",
    version,
    about,
    long_about,
    args_override_self = true
)]
struct Args {
    /// TCP port for clients (0 = pick a free one).
    #[arg(short, long, env = "CLAWTERM_PORT", default_value_t = 7220)]
    port: u16,
    /// Address to listen on.
    #[arg(long, env = "CLAWTERM_BIND", default_value = "0.0.0.0")]
    bind: IpAddr,
    /// UDP port for QUIC.
    #[arg(long, env = "CLAWTERM_QUIC_PORT", default_value_t = 7221)]
    quic_port: u16,
    /// Turn QUIC off.
    #[arg(long, env = "CLAWTERM_NO_QUIC", value_parser = BoolishValueParser::new())]
    no_quic: bool,
    /// Directory where agent pods' sockets appear ({tenant}_{agent}).
    #[arg(
        short = 's',
        long,
        env = "CLAWTERM_SOCKET_DIR",
        default_value = "/run/claw/sockets"
    )]
    socket_dir: PathBuf,
    /// Tenant tokens file: lines of `TENANT_ID TOKEN_HEX64 [AGENT_ID]`; reloaded on SIGHUP.
    #[arg(long, env = "CLAWTERM_TOKENS")]
    tokens: Option<PathBuf>,
    /// Accept any token (development only).
    #[arg(long, env = "CLAWTERM_INSECURE_NO_AUTH", value_parser = BoolishValueParser::new())]
    insecure_no_auth: bool,
    /// TLS certificate chain (PEM) for the TCP port.
    #[arg(long, env = "CLAWTERM_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "CLAWTERM_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Plaintext TCP (development, legacy clients).
    #[arg(long, env = "CLAWTERM_INSECURE_PLAINTEXT", value_parser = BoolishValueParser::new())]
    insecure_plaintext: bool,
    /// Reactor threads [default: one per CPU the process may run on].
    #[arg(long, env = "CLAWTERM_SHARDS")]
    shards: Option<usize>,
    /// CPUs to pin shards to, e.g. `0,2-3` [default: the affinity mask]. Shard i runs on the
    /// i-th CPU (round-robin when there are more shards); the daemon's other threads stay on
    /// these CPUs too.
    #[arg(long, env = "CLAWTERM_CPUS")]
    cpus: Option<String>,
    /// I/O backend: auto, uring or epoll. auto falls back to epoll, saying so.
    #[arg(long, env = "CLAWTERM_IO", default_value = "auto")]
    io: shards::IoMode,
    /// Admin endpoint ADDR:PORT for /metrics, /healthz, /readyz, or `off`.
    #[arg(long, env = "CLAWTERM_ADMIN", default_value = "127.0.0.1:9720")]
    admin: String,
    /// Replay ring cap per session, in bytes of payload.
    #[arg(long, env = "CLAWTERM_RING_BYTES", default_value_t = 262144)]
    ring_bytes: usize,
    /// What a suspended session's full ring does: drop (oldest, reported as GAP) or pause the agent.
    #[arg(long, env = "CLAWTERM_OVERFLOW", default_value = "drop")]
    overflow: Overflow,
    /// Largest accepted frame payload (1024 to 65535).
    #[arg(long, env = "CLAWTERM_MAX_PAYLOAD", default_value_t = 65535)]
    max_payload: usize,
    /// Largest DATA payload sent (512 to 65535, and never above --max-payload): agent output
    /// goes out in frames of at most this size. 16 KiB keeps v1 clients that compute `13 +
    /// LEN` in 16 bits working and lets keystroke echoes of other sessions pass bulk output.
    #[arg(long, env = "CLAWTERM_MAX_SEND_PAYLOAD", default_value_t = 16384)]
    max_send_payload: usize,
    /// Seconds an attached client that has received everything may leave it unacknowledged
    /// while its agent waits, before its connection is paced by its send backlog instead of
    /// ACKs (its ring then keeps the newest --ring-bytes). Applies with --overflow drop.
    #[arg(long, env = "CLAWTERM_ACK_WAIT", default_value_t = 0.2)]
    ack_wait: f64,
    /// Sessions per node (suspended ones count); beyond it CONNECT gets OVERLOADED.
    #[arg(long, env = "CLAWTERM_MAX_SESSIONS")]
    max_sessions: Option<usize>,
    /// Connections per shard that may be mid-handshake at once; more are closed at accept.
    /// Bounds the memory of connections that have not authenticated.
    #[arg(long, env = "CLAWTERM_MAX_PENDING_HANDSHAKES", default_value_t = 1024)]
    max_pending_handshakes: usize,
    /// New connections per second per source address, per shard (0 = unlimited); beyond it
    /// RATE_LIMITED.
    #[arg(long, env = "CLAWTERM_MAX_CONN_RATE_PER_IP", default_value_t = 10000)]
    max_conn_rate_per_ip: u32,
    /// Failed authentications (bad token, unknown session) per minute per source address, per
    /// shard, before the address gets RATE_LIMITED for the rest of the minute (0 = unlimited).
    #[arg(long, env = "CLAWTERM_MAX_AUTH_FAILURES_PER_IP", default_value_t = 30)]
    max_auth_failures_per_ip: u32,
    /// Send a KEEPALIVE after this many seconds without sending.
    #[arg(long, env = "CLAWTERM_KEEPALIVE", default_value_t = 30.0)]
    keepalive: f64,
    /// Close a connection after this many seconds without receiving anything.
    #[arg(long, env = "CLAWTERM_IDLE_TIMEOUT", default_value_t = 90.0)]
    idle_timeout: f64,
    /// Close a session suspended this many seconds.
    #[arg(long, env = "CLAWTERM_SUSPEND_TTL", default_value_t = 3600.0)]
    suspend_ttl: f64,
    /// Close a connection that has not completed CONNECT/RESUME within this many seconds.
    #[arg(long, env = "CLAWTERM_HANDSHAKE_TIMEOUT", default_value_t = 10.0)]
    handshake_timeout: f64,
    /// How long a lost agent pod may take to come back, in seconds.
    #[arg(long, env = "CLAWTERM_AGENT_GRACE", default_value_t = 60.0)]
    agent_grace: f64,
    /// Accept the 4-byte RESUME that carries no credential (INSECURE: anyone who guesses a
    /// session id can take the session over).
    #[arg(long, env = "CLAWTERM_ALLOW_LEGACY_RESUME", value_parser = BoolishValueParser::new())]
    allow_legacy_resume: bool,
    /// TOML config file: keys are the long option names with `_` for `-` (`ring_bytes =
    /// 262144`); the command line and CLAWTERM_* variables win over it.
    #[arg(long, env = "CLAWTERM_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the options, config file and tokens file, print the result and exit (0 when
    /// valid) without starting.
    #[arg(long)]
    check_config: bool,
    /// Everything embedded for a first run: a temporary socket dir, a built-in echo agent, a
    /// printed dev token, loopback only, and a scripted client that shows connect, echo, an
    /// abrupt drop and a resume with replay.
    #[arg(long, env = "CLAWTERM_DEMO", value_parser = BoolishValueParser::new())]
    demo: bool,
}

/// A refused configuration: the message, and the options (long names) whose values caused it,
/// so the message can name where each value came from.
struct Bad {
    opts: Vec<&'static str>,
    msg: String,
}

fn bad(opts: &[&'static str], msg: impl Into<String>) -> Bad {
    Bad {
        opts: opts.to_vec(),
        msg: msg.into(),
    }
}

fn secs(name: &'static str, v: f64) -> Result<u64, Bad> {
    if !(v.is_finite() && v > 0.0) {
        return Err(bad(
            &[name],
            format!("--{name} must be a positive number of seconds, got {v}"),
        ));
    }
    Ok((v * 1000.0).round() as u64)
}

fn build_config(a: &Args) -> Result<ServerConfig, Bad> {
    if !(1024..=65535).contains(&a.max_payload) {
        return Err(bad(
            &["max-payload"],
            format!(
                "--max-payload must be from 1024 to 65535, got {}: pick a value in that range",
                a.max_payload
            ),
        ));
    }
    if !(512..=65535).contains(&a.max_send_payload) {
        return Err(bad(
            &["max-send-payload"],
            format!(
                "--max-send-payload must be from 512 to 65535, got {}: pick a value in that range",
                a.max_send_payload
            ),
        ));
    }
    if a.ring_bytes < a.max_payload {
        return Err(bad(
            &["ring-bytes", "max-payload"],
            format!(
                "--ring-bytes ({}) must be at least --max-payload ({}) so one frame fits the replay ring",
                a.ring_bytes, a.max_payload
            ),
        ));
    }
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(_), Some(_)) if a.insecure_plaintext => {
            return Err(bad(
                &["tls-cert", "insecure-plaintext"],
                "--tls-cert/--tls-key and --insecure-plaintext contradict each other: pick one",
            ))
        }
        (Some(c), Some(k)) => {
            server::tls::server_config(c, k).map_err(|e| bad(&["tls-cert", "tls-key"], e))?;
            Some((c.clone(), k.clone()))
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(bad(
                &["tls-cert", "tls-key"],
                "--tls-cert and --tls-key go together: pass both (PEM files)",
            ))
        }
        (None, None) if a.insecure_plaintext || a.demo => None,
        (None, None) => {
            return Err(bad(&[], "no TLS certificate: pass --tls-cert and --tls-key (PEM), or --insecure-plaintext for development on a trusted network"))
        }
    };
    let auth = match (&a.tokens, a.insecure_no_auth) {
        (Some(_), true) => {
            return Err(bad(
                &["tokens", "insecure-no-auth"],
                "--tokens and --insecure-no-auth contradict each other: pick one",
            ))
        }
        (Some(p), false) => {
            Tokens::load(p).map_err(|e| {
                bad(
                    &["tokens"],
                    format!("{e}; fix the file or point --tokens at a valid one"),
                )
            })?;
            Auth::Tokens(p.clone())
        }
        (None, true) => Auth::NoAuth,
        (None, false) if a.demo => Auth::NoAuth,
        (None, false) => {
            return Err(bad(&[], "no tokens: pass --tokens FILE (lines of `TENANT_ID TOKEN_HEX64 [AGENT_ID]`), or --insecure-no-auth for development"))
        }
    };
    let allowed = shards::allowed_cpus()
        .map_err(|e| bad(&[], format!("cannot read the CPU affinity mask: {e}")))?;
    let cpus: Vec<usize> = match &a.cpus {
        Some(list) => {
            let l =
                shards::parse_cpu_list(list).map_err(|e| bad(&["cpus"], format!("--cpus: {e}")))?;
            if let Some(bad_cpu) = l.iter().find(|c| !allowed.contains(c)) {
                return Err(bad(
                    &["cpus"],
                    format!(
                        "--cpus: CPU {bad_cpu} is not in this process's affinity mask {allowed:?}"
                    ),
                ));
            }
            l
        }
        None => allowed,
    };
    let n = a.shards.unwrap_or(cpus.len().max(1));
    if !(1..=256).contains(&n) {
        return Err(bad(
            &["shards"],
            format!("--shards must be from 1 to 256, got {n}"),
        ));
    }
    // Shard i on CPU i of the list. With more shards than CPUs: an explicit --cpus is still
    // honoured (shards share its CPUs round-robin); without one they are left to the
    // scheduler.
    let pin = !cpus.is_empty() && (a.cpus.is_some() || n <= cpus.len());
    let pinned: Vec<Option<usize>> = (0..n).map(|i| pin.then(|| cpus[i % cpus.len()])).collect();
    Ok(ServerConfig {
        bind: a.bind,
        port: a.port,
        socket_dir: a.socket_dir.clone(),
        auth,
        shards: n,
        cpus: pinned,
        io: a.io,
        session: SessionConfig {
            ring_bytes: a.ring_bytes,
            max_payload: a.max_payload,
            send_payload: a.max_send_payload,
            ack_wait_ms: secs("ack-wait", a.ack_wait)?,
            keepalive_ms: secs("keepalive", a.keepalive)?,
            idle_ms: secs("idle-timeout", a.idle_timeout)?,
            ttl_ms: secs("suspend-ttl", a.suspend_ttl)?,
            overflow: a.overflow,
        },
        max_sessions: a.max_sessions,
        max_pending_handshakes: a.max_pending_handshakes.max(1),
        handshake_ms: secs("handshake-timeout", a.handshake_timeout)?,
        allow_legacy_resume: a.allow_legacy_resume,
        agent_grace_ms: secs("agent-grace", a.agent_grace)?,
        tls,
        quic_port: (!a.no_quic).then_some(a.quic_port),
        conn_rate_per_ip: a.max_conn_rate_per_ip,
        max_auth_failures_per_ip: a.max_auth_failures_per_ip,
        admin: match a.admin.as_str() {
            "off" => None,
            addr => Some(addr.parse().map_err(|_| {
                bad(
                    &["admin"],
                    format!(
                        "--admin must be ADDR:PORT (e.g. 127.0.0.1:9720) or `off`, got `{addr}`"
                    ),
                )
            })?),
        },
    })
}

/// Where the settings came from: the command line, CLAWTERM_* variables, the TOML file.
struct Layers {
    /// The config file, when one was given.
    file: Option<String>,
    /// The CLAWTERM_* variables this process set from the config file, and the key of each.
    from_file: HashMap<String, String>,
}

/// How `main` ends early.
enum Early {
    /// `--help` or `--version`: print it and exit 0.
    Print(clap::Error),
    /// A bad option, variable or config file: the message.
    Refused(String),
}

/// The first paragraph of a clap error, without its `error: ` prefix.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.split("\n\n").next().unwrap_or(&text);
    first.trim_start_matches("error: ").trim().to_string()
}

/// The long name of the option a clap error is about (`--port <PORT>` -> `port`).
fn clap_error_option(e: &clap::Error) -> Option<String> {
    match e.get(clap::error::ContextKind::InvalidArg)? {
        clap::error::ContextValue::String(s) => {
            let long = s.strip_prefix("--")?;
            Some(long.split([' ', '=']).next()?.to_string())
        }
        _ => None,
    }
}

fn env_var_of(long: &str) -> Option<String> {
    let cmd = Args::command();
    let arg = cmd.get_arguments().find(|a| a.get_long() == Some(long))?;
    arg.get_env().map(|v| v.to_string_lossy().into_owned())
}

impl Layers {
    /// Names where the value of option `long` came from, when that was not the command line:
    /// `environment variable CLAWTERM_PORT` or `config file F: key `port``.
    fn origin(&self, long: &str, matches: Option<&ArgMatches>) -> Option<String> {
        let var = env_var_of(long)?;
        if let Some(m) = matches {
            let id = long.replace('-', "_");
            if m.value_source(&id) != Some(ValueSource::EnvVariable) {
                return None;
            }
        }
        Some(match (&self.file, self.from_file.get(&var)) {
            (Some(f), Some(key)) => format!("config file {f}: key `{key}`"),
            _ => format!("environment variable {var}"),
        })
    }

    /// `msg`, preceded by where the values of `opts` came from (when not the command line).
    fn describe(&self, b: &Bad, matches: &ArgMatches) -> String {
        let origins: Vec<String> = b
            .opts
            .iter()
            .filter_map(|o| self.origin(o, Some(matches)))
            .collect();
        if origins.is_empty() {
            b.msg.clone()
        } else {
            format!("{}: {}", origins.join("; "), b.msg)
        }
    }
}

/// Reads the TOML config file and sets the CLAWTERM_* variable of each of its keys that is
/// not already set, so that the environment wins over the file (and the command line over
/// both). Unknown keys and values that are no string, number or boolean are refused, naming
/// the key.
fn apply_config_file(path: &str) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("config file {path}: {e}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("config file {path}: {}", e.message()))?;
    let cmd = Args::command();
    let mut from_file = HashMap::new();
    for (key, value) in table {
        let name = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()) && name != "config");
        let Some(env) = arg.and_then(|a| a.get_env()) else {
            let valid: Vec<String> = cmd
                .get_arguments()
                .filter(|a| a.get_env().is_some() && a.get_long() != Some("config"))
                .filter_map(|a| a.get_long().map(|l| l.replace('-', "_")))
                .collect();
            return Err(format!(
                "config file {path}: unknown key `{key}`; valid keys: {}",
                valid.join(", ")
            ));
        };
        let v = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(format!(
                    "config file {path}: key `{key}` must be a string, number or boolean, not {}",
                    other.type_str()
                ))
            }
        };
        if std::env::var_os(env).is_none() {
            // Single-threaded here: nothing else reads the environment concurrently.
            std::env::set_var(env, v);
            from_file.insert(env.to_string_lossy().into_owned(), key);
        }
    }
    Ok(from_file)
}

/// Parses the command line, the environment and the config file, in that order of precedence.
/// A refusal names the source of the bad value: the option, the variable, or the file and key.
fn load_args() -> Result<(Args, ArgMatches, Layers), Early> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // 1. The command line alone (no variables): its own errors, and where the file is.
    let cli_only = Args::command().mut_args(|a| a.env(None::<&str>));
    let cli = match cli_only.try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) if !e.use_stderr() => {
            // --help/--version: print the full command's (it lists the variables).
            return Err(Early::Print(
                Args::command()
                    .try_get_matches_from(&argv)
                    .err()
                    .unwrap_or(e),
            ));
        }
        Err(e) => return Err(Early::Refused(clap_message(&e))),
    };
    let file = match cli.get_one::<PathBuf>("config") {
        Some(p) => Some(p.display().to_string()),
        None => std::env::var("CLAWTERM_CONFIG").ok(),
    };
    // 2. The file fills in the variables the environment does not set.
    let from_file = match &file {
        Some(f) => apply_config_file(f).map_err(Early::Refused)?,
        None => HashMap::new(),
    };
    let layers = Layers { file, from_file };
    // 3. Everything together; the command line was fine, so an error here is a variable's
    //    (or the file's, through its variable).
    let all = Args::command().try_get_matches_from(&argv).map_err(|e| {
        if !e.use_stderr() {
            return Early::Print(e);
        }
        let msg = clap_message(&e);
        Early::Refused(
            match clap_error_option(&e).and_then(|o| layers.origin(&o, None)) {
                Some(origin) => format!("{origin}: {msg}"),
                None => msg,
            },
        )
    })?;
    let args = Args::from_arg_matches(&all).map_err(|e| Early::Refused(clap_message(&e)))?;
    Ok((args, all, layers))
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it starts afterwards) so
/// that they are only received through `wait_signal`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it and pthread_sigmask
    // only reads it. None of these calls can fail with valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `timeout` for one of the signals in `set`; `None` when none came.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` is an initialised sigset, `ts` a valid timespec, and a null siginfo
    // pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// Logs to stderr, filtered by RUST_LOG (default `info`).
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    let registry = tracing_subscriber::registry().with(fmt);
    #[cfg(debug_assertions)]
    if let Some(fault) = fault::PanicOn::from_env() {
        registry.with(fault).init();
        return;
    }
    registry.init();
}

/// Fault injection for tests, compiled into debug builds only (release builds, hence the
/// images, do not have it): with `CLAWTERMD_TEST_PANIC_ON=TEXT` in the environment, a shard
/// thread panics when it logs an event (any level) whose message contains TEXT. This lets a
/// black-box test make a shard panic at a moment it chooses, to check what the daemon does then.
#[cfg(debug_assertions)]
mod fault {
    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::{Context, Layer};

    pub struct PanicOn(String);

    impl PanicOn {
        pub fn from_env() -> Option<PanicOn> {
            let text = std::env::var("CLAWTERMD_TEST_PANIC_ON").ok()?;
            (!text.is_empty()).then_some(PanicOn(text))
        }
    }

    struct Message(String);

    impl Visit for Message {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}");
            }
        }
    }

    impl<S: tracing::Subscriber> Layer<S> for PanicOn {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            let on_shard = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("shard-"));
            if !on_shard {
                return;
            }
            let mut m = Message(String::new());
            event.record(&mut m);
            if m.0.contains(&self.0) {
                panic!("injected fault (CLAWTERMD_TEST_PANIC_ON): {}", m.0);
            }
        }
    }
}

fn main() -> ExitCode {
    init_logging();
    let (args, matches, layers) = match load_args() {
        Ok(x) => x,
        Err(Early::Print(e)) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(Early::Refused(msg)) => {
            eprintln!("clawtermd: {msg}");
            return ExitCode::from(2);
        }
    };
    let mut cfg = match build_config(&args) {
        Ok(c) => c,
        Err(b) => {
            eprintln!("clawtermd: {}", layers.describe(&b, &matches));
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!(
            "clawtermd: configuration OK: {} shards, {} I/O, tcp {}:{}, agents in {}, auth {}",
            cfg.shards,
            args.io,
            cfg.bind,
            cfg.port,
            cfg.socket_dir.display(),
            match &cfg.auth {
                Auth::NoAuth => "off (--insecure-no-auth)".to_string(),
                Auth::Tokens(p) => format!("tokens file {}", p.display()),
            }
        );
        return ExitCode::SUCCESS;
    }
    let sigs = block_signals();
    if args.cpus.is_some() {
        // Everything started from here on (pod registry, admin, config watcher, the demo
        // agent) stays on the CPUs given, as a cpuset would keep it.
        let mut set: Vec<usize> = cfg.cpus.iter().flatten().copied().collect();
        set.sort_unstable();
        set.dedup();
        if let Err(e) = shards::confine_current_thread(&set) {
            tracing::warn!(cpus = ?set, "could not confine clawtermd to its shard CPUs: {e}");
        }
    }
    let demo = if args.demo {
        match demo::prepare(&mut cfg, !args.insecure_plaintext) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("clawtermd: --demo: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let server = match server::start(cfg.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("clawtermd: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Reload the tokens file and the TLS certificate when they change on disk (also on SIGHUP).
    let mut watched: Vec<PathBuf> = Vec::new();
    if let Auth::Tokens(p) = &cfg.auth {
        watched.push(p.clone());
    }
    if let Some((c, k)) = &cfg.tls {
        watched.push(c.clone());
        watched.push(k.clone());
    }
    if !watched.is_empty() {
        let shared = server.shared().clone();
        let res = server::watch::watch(watched, move |path| {
            shared.reload(Some(path));
        });
        if let Err(e) = res {
            warn!("cannot watch the tokens/TLS files for changes (SIGHUP still reloads): {e}");
        }
    }
    let Some(addr) = server.local_addr() else {
        eprintln!("clawtermd: no listening address");
        return ExitCode::FAILURE;
    };
    let quic = match server.quic_addr() {
        Some(q) if server.quic_steered() => format!(" and quic {q} (steered by connection id)"),
        Some(q) => format!(" and quic {q} (forwarded between shards)"),
        None => String::new(),
    };
    info!(
        "clawtermd {} listening on tcp {} ({}){}, {} shards, {} I/O, agents in {}",
        env!("CARGO_PKG_VERSION"),
        addr,
        if cfg.tls.is_some() {
            "TLS 1.3"
        } else {
            "plaintext"
        },
        quic,
        cfg.shards,
        server.backend(),
        cfg.socket_dir.display()
    );
    if let Some(a) = server.admin_addr() {
        info!("admin endpoint on http://{a} (/metrics, /healthz, /readyz)");
    }
    if let Some(d) = &demo {
        d.run_walkthrough(addr, server.quic_addr());
    }
    // Wait for a signal; between signals, check that every shard is still running: a shard
    // that ended on its own (a panic, a fatal I/O error) takes its sessions with it, and only
    // a restart brings the node back to full service, so the process exits non-zero.
    let mut failed = false;
    loop {
        match wait_signal(&sigs, Duration::from_millis(250)) {
            None => {
                if let Err(why) = server.shared().metrics.health() {
                    error!(
                        "{why}: the node cannot serve every session any more; stopping the \
                         others and exiting with an error so that the supervisor restarts clawtermd"
                    );
                    failed = true;
                    break;
                }
            }
            Some(libc::SIGHUP) => {
                if matches!(cfg.auth, Auth::NoAuth) && cfg.tls.is_none() {
                    info!("SIGHUP: no tokens file or TLS certificate to reload");
                } else {
                    server.shared().reload(None);
                }
            }
            Some(s) => {
                info!(signal = s, "shutting down");
                break;
            }
        }
    }
    server.shutdown();
    match server.join() {
        Ok(()) if !failed => {
            info!("clawtermd stopped");
            ExitCode::SUCCESS
        }
        Ok(()) => {
            error!("clawtermd stopped after a shard failure");
            ExitCode::FAILURE
        }
        Err(e) => {
            error!("clawtermd stopped after a shard failure: {e}");
            ExitCode::FAILURE
        }
    }
}
