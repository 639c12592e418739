//! `clawtermd`: the ClawTerm session server (one per node).

use clap::{CommandFactory, Parser};
use clawterm::auth::Tokens;
use clawterm::server::{self, Auth, ServerConfig};
use clawterm::session::{Overflow, SessionConfig};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing::{error, info, warn};

/// ClawTerm session server: keeps interactive agent sessions alive through network drops,
/// device switches and reconnects. Clients connect over TCP and speak the ClawTerm protocol;
/// agents are pods on this node listening on Unix sockets in --socket-dir.
///
/// Every option can also be set as CLAWTERM_<NAME> in the environment (e.g. CLAWTERM_PORT).
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
    #[arg(long, env = "CLAWTERM_NO_QUIC")]
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
    #[arg(long, env = "CLAWTERM_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// TLS certificate chain (PEM) for the TCP port.
    #[arg(long, env = "CLAWTERM_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "CLAWTERM_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Plaintext TCP (development, legacy clients).
    #[arg(long, env = "CLAWTERM_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,
    /// Reactor threads [default: one per CPU the process may run on].
    #[arg(long, env = "CLAWTERM_SHARDS")]
    shards: Option<usize>,
    /// CPUs to pin shards to, e.g. `0,2-3` [default: the affinity mask].
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
    #[arg(long, env = "CLAWTERM_ALLOW_LEGACY_RESUME")]
    allow_legacy_resume: bool,
    /// TOML config file: keys are the long option names (`ring_bytes = 262144`); the command
    /// line and CLAWTERM_* variables win over it.
    #[arg(long, env = "CLAWTERM_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the options, config file and tokens file, print the result and exit (0 when
    /// valid) without starting.
    #[arg(long)]
    check_config: bool,
    /// Everything embedded for a first run: a temporary socket dir, a built-in echo agent, a
    /// printed dev token, loopback only, and a scripted client that shows connect, echo, an
    /// abrupt drop and a resume with replay.
    #[arg(long)]
    demo: bool,
}

fn secs(name: &str, v: f64) -> Result<u64, String> {
    if !(v.is_finite() && v > 0.0) {
        return Err(format!(
            "--{name} must be a positive number of seconds, got {v}"
        ));
    }
    Ok((v * 1000.0).round() as u64)
}

fn build_config(a: &Args) -> Result<ServerConfig, String> {
    if !(1024..=65535).contains(&a.max_payload) {
        return Err(format!(
            "--max-payload must be from 1024 to 65535, got {}: pick a value in that range",
            a.max_payload
        ));
    }
    if a.ring_bytes < a.max_payload {
        return Err(format!(
            "--ring-bytes ({}) must be at least --max-payload ({}) so one frame fits the replay ring",
            a.ring_bytes, a.max_payload
        ));
    }
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(_), Some(_)) if a.insecure_plaintext => {
            return Err("--tls-cert/--tls-key and --insecure-plaintext contradict each other: pick one".into())
        }
        (Some(c), Some(k)) => {
            server::tls::server_config(c, k)?;
            Some((c.clone(), k.clone()))
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err("--tls-cert and --tls-key go together: pass both (PEM files)".into())
        }
        (None, None) if a.insecure_plaintext || a.demo => None,
        (None, None) => {
            return Err("no TLS certificate: pass --tls-cert and --tls-key (PEM), or --insecure-plaintext for development on a trusted network".into())
        }
    };
    let auth = match (&a.tokens, a.insecure_no_auth) {
        (Some(_), true) => return Err("--tokens and --insecure-no-auth contradict each other: pick one".into()),
        (Some(p), false) => {
            Tokens::load(p).map_err(|e| format!("{e}; fix the file or point --tokens at a valid one"))?;
            Auth::Tokens(p.clone())
        }
        (None, true) => Auth::NoAuth,
        (None, false) if a.demo => Auth::NoAuth,
        (None, false) => {
            return Err("no tokens: pass --tokens FILE (lines of `TENANT_ID TOKEN_HEX64 [AGENT_ID]`), or --insecure-no-auth for development".into())
        }
    };
    let allowed =
        shards::allowed_cpus().map_err(|e| format!("cannot read the CPU affinity mask: {e}"))?;
    let cpus: Vec<usize> = match &a.cpus {
        Some(list) => {
            let l = shards::parse_cpu_list(list).map_err(|e| format!("--cpus: {e}"))?;
            if let Some(bad) = l.iter().find(|c| !allowed.contains(c)) {
                return Err(format!(
                    "--cpus: CPU {bad} is not in this process's affinity mask {allowed:?}"
                ));
            }
            l
        }
        None => allowed,
    };
    let n = a.shards.unwrap_or(cpus.len().max(1));
    if !(1..=256).contains(&n) {
        return Err(format!("--shards must be from 1 to 256, got {n}"));
    }
    // Pin only when each shard gets a CPU of its own.
    let pinned: Vec<Option<usize>> = (0..n).map(|i| (n <= cpus.len()).then(|| cpus[i])).collect();
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
        conn_rate_per_ip: a.max_conn_rate_per_ip,
        max_auth_failures_per_ip: a.max_auth_failures_per_ip,
        admin: match a.admin.as_str() {
            "off" => None,
            addr => Some(addr.parse().map_err(|_| {
                format!("--admin must be ADDR:PORT (e.g. 127.0.0.1:9720) or `off`, got `{addr}`")
            })?),
        },
    })
}

