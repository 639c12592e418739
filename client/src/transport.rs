//! How the client reaches the server: plaintext TCP or TLS 1.3 (rustls, `ring` provider).
//!
//! TLS trust is one of: the system roots (the platform's store via `rustls-native-certs`, else
//! the bundled Mozilla roots from `webpki-roots`), a CA file (`--ca FILE`, PEM: a CA or the
//! server's own self-signed certificate), or a pin (`--pin SHA256HEX`, the SHA-256 of the
//! server's end-entity DER certificate). With a pin the chain is not validated, but the
//! TLS 1.3 handshake signature is still verified against the pinned certificate's key, so only
//! the holder of that certificate's private key can complete the handshake.
//!
//! A [`Target`] is an address plus its transport, written as text for saved credentials:
//! `HOST:PORT` (plaintext, the format of every credential saved before TLS existed),
//! `tcp://HOST:PORT` (plaintext) or `tls://HOST:PORT[?ca=FILE][&pin=HEX][&name=SNI]`.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use super::quic::QuicStream;
use super::ClientError;

/// What the client trusts for TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsTrust {
    /// PEM file of trusted certificates (CA or self-signed server certificate). `None` and no
    /// pin: the system roots.
    pub ca: Option<PathBuf>,
    /// SHA-256 of the server's end-entity certificate (DER). When set, it alone decides which
    /// certificate is accepted (the chain need not validate; the handshake signature is still
    /// checked).
    pub pin: Option<[u8; 32]>,
    /// Name to check the certificate against (and send as SNI) when it differs from the
    /// endpoint's host (e.g. after the server moved the session to an IP address).
    pub server_name: Option<String>,
}

/// The transport to the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext TCP (the server runs with `--insecure-plaintext`).
    Plaintext,
    /// TLS 1.3 only.
    Tls(TlsTrust),
    /// QUIC (UDP, TLS 1.3 inside): one stream per session; the connection survives changes of
    /// the client's address (connection migration).
    Quic(TlsTrust),
}

impl Transport {
    /// TLS trusting the system roots.
    pub fn tls_system() -> Transport {
        Transport::Tls(TlsTrust::default())
    }

    /// TLS trusting the certificates in a PEM file.
    pub fn tls_ca(ca: impl Into<PathBuf>) -> Transport {
        Transport::Tls(TlsTrust {
            ca: Some(ca.into()),
            ..TlsTrust::default()
        })
    }

    /// TLS accepting exactly the certificate whose DER SHA-256 is `pin`.
    pub fn tls_pin(pin: [u8; 32]) -> Transport {
        Transport::Tls(TlsTrust {
            pin: Some(pin),
            ..TlsTrust::default()
        })
    }

    /// Whether the transport is encrypted (TLS 1.3 over TCP, or QUIC).
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_) | Transport::Quic(_))
    }

    /// The TLS trust, for TLS and QUIC.
    pub fn trust(&self) -> Option<&TlsTrust> {
        match self {
            Transport::Plaintext => None,
            Transport::Tls(t) | Transport::Quic(t) => Some(t),
        }
    }

    /// The same trust over QUIC (plaintext stays plaintext: QUIC needs TLS).
    pub fn over_quic(self) -> Transport {
        match self {
            Transport::Tls(t) => Transport::Quic(t),
            other => other,
        }
    }

    /// A short description for listings: `plaintext`, `tls`, `tls+ca`, `tls+pin`, `quic`, …
    pub fn describe(&self) -> &'static str {
        match self {
            Transport::Plaintext => "plaintext",
            Transport::Tls(t) if t.pin.is_some() => "tls+pin",
            Transport::Tls(t) if t.ca.is_some() => "tls+ca",
            Transport::Tls(_) => "tls",
            Transport::Quic(t) if t.pin.is_some() => "quic+pin",
            Transport::Quic(t) if t.ca.is_some() => "quic+ca",
            Transport::Quic(_) => "quic",
        }
    }
}

/// Parses a certificate pin: 64 hex digits, case-insensitive, `:` separators allowed (as
/// `openssl x509 -fingerprint -sha256` prints them).
pub fn parse_pin(s: &str) -> Option<[u8; 32]> {
    let clean: String = s.trim().chars().filter(|c| *c != ':').collect();
    let v = hex::decode(&clean).ok()?;
    <[u8; 32]>::try_from(v.as_slice()).ok()
}

/// The SHA-256 of a DER certificate, hex (what `--pin` takes).
pub fn cert_sha256_hex(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// An address and its transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `HOST:PORT` (`[V6]:PORT` for IPv6 literals).
    pub addr: String,
    pub transport: Transport,
}

