//! Saved session credentials: one small JSON file per named session, and a one-line export
//! format to carry a session to another device.
//!
//! Files live in `$CLAWTERM_STATE_DIR/sessions/NAME.json`, else
//! `$XDG_STATE_HOME/clawterm/sessions/NAME.json`, else `~/.local/state/clawterm/sessions/`.
//! Directories are created 0700 and files written 0600 (atomically: temp file + rename),
//! because the resume token grants access to the session.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::transport::{parse_pin, Target, TlsTrust, Transport};
use super::ClientError;

/// Everything needed to resume a session.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Name it is saved under (not part of the secret).
    pub name: String,
    /// The server and the transport to reach it, as a [`Target`] in text form: `HOST:PORT`
    /// (plaintext) or `tls://HOST:PORT[?ca=FILE][&pin=SHA256HEX][&name=SNI]`. In the JSON file
    /// this is split into `endpoint`, `transport`, `tls_ca`, `tls_pin`, `tls_name`.
    pub endpoint: String,
    pub tenant: u32,
    pub agent: u32,
    pub session_id: u32,
    pub resume_token: [u8; 16],
    /// Highest server DATA SEQ received.
    pub last_seq: u32,
    /// Next client SEQ (client SEQs continue across resumes).
    pub next_seq: u32,
    /// Unix time (s) of the last contact.
    pub last_seen: u64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .field("tenant", &self.tenant)
            .field("agent", &self.agent)
            .field("session_id", &format_args!("{:08x}", self.session_id))
            .field("resume_token", &"<redacted>")
            .field("last_seq", &self.last_seq)
            .field("next_seq", &self.next_seq)
            .field("last_seen", &self.last_seen)
            .finish()
    }
}

/// Unix time now, seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A value of a flat JSON object: a string or a non-negative integer.
#[derive(Debug, PartialEq)]
enum JVal {
    Str(String),
    Num(u64),
}

