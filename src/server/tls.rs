//! TLS 1.3 on the TCP port: rustls driven sans-IO over the reactor's own buffers, so both I/O
//! backends get it for free. The certificate is hot-swappable: a reload builds a new
//! `ServerConfig` and new connections use it; established ones keep theirs.

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The TLS settings in force, reloadable.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<rustls::ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tls {{ cert: {}, key: {} }}",
            self.cert.display(),
            self.key.display()
        )
    }
}

/// Builds a TLS 1.3-only server configuration from PEM files (ECDSA, Ed25519 or RSA keys).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "--tls-cert {}: no PEM certificate in the file",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("--tls-cert/--tls-key do not make a usable certificate: {e}"))?;
    // Sessions resume with ClawTerm's own RESUME; TLS tickets would only cost memory.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

impl Tls {
    /// Loads the certificate and key.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, String> {
        let cfg = server_config(cert, key)?;
        Ok(Tls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::new(cfg),
        })
    }

    /// Re-reads the files; on error the configuration in force is kept.
    pub fn reload(&self) -> Result<(), String> {
        let cfg = server_config(&self.cert, &self.key)?;
        self.current.store(cfg);
        Ok(())
    }

    /// The configuration in force (QUIC builds its own from it, ALPN added).
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.load_full()
    }

    /// A server-side TLS connection with the configuration in force.
    pub fn accept(&self) -> Result<rustls::ServerConnection, rustls::Error> {
        rustls::ServerConnection::new(self.current.load_full())
    }

    pub fn files(&self) -> (&Path, &Path) {
        (&self.cert, &self.key)
    }
}

/// A self-signed certificate for `localhost`/127.0.0.1 written to `dir` (for `--demo` and
/// tests): returns (cert path, key path, SHA-256 of the DER certificate in hex).
pub fn self_signed(dir: &Path) -> Result<(PathBuf, PathBuf, String), String> {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .map_err(|e| format!("cannot generate a certificate: {e}"))?;
    let cert = dir.join("tls-cert.pem");
    let key = dir.join("tls-key.pem");
    std::fs::write(&cert, ck.cert.pem()).map_err(|e| format!("{}: {e}", cert.display()))?;
    write_private(&key, ck.key_pair.serialize_pem().as_bytes())
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, ck.cert.der());
    Ok((cert, key, hex::encode(digest.as_ref())))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_self_signed_pair_and_refuses_garbage() {
        let dir = std::env::temp_dir().join(format!("clawterm-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key, fp) = self_signed(&dir).unwrap();
        assert_eq!(fp.len(), 64);
        let t = Tls::load(&cert, &key).unwrap();
        assert!(t.accept().is_ok());
        t.reload().unwrap();
        std::fs::write(&cert, "not a cert").unwrap();
        assert!(t.reload().is_err(), "a bad file is refused");
        assert!(
            t.accept().is_ok(),
            "the previous configuration stays in force"
        );
        assert!(Tls::load(&dir.join("missing.pem"), &key)
            .unwrap_err()
            .contains("--tls-cert"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
