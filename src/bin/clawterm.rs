//! `clawterm`: the interactive ClawTerm client. Sessions survive network loss: the connection
//! is re-established by itself, output is replayed exactly once and typed input is delivered
//! after the reconnect. The terminal loop is `clawterm_client::interactive`, the rest of the
//! logic `clawterm_client::cli`; this file declares the arguments and dispatches.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use clawterm_client::cli::{self, DEFAULT_PORT, DEFAULT_QUIC_PORT};
use clawterm_client::creds::valid_name;
use clawterm_client::{interactive, ClientError, Options, Session, Store, TlsTrust, Transport};

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
        cli::tls_trust(self.ca.as_deref(), self.pin.as_deref())
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
            let token = match cli::token(token.as_deref(), token_file.as_deref()) {
                Ok(t) => t,
                Err(e) => return usage(&e),
            };
            if name.as_deref().is_some_and(|n| !valid_name(n)) {
                return usage("--name: use letters, digits, '-', '_', '.', '@' (max 64)");
            }
            let port = if quic {
                DEFAULT_QUIC_PORT
            } else {
                DEFAULT_PORT
            };
            let ep = cli::normalize_endpoint(&endpoint, port);
            let opts = Options {
                transport,
                ..Options::default()
            };
            let session = match Session::connect_with(&ep, tenant, agent, token, opts) {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            let name = name.unwrap_or_else(|| format!("{:08x}", session.session_id()));
            ExitCode::from(interactive::attach(session, &name, &store, log))
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
                let new_trust = match trust.given().then(|| trust.trust()).transpose() {
                    Ok(t) => t,
                    Err(e) => return usage(&e),
                };
                creds.endpoint = cli::retarget(saved, quic, tcp, new_trust).to_string();
            }
            let session = match Session::resume(&creds) {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            ExitCode::from(interactive::attach(session, &name, &store, log))
        }
        Cmd::List => match cli::list_table(&store) {
            Ok(table) => {
                print!("{table}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Cmd::Export { name } => match store.load(&name) {
            Ok(c) => {
                println!("{}", c.export());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Cmd::Import { blob, name } => match cli::import(&store, &blob, name) {
            Ok(msg) => {
                eprintln!("clawterm: {msg}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Cmd::Forget { name } => match store.remove(&name) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
    }
}
