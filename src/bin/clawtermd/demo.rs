//! `clawtermd --demo`: everything embedded for a first look.
//!
//! A temporary socket directory with a built-in echo agent (tenant 1, agent 1), a freshly
//! generated dev token in a tokens file, loopback only — and a scripted client that connects,
//! echoes, loses its connection abruptly while output is in flight, resumes on a new connection
//! and receives exactly what it missed.

use clawterm::server::{Auth, ServerConfig};
use clawterm_agent::{Agent, AgentListener, Outbox, SessionId};
use clawterm_client::{Event, Options, Session, Transport};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Tenant and agent of the built-in echo agent.
pub const DEMO_TENANT: u32 = 1;
pub const DEMO_AGENT: u32 = 1;

struct Echo;

impl Agent for Echo {
    fn data(&mut self, s: SessionId, bytes: &[u8], out: &Outbox) {
        let _ = out.data(s, bytes);
    }
}

/// The embedded pieces of a demo run.
pub struct Demo {
    dir: PathBuf,
    token: [u8; 32],
    stop: Arc<AtomicBool>,
    /// The self-signed certificate (path, SHA-256) when the demo runs TLS.
    tls: Option<(PathBuf, String)>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sets up the demo: loopback address, a temporary socket dir with an echo agent, a dev token
/// and (with `tls`) a self-signed certificate; rewrites `cfg` to use them.
pub fn prepare(cfg: &mut ServerConfig, tls: bool) -> std::io::Result<Demo> {
    let dir = std::env::temp_dir().join(format!("clawterm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut token = [0u8; 32];
    getrandom::getrandom(&mut token).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "# clawtermd --demo dev token\n{DEMO_TENANT} {}\n",
            hex::encode(token)
        ),
    )?;
    let sockets = dir.join("sockets");
    let listener = AgentListener::bind(&sockets, DEMO_TENANT, DEMO_AGENT)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    std::thread::Builder::new()
        .name("demo-agent".into())
        .spawn(move || {
            if let Err(e) = listener.serve(|| Echo, stop2) {
                tracing::error!("demo agent stopped: {e}");
            }
        })?;
    if cfg.ws.as_ref().is_some_and(|w| w.web_root.is_none()) {
        build_page_if_missing();
    }
    cfg.bind = Ipv4Addr::LOCALHOST.into();
    cfg.socket_dir = sockets;
    cfg.auth = Auth::Tokens(tokens);
    let tls = if tls && cfg.tls.is_none() {
        let (cert, key, fp) =
            clawterm::server::tls::self_signed(&dir).map_err(std::io::Error::other)?;
        cfg.tls = Some((cert.clone(), key));
        Some((cert, fp))
    } else {
        None
    };
    Ok(Demo {
        dir,
        token,
        stop,
        tls,
    })
}

/// The demo serves the browser terminal: when this binary runs from a source tree whose page
/// is not built yet and Node.js is here, build it (`scripts/build-web.sh`, first run only);
/// otherwise the port serves a page that says how. Only for a person at a terminal (a script or a test running the demo does not build).
fn build_page_if_missing() {
    use std::io::IsTerminal;
    if clawterm::server::ws::assets::Assets::default_root().is_some()
        || !std::io::stdin().is_terminal()
    {
        return;
    }
    let Some(tree) = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.parent()?.to_path_buf()))
    else {
        return;
    };
    let script = tree.join("scripts/build-web.sh");
    let has_npm = std::process::Command::new("npm")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !script.is_file() || !has_npm {
        return;
    }
    println!(
        "  building the browser terminal page (first run only): {}",
        script.display()
    );
    match std::process::Command::new("bash").arg(&script).status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("  building the page failed ({s}); / serves a placeholder"),
        Err(e) => eprintln!(
            "  cannot run {}: {e}; / serves a placeholder",
            script.display()
        ),
    }
}