fn pct_encode(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'-' | b'_' | b'~' | b':' | b'@')
        {
            o.push(b as char);
        } else {
            let _ = write!(o, "%{b:02X}");
        }
    }
    o
}

fn pct_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Target {
    /// Parses the text form (see the module docs). A bare `HOST:PORT` is plaintext.
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("tcp://") {
            return Ok(Target {
                addr: rest.to_string(),
                transport: Transport::Plaintext,
            });
        }
        let (quic, rest) = match (s.strip_prefix("tls://"), s.strip_prefix("quic://")) {
            (Some(r), _) => (false, Some(r)),
            (_, Some(r)) => (true, Some(r)),
            _ => (false, None),
        };
        let Some(rest) = rest else {
            if s.contains("://") {
                return Err(format!(
                    "unknown scheme in {s:?}: use HOST:PORT, tcp://HOST:PORT, tls://HOST:PORT \
                     or quic://HOST:PORT"
                ));
            }
            return Ok(Target {
                addr: s.to_string(),
                transport: Transport::Plaintext,
            });
        };
        let (addr, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut t = TlsTrust::default();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = pct_decode(v).ok_or_else(|| format!("bad %-escape in {kv:?}"))?;
            match k {
                "ca" => t.ca = Some(PathBuf::from(v)),
                "pin" => {
                    t.pin = Some(
                        parse_pin(&v).ok_or_else(|| format!("pin must be 64 hex digits: {v:?}"))?,
                    )
                }
                "name" => t.server_name = Some(v),
                _ => return Err(format!("unknown TLS option {k:?}")),
            }
        }
        Ok(Target {
            addr: addr.to_string(),
            transport: if quic {
                Transport::Quic(t)
            } else {
                Transport::Tls(t)
            },
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.transport {
            Transport::Plaintext => f.write_str(&self.addr),
            Transport::Tls(t) | Transport::Quic(t) => {
                let scheme = if matches!(self.transport, Transport::Quic(_)) {
                    "quic"
                } else {
                    "tls"
                };
                write!(f, "{scheme}://{}", self.addr)?;
                let mut sep = '?';
                if let Some(ca) = &t.ca {
                    write!(f, "{sep}ca={}", pct_encode(&ca.to_string_lossy()))?;
                    sep = '&';
                }
                if let Some(pin) = &t.pin {
                    write!(f, "{sep}pin={}", hex::encode(pin))?;
                    sep = '&';
                }
                if let Some(n) = &t.server_name {
                    write!(f, "{sep}name={}", pct_encode(n))?;
                }
                Ok(())
            }
        }
    }
}

/// The host part of `HOST:PORT` / `[V6]:PORT` (brackets removed).
pub fn host_of(addr: &str) -> &str {
    let h = match addr.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    h.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h)
}

// ---------------------------------------------------------------------------------------------
// TLS client configuration

/// Accepts exactly one end-entity certificate (by SHA-256) and verifies the TLS 1.3 handshake
/// signature with its key.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

