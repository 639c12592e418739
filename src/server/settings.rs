//! `clawtermd`'s settings and where they come from: the command line, the environment
//! (`CLAWTERM_*`) and the TOML file given with `--config`, in that order of precedence, over
//! the built-in defaults.
//!
//! [`Settings::load`] takes the three layers as values (the argument vector, a map of the
//! environment, a function that reads the file), so the layering is tested without a process;
//! [`Settings::from_process`] is the daemon's call. [`Loaded::server_config`] checks the values
//! together and builds the [`ServerConfig`]; a refusal names where each value at fault came
//! from (`environment variable CLAWTERM_PORT`, `config file F: key `port``), which is what
//! `--check-config` prints.

use crate::auth::Tokens;
use crate::server::{tls, Auth, ServerConfig};
use crate::session::{Overflow, SessionConfig};
use clap::builder::BoolishValueParser;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use std::collections::HashMap;
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

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
pub struct Settings {
    /// TCP port for clients (0 = pick a free one).
    #[arg(short, long, env = "CLAWTERM_PORT", default_value_t = 7220)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = "CLAWTERM_BIND", default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// UDP port for QUIC.
    #[arg(long, env = "CLAWTERM_QUIC_PORT", default_value_t = 7221)]
    pub quic_port: u16,
    /// Turn QUIC off.
    #[arg(long, env = "CLAWTERM_NO_QUIC", value_parser = BoolishValueParser::new())]
    pub no_quic: bool,
    /// TCP port of the WebSocket endpoint (`/ws`) and the browser terminal page (`/`); TLS
    /// 1.3 with the same certificate as the TCP port, plaintext only with
    /// --insecure-plaintext [default: 7222; with --port 0, a free port too].
    #[arg(long, env = "CLAWTERM_WS_PORT", value_name = "PORT")]
    pub ws_port: Option<u16>,
    /// Turn the WebSocket port off.
    #[arg(long, env = "CLAWTERM_NO_WS", value_parser = BoolishValueParser::new())]
    pub no_ws: bool,
    /// The browser terminal page's files [default: clients/web/dist of the source tree the
    /// binary was built in, else /usr/share/clawterm/web, else a page saying how to build it].
    #[arg(long, env = "CLAWTERM_WEB_ROOT", value_name = "DIR")]
    pub web_root: Option<PathBuf>,
    /// Origins (as browsers send them, e.g. https://app.example.com) whose pages may open a
    /// WebSocket besides the page this port serves; comma-separated, `*` for any.
    #[arg(
        long,
        env = "CLAWTERM_WS_ORIGIN",
        value_name = "ORIGINS",
        value_delimiter = ','
    )]
    pub ws_origin: Vec<String>,
    /// Largest WebSocket message a client may send, in bytes (close 1009 beyond).
    #[arg(long, env = "CLAWTERM_WS_MAX_MESSAGE", default_value_t = 1 << 20)]
    pub ws_max_message: u64,
    /// Directory where agent pods' sockets appear ({tenant}_{agent}).
    #[arg(
        short = 's',
        long,
        env = "CLAWTERM_SOCKET_DIR",
        default_value = "/run/claw/sockets"
    )]
    pub socket_dir: PathBuf,
    /// Tenant tokens file: lines of `TENANT_ID TOKEN_HEX64 [AGENT_ID]`; reloaded on SIGHUP.
    #[arg(long, env = "CLAWTERM_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Accept any token (development only).
    #[arg(long, env = "CLAWTERM_INSECURE_NO_AUTH", value_parser = BoolishValueParser::new())]
    pub insecure_no_auth: bool,
    /// TLS certificate chain (PEM) for the TCP port.
    #[arg(long, env = "CLAWTERM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "CLAWTERM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Plaintext TCP (development, legacy clients).
    #[arg(long, env = "CLAWTERM_INSECURE_PLAINTEXT", value_parser = BoolishValueParser::new())]
    pub insecure_plaintext: bool,
    /// Reactor threads [default: one per CPU the process may run on].
    #[arg(long, env = "CLAWTERM_SHARDS")]
    pub shards: Option<usize>,
    /// CPUs to pin shards to, e.g. `0,2-3` [default: the affinity mask]. Shard i runs on the
    /// i-th CPU (round-robin when there are more shards); the daemon's other threads stay on
    /// these CPUs too.
    #[arg(long, env = "CLAWTERM_CPUS")]
    pub cpus: Option<String>,
    /// I/O backend: auto, uring or epoll. auto falls back to epoll, saying so.
    #[arg(long, env = "CLAWTERM_IO", default_value = "auto")]
    pub io: shards::IoMode,
    /// Admin endpoint ADDR:PORT for /metrics, /healthz, /readyz, or `off`.
    #[arg(long, env = "CLAWTERM_ADMIN", default_value = "127.0.0.1:9720")]
    pub admin: String,
    /// State dir: what lets sessions outlive this process (restart, crash, upgrade); `off` or
    /// absent: nothing outlives it. A state dir held by a running clawtermd is refused, naming
    /// its pid and --upgrade. The DaemonSet sets /run/claw/state (tmpfs on the node).
    #[arg(long, env = "CLAWTERM_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// With --state-dir: if a running clawtermd holds it, take its listeners, sessions and
    /// connections over while it exits (live upgrade); if none does, start normally.
    #[arg(long, env = "CLAWTERM_UPGRADE", value_parser = BoolishValueParser::new())]
    pub upgrade: bool,
    /// What this process does once a live upgrade has handed everything to a new clawtermd:
    /// exit (status 0), or wait, holding nothing, until SIGTERM (for supervisors that restart a
    /// process that exits, e.g. a Kubernetes container).
    #[arg(
        long,
        env = "CLAWTERM_AFTER_UPGRADE",
        value_name = "exit|wait",
        default_value = "exit"
    )]
    pub after_upgrade: AfterUpgrade,
    /// Replay ring cap per session, in bytes of payload.
    #[arg(long, env = "CLAWTERM_RING_BYTES", default_value_t = 262144)]
    pub ring_bytes: usize,
    /// What a suspended session's full ring does: drop (oldest, reported as GAP) or pause the agent.
    #[arg(long, env = "CLAWTERM_OVERFLOW", default_value = "drop")]
    pub overflow: Overflow,
    /// Largest accepted frame payload (1024 to 65535).
    #[arg(long, env = "CLAWTERM_MAX_PAYLOAD", default_value_t = 65535)]
    pub max_payload: usize,
    /// Largest DATA payload sent (512 to 65535, and never above --max-payload): agent output
    /// goes out in frames of at most this size. 16 KiB keeps v1 clients that compute `13 +
    /// LEN` in 16 bits working and lets keystroke echoes of other sessions pass bulk output.
    #[arg(long, env = "CLAWTERM_MAX_SEND_PAYLOAD", default_value_t = 16384)]
    pub max_send_payload: usize,
    /// Seconds an attached client that has received everything may leave it unacknowledged
    /// while its agent waits, before its connection is paced by its send backlog instead of
    /// ACKs (its ring then keeps the newest --ring-bytes). Applies with --overflow drop.
    #[arg(long, env = "CLAWTERM_ACK_WAIT", default_value_t = 0.2)]
    pub ack_wait: f64,
    /// Sessions per node (suspended ones count); beyond it CONNECT gets OVERLOADED.
    #[arg(long, env = "CLAWTERM_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    /// Connections per shard that may be mid-handshake at once; more are closed at accept.
    /// Bounds the memory of connections that have not authenticated.
    #[arg(long, env = "CLAWTERM_MAX_PENDING_HANDSHAKES", default_value_t = 1024)]
    pub max_pending_handshakes: usize,
    /// New connections per second per source address, per shard (0 = unlimited); beyond it
    /// RATE_LIMITED.
    #[arg(long, env = "CLAWTERM_MAX_CONN_RATE_PER_IP", default_value_t = 10000)]
    pub max_conn_rate_per_ip: u32,
    /// Failed authentications (bad token, unknown session) per minute per source address, per
    /// shard, before the address gets RATE_LIMITED for the rest of the minute (0 = unlimited).
    #[arg(long, env = "CLAWTERM_MAX_AUTH_FAILURES_PER_IP", default_value_t = 30)]
    pub max_auth_failures_per_ip: u32,
    /// Send a KEEPALIVE after this many seconds without sending.
    #[arg(long, env = "CLAWTERM_KEEPALIVE", default_value_t = 30.0)]
    pub keepalive: f64,
    /// Close a connection after this many seconds without receiving anything.
    #[arg(long, env = "CLAWTERM_IDLE_TIMEOUT", default_value_t = 90.0)]
    pub idle_timeout: f64,
    /// Close a session suspended this many seconds.
    #[arg(long, env = "CLAWTERM_SUSPEND_TTL", default_value_t = 3600.0)]
    pub suspend_ttl: f64,
    /// Close a connection that has not completed CONNECT/RESUME within this many seconds.
    #[arg(long, env = "CLAWTERM_HANDSHAKE_TIMEOUT", default_value_t = 10.0)]
    pub handshake_timeout: f64,
    /// How long a lost agent pod may take to come back, in seconds.
    #[arg(long, env = "CLAWTERM_AGENT_GRACE", default_value_t = 60.0)]
    pub agent_grace: f64,
    /// Accept the 4-byte RESUME that carries no credential (INSECURE: anyone who guesses a
    /// session id can take the session over).
    #[arg(long, env = "CLAWTERM_ALLOW_LEGACY_RESUME", value_parser = BoolishValueParser::new())]
    pub allow_legacy_resume: bool,
    /// This node's name in a cluster [default: the host name].
    #[arg(long, env = "CLAWTERM_NODE_ID", value_name = "NAME")]
    pub node_id: Option<String>,
    /// The cluster's session directory (ClawRoam), e.g. `redis://HOST:6379/0`. Without it the
    /// node is on its own: nothing is shared and sessions never move.
    #[arg(long, env = "CLAWTERM_KEEPER", value_name = "URL")]
    pub keeper: Option<String>,
    /// Where clients and other nodes reach this node, HOST[:PORT] [default: the bind address
    /// and --port]. ROAM frames send clients here, so in a cluster it must be an address they
    /// can reach (not 0.0.0.0).
    #[arg(long, env = "CLAWTERM_ADVERTISE", value_name = "HOST[:PORT]")]
    pub advertise: Option<String>,
    /// Node-to-node link (sessions moving between nodes, relay), mutually authenticated with
    /// the cluster secret; listens on the bind address.
    #[arg(long, env = "CLAWTERM_PEER_PORT", default_value_t = 7223)]
    pub peer_port: u16,
    /// File holding the cluster secret (at least 16 bytes, the same on every node): it
    /// authenticates the peer link both ways and encrypts it. Required with --keeper.
    #[arg(long, env = "CLAWTERM_CLUSTER_SECRET", value_name = "FILE")]
    pub cluster_secret: Option<PathBuf>,
    /// TOML config file: keys are the long option names with `_` for `-` (`ring_bytes =
    /// 262144`); the command line and CLAWTERM_* variables win over it.
    #[arg(long, env = "CLAWTERM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the options, config file and tokens file, print the result and exit (0 when
    /// valid) without starting.
    #[arg(long)]
    pub check_config: bool,
    /// Everything embedded for a first run: a temporary socket dir, a built-in echo agent, a
    /// printed dev token, loopback only, and a scripted client that shows connect, echo, an
    /// abrupt drop and a resume with replay.
    #[arg(long, env = "CLAWTERM_DEMO", value_parser = BoolishValueParser::new())]
    pub demo: bool,
}

