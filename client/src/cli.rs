//! The `clawterm` command line's logic, apart from its argument declarations: endpoints and
//! tokens as typed, TLS trust options, moving a saved session between QUIC and TCP, and the
//! `clawterm list` table. Pure where it can be, so it is tested here.

use crate::creds::unix_now;
use crate::transport::parse_pin;
use crate::{
    ClientError, Credentials, LocalState, StateRecord, Store, Target, TlsTrust, Transport,
};
use std::path::{Path, PathBuf};

/// The default TCP port (TLS or plaintext).
pub const DEFAULT_PORT: u16 = 7220;
/// The default UDP port for QUIC.
pub const DEFAULT_QUIC_PORT: u16 = 7221;

/// `HOST[:PORT]` as typed -> `HOST:PORT` (`[V6]:PORT` for a bare IPv6 address), `port` when
/// none is given.
pub fn normalize_endpoint(ep: &str, port: u16) -> String {
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

/// A tenant token: 64 hex digits (surrounding blanks ignored).
pub fn parse_token(s: &str) -> Option<[u8; 32]> {
    let mut t = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut t).ok()?;
    Some(t)
}

/// The token in `text` (the file `path`): its first 64-hex-digit word outside `#` comments,
/// so a line of the server's tokens file works too.
pub fn token_in(path: &Path, text: &str) -> Result<[u8; 32], String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .find_map(parse_token)
        .ok_or_else(|| format!("{} holds no 64-hex-digit token", path.display()))
}

/// The token in the file `path` (see [`token_in`]).
pub fn token_from_file(path: &Path) -> Result<[u8; 32], String> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    token_in(path, &s)
}

/// The tenant token of `--token HEX` or `--token-file FILE` (the message says what to fix).
pub fn token(hex: Option<&str>, file: Option<&Path>) -> Result<[u8; 32], String> {
    match (hex, file) {
        (Some(t), _) => parse_token(t).ok_or_else(|| "--token must be 64 hex digits".to_string()),
        (None, Some(f)) => token_from_file(f),
        (None, None) => {
            Err("give the tenant token with --token HEX or --token-file FILE".to_string())
        }
    }
}

