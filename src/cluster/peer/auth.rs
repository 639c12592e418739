//! Peer credentials: mutual TLS 1.3 keyed by the cluster secret.
//!
//! Every node derives the same Ed25519 key from the secret (HKDF-SHA256) and presents a
//! self-signed certificate for it; each side accepts the other only if the end-entity
//! certificate carries exactly that public key (a pin), and the handshake signatures are checked
//! with rustls's ring helpers. There are no CAs, names or validity dates to trust: whoever knows
//! the secret is a member, and nobody else gets through the handshake.

use super::PeerError;
use ring::hkdf;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;

/// The shortest cluster secret accepted, in bytes.
pub const MIN_SECRET: usize = 16;
/// The TLS server name both sides use (the pin, not the name, authenticates).
pub const SERVER_NAME: &str = "clawterm-peer";

const HKDF_SALT: &[u8] = b"clawterm peer salt v1";
const HKDF_INFO: &[u8] = b"clawterm peer ed25519 v1";
/// PKCS#8 v1 `PrivateKeyInfo` for Ed25519 (RFC 8410) up to the 32-byte seed.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The peer link's TLS configurations, both derived from the cluster secret.
#[derive(Clone)]
pub struct PeerAuth {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    spki: Arc<[u8]>,
}

impl std::fmt::Debug for PeerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key; the public key's digest is enough to tell clusters apart.
        let d = ring::digest::digest(&ring::digest::SHA256, &self.spki);
        write!(
            f,
            "PeerAuth {{ spki_sha256: {} }}",
            hex::encode(&d.as_ref()[..8])
        )
    }
}

impl PeerAuth {
    /// Derives the node credentials from the cluster `secret` (at least [`MIN_SECRET`] bytes).
    pub fn from_secret(secret: &[u8]) -> Result<PeerAuth, PeerError> {
        let (cert, key_der, spki) = derive(secret)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(Pinned {
            spki: spki.clone(),
            algs: provider.signature_verification_algorithms,
        });
        let tls = |e: rustls::Error| PeerError::Tls(e.to_string());

        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(
                vec![cert.clone()],
                PrivateKeyDer::Pkcs8(key_der.clone_key()),
            )
            .map_err(tls)?;
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});

        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![cert], PrivateKeyDer::Pkcs8(key_der))
            .map_err(tls)?;
        client.resumption = rustls::client::Resumption::disabled();

        Ok(PeerAuth {
            server: Arc::new(server),
            client: Arc::new(client),
            spki,
        })
    }

    /// The configuration for links this node accepts (client certificate mandatory).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// The configuration for links this node opens (connect with [`server_name`]).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// The DER SubjectPublicKeyInfo every member presents.
    pub fn public_key_info(&self) -> &[u8] {
        &self.spki
    }
}

/// The certificate, key and pinned public key (DER SubjectPublicKeyInfo) for `secret`.
fn derive(
    secret: &[u8],
) -> Result<
    (
        CertificateDer<'static>,
        PrivatePkcs8KeyDer<'static>,
        Arc<[u8]>,
    ),
    PeerError,
> {
    if secret.len() < MIN_SECRET {
        return Err(PeerError::SecretTooShort(secret.len()));
    }
    let mut seed = [0u8; 32];
    hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT)
        .extract(secret)
        .expand(&[HKDF_INFO], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut seed))
        .map_err(|_| PeerError::Tls("HKDF expansion failed".into()))?;
    let mut pkcs8 = Vec::with_capacity(48);
    pkcs8.extend_from_slice(&PKCS8_ED25519_PREFIX);
    pkcs8.extend_from_slice(&seed);
    seed.fill(0);
    let key_der = PrivatePkcs8KeyDer::from(pkcs8);

    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key_der, &rcgen::PKCS_ED25519)
        .map_err(|e| PeerError::Tls(format!("derived key: {e}")))?;
    let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
        .map_err(|e| PeerError::Tls(format!("certificate parameters: {e}")))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, SERVER_NAME);
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| PeerError::Tls(format!("self-signed certificate: {e}")))?;
    let cert: CertificateDer<'static> = cert.der().clone();
    let spki: Arc<[u8]> = ParsedCertificate::try_from(&cert)
        .map_err(|e| PeerError::Tls(format!("own certificate: {e}")))?
        .subject_public_key_info()
        .as_ref()
        .into();

    Ok((cert, key_der, spki))
}

/// The name to connect with.
pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from(SERVER_NAME)
            .expect("a valid DNS name")
            .to_owned(),
    )
}

/// Accepts exactly one public key, in both directions.
#[derive(Debug)]
struct Pinned {
    spki: Arc<[u8]>,
    algs: WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        if *parsed.subject_public_key_info().as_ref() == *self.spki {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check(cert)?;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

fn no_tls12() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOfferedOrEnabled)
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for Pinned {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConnection, Connection, ServerConnection};