/// Parses a flat JSON object whose values are strings or non-negative integers.
fn parse_flat_json(s: &str) -> Option<Vec<(String, JVal)>> {
    let b = s.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] as char).is_ascii_whitespace() {
            *i += 1;
        }
    };
    let string = |i: &mut usize| -> Option<String> {
        if b.get(*i) != Some(&b'"') {
            return None;
        }
        *i += 1;
        let mut out = String::new();
        let rest = &s[*i..];
        let mut chars = rest.char_indices();
        while let Some((k, c)) = chars.next() {
            match c {
                '"' => {
                    *i += k + 1;
                    return Some(out);
                }
                '\\' => {
                    let (_, e) = chars.next()?;
                    match e {
                        '"' => out.push('"'),
                        '\\' => out.push('\\'),
                        '/' => out.push('/'),
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        't' => out.push('\t'),
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'u' => {
                            let mut v = 0u32;
                            for _ in 0..4 {
                                v = v * 16 + chars.next()?.1.to_digit(16)?;
                            }
                            out.push(char::from_u32(v).unwrap_or('\u{fffd}'));
                        }
                        _ => return None,
                    }
                }
                c => out.push(c),
            }
        }
        None
    };
    ws(&mut i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut out = Vec::new();
    ws(&mut i);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            ws(&mut i);
            let k = string(&mut i)?;
            ws(&mut i);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i += 1;
            ws(&mut i);
            let v = if b.get(i) == Some(&b'"') {
                JVal::Str(string(&mut i)?)
            } else {
                let st = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                JVal::Num(s[st..i].parse().ok()?)
            };
            out.push((k, v));
            ws(&mut i);
            match b.get(i) {
                Some(b',') => i += 1,
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    ws(&mut i);
    (i == b.len()).then_some(out)
}

impl Credentials {
    /// The server address and transport of these credentials.
    pub fn target(&self) -> Result<Target, ClientError> {
        Target::parse(&self.endpoint).map_err(ClientError::BadCredentials)
    }

    /// The JSON text stored in the session file. Version 1 (plaintext, readable by clients
    /// from before TLS) or 2 (TLS or QUIC: `transport` "tls" or "quic", optional `tls_ca`,
    /// `tls_pin`, `tls_name`), so an older client refuses TLS credentials instead of trying
    /// plaintext.
    pub fn to_json(&self) -> String {
        let (version, addr, transport) = match Target::parse(&self.endpoint) {
            Ok(Target {
                addr,
                transport: transport @ (Transport::Tls(_) | Transport::Quic(_)),
            }) => {
                let (name, t) = match &transport {
                    Transport::Quic(t) => ("quic", t.clone()),
                    Transport::Tls(t) => ("tls", t.clone()),
                    Transport::Plaintext => ("plaintext", TlsTrust::default()),
                };
                let mut x = format!(",\n  \"transport\": \"{name}\"");
                if let Some(ca) = &t.ca {
                    let _ = write!(x, ",\n  \"tls_ca\": {}", json_str(&ca.to_string_lossy()));
                }
                if let Some(pin) = &t.pin {
                    let _ = write!(x, ",\n  \"tls_pin\": \"{}\"", hex::encode(pin));
                }
                if let Some(n) = &t.server_name {
                    let _ = write!(x, ",\n  \"tls_name\": {}", json_str(n));
                }
                (2, addr, x)
            }
            Ok(Target { addr, .. }) => (1, addr, ",\n  \"transport\": \"plaintext\"".into()),
            Err(_) => (1, self.endpoint.clone(), String::new()),
        };
        format!(
            "{{\n  \"version\": {version},\n  \"name\": {},\n  \"endpoint\": {}{transport},\n  \"tenant\": {},\n  \"agent\": {},\n  \"session_id\": {},\n  \"resume_token\": \"{}\",\n  \"last_seq\": {},\n  \"next_seq\": {},\n  \"last_seen\": {}\n}}\n",
            json_str(&self.name),
            json_str(&addr),
            self.tenant,
            self.agent,
            self.session_id,
            hex::encode(self.resume_token),
            self.last_seq,
            self.next_seq,
            self.last_seen
        )
    }

    /// Parses [`Credentials::to_json`]'s format.
    pub fn from_json(s: &str) -> Result<Credentials, ClientError> {
        let bad = |what: &str| ClientError::BadCredentials(what.to_string());
        let fields = parse_flat_json(s).ok_or_else(|| bad("not a flat JSON object"))?;
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        let num = |k: &str| -> Result<u64, ClientError> {
            match get(k) {
                Some(JVal::Num(n)) => Ok(*n),
                _ => Err(bad(&format!("missing or non-numeric field {k:?}"))),
            }
        };
        let u32f = |k: &str| -> Result<u32, ClientError> {
            u32::try_from(num(k)?).map_err(|_| bad(&format!("field {k:?} out of range")))
        };
        let strf = |k: &str| -> Result<String, ClientError> {
            match get(k) {
                Some(JVal::Str(s)) => Ok(s.clone()),
                _ => Err(bad(&format!("missing or non-string field {k:?}"))),
            }
        };
        if !matches!(num("version")?, 1 | 2) {
            return Err(bad(
                "unsupported credentials version (saved by a newer clawterm?)",
            ));
        }
        let opt_str = |k: &str| -> Result<Option<String>, ClientError> {
            match get(k) {
                None => Ok(None),
                Some(JVal::Str(s)) => Ok(Some(s.clone())),
                Some(_) => Err(bad(&format!("non-string field {k:?}"))),
            }
        };
        let addr = strf("endpoint")?;
        let endpoint = match opt_str("transport")?.as_deref() {
            None | Some("plaintext") => {
                // Files from before TLS hold a bare HOST:PORT (plaintext).
                if addr.contains("://") {
                    Target::parse(&addr).map_err(ClientError::BadCredentials)?;
                }
                addr
            }
            Some(kind @ ("tls" | "quic")) => {
                let pin = match opt_str("tls_pin")? {
                    None => None,
                    Some(p) => {
                        Some(parse_pin(&p).ok_or_else(|| bad("tls_pin must be 64 hex digits"))?)
                    }
                };
                let trust = TlsTrust {
                    ca: opt_str("tls_ca")?.map(Into::into),
                    pin,
                    server_name: opt_str("tls_name")?,
                };
                Target {
                    addr,
                    transport: if kind == "quic" {
                        Transport::Quic(trust)
                    } else {
                        Transport::Tls(trust)
                    },
                }
                .to_string()
            }
            Some(t) => return Err(bad(&format!("unknown transport {t:?}"))),
        };
        let tok = hex::decode(strf("resume_token")?.trim())
            .ok()
            .filter(|t| t.len() == 16)
            .ok_or_else(|| bad("resume_token must be 32 hex digits"))?;
        let mut resume_token = [0u8; 16];
        resume_token.copy_from_slice(&tok);
        Ok(Credentials {
            name: strf("name")?,
            endpoint,
            tenant: u32f("tenant")?,
            agent: u32f("agent")?,
            session_id: u32f("session_id")?,
            resume_token,
            last_seq: u32f("last_seq")?,
            next_seq: u32f("next_seq").unwrap_or(1),
            last_seen: num("last_seen").unwrap_or(0),
        })
    }

    /// A single-line, copy-pasteable blob: `ct1:` followed by the hex of the JSON. It holds the
    /// resume token: treat it like a password.
    pub fn export(&self) -> String {
        format!("ct1:{}", hex::encode(self.to_json().as_bytes()))
    }

    /// Parses [`Credentials::export`]'s blob.
    pub fn import(blob: &str) -> Result<Credentials, ClientError> {
        let body = blob.trim().strip_prefix("ct1:").ok_or_else(|| {
            ClientError::BadCredentials(
                "not a clawterm export blob (it starts with \"ct1:\")".into(),
            )
        })?;
        let bytes = hex::decode(body.trim())
            .ok()
            .ok_or_else(|| ClientError::BadCredentials("blob is not valid hex".into()))?;
        let s = String::from_utf8(bytes)
            .map_err(|_| ClientError::BadCredentials("blob is not UTF-8".into()))?;
        Credentials::from_json(&s)
    }
}

/// What this device last knew about a saved session: written by the `clawterm` process using
/// it (next to the credentials, in `NAME.state`) and shown by `clawterm list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalState {
    /// A `clawterm` process of this device has it attached.
    Attached,
    /// A `clawterm` process of this device has it, but the connection is down: reconnecting.
    Reconnecting,
    /// Detached on purpose (`~.`), or its `clawterm` stopped (signal, error): the session runs
    /// on the server; `clawterm resume NAME` reattaches.
    Detached,
    /// Another device resumed it (this device's `clawterm` exited with status 6).
    TakenOver,
    /// Saved by `clawterm import`; not used on this device yet.
    Imported,
}

