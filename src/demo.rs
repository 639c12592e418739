//! `clawtermd --demo`: everything embedded for a first look.
//!
//! A temporary socket directory with a built-in echo agent (tenant 1, agent 1), a freshly
//! generated dev token in a tokens file, loopback only — and a scripted client that connects,
//! echoes, loses its connection abruptly while output is in flight, resumes on a new connection
//! and receives exactly what it missed.

use crate::agent::{Agent, AgentListener, Outbox, SessionId};
use crate::proto::{self, Accept, Connect, Decoded, FrameType, Resume, Resumed};
use crate::server::{Auth, ServerConfig};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
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
    cfg.bind = Ipv4Addr::LOCALHOST.into();
    cfg.socket_dir = sockets;
    cfg.auth = Auth::Tokens(tokens);
    let tls = if tls && cfg.tls.is_none() {
        let (cert, key, fp) =
            crate::server::tls::self_signed(&dir).map_err(std::io::Error::other)?;
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

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(b),
            Stream::Tls(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(b),
            Stream::Tls(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// A client TLS configuration that trusts exactly `cert` (the demo's self-signed one).
fn trust_only(cert: &std::path::Path) -> std::io::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    let der =
        CertificateDer::from_pem_file(cert).map_err(|e| std::io::Error::other(e.to_string()))?;
    roots
        .add(der)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A minimal blocking ClawTerm client, enough for the walkthrough.
struct MiniClient {
    sock: Stream,
    buf: Vec<u8>,
    seq: u32,
}

impl MiniClient {
    fn connect(
        addr: SocketAddr,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> std::io::Result<MiniClient> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.set_nodelay(true)?;
        let sock = match tls {
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from("localhost")
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let conn = rustls::ClientConnection::new(cfg.clone(), name)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
            }
            None => Stream::Plain(tcp),
        };
        Ok(MiniClient {
            sock,
            buf: Vec::new(),
            seq: 0,
        })
    }

    fn send(&mut self, sid: u32, ty: FrameType, payload: &[u8]) -> std::io::Result<()> {
        self.seq += 1;
        let mut out = Vec::new();
        proto::encode_to_vec(&mut out, sid, self.seq, ty, 0, payload);
        self.sock.write_all(&out)
    }

    /// Reads one frame: (seq, type, flags, payload).
    fn recv(&mut self) -> std::io::Result<(u32, FrameType, u8, Vec<u8>)> {
        loop {
            match proto::decode(&self.buf, proto::MAX_PAYLOAD) {
                Ok(Decoded::Frame(f, used)) => {
                    let r = (f.seq, f.ty, f.flags, f.payload.to_vec());
                    self.buf.drain(..used);
                    return Ok(r);
                }
                Ok(Decoded::NeedMore(_)) => {}
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
            let mut chunk = [0u8; 4096];
            let n = self.sock.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Demo {
    /// Prints how to use the demo server, then runs the scripted walkthrough on a thread.
    /// Prints how to use the demo server (TCP at `addr`, QUIC at `quic` when on) and runs
    /// the scripted client in the background.
    pub fn run_walkthrough(&self, addr: SocketAddr, quic: Option<SocketAddr>) {
        println!();
        let token = hex::encode(self.token);
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
        let tls = match &self.tls {
            Some((cert, _)) => match trust_only(cert) {
                Ok(c) => Some(c),
                Err(e) => {
                    println!("  demo walkthrough failed: {e}");
                    return;
                }
            },
            None => None,
        };
        let _ = std::thread::Builder::new().name("demo-client".into()).spawn(move || {
            // Give the shards a moment to be serving before the scripted client connects.
            std::thread::sleep(Duration::from_millis(200));
            match walkthrough(addr, token, tls.as_ref()) {
                Ok(()) => println!("  demo walkthrough: OK — every missed frame replayed exactly once, in order\n"),
                Err(e) => println!("  demo walkthrough failed: {e}\n"),
            }
        });
    }
}

fn walkthrough(
    addr: SocketAddr,
    token: [u8; 32],
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> std::io::Result<()> {
    let err = |m: String| std::io::Error::other(m);
    let mut c = MiniClient::connect(addr, tls)?;
    let mut p = Vec::new();
    Connect {
        version: 1,
        caps: proto::CAP_V1,
        caps_width: proto::payload::CapsWidth::U8,
        tenant_id: DEMO_TENANT,
        agent_id: DEMO_AGENT,
        token,
        nonce: [7; 16],
    }
    .encode(&mut p);
    c.send(0, FrameType::Connect, &p)?;
    let (_, ty, _, payload) = c.recv()?;
    if ty != FrameType::Accept {
        let e = proto::ErrorFrame::parse(&payload)
            .map(|e| format!("{} {}", e.code, e.message))
            .unwrap_or_default();
        return Err(err(format!("expected ACCEPT, got {ty} {e}")));
    }
    let acc = Accept::parse(&payload).map_err(|e| err(e.to_string()))?;
    let sid = acc.session_id;
    let rtoken = acc
        .resume_token
        .ok_or_else(|| err("ACCEPT without resume token".into()))?;
    println!("  [1] CONNECT → ACCEPT: session {sid:#010x}");
    c.send(sid, FrameType::Data, b"hello, agent")?;
    let (seq, _, _, echo) = c.recv()?;
    println!(
        "  [2] DATA \"hello, agent\" → echoed back as SEQ {seq}: {:?}",
        String::from_utf8_lossy(&echo)
    );
    c.send(sid, FrameType::Ack, &seq.to_be_bytes())?;
    let last_seen = seq;
    for i in 1..=3 {
        c.send(
            sid,
            FrameType::Data,
            format!("line {i} typed just before the network died").as_bytes(),
        )?;
    }
    // Abrupt loss: no SUSPEND, the socket just goes away while the echoes are in flight.
    drop(c);
    println!("  [3] connection dropped abruptly with 3 echoes in flight");
    std::thread::sleep(Duration::from_millis(300));
    let mut c = MiniClient::connect(addr, tls)?;
    let mut p = Vec::new();
    Resume::Full {
        session_id: sid,
        last_seq: last_seen,
        token: rtoken,
    }
    .encode(&mut p);
    c.send(0, FrameType::Resume, &p)?;
    let (_, ty, flags, payload) = c.recv()?;
    if ty != FrameType::Resumed {
        return Err(err(format!("expected RESUMED, got {ty}")));
    }
    let r = Resumed::parse(&payload).map_err(|e| err(e.to_string()))?;
    println!(
        "  [4] RESUME (last_seq {last_seen}) on a new connection → RESUMED, replay from SEQ {}{}",
        r.first_replay_seq,
        if flags & proto::FLAG_GAP != 0 {
            " (GAP)"
        } else {
            ""
        }
    );
    for _ in 0..3 {
        let (seq, ty, flags, data) = c.recv()?;
        if ty != FrameType::Data || flags & proto::FLAG_REPLAY == 0 {
            return Err(err(format!(
                "expected a replayed DATA frame, got {ty} flags {flags:#x}"
            )));
        }
        println!(
            "      replayed SEQ {seq}: {:?}",
            String::from_utf8_lossy(&data)
        );
        c.send(sid, FrameType::Ack, &seq.to_be_bytes())?;
    }
    c.send(sid, FrameType::Disconnect, &[])?;
    println!("  [5] DISCONNECT: session closed");
    Ok(())
}