    /// Pumps TLS bytes between the two ends until both are done handshaking or one fails;
    /// returns each side's error.
    fn handshake(
        client: &mut Connection,
        server: &mut Connection,
    ) -> (Option<rustls::Error>, Option<rustls::Error>) {
        fn transfer(
            from: &mut Connection,
            to: &mut Connection,
            err: &mut Option<rustls::Error>,
        ) -> bool {
            let mut buf = Vec::new();
            while from.wants_write() {
                from.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() && err.is_none() {
                if to.read_tls(&mut rd).is_err() {
                    break;
                }
                if let Err(e) = to.process_new_packets() {
                    *err = Some(e);
                }
            }
            !buf.is_empty()
        }
        let (mut ce, mut se) = (None, None);
        for _ in 0..20 {
            let a = transfer(client, server, &mut se);
            let b = transfer(server, client, &mut ce);
            if !a && !b {
                break;
            }
        }
        (ce, se)
    }

    fn pair(c: &PeerAuth, s: &PeerAuth) -> (Connection, Connection) {
        let client = ClientConnection::new(c.client_config(), server_name()).unwrap();
        let server = ServerConnection::new(s.server_config()).unwrap();
        (client.into(), server.into())
    }

    #[test]
    fn a_short_secret_is_refused_with_the_fix() {
        let e = PeerAuth::from_secret(b"fifteen bytes!!").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("16"), "{text}");
        assert!(text.contains("/dev/urandom"), "{text}");
        assert!(PeerAuth::from_secret(b"sixteen bytes!!!").is_ok());
    }

    #[test]
    fn the_key_is_deterministic_and_secret_specific() {
        let a1 = PeerAuth::from_secret(b"cluster secret number one").unwrap();
        let a2 = PeerAuth::from_secret(b"cluster secret number one").unwrap();
        let b = PeerAuth::from_secret(b"cluster secret number two").unwrap();
        assert_eq!(a1.public_key_info(), a2.public_key_info());
        assert_ne!(a1.public_key_info(), b.public_key_info());
        assert!(!format!("{a1:?}").contains("secret"));
    }

    #[test]
    fn the_same_secret_handshakes_with_tls13_both_ways_authenticated() {
        // Two independent derivations, as on two nodes.
        let a = PeerAuth::from_secret(b"0123456789abcdef-shared").unwrap();
        let b = PeerAuth::from_secret(b"0123456789abcdef-shared").unwrap();
        let (mut c, mut s) = pair(&a, &b);
        let (ce, se) = handshake(&mut c, &mut s);
        assert!(ce.is_none() && se.is_none(), "{ce:?} {se:?}");
        assert!(!c.is_handshaking() && !s.is_handshaking());
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        // The server saw the client's certificate (mutual).
        assert_eq!(s.peer_certificates().map(<[_]>::len), Some(1));
        // Application data flows.
        use std::io::{Read, Write};
        c.writer().write_all(b"hello").unwrap();
        handshake(&mut c, &mut s);
        let mut got = [0u8; 5];
        s.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn another_secret_fails_both_ways() {
        let a = PeerAuth::from_secret(b"0123456789abcdef-cluster-a").unwrap();
        let b = PeerAuth::from_secret(b"0123456789abcdef-cluster-b").unwrap();
        for (cl, sv) in [(&a, &b), (&b, &a)] {
            let (mut c, mut s) = pair(cl, sv);
            let (ce, se) = handshake(&mut c, &mut s);
            // The client refuses the server's certificate first; the server sees the alert.
            assert!(
                matches!(ce, Some(rustls::Error::InvalidCertificate(_))),
                "{ce:?}"
            );
            assert!(se.is_some(), "the server must fail too");
            assert!(s.is_handshaking());
        }
    }

    #[test]
    fn the_server_refuses_a_client_certificate_from_another_secret() {
        // The client trusts the server (same pin) but presents another cluster's key.
        let a = PeerAuth::from_secret(b"0123456789abcdef-cluster-a").unwrap();
        let (cert_b, key_b, _) = derive(b"0123456789abcdef-cluster-b").unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                spki: a.spki.clone(),
                algs: provider.signature_verification_algorithms,
            }))
            .with_client_auth_cert(vec![cert_b], PrivateKeyDer::Pkcs8(key_b))
            .unwrap();
        let mut c: Connection = ClientConnection::new(Arc::new(cfg), server_name())
            .unwrap()
            .into();
        let mut s: Connection = ServerConnection::new(a.server_config()).unwrap().into();
        let (ce, se) = handshake(&mut c, &mut s);
        assert!(
            matches!(se, Some(rustls::Error::InvalidCertificate(_))),
            "{se:?}"
        );
        assert!(ce.is_some(), "the client hears about it: {ce:?}");
    }

    #[test]
    fn a_client_without_certificate_is_refused() {
        let a = PeerAuth::from_secret(b"0123456789abcdef-shared").unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let anon = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                spki: a.spki.clone(),
                algs: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth();
        let mut c: Connection = ClientConnection::new(Arc::new(anon), server_name())
            .unwrap()
            .into();
        let mut s: Connection = ServerConnection::new(a.server_config()).unwrap().into();
        let (_ce, se) = handshake(&mut c, &mut s);
        assert!(
            matches!(se, Some(rustls::Error::NoCertificatesPresented)),
            "{se:?}"
        );
    }
}