impl Demo {
    /// Prints how to use the demo server, then runs the scripted walkthrough on a thread.
    /// Prints how to use the demo server (TCP at `addr`, QUIC at `quic` when on) and runs
    /// the scripted client in the background.
    pub fn run_walkthrough(
        &self,
        addr: SocketAddr,
        quic: Option<SocketAddr>,
        ws: Option<SocketAddr>,
    ) {
        println!();
        let token = hex::encode(self.token);
        if let Some(w) = ws {
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            println!(
                "  browser terminal: {scheme}://{w}/#tenant={DEMO_TENANT}&agent={DEMO_AGENT}&token={token}"
            );
            if self.tls.is_some() {
                println!("    (self-signed certificate: the browser asks you to accept it once)");
            }
        }
        match &self.tls {
            Some((cert, fp)) => {
                println!("  clawtermd demo is running on {addr} (TLS 1.3, loopback only)");
                if let Some(q) = quic {
                    println!("  and on QUIC at udp {q}");
                }
                println!(
                    "  self-signed certificate: {} (SHA-256 {fp})",
                    cert.display()
                );
                println!("  clients trust it with --ca {}", cert.display());
                println!("  built-in echo agent: tenant {DEMO_TENANT}, agent {DEMO_AGENT}");
                println!("  dev token: {token}");
                println!("  try it from another terminal:");
                println!(
                    "    cargo run --release --bin clawterm -- connect {addr} --ca {} \\\n      --tenant {DEMO_TENANT} --agent {DEMO_AGENT} --token {token}",
                    cert.display()
                );
                if let Some(q) = quic {
                    println!("    (over QUIC: connect {q} --quic with the same options)");
                }
            }
            None => {
                println!("  clawtermd demo is running on {addr} (plaintext, loopback only)");
                println!("  built-in echo agent: tenant {DEMO_TENANT}, agent {DEMO_AGENT}");
                println!("  dev token: {token}");
                println!("  try it from another terminal:");
                println!(
                    "    cargo run --release --bin clawterm -- connect {addr} --plaintext \\\n      --tenant {DEMO_TENANT} --agent {DEMO_AGENT} --token {token}"
                );
            }
        }
        println!("  press Ctrl-C to stop");
        println!();
        let token = self.token;
        let ca = self.tls.as_ref().map(|(cert, _)| cert.clone());
        let _ = std::thread::Builder::new().name("demo-client".into()).spawn(move || {
            // Give the shards a moment to be serving before the scripted client connects.
            std::thread::sleep(Duration::from_millis(200));
            match walkthrough(addr, token, ca.as_deref()) {
                Ok(()) => println!("  demo walkthrough: OK — every missed frame replayed exactly once, in order\n"),
                Err(e) => println!("  demo walkthrough failed: {e}\n"),
            }
        });
    }
}

/// The scripted client, on the client library (the same code `clawterm` runs): connect, echo,
/// lose the connection with output in flight, resume, receive exactly what was missed.
fn walkthrough(addr: SocketAddr, token: [u8; 32], ca: Option<&Path>) -> Result<(), String> {
    let opts = Options {
        transport: match ca {
            Some(cert) => Transport::tls_ca(cert),
            None => Transport::Plaintext,
        },
        ..Options::default()
    };
    let endpoint = addr.to_string();
    let mut s = Session::connect_with(&endpoint, DEMO_TENANT, DEMO_AGENT, token, opts)
        .map_err(|e| format!("connect: {e}"))?;
    println!("  [1] CONNECT → ACCEPT: session {:#010x}", s.session_id());
    s.send(b"hello, agent").map_err(|e| e.to_string())?;
    let echo = next_data(&mut s)?;
    println!(
        "  [2] DATA \"hello, agent\" → echoed back as SEQ {}: {:?}",
        s.last_seq(),
        String::from_utf8_lossy(&echo)
    );
    let last_seen = s.last_seq();
    for i in 1..=3 {
        let line = format!("line {i} typed just before the network died");
        s.send(line.as_bytes()).map_err(|e| e.to_string())?;
    }
    // Abrupt loss: no SUSPEND, the socket just goes away while the echoes are in flight.
    s.drop_connection("demo: the network died");
    println!("  [3] connection dropped abruptly with 3 echoes in flight");
    let mut replayed = 0;
    while replayed < 3 {
        match s.recv(Duration::from_secs(10)).map_err(|e| e.to_string())? {
            Some(Event::Reconnected { .. }) => println!(
                "  [4] RESUME (last_seq {last_seen}) on a new connection → RESUMED, then every frame after SEQ {last_seen}:"
            ),
            Some(Event::Gap) => println!("      (GAP: output was lost)"),
            Some(Event::Data(d)) => {
                replayed += 1;
                println!("      replayed: {:?}", String::from_utf8_lossy(&d));
            }
            Some(Event::Ended) => return Err("the session ended".into()),
            Some(_) => {}
            None => return Err("nothing replayed within 10 s".into()),
        }
    }
    s.end();
    println!("  [5] DISCONNECT: session closed");
    Ok(())
}

/// The next output, skipping connection events.
fn next_data(s: &mut Session) -> Result<Vec<u8>, String> {
    loop {
        match s.recv(Duration::from_secs(10)).map_err(|e| e.to_string())? {
            Some(Event::Data(d)) => return Ok(d),
            Some(Event::Ended) => return Err("the session ended".into()),
            Some(_) => {}
            None => return Err("no echo within 10 s".into()),
        }
    }
}