/// What a clawtermd does after handing itself over (`--after-upgrade`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AfterUpgrade {
    Exit,
    Wait,
}

/// How loading the settings ends early.
#[derive(Debug)]
pub enum Early {
    /// `--help` or `--version`: print it and exit 0.
    Print(clap::Error),
    /// A bad option, variable or config file: the message (without the `clawtermd: ` prefix).
    Refused(String),
}

/// The settings in force, and where each one that did not come from the command line or a
/// default came from.
#[derive(Debug)]
pub struct Loaded {
    pub settings: Settings,
    /// Long option name -> `environment variable CLAWTERM_X` or `config file F: key `x``.
    origins: HashMap<String, String>,
}

impl Settings {
    /// Loads the settings of this process: its arguments, its environment and the config file
    /// named by `--config` or `CLAWTERM_CONFIG`.
    pub fn from_process() -> Result<Loaded, Early> {
        let env: HashMap<String, OsString> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
            .collect();
        Settings::load(std::env::args_os(), &env, |p| std::fs::read_to_string(p))
    }

    /// Layers `argv` (program name first) over `env` (the `CLAWTERM_*` variables; others are
    /// ignored) over the TOML file that `--config` or `CLAWTERM_CONFIG` names, read with
    /// `read_file`, over the defaults. Unknown keys and values that are no string, number or
    /// boolean are refused, naming the key; a bad value is refused naming its source.
    pub fn load<I, T>(
        argv: I,
        env: &HashMap<String, OsString>,
        read_file: impl FnOnce(&Path) -> std::io::Result<String>,
    ) -> Result<Loaded, Early>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        // 1. The command line alone: its own errors, and where the file is.
        let cli = match Settings::command()
            .mut_args(|a| a.env(None::<&str>))
            .try_get_matches_from(&argv)
        {
            Ok(m) => m,
            Err(e) if !e.use_stderr() => {
                // --help/--version: print the full command's (it lists the variables).
                return Err(Early::Print(
                    Settings::command()
                        .try_get_matches_from(&argv)
                        .err()
                        .unwrap_or(e),
                ));
            }
            Err(e) => return Err(Early::Refused(clap_message(&e))),
        };
        let file = match cli.get_one::<PathBuf>("config") {
            Some(p) => Some(p.display().to_string()),
            None => env
                .get("CLAWTERM_CONFIG")
                .and_then(|v| v.to_str())
                .map(str::to_string),
        };
        // 2. The file's keys, by variable name.
        let from_file = match &file {
            Some(f) => {
                let text = read_file(Path::new(f))
                    .map_err(|e| Early::Refused(format!("config file {f}: {e}")))?;
                parse_file(f, &text).map_err(Early::Refused)?
            }
            None => HashMap::new(),
        };
        // 3. Each option the command line leaves unset takes the environment's value, else
        //    the file's, else its default: the layered value becomes the option's default, so
        //    clap parses and checks it exactly as it does a value of its own.
        let mut origins = HashMap::new();
        let layered = Settings::command().mut_args(|a| {
            let Some(var) = a.get_env().and_then(|v| v.to_str()).map(str::to_string) else {
                return a;
            };
            let a = a.env(None::<&str>);
            let long = a.get_long().unwrap_or_default().to_string();
            if cli.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine) {
                return a;
            }
            let (value, origin) = match (env.get(&var), from_file.get(&var)) {
                (Some(v), _) => (v.clone(), format!("environment variable {var}")),
                (None, Some((key, v))) => (
                    OsString::from(v),
                    format!("config file {}: key `{key}`", file.as_deref().unwrap_or("")),
                ),
                (None, None) => return a,
            };
            origins.insert(long, origin);
            a.default_value(value)
        });
        // 4. Everything together; the command line was fine, so an error here is a layered
        //    value's: name its source.
        let all = layered.try_get_matches_from(&argv).map_err(|e| {
            if !e.use_stderr() {
                return Early::Print(e);
            }
            let msg = clap_message(&e);
            Early::Refused(match clap_error_option(&e).and_then(|o| origins.get(&o)) {
                Some(origin) => format!("{origin}: {msg}"),
                None => msg,
            })
        })?;
        let settings =
            Settings::from_arg_matches(&all).map_err(|e| Early::Refused(clap_message(&e)))?;
        Ok(Loaded { settings, origins })
    }
}