impl LocalState {
    /// The word stored in the state file.
    pub fn as_str(self) -> &'static str {
        match self {
            LocalState::Attached => "attached",
            LocalState::Reconnecting => "reconnecting",
            LocalState::Detached => "detached",
            LocalState::TakenOver => "taken-over",
            LocalState::Imported => "imported",
        }
    }

    fn parse(s: &str) -> Option<LocalState> {
        Some(match s {
            "attached" => LocalState::Attached,
            "reconnecting" => LocalState::Reconnecting,
            "detached" => LocalState::Detached,
            "taken-over" => LocalState::TakenOver,
            "imported" => LocalState::Imported,
            _ => return None,
        })
    }
}

/// A [`LocalState`], which process recorded it, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateRecord {
    pub state: LocalState,
    /// The `clawterm` process that wrote it.
    pub pid: u32,
    /// Unix time (s) it was written.
    pub since: u64,
}

impl StateRecord {
    /// A record written now by this process.
    pub fn now(state: LocalState) -> StateRecord {
        StateRecord {
            state,
            pid: std::process::id(),
            since: unix_now(),
        }
    }

    /// Whether the process that wrote it still runs (and is a `clawterm`, where /proc says).
    pub fn writer_alive(&self) -> bool {
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return false;
        };
        if pid <= 0 {
            return false;
        }
        // SAFETY: kill with signal 0 only checks that the process exists.
        let exists = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !exists {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            Ok(comm) => comm.trim_end().starts_with("clawterm"),
            Err(_) => true,
        }
    }

    /// How `clawterm list` shows it: e.g. `attached here (pid 123)`, `taken over`.
    pub fn describe(&self) -> String {
        let alive = || self.writer_alive();
        match self.state {
            LocalState::Attached if alive() => format!("attached here (pid {})", self.pid),
            LocalState::Reconnecting if alive() => format!("reconnecting (pid {})", self.pid),
            // The process died without saying (e.g. SIGKILL): the server suspended it.
            LocalState::Attached | LocalState::Reconnecting => "detached (clawterm gone)".into(),
            LocalState::Detached => "detached".into(),
            LocalState::TakenOver => "taken over".into(),
            LocalState::Imported => "imported".into(),
        }
    }

    fn to_line(self) -> String {
        format!("{} {} {}\n", self.state.as_str(), self.pid, self.since)
    }

    fn parse(s: &str) -> Option<StateRecord> {
        let mut w = s.split_whitespace();
        let state = LocalState::parse(w.next()?)?;
        let pid = w.next()?.parse().ok()?;
        let since = w.next()?.parse().ok()?;
        Some(StateRecord { state, pid, since })
    }
}

/// Whether `name` is usable as a session name (file-name safe).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