/// Applies the TOML config file named by `--config` (or CLAWTERM_CONFIG) by setting the
/// CLAWTERM_* variable of every key not already set, so the command line and the environment
/// win over the file. Returns the keys the file set. Unknown keys are an error naming them.
fn apply_config_file() -> Result<Vec<String>, String> {
    let argv: Vec<String> = std::env::args().collect();
    let mut path = std::env::var("CLAWTERM_CONFIG").ok();
    for (i, a) in argv.iter().enumerate() {
        if a == "--config" {
            path = argv.get(i + 1).cloned();
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.to_string());
        }
    }
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("config file {path}: {e}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("config file {path}: {}", e.message()))?;
    let cmd = Args::command();
    let mut keys = Vec::new();
    for (key, value) in table {
        let name = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()));
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
        }
        keys.push(key);
    }
    Ok(keys)
}

/// Points an error about an option at the config key that set it, if one did.
fn with_key(msg: String, keys: &[String]) -> String {
    for k in keys {
        if msg.contains(&format!("--{}", k.replace('_', "-"))) {
            return format!("config key `{k}`: {msg}");
        }
    }
    msg
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

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised sigset and `sig` a valid out-pointer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let keys = match apply_config_file() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("clawtermd: {e}");
            return ExitCode::from(2);
        }
    };
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "clawtermd: {}",
                with_key(
                    e.to_string()
                        .trim_start_matches("error: ")
                        .trim()
                        .to_string(),
                    &keys
                )
            );
            return ExitCode::from(2);
        }
    };
    let mut cfg = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clawtermd: {}", with_key(e, &keys));
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
    let demo = if args.demo {
        match clawterm::demo::prepare(&mut cfg, !args.insecure_plaintext) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("clawtermd: --demo: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    if !args.no_quic {
        warn!(
            port = args.quic_port,
            "QUIC is not available in this build yet; UDP port not bound"
        );
    }
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
        let auth = cfg.auth.clone();
        let res = server::watch::watch(watched, move |path| {
            if let Auth::Tokens(t) = &auth {
                if t == path {
                    match Tokens::load(t) {
                        Ok(tok) => {
                            info!(tokens = tok.len(), "tokens file changed; reloaded");
                            shared.set_tokens(tok);
                        }
                        Err(e) => error!(
                            "tokens file changed but is invalid, keeping the previous one: {e}"
                        ),
                    }
                    return;
                }
            }
            if let Some(t) = &shared.tls {
                match t.reload() {
                    Ok(()) => info!(file = %path.display(), "TLS certificate changed; reloaded"),
                    Err(e) => warn!("TLS files changed but do not load yet, keeping the previous certificate: {e}"),
                }
            }
        });
        if let Err(e) = res {
            warn!("cannot watch the tokens/TLS files for changes (SIGHUP still reloads): {e}");
        }
    }
    let Some(addr) = server.local_addr() else {
        eprintln!("clawtermd: no listening address");
        return ExitCode::FAILURE;
    };
    info!(
        "clawtermd {} listening on tcp {} ({}), {} shards, {} I/O, agents in {}",
        env!("CARGO_PKG_VERSION"),
        addr,
        if cfg.tls.is_some() {
            "TLS 1.3"
        } else {
            "plaintext"
        },
        cfg.shards,
        server.backend(),
        cfg.socket_dir.display()
    );
    if let Some(a) = server.admin_addr() {
        info!("admin endpoint on http://{a} (/metrics, /healthz, /readyz)");
    }
    if let Some(d) = &demo {
        d.run_walkthrough(addr);
    }
    loop {
        match wait_signal(&sigs) {
            libc::SIGHUP => {
                if let Some(t) = &server.shared().tls {
                    match t.reload() {
                        Ok(()) => info!("TLS certificate reloaded"),
                        Err(e) => {
                            error!("TLS certificate not reloaded, keeping the previous one: {e}")
                        }
                    }
                }
                match &cfg.auth {
                    Auth::Tokens(p) => match Tokens::load(p) {
                        Ok(t) => {
                            info!(tokens = t.len(), "tokens file reloaded");
                            server.shared().set_tokens(t);
                        }
                        Err(e) => error!("tokens file not reloaded, keeping the previous one: {e}"),
                    },
                    Auth::NoAuth => info!("SIGHUP: no tokens file to reload"),
                }
            }
            s => {
                info!(signal = s, "shutting down");
                break;
            }
        }
    }
    server.shutdown();
    match server.join() {
        Ok(()) => {
            info!("clawtermd stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("shard failure during shutdown: {e}");
            ExitCode::FAILURE
        }
    }
}