/// The TLS trust of `--ca FILE` (made absolute, so `clawterm resume` works from any
/// directory) and `--pin SHA256`; the system roots when neither is given.
pub fn tls_trust(ca: Option<&Path>, pin: Option<&str>) -> Result<TlsTrust, String> {
    let pin = match pin {
        Some(p) => Some(
            parse_pin(p)
                .ok_or("--pin must be the 64-hex-digit SHA-256 of the server's certificate")?,
        ),
        None => None,
    };
    let ca: Option<PathBuf> = match ca {
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

/// Where `clawterm resume --quic/--tcp/--ca/--pin` takes a saved session: QUIC with `quic`, TLS
/// over TCP with `tcp`, else the saved protocol (a plaintext session moves to TLS); `trust`
/// replaces the saved trust (a plaintext session gets the system roots, as `connect` without
/// --ca/--pin). The port follows the protocol when it was the default one.
pub fn retarget(saved: Target, quic: bool, tcp: bool, trust: Option<TlsTrust>) -> Target {
    let t = trust.unwrap_or_else(|| saved.transport.trust().cloned().unwrap_or_default());
    let quic = quic || (!tcp && matches!(saved.transport, Transport::Quic(_)));
    let addr = match (quic, saved.addr.rsplit_once(':')) {
        (true, Some((h, p))) if p == DEFAULT_PORT.to_string() => {
            format!("{h}:{DEFAULT_QUIC_PORT}")
        }
        (false, Some((h, p))) if p == DEFAULT_QUIC_PORT.to_string() => {
            format!("{h}:{DEFAULT_PORT}")
        }
        _ => saved.addr,
    };
    Target {
        addr,
        transport: if quic {
            Transport::Quic(t)
        } else {
            Transport::Tls(t)
        },
    }
}

/// How long ago the Unix time `t` was, at `now` (`never` for 0).
pub fn ago(now: u64, t: u64) -> String {
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

/// `clawterm import`: saves the session in `blob` under `name` (default: the blob's own);
/// returns what to tell the user.
pub fn import(store: &Store, blob: &str, name: Option<String>) -> Result<String, ClientError> {
    let mut c = Credentials::import(blob)?;
    if let Some(n) = name {
        c.name = n;
    }
    let p = store.save(&c)?;
    let _ = store.save_state(&c.name, &StateRecord::now(LocalState::Imported));
    Ok(format!(
        "saved session {} ({}); resume it with: clawterm resume {}",
        c.name,
        p.display(),
        c.name
    ))
}

/// What `clawterm list` prints: a table of the saved sessions, or a line saying there are none.
pub fn list_table(store: &Store) -> Result<String, ClientError> {
    let list = store.list()?;
    if list.is_empty() {
        return Ok(format!(
            "no saved sessions (in {})\n",
            store.dir().display()
        ));
    }
    let mut out = format!(
        "{:<20} {:<24} {:<9} {:>10} {:>10} {:<8}  {:<26} LAST SEEN\n",
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
        out += &format!(
            "{:<20} {:<24} {:<9} {:>10} {:>10} {:08x}  {:<26} {}\n",
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
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_default_port() {
        assert_eq!(normalize_endpoint("example.com", 7220), "example.com:7220");
        assert_eq!(normalize_endpoint("example.com:9", 7220), "example.com:9");
        assert_eq!(normalize_endpoint("10.0.0.1", 7221), "10.0.0.1:7221");
        assert_eq!(normalize_endpoint("10.0.0.1:80", 7221), "10.0.0.1:80");
        assert_eq!(normalize_endpoint("::1", 7220), "[::1]:7220");
        assert_eq!(normalize_endpoint("[::1]:5", 7220), "[::1]:5");
    }

    #[test]
    fn tokens_as_typed_and_in_files() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_token(&format!(" {hex}\n")), Some([0xAB; 32]));
        assert_eq!(parse_token("abc"), None);
        assert_eq!(parse_token(&"zz".repeat(32)), None);
        let p = Path::new("t");
        let line = format!("# {}\n7 {hex} 1\n", "cd".repeat(32));
        assert_eq!(token_in(p, &line), Ok([0xAB; 32]));
        assert_eq!(
            token_in(p, "# nothing\n"),
            Err("t holds no 64-hex-digit token".to_string())
        );
        assert_eq!(token(Some(&hex), Some(p)), Ok([0xAB; 32]));
        assert_eq!(
            token(Some("12"), None),
            Err("--token must be 64 hex digits".into())
        );
        assert!(token(None, None)
            .unwrap_err()
            .contains("--token HEX or --token-file FILE"));
        let e = token_from_file(Path::new("/no/such/token")).unwrap_err();
        assert!(e.starts_with("cannot read /no/such/token: "), "{e}");
    }

    #[test]
    fn trust_options() {
        let pin = "0A:".repeat(31) + "0a";
        let t = tls_trust(None, Some(&pin)).unwrap();
        assert_eq!(t.pin, Some([0x0A; 32]));
        assert!(t.ca.is_none());
        assert_eq!(
            tls_trust(None, Some("12")).unwrap_err(),
            "--pin must be the 64-hex-digit SHA-256 of the server's certificate"
        );
        let e = tls_trust(Some(Path::new("/no/such/ca.pem")), None).unwrap_err();
        assert!(e.starts_with("--ca /no/such/ca.pem: "), "{e}");
        let t = tls_trust(Some(Path::new("/")), None).unwrap();
        assert_eq!(t.ca, Some(PathBuf::from("/")));
    }

    #[test]
    fn resume_moves_between_quic_and_tcp_with_the_default_ports() {
        let pinned = TlsTrust {
            pin: Some([1; 32]),
            ..TlsTrust::default()
        };
        let tls = Target {
            addr: "h:7220".into(),
            transport: Transport::Tls(pinned.clone()),
        };
        let q = retarget(tls.clone(), true, false, None);
        assert_eq!(q.addr, "h:7221");
        assert!(matches!(&q.transport, Transport::Quic(t) if t.pin == Some([1; 32])));
        let back = retarget(q.clone(), false, true, None);
        assert_eq!(back.addr, "h:7220");
        assert!(matches!(&back.transport, Transport::Tls(t) if t.pin == Some([1; 32])));
        // Neither switch: the saved protocol, with the new trust.
        let same = retarget(q, false, false, Some(TlsTrust::default()));
        assert_eq!(same.addr, "h:7221");
        assert!(matches!(&same.transport, Transport::Quic(t) if t.pin.is_none()));
        // A port of its own stays; plaintext moves to TLS with the system roots.
        let plain = Target {
            addr: "h:9000".into(),
            transport: Transport::Plaintext,
        };
        let t = retarget(plain, false, true, None);
        assert_eq!(t.addr, "h:9000");
        assert!(matches!(&t.transport, Transport::Tls(t) if t.pin.is_none() && t.ca.is_none()));
    }

    #[test]
    fn ages() {
        assert_eq!(ago(100, 0), "never");
        assert_eq!(ago(100, 90), "10s ago");
        assert_eq!(ago(1000, 100), "15m ago");
        assert_eq!(ago(10_000, 100), "2h ago");
        assert_eq!(ago(1_000_000, 100), "11d ago");
        assert_eq!(ago(5, 10), "0s ago");
    }

    #[test]
    fn an_empty_store_lists_none() {
        let dir = std::env::temp_dir().join(format!("ct-list-{}", std::process::id()));
        let s = Store::at(&dir);
        let out = list_table(&s).unwrap();
        assert_eq!(out, format!("no saved sessions (in {})\n", dir.display()));
    }
}