/// Reads the TOML config file `text` (from `path`): `CLAWTERM_*` variable -> (key, value).
fn parse_file(path: &str, text: &str) -> Result<HashMap<String, (String, String)>, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("config file {path}: {}", e.message()))?;
    let cmd = Settings::command();
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
        from_file.insert(env.to_string_lossy().into_owned(), (key, v));
    }
    Ok(from_file)
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

impl Loaded {
    /// Where the value of option `long` (`ring-bytes`) came from, when that was neither the
    /// command line nor a default: `environment variable CLAWTERM_RING_BYTES` or `config file
    /// F: key `ring_bytes``.
    pub fn origin(&self, long: &str) -> Option<&str> {
        self.origins.get(long).map(String::as_str)
    }

    /// The server's configuration, the values checked together (the tokens file and the TLS
    /// certificate are loaded to check them); a refusal names the sources of the values at
    /// fault.
    pub fn server_config(&self) -> Result<ServerConfig, String> {
        self.server_config_with(shards::allowed_cpus)
    }

    /// [`Loaded::server_config`] with the CPUs this process may run on from `allowed_cpus`.
    pub fn server_config_with(
        &self,
        allowed_cpus: impl FnOnce() -> std::io::Result<Vec<usize>>,
    ) -> Result<ServerConfig, String> {
        build_config(&self.settings, allowed_cpus).map_err(|b| {
            let origins: Vec<&str> = b.opts.iter().filter_map(|o| self.origin(o)).collect();
            if origins.is_empty() {
                b.msg
            } else {
                format!("{}: {}", origins.join("; "), b.msg)
            }
        })
    }