/// The error a pin mismatch reports (inside `CertificateError::Other`).
#[derive(Debug)]
struct PinMismatch {
    got: String,
}

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server's certificate does not match the pin (its SHA-256 is {})",
            self.got
        )
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let d = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if d.as_ref() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(PinMismatch {
                    got: hex::encode(d.as_ref()),
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Never reached (TLS 1.3 only), but correct if it were.
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn tls_err(endpoint: &str, reason: String) -> ClientError {
    ClientError::Tls {
        endpoint: endpoint.to_string(),
        reason,
    }
}

fn load_ca(path: &Path, endpoint: &str) -> Result<rustls::RootCertStore, ClientError> {
    let bad = |e: String| tls_err(endpoint, format!("--ca {}: {e}", path.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in the file".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    let (ok, _) = roots.add_parsable_certificates(certs);
    if ok == 0 {
        return Err(bad("no usable certificate in the file".into()));
    }
    Ok(roots)
}

fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    roots
}

/// A TLS 1.3-only client configuration for `trust`, and the name to verify.
#[derive(Clone, Debug)]
pub(crate) struct TlsSetup {
    pub config: Arc<rustls::ClientConfig>,
    pub name: ServerName<'static>,
}

impl TlsSetup {
    pub fn new(trust: &TlsTrust, endpoint: &str) -> Result<TlsSetup, ClientError> {
        let host = trust
            .server_name
            .clone()
            .unwrap_or_else(|| host_of(endpoint).to_string());
        let name = ServerName::try_from(host.clone()).map_err(|_| {
            tls_err(
                endpoint,
                format!("{host:?} is not a valid DNS name or IP address for TLS"),
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(endpoint, e.to_string()))?;
        let config = match (&trust.pin, &trust.ca) {
            (Some(pin), _) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier {
                    pin: *pin,
                    provider,
                }))
                .with_no_client_auth(),
            (None, Some(ca)) => builder
                .with_root_certificates(load_ca(ca, endpoint)?)
                .with_no_client_auth(),
            (None, None) => builder
                .with_root_certificates(system_roots())
                .with_no_client_auth(),
        };
        Ok(TlsSetup {
            config: Arc::new(config),
            name,
        })
    }
}

/// The rustls client configuration (TLS 1.3 only, `ring`) a [`Session`](super::Session) uses
/// for `trust`, and the server name it verifies for `endpoint` (`HOST:PORT`): for tools that
/// drive rustls themselves (benchmarks, custom transports).
pub fn client_config(
    trust: &TlsTrust,
    endpoint: &str,
) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>), ClientError> {
    let s = TlsSetup::new(trust, endpoint)?;
    Ok((s.config, s.name))
}

/// The message for a TLS failure, with what to do about it.
pub(crate) fn explain(e: &rustls::Error, trust: &TlsTrust) -> String {
    use rustls::{AlertDescription as A, Error as E};
    match e {
        E::InvalidCertificate(CertificateError::Other(o)) if o.0.is::<PinMismatch>() => {
            format!(
                "{}; pass the right --pin SHA256 (if the server's certificate was replaced on purpose, use the new one's)",
                o.0
            )
        }
        E::InvalidCertificate(CertificateError::UnknownIssuer)
        | E::InvalidCertificate(CertificateError::BadSignature)
        | E::InvalidCertificate(CertificateError::InvalidPurpose) => {
            let how = if trust.ca.is_some() {
                "it is not signed by the --ca certificates"
            } else {
                "it is not signed by a system-trusted CA"
            };
            format!(
                "certificate not trusted ({e}; {how}): pass --ca FILE (the server's CA or \
                 self-signed certificate, PEM) or --pin SHA256 (the server certificate's SHA-256)"
            )
        }
        E::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "certificate not valid for this host name ({e}): connect with a name the \
             certificate holds, or pass --pin SHA256"
        ),
        E::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => format!(
            "certificate outside its validity period ({e}): check the clock here, or renew \
             the server's certificate"
        ),
        E::InvalidCertificate(_) => {
            format!("certificate refused ({e}): pass --ca FILE or --pin SHA256")
        }
        E::AlertReceived(A::ProtocolVersion) | E::PeerIncompatible(_) => {
            format!("the server does not speak TLS 1.3 ({e}); this client only uses TLS 1.3")
        }
        E::InvalidMessage(_) | E::InappropriateHandshakeMessage { .. } => format!(
            "the server did not answer with TLS ({e}): if it runs with --insecure-plaintext, \
             connect with --plaintext"
        ),
        e => format!("TLS handshake failed: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The connection

/// One connection: a TCP stream, with TLS over it when the transport says so, or a QUIC
/// stream.
pub(crate) enum Conn {
    Tcp {
        sock: TcpStream,
        tls: Option<Box<rustls::ClientConnection>>,
    },
    Quic(Box<QuicStream>),
}

fn rustls_io(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The rustls error inside an I/O error, if any.
pub(crate) fn as_rustls(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

impl Conn {
    pub fn plain(sock: TcpStream) -> Conn {
        Conn::Tcp { sock, tls: None }
    }

    /// Runs the TLS handshake to completion on a blocking socket (bounded by its read
    /// timeout).
    pub fn tls_handshake(
        mut sock: TcpStream,
        setup: &TlsSetup,
        deadline: std::time::Instant,
    ) -> io::Result<Conn> {
        let mut tls = rustls::ClientConnection::new(setup.config.clone(), setup.name.clone())
            .map_err(rustls_io)?;
        while tls.is_handshaking() {
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer to the TLS handshake",
                ));
            }
            match tls.complete_io(&mut sock) {
                Ok((0, 0)) if tls.is_handshaking() && !tls.wants_write() => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed during the TLS handshake",
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    // Tell the server why (an alert), best effort.
                    while tls.wants_write() {
                        if tls.write_tls(&mut sock).is_err() {
                            break;
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(Conn::Tcp {
            sock,
            tls: Some(Box::new(tls)),
        })
    }

    /// A QUIC connection with its session stream (handshake done), to `addr`. `steer`: the
    /// session this connection will resume, so the server's steering lands it on the shard
    /// that owns it.
    pub fn quic(
        addr: SocketAddr,
        setup: &TlsSetup,
        steer: Option<u32>,
        timeout: Duration,
    ) -> io::Result<Conn> {
        let name = setup.name.to_str().into_owned();
        let q = QuicStream::connect(addr, &name, setup.config.clone(), steer, None, timeout)?;
        Ok(Conn::Quic(Box::new(q)))
    }

    /// The descriptor to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Tcp { sock, .. } => sock.as_fd(),
            Conn::Quic(q) => q.fd(),
        }
    }

    /// Non-blocking mode for reads and writes (QUIC is always driven without blocking; its
    /// blocking reads wait on the socket themselves).
    pub fn set_nonblocking(&mut self, on: bool) -> io::Result<()> {
        match self {
            Conn::Tcp { sock, .. } => sock.set_nonblocking(on),
            Conn::Quic(_) => Ok(()),
        }
    }

    /// When the connection needs attention even if its descriptor stays quiet (QUIC's loss
    /// recovery, acknowledgements and keepalives).
    pub fn next_timeout(&self) -> Option<std::time::Instant> {
        match self {
            Conn::Tcp { .. } => None,
            Conn::Quic(q) => q.next_timeout(),
        }
    }

    /// The negotiated protocol and cipher suite, for display.
    pub fn tls_info(&self) -> Option<(String, String)> {
        match self {
            Conn::Tcp { tls: Some(t), .. } => Some((
                format!("{:?}", t.protocol_version()?),
                format!("{:?}", t.negotiated_cipher_suite()?.suite()),
            )),
            Conn::Tcp { tls: None, .. } => None,
            Conn::Quic(_) => Some(("QUIC (TLS 1.3)".into(), String::new())),
        }
    }

    /// Sends the TLS records rustls holds (QUIC: what the connection has to send).
    /// `WouldBlock` when the socket is full.
    pub fn flush_tls(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp {
                sock,
                tls: Some(tls),
            } => {
                while tls.wants_write() {
                    match tls.write_tls(sock) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Conn::Tcp { tls: None, .. } => Ok(()),
            Conn::Quic(q) => q.drive(),
        }
    }

    /// Whether TLS records wait for the socket to become writable. Never for QUIC: a UDP
    /// socket is always writable, and what QUIC holds back waits for the peer (acknowledgements
    /// and flow-control credit arrive as readable datagrams), so polling for writability would
    /// only spin.
    pub fn pending_output(&self) -> bool {
        match self {
            Conn::Tcp { tls, .. } => tls.as_ref().is_some_and(|t| t.wants_write()),
            Conn::Quic(_) => false,
        }
    }

    /// Whether waiting for writability can help output that is left over (TCP: yes).
    pub fn polls_for_write(&self) -> bool {
        matches!(self, Conn::Tcp { .. })
    }

    /// Cuts the connection now (testing, "reconnect now").
    pub fn abort(&mut self) {
        match self {
            Conn::Tcp { sock, .. } => {
                let _ = sock.shutdown(std::net::Shutdown::Both);
            }
            Conn::Quic(q) => q.close(),
        }
    }

    /// Writes everything, blocking up to `timeout`, then closes in order: close_notify (TLS)
    /// and the write side shut down; QUIC: stream finished, connection closed.
    pub fn finish(&mut self, bytes: &[u8], timeout: Duration) {
        match self {
            Conn::Tcp { sock, .. } => {
                let _ = sock.set_nonblocking(false);
                let _ = sock.set_write_timeout(Some(timeout));
            }
            Conn::Quic(_) => {}
        }
        let _ = self.write_all(bytes);
        let _ = self.flush();
        if let Conn::Quic(q) = self {
            // Let the stream's last bytes be acknowledged before closing.
            let deadline = std::time::Instant::now() + timeout;
            while q.pending_output() > 0 && std::time::Instant::now() < deadline {
                if q.wait(deadline.min(std::time::Instant::now() + Duration::from_millis(50)))
                    .is_err()
                {
                    break;
                }
            }
        }
        self.close();
    }

    /// Orderly close: close_notify (TLS), then shut the write side; QUIC: finish and close.
    pub fn close(&mut self) {
        match self {
            Conn::Tcp { sock, tls } => {
                if let Some(t) = tls {
                    t.send_close_notify();
                    while t.wants_write() {
                        match t.write_tls(sock) {
                            Ok(n) if n > 0 => {}
                            _ => break,
                        }
                    }
                }
                let _ = sock.shutdown(std::net::Shutdown::Write);
            }
            Conn::Quic(q) => q.close(),
        }
    }
}

impl Conn {
    /// Whether the server ended this connection in order without an error (QUIC close with
    /// code 0); a TCP FIN reads as end of stream instead.
    pub(crate) fn closed_orderly(&self) -> bool {
        match self {
            Conn::Tcp { .. } => false,
            Conn::Quic(q) => q.closed_orderly(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (sock, tls) = match self {
            Conn::Quic(q) => {
                q.drive()?;
                return q.try_read(buf);
            }
            Conn::Tcp { sock, tls: None } => return sock.read(buf),
            Conn::Tcp {
                sock,
                tls: Some(tls),
            } => (sock, tls),
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match tls.read_tls(sock) {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
            let processed = tls.process_new_packets();
            // Alerts, key updates: best effort, the next flush retries.
            while tls.wants_write() {
                match tls.write_tls(sock) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
            processed.map_err(rustls_io)?;
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Quic(q) => q.try_write(buf),
            Conn::Tcp { sock, tls: None } => sock.write(buf),
            Conn::Tcp { tls: Some(_), .. } => {
                self.flush_tls()?;
                let n = match self {
                    Conn::Tcp { tls: Some(t), .. } => t.writer().write(buf).unwrap_or(0),
                    _ => 0,
                };
                match self.flush_tls() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if n == 0 && !buf.is_empty() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Quic(q) => q.flush(),
            _ => self.flush_tls(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_text_round_trip() {
        let t = Target::parse("127.0.0.1:7220").unwrap();
        assert_eq!(t.transport, Transport::Plaintext);
        assert_eq!(t.to_string(), "127.0.0.1:7220");
        assert_eq!(
            Target::parse("tcp://h:1").unwrap().transport,
            Transport::Plaintext
        );
        let t = Target {
            addr: "[::1]:7220".into(),
            transport: Transport::Tls(TlsTrust {
                ca: Some("/tmp/my ca&x?.pem".into()),
                pin: Some([0xAB; 32]),
                server_name: Some("example.org".into()),
            }),
        };
        let s = t.to_string();
        assert!(s.starts_with("tls://[::1]:7220?ca=/tmp/my%20ca%26x%3F.pem&pin=abab"));
        assert_eq!(Target::parse(&s).unwrap(), t);
        assert_eq!(
            Target::parse("tls://h:1").unwrap().transport,
            Transport::tls_system()
        );
        assert!(Target::parse("http://h:1").is_err());
        assert!(Target::parse("tls://h:1?pin=12").is_err());
        assert!(Target::parse("tls://h:1?bogus=1").is_err());
        // QUIC: the same trust options under its own scheme.
        let q = Target {
            addr: t.addr.clone(),
            transport: t.transport.clone().over_quic(),
        };
        let qs = q.to_string();
        assert!(qs.starts_with("quic://[::1]:7220?ca="), "{qs}");
        assert_eq!(Target::parse(&qs).unwrap(), q);
        assert_eq!(q.transport.describe(), "quic+pin");
        assert!(q.transport.is_tls());
        assert_eq!(Transport::Plaintext.over_quic(), Transport::Plaintext);
    }

    #[test]
    fn pins_and_hosts() {
        let hexpin = "AB:".repeat(31) + "AB";
        assert_eq!(parse_pin(&hexpin), Some([0xAB; 32]));
        assert_eq!(parse_pin(&"cd".repeat(32)), Some([0xCD; 32]));
        assert_eq!(parse_pin("abc"), None);
        assert_eq!(host_of("example.org:7220"), "example.org");
        assert_eq!(host_of("[::1]:7220"), "::1");
        assert_eq!(host_of("10.0.0.1:1"), "10.0.0.1");
        let s = TlsSetup::new(&TlsTrust::default(), "127.0.0.1:7220").unwrap();
        assert!(matches!(s.name, ServerName::IpAddress(_)));
        let s = TlsSetup::new(&TlsTrust::default(), "[::1]:7220").unwrap();
        assert!(matches!(s.name, ServerName::IpAddress(_)));
        let s = TlsSetup::new(&TlsTrust::default(), "localhost:7220").unwrap();
        assert!(matches!(s.name, ServerName::DnsName(_)));
    }

    #[test]
    fn missing_ca_file_says_so() {
        let e = TlsSetup::new(
            &TlsTrust {
                ca: Some("/nonexistent/ca.pem".into()),
                ..TlsTrust::default()
            },
            "localhost:1",
        )
        .unwrap_err();
        assert!(e.to_string().contains("--ca /nonexistent/ca.pem"), "{e}");
    }
}