/// The directory of saved sessions.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The default store (see the module docs for the lookup order).
    pub fn default_location() -> Result<Store, ClientError> {
        let base = if let Some(d) = std::env::var_os("CLAWTERM_STATE_DIR").filter(|d| !d.is_empty())
        {
            PathBuf::from(d)
        } else if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
            PathBuf::from(d).join("clawterm")
        } else if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            PathBuf::from(h).join(".local/state/clawterm")
        } else {
            return Err(ClientError::Store(
                "cannot find a state directory: set CLAWTERM_STATE_DIR or HOME".into(),
            ));
        };
        Ok(Store::at(base.join("sessions")))
    }

    /// A store in `dir` (the `sessions` directory itself).
    pub fn at(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn io_err(&self, what: &str, p: &Path, e: std::io::Error) -> ClientError {
        ClientError::Store(format!("{what} {}: {e}", p.display()))
    }

    /// Writes `c` as `NAME.json` (0600, dir 0700), replacing any earlier version atomically.
    pub fn save(&self, c: &Credentials) -> Result<PathBuf, ClientError> {
        if !valid_name(&c.name) {
            return Err(ClientError::BadCredentials(format!(
                "invalid session name {:?}: use letters, digits, '-', '_', '.', '@' (max 64)",
                c.name
            )));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| self.io_err("cannot create", &self.dir, e))?;
        let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700));
        let path = self.path_of(&c.name);
        let tmp = self
            .dir
            .join(format!(".{}.{}.tmp", c.name, std::process::id()));
        self.write_private(&tmp, &path, c.to_json().as_bytes(), true)?;
        Ok(path)
    }

    /// Loads `NAME.json`.
    pub fn load(&self, name: &str) -> Result<Credentials, ClientError> {
        if !valid_name(name) {
            return Err(ClientError::NotSaved(name.to_string()));
        }
        let path = self.path_of(name);
        let s = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClientError::NotSaved(name.to_string()))
            }
            Err(e) => return Err(self.io_err("cannot read", &path, e)),
        };
        let mut c = Credentials::from_json(&s)?;
        c.name = name.to_string();
        Ok(c)
    }

    fn state_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.state"))
    }

    /// Records what this device knows about `name` now (`NAME.state`, 0600, atomic). Only for
    /// saved sessions: nothing is written if `NAME.json` is absent.
    pub fn save_state(&self, name: &str, rec: &StateRecord) -> Result<(), ClientError> {
        if !valid_name(name) || !self.path_of(name).exists() {
            return Ok(());
        }
        let path = self.state_path(name);
        let tmp = self
            .dir
            .join(format!(".{name}.state.{}.tmp", std::process::id()));
        self.write_private(&tmp, &path, rec.to_line().as_bytes(), false)
    }

    /// Writes `bytes` to `path` atomically and readable by its owner only: into `tmp` (0600),
    /// flushed to disk first when `durable`, then renamed over `path`. `tmp` is removed if
    /// anything fails.
    fn write_private(
        &self,
        tmp: &Path,
        path: &Path,
        bytes: &[u8],
        durable: bool,
    ) -> Result<(), ClientError> {
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(tmp)?;
            // An existing file keeps its mode through `open`: make it 0600 too.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(bytes)?;
            if durable {
                f.sync_all()?;
            }
            std::fs::rename(tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(tmp);
            self.io_err("cannot write", path, e)
        })
    }

    /// The last [`StateRecord`] of `name`, if any (none for sessions saved by an older
    /// clawterm).
    pub fn load_state(&self, name: &str) -> Option<StateRecord> {
        if !valid_name(name) {
            return None;
        }
        StateRecord::parse(&std::fs::read_to_string(self.state_path(name)).ok()?)
    }

    /// Removes `NAME.json` and its state (no error if absent).
    pub fn remove(&self, name: &str) -> Result<(), ClientError> {
        if !valid_name(name) {
            return Ok(());
        }
        let _ = std::fs::remove_file(self.state_path(name));
        let p = self.path_of(name);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_err("cannot remove", &p, e)),
        }
    }

    /// Every saved session, sorted by name (unreadable files are skipped).
    pub fn list(&self) -> Result<Vec<Credentials>, ClientError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io_err("cannot read", &self.dir, e)),
        };
        let mut v = Vec::new();
        for ent in rd.flatten() {
            let n = ent.file_name();
            let Some(n) = n.to_str() else { continue };
            let Some(stem) = n.strip_suffix(".json") else {
                continue;
            };
            if let Ok(c) = self.load(stem) {
                v.push(c);
            }
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Credentials {
        Credentials {
            name: "dev\"x".into(),
            endpoint: "127.0.0.1:7220".into(),
            tenant: 7,
            agent: u32::MAX,
            session_id: 0xdead_beef,
            resume_token: [9; 16],
            last_seq: 42,
            next_seq: 17,
            last_seen: 1_700_000_000,
        }
    }

    #[test]
    fn json_round_trip() {
        let c = sample();
        assert_eq!(Credentials::from_json(&c.to_json()).unwrap(), c);
        assert_eq!(Credentials::import(&c.export()).unwrap(), c);
        assert!(!c.export().contains('\n'));
    }

    #[test]
    fn transport_round_trip() {
        let mut c = sample();
        assert!(c.to_json().contains("\"transport\": \"plaintext\""));
        assert!(c.to_json().contains("\"version\": 1"));
        c.endpoint = Target {
            addr: "example.org:7220".into(),
            transport: Transport::Tls(TlsTrust {
                ca: Some("/etc/ct/ca \"x\".pem".into()),
                pin: Some([0x3C; 32]),
                server_name: Some("example.org".into()),
            }),
        }
        .to_string();
        let j = c.to_json();
        assert!(j.contains("\"version\": 2"), "{j}");
        assert!(j.contains("\"endpoint\": \"example.org:7220\""), "{j}");
        assert!(j.contains("\"transport\": \"tls\""), "{j}");
        assert!(
            j.contains(&format!("\"tls_pin\": \"{}\"", "3c".repeat(32))),
            "{j}"
        );
        assert_eq!(Credentials::from_json(&j).unwrap(), c);
        assert_eq!(Credentials::import(&c.export()).unwrap(), c);
        c.endpoint = "tls://h:1".into();
        let back = Credentials::from_json(&c.to_json()).unwrap();
        assert_eq!(back.target().unwrap().transport, Transport::tls_system());
        // A file from before TLS.
        let old = "{\"version\": 1, \"name\": \"a\", \"endpoint\": \"h:1\", \"tenant\": 1, \"agent\": 2, \"session_id\": 3, \"resume_token\": \"00000000000000000000000000000000\", \"last_seq\": 0}";
        let o = Credentials::from_json(old).unwrap();
        assert_eq!(o.target().unwrap().transport, Transport::Plaintext);
        assert!(Credentials::from_json(
            &old.replace("\"h:1\"", "\"h:1\", \"transport\": \"carrier-pigeon\"")
        )
        .is_err());
        // QUIC keeps its trust the same way and reads back as QUIC.
        c.endpoint = "quic://example.org:7221?pin=".to_string() + &"3c".repeat(32);
        let j = c.to_json();
        assert!(j.contains("\"transport\": \"quic\""), "{j}");
        let back = Credentials::from_json(&j).unwrap();
        assert_eq!(back, c);
        assert!(matches!(
            back.target().unwrap().transport,
            Transport::Quic(_)
        ));
    }

    #[test]
    fn state_records() {
        let dir = std::env::temp_dir().join(format!("ct-state-{}", std::process::id()));
        let store = Store::at(&dir);
        let mut c = sample();
        c.name = "s1".into();
        let rec = StateRecord::now(LocalState::Attached);
        // Not saved: no state written.
        store.save_state("s1", &rec).unwrap();
        assert_eq!(store.load_state("s1"), None);
        store.save(&c).unwrap();
        store.save_state("s1", &rec).unwrap();
        assert_eq!(store.load_state("s1"), Some(rec));
        // This test process is alive but is not a clawterm.
        assert!(!rec.writer_alive() || rec.describe().starts_with("attached here"));
        for st in [
            LocalState::Reconnecting,
            LocalState::Detached,
            LocalState::TakenOver,
            LocalState::Imported,
        ] {
            let r = StateRecord {
                state: st,
                pid: 1,
                since: 5,
            };
            store.save_state("s1", &r).unwrap();
            assert_eq!(store.load_state("s1"), Some(r));
        }
        let gone = StateRecord {
            state: LocalState::Attached,
            pid: u32::MAX,
            since: 1,
        };
        assert_eq!(gone.describe(), "detached (clawterm gone)");
        assert_eq!(
            StateRecord {
                state: LocalState::TakenOver,
                ..gone
            }
            .describe(),
            "taken over"
        );
        assert_eq!(StateRecord::parse("bogus 1 2"), None);
        store.remove("s1").unwrap();
        assert_eq!(store.load_state("s1"), None);
        assert!(store.list().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(Credentials::import("ct1:zz").is_err());
        assert!(Credentials::import("hello").is_err());
        assert!(Credentials::from_json("{\"version\": 1}").is_err());
        assert!(parse_flat_json("{\"a\": 1,}").is_none());
    }
}