    /// What `--check-config` prints for a valid configuration (after `clawtermd: `).
    pub fn summary(&self, cfg: &ServerConfig) -> String {
        format!(
            "configuration OK: {} shards, {} I/O, tcp {}:{}, agents in {}, auth {}",
            cfg.shards,
            self.settings.io,
            cfg.bind,
            cfg.port,
            cfg.socket_dir.display(),
            match &cfg.auth {
                Auth::NoAuth => "off (--insecure-no-auth)".to_string(),
                Auth::Tokens(p) => format!("tokens file {}", p.display()),
            }
        )
    }
}

fn build_config(
    a: &Settings,
    allowed_cpus: impl FnOnce() -> std::io::Result<Vec<usize>>,
) -> Result<ServerConfig, Bad> {
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
            tls::server_config(c, k).map_err(|e| bad(&["tls-cert", "tls-key"], e))?;
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
    let allowed =
        allowed_cpus().map_err(|e| bad(&[], format!("cannot read the CPU affinity mask: {e}")))?;
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
    if a.upgrade && a.state_dir.as_ref().is_none_or(|d| d.as_os_str() == "off") {
        return Err(bad(
            &["upgrade"],
            "--upgrade needs --state-dir DIR (the state dir of the clawtermd to take over)"
                .to_string(),
        ));
    }
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
        state_dir: a
            .state_dir
            .clone()
            .filter(|d| d.as_os_str() != "off" && !d.as_os_str().is_empty()),
        upgrade: a.upgrade,
        tls,
        quic_port: (!a.no_quic).then_some(a.quic_port),
        ws: (!a.no_ws).then(|| crate::server::config::WsSettings {
            port: a.ws_port.unwrap_or(if a.port == 0 { 0 } else { 7222 }),
            web_root: a.web_root.clone(),
            origins: a
                .ws_origin
                .iter()
                .map(|o| o.trim().to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            max_message: a.ws_max_message.max(1024),
        }),
        conn_rate_per_ip: a.max_conn_rate_per_ip,
        max_auth_failures_per_ip: a.max_auth_failures_per_ip,
        cluster: cluster_config(a)?,
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

/// The cluster part of the configuration: `None` without `--keeper` (one node on its own).
fn cluster_config(a: &Settings) -> Result<Option<crate::server::config::ClusterConfig>, Bad> {
    let Some(url) = a.keeper.clone().filter(|u| !u.is_empty() && u != "off") else {
        return Ok(None);
    };
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(bad(
            &["keeper"],
            format!("--keeper must be a Redis URL such as redis://HOST:6379/0, got `{url}`"),
        ));
    }
    let Some(secret_file) = a.cluster_secret.clone() else {
        return Err(bad(
            &["keeper"],
            "--keeper needs --cluster-secret FILE (the same secret of at least 16 bytes on every node): the peer link is never open without credentials",
        ));
    };
    let secret = std::fs::read(&secret_file).map_err(|e| {
        bad(
            &["cluster-secret"],
            format!("--cluster-secret {}: {e}", secret_file.display()),
        )
    })?;
    let secret: Vec<u8> = secret.trim_ascii().to_vec();
    if secret.len() < 16 {
        return Err(bad(
            &["cluster-secret"],
            format!(
                "--cluster-secret {}: the secret is {} bytes; use at least 16 (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
                secret_file.display(),
                secret.len()
            ),
        ));
    }
    let node_id = match &a.node_id {
        Some(n) => n.clone(),
        None => crate::server::config::host_name().ok_or_else(|| {
            bad(
                &["node-id"],
                "cannot read the host name: pass --node-id NAME",
            )
        })?,
    };
    if node_id.is_empty()
        || node_id.len() > 64
        || !node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(bad(
            &["node-id"],
            format!("--node-id must be 1 to 64 characters of letters, digits, `-`, `_` or `.`, got `{node_id}`"),
        ));
    }
    let (host, port) = match &a.advertise {
        Some(adv) => match adv.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.starts_with('[') => {
                let port = p.parse::<u16>().map_err(|_| {
                    bad(&["advertise"], format!("--advertise {adv}: `{p}` is not a port"))
                })?;
                (h.trim_start_matches('[').trim_end_matches(']').to_string(), port)
            }
            _ => (adv.clone(), a.port),
        },
        None if a.bind.is_unspecified() => {
            return Err(bad(
                &["advertise", "bind"],
                "in a cluster (--keeper) clients and nodes must be told where this node is: pass --advertise HOST[:PORT] (the bind address is 0.0.0.0)",
            ))
        }
        None => (a.bind.to_string(), a.port),
    };
    if port == 0 || a.peer_port == 0 {
        return Err(bad(
            &["port", "peer-port", "advertise"],
            "in a cluster (--keeper) other nodes must know this node's ports: give --port (or --advertise HOST:PORT) and --peer-port other than 0",
        ));
    }
    let ip: IpAddr = match host.parse() {
        Ok(ip) => ip,
        Err(_) => {
            use std::net::ToSocketAddrs;
            (host.as_str(), port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .map(|sa| sa.ip())
                .ok_or_else(|| {
                    bad(
                        &["advertise"],
                        format!("--advertise: cannot resolve `{host}`"),
                    )
                })?
        }
    };
    if ip.is_unspecified() {
        return Err(bad(
            &["advertise"],
            "--advertise must be an address clients can reach, not 0.0.0.0 or ::",
        ));
    }
    Ok(Some(crate::server::config::ClusterConfig {
        node_id,
        keeper: url,
        advertise: std::net::SocketAddr::new(ip, port),
        advertise_port_given: a.advertise.as_deref().is_some_and(|s| s.contains(':')),
        peer_bind: std::net::SocketAddr::new(a.bind, a.peer_port),
        peer_advertise: std::net::SocketAddr::new(ip, a.peer_port),
        secret,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// Enough to pass the checks, from the command line.
    const DEV: [&str; 3] = ["clawtermd", "--insecure-no-auth", "--insecure-plaintext"];

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, OsString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect()
    }

    /// Loads with the file `c.toml` holding `toml` (when `--config c.toml` or CLAWTERM_CONFIG
    /// names it) and two CPUs allowed.
    fn load(argv: &[&str], vars: &[(&str, &str)], toml: &str) -> Result<ServerConfig, String> {
        let loaded = Settings::load(argv, &env(vars), |p| {
            assert_eq!(p, Path::new("c.toml"));
            Ok(toml.to_string())
        })
        .map_err(|e| match e {
            Early::Refused(m) => m,
            Early::Print(e) => panic!("printed: {e}"),
        })?;
        loaded.server_config_with(|| Ok(vec![0, 1]))
    }

    fn with_file(args: &[&'static str]) -> Vec<&'static str> {
        [&DEV[..], &["--config", "c.toml"], args].concat()
    }

    /// The cluster options are checked together, each refusal naming the fix; without
    /// --keeper none of them matters.
    #[test]
    fn cluster_options_are_checked_with_their_fix() {
        let dir = std::env::temp_dir().join(format!("ct-cluster-opts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "0123456789abcdef0123456789abcdef\n").unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "tooshort").unwrap();
        let (g, sh) = (good.to_str().unwrap(), short.to_str().unwrap());
        let base = |extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = DEV.iter().map(|s| s.to_string()).collect();
            v.extend(["--keeper", "redis://127.0.0.1:6379/0"].map(String::from));
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let run = |argv: Vec<String>| {
            let a: Vec<&str> = argv.iter().map(String::as_str).collect();
            load(&a, &[], "")
        };
        let e = run(base(&["--advertise", "10.0.0.1"])).unwrap_err();
        assert!(e.contains("--cluster-secret"), "{e}");
        let e = run(base(&["--cluster-secret", sh, "--advertise", "10.0.0.1"])).unwrap_err();
        assert!(e.contains("at least 16"), "{e}");
        let e = run(base(&["--cluster-secret", g])).unwrap_err();
        assert!(e.contains("--advertise"), "{e}");
        let e = run(base(&[
            "--cluster-secret",
            g,
            "--advertise",
            "10.0.0.1",
            "--port",
            "0",
        ]))
        .unwrap_err();
        assert!(e.contains("other than 0"), "{e}");
        let e = run(base(&[
            "--cluster-secret",
            g,
            "--advertise",
            "10.0.0.1",
            "--node-id",
            "a b",
        ]))
        .unwrap_err();
        assert!(e.contains("--node-id"), "{e}");
        let e = load(&[DEV[0], DEV[1], DEV[2], "--keeper", "http://x"], &[], "").unwrap_err();
        assert!(e.contains("redis://"), "{e}");
        let c = run(base(&[
            "--cluster-secret",
            g,
            "--advertise",
            "10.0.0.1:7300",
            "--node-id",
            "n-1",
            "--peer-port",
            "7400",
        ]))
        .unwrap();
        let cc = c.cluster.expect("a cluster");
        assert_eq!(cc.node_id, "n-1");
        assert_eq!(cc.advertise, "10.0.0.1:7300".parse().unwrap());
        assert_eq!(cc.peer_advertise, "10.0.0.1:7400".parse().unwrap());
        assert_eq!(
            cc.secret.len(),
            32,
            "the file's trailing newline is not part of it"
        );
        assert!(
            !format!("{cc:?}").contains("0123456789abcdef"),
            "the secret is redacted"
        );
        assert!(load(&DEV, &[], "").unwrap().cluster.is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn defaults_without_file_or_environment() {
        let cfg = load(&DEV, &[], "").unwrap();
        assert_eq!(cfg.port, 7220);
        assert_eq!(cfg.bind.to_string(), "0.0.0.0");
        assert_eq!(cfg.quic_port, Some(7221));
        assert_eq!(cfg.socket_dir, PathBuf::from("/run/claw/sockets"));
        assert!(matches!(cfg.auth, Auth::NoAuth));
        assert!(cfg.tls.is_none());
        assert_eq!(cfg.admin, Some("127.0.0.1:9720".parse().unwrap()));
        assert_eq!(cfg.session.ring_bytes, 262144);
        assert_eq!(cfg.session.keepalive_ms, 30_000);
        assert_eq!(cfg.session.ack_wait_ms, 200);
        assert_eq!(cfg.handshake_ms, 10_000);
        assert_eq!((cfg.shards, cfg.cpus), (2, vec![Some(0), Some(1)]));
    }

    #[test]
    fn command_line_beats_environment_beats_file_beats_default() {
        let file = "port = 7305\nring_bytes = 300000\n";
        let cfg = load(&with_file(&[]), &[], file).unwrap();
        assert_eq!((cfg.port, cfg.session.ring_bytes), (7305, 300000));
        let cfg = load(&with_file(&[]), &[("CLAWTERM_PORT", "7303")], file).unwrap();
        assert_eq!((cfg.port, cfg.session.ring_bytes), (7303, 300000));
        let argv = with_file(&["--port", "7304"]);
        let cfg = load(&argv, &[("CLAWTERM_PORT", "7303")], file).unwrap();
        assert_eq!(cfg.port, 7304);
        // A bad value in a lower layer is never looked at.
        let argv = with_file(&["--port", "7301"]);
        assert_eq!(
            load(&argv, &[("CLAWTERM_PORT", "abc")], "port = \"x\"\n")
                .unwrap()
                .port,
            7301
        );
        let vars = [("CLAWTERM_PORT", "7300")];
        assert_eq!(
            load(&with_file(&[]), &vars, "port = \"abc\"\n")
                .unwrap()
                .port,
            7300
        );
        // Variables that are not options are ignored.
        assert!(load(&DEV, &[("CLAWTERM_BOGUS", "1"), ("PATH", "/bin")], "").is_ok());
    }

    #[test]
    fn the_file_can_come_from_the_environment() {
        let cfg = load(&DEV, &[("CLAWTERM_CONFIG", "c.toml")], "port = 7306\n").unwrap();
        assert_eq!(cfg.port, 7306);
        let e = Settings::load(DEV, &env(&[("CLAWTERM_CONFIG", "/no/such.toml")]), |_| {
            Err(io::Error::new(io::ErrorKind::NotFound, "No such file"))
        })
        .unwrap_err();
        assert!(
            matches!(&e, Early::Refused(m) if m == "config file /no/such.toml: No such file"),
            "{e:?}"
        );
    }

    #[test]
    fn a_refusal_names_the_source_of_the_value() {
        let e = load(&with_file(&[]), &[], "keepalive = -1\n").unwrap_err();
        assert_eq!(
            e,
            "config file c.toml: key `keepalive`: --keepalive must be a positive number of \
             seconds, got -1"
        );
        let vars = [("CLAWTERM_KEEPALIVE", "-1")];
        let e = load(&with_file(&[]), &vars, "keepalive = 10\n").unwrap_err();
        assert!(
            e.starts_with("environment variable CLAWTERM_KEEPALIVE: --keepalive"),
            "{e}"
        );
        let e = load(&DEV, &[("CLAWTERM_PORT", "abc")], "").unwrap_err();
        assert_eq!(
            e,
            "environment variable CLAWTERM_PORT: invalid value 'abc' for '--port <PORT>': \
             invalid digit found in string"
        );
        let e = load(&with_file(&[]), &[], "overflow = \"sometimes\"\n").unwrap_err();
        assert!(
            e.starts_with("config file c.toml: key `overflow`: invalid value"),
            "{e}"
        );
        // From the command line: no source named.
        let argv = [&DEV[..], &["--keepalive=-1"]].concat();
        assert_eq!(
            load(&argv, &[], "").unwrap_err(),
            "--keepalive must be a positive number of seconds, got -1"
        );
        let argv = [&DEV[..], &["--port", "abc"]].concat();
        assert!(load(&argv, &[], "")
            .unwrap_err()
            .starts_with("invalid value 'abc' for '--port"));
        // Two options in conflict, one from each layer: both named.
        let vars = [("CLAWTERM_RING_BYTES", "2000")];
        let e = load(&with_file(&[]), &vars, "max_payload = 65535\n").unwrap_err();
        assert!(
            e.starts_with(
                "environment variable CLAWTERM_RING_BYTES; config file c.toml: key `max_payload`: \
                 --ring-bytes (2000) must be at least --max-payload (65535)"
            ),
            "{e}"
        );
    }

    #[test]
    fn the_file_refuses_unknown_keys_and_tables() {
        for key in ["bogus", "config", "check_config"] {
            let e = load(&with_file(&[]), &[], &format!("{key} = 1\n")).unwrap_err();
            assert!(
                e.starts_with(&format!(
                    "config file c.toml: unknown key `{key}`; valid keys: port, bind,"
                )),
                "{e}"
            );
            let valid = e.split("valid keys: ").nth(1).unwrap_or_default();
            assert!(valid.ends_with(", demo"), "{e}");
            assert!(!valid.contains("config"), "{e}");
        }
        let e = load(&with_file(&[]), &[], "shards = [1, 2]\n").unwrap_err();
        assert_eq!(
            e,
            "config file c.toml: key `shards` must be a string, number or boolean, not array"
        );
        let e = load(&with_file(&[]), &[], "not toml [").unwrap_err();
        assert!(e.starts_with("config file c.toml: "), "{e}");
    }

    #[test]
    fn switches_take_boolean_words_in_the_environment() {
        let argv = ["clawtermd", "--insecure-no-auth", "--config", "c.toml"];
        for yes in ["1", "true", "yes", "TRUE", "on"] {
            let vars = [("CLAWTERM_INSECURE_PLAINTEXT", yes)];
            assert!(load(&argv, &vars, "").is_ok(), "{yes}");
        }
        for no in ["0", "false", "no", "off"] {
            let vars = [("CLAWTERM_INSECURE_PLAINTEXT", no)];
            let e = load(&argv, &vars, "insecure_plaintext = true\n").unwrap_err();
            assert!(e.starts_with("no TLS certificate"), "{no}: {e}");
        }
        assert!(load(&argv, &[], "insecure_plaintext = true\n").is_ok());
        let e = load(&argv, &[("CLAWTERM_NO_QUIC", "maybe")], "").unwrap_err();
        assert_eq!(
            e,
            "environment variable CLAWTERM_NO_QUIC: invalid value 'maybe' for '--no-quic': \
             value was not a boolean"
        );
        let cfg = load(&with_file(&[]), &[], "no_quic = true\n").unwrap();
        assert_eq!(cfg.quic_port, None);
    }

    #[test]
    fn demo_needs_no_tokens_or_certificate() {
        let e = load(&["clawtermd"], &[], "").unwrap_err();
        assert!(e.starts_with("no TLS certificate"), "{e}");
        assert!(load(&["clawtermd", "--demo"], &[], "").is_ok());
        assert!(load(&["clawtermd"], &[("CLAWTERM_DEMO", "1")], "").is_ok());
        let argv = ["clawtermd", "--config", "c.toml"];
        assert!(load(&argv, &[], "demo = true\n").is_ok());
        assert!(load(&argv, &[("CLAWTERM_DEMO", "0")], "demo = true\n").is_err());
    }

    #[test]
    fn shards_follow_the_cpus() {
        let run = |args: &[&'static str], allowed: Vec<usize>| {
            let argv = [&DEV[..], args].concat();
            let loaded = Settings::load(argv, &HashMap::new(), |_| Ok(String::new())).unwrap();
            loaded.server_config_with(|| Ok(allowed))
        };
        let cfg = run(&[], vec![2, 5, 7]).unwrap();
        assert_eq!(cfg.cpus, vec![Some(2), Some(5), Some(7)]);
        // More shards than CPUs: left to the scheduler, unless --cpus says otherwise.
        let cfg = run(&["--shards", "3"], vec![0, 1]).unwrap();
        assert_eq!(cfg.cpus, vec![None; 3]);
        let cfg = run(&["--shards", "3", "--cpus", "1"], vec![0, 1]).unwrap();
        assert_eq!(cfg.cpus, vec![Some(1); 3]);
        let e = run(&["--cpus", "0-3"], vec![0, 1]).unwrap_err();
        assert_eq!(
            e,
            "--cpus: CPU 2 is not in this process's affinity mask [0, 1]"
        );
        assert_eq!(
            run(&["--shards", "0"], vec![0]).unwrap_err(),
            "--shards must be from 1 to 256, got 0"
        );
        let e = run(&[], vec![]).map(|c| c.shards);
        assert_eq!(e, Ok(1));
        let e = Settings::load(DEV, &HashMap::new(), |_| Ok(String::new()))
            .unwrap()
            .server_config_with(|| Err(io::Error::other("no /proc")))
            .unwrap_err();
        assert_eq!(e, "cannot read the CPU affinity mask: no /proc");
    }

    #[test]
    fn help_and_version_are_printed() {
        for flag in ["--help", "-h", "--version"] {
            let r = Settings::load(["clawtermd", flag], &HashMap::new(), |_| unreachable!());
            assert!(matches!(r, Err(Early::Print(_))), "{flag}");
        }
        let r = Settings::load(
            ["clawtermd", "--bogus"],
            &HashMap::new(),
            |_| unreachable!(),
        );
        assert!(
            matches!(&r, Err(Early::Refused(m)) if m.starts_with("unexpected argument '--bogus'")),
            "{r:?}"
        );
    }

    #[test]
    fn check_config_summary() {
        let argv = [&DEV[..], &["--port", "7400", "--socket-dir", "/tmp/s"]].concat();
        let loaded = Settings::load(argv, &HashMap::new(), |_| unreachable!()).unwrap();
        let cfg = loaded.server_config_with(|| Ok(vec![0])).unwrap();
        assert_eq!(
            loaded.summary(&cfg),
            "configuration OK: 1 shards, auto I/O, tcp 0.0.0.0:7400, agents in /tmp/s, auth off \
             (--insecure-no-auth)"
        );
        assert_eq!(loaded.origin("port"), None);
    }
}
