//! Typed payloads of §2. Parsing borrows nothing it does not need to; encoding appends to a
//! caller's `Vec<u8>` (use with [`crate::proto::frame::encode_with`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// ERROR codes (§6).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// 1: the flag byte or the CRC is wrong; connection closed.
    BadFrame = 1,
    /// 2: CONNECT version is not 1; connection closed.
    UnsupportedVersion = 2,
    /// 3: the token does not match, or a legacy RESUME is not allowed; connection closed.
    AuthFailed = 3,
    /// 4: unknown or expired session, or a wrong resume token; connection closed.
    NoSuchSession = 4,
    /// 5: no agent pod for the tenant and agent; connection closed.
    NoAgent = 5,
    /// 6: frame not allowed in this state, or wrong SESSION_ID; connection closed.
    ProtocolViolation = 6,
    /// 7: LEN over the maximum payload; connection closed.
    TooLarge = 7,
    /// 8: session or connection limit reached; connection closed.
    Overloaded = 8,
    /// 9: another device resumed this session; connection closed.
    TakenOver = 9,
    /// 10: the agent pod went away for good; DISCONNECT follows.
    AgentGone = 10,
    /// 11: rate limited; connection closed.
    RateLimited = 11,
    /// 12: CONNECT payload malformed; connection closed.
    BadConnect = 12,
}

impl ErrorCode {
    /// All codes, in numeric order.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadFrame,
        ErrorCode::UnsupportedVersion,
        ErrorCode::AuthFailed,
        ErrorCode::NoSuchSession,
        ErrorCode::NoAgent,
        ErrorCode::ProtocolViolation,
        ErrorCode::TooLarge,
        ErrorCode::Overloaded,
        ErrorCode::TakenOver,
        ErrorCode::AgentGone,
        ErrorCode::RateLimited,
        ErrorCode::BadConnect,
    ];

    /// The code for a wire value.
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        Self::ALL.get((v as usize).wrapping_sub(1)).copied()
    }

    /// The contract's name (`"NO_SUCH_SESSION"`, …).
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "BAD_FRAME",
            ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::NoSuchSession => "NO_SUCH_SESSION",
            ErrorCode::NoAgent => "NO_AGENT",
            ErrorCode::ProtocolViolation => "PROTOCOL_VIOLATION",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::Overloaded => "OVERLOADED",
            ErrorCode::TakenOver => "TAKEN_OVER",
            ErrorCode::AgentGone => "AGENT_GONE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::BadConnect => "BAD_CONNECT",
        }
    }

    /// A short human message sent with the code.
    pub const fn message(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad frame",
            ErrorCode::UnsupportedVersion => "unsupported protocol version",
            ErrorCode::AuthFailed => "authentication failed",
            ErrorCode::NoSuchSession => "no such session",
            ErrorCode::NoAgent => "no agent pod for this tenant and agent",
            ErrorCode::ProtocolViolation => "protocol violation",
            ErrorCode::TooLarge => "frame too large",
            ErrorCode::Overloaded => "server overloaded",
            ErrorCode::TakenOver => "session taken over by another connection",
            ErrorCode::AgentGone => "the agent pod went away",
            ErrorCode::RateLimited => "rate limited",
            ErrorCode::BadConnect => "malformed CONNECT",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}

/// A payload did not have the shape its type requires. Carries the ERROR code to answer with.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {what}")]
pub struct PayloadError {
    /// The ERROR code to answer with.
    pub code: ErrorCode,
    /// What was wrong, for logs and the ERROR message.
    pub what: &'static str,
}

fn perr(code: ErrorCode, what: &'static str) -> PayloadError {
    PayloadError { code, what }
}

#[inline]
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The width of the capabilities field in a CONNECT (58, 59 or 61 byte forms).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CapsWidth {
    /// One byte: the 58-byte form.
    U8,
    /// Two bytes: the 59-byte form.
    U16,
    /// Four bytes: the 61-byte form.
    U32,
}

/// CONNECT payload (§2.1).
#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol version (1).
    pub version: u8,
    /// Capabilities: only the low 8 bits are meaningful.
    pub caps: u8,
    /// Width the capabilities had on the wire (re-encoded the same way).
    pub caps_width: CapsWidth,
    /// Tenant id.
    pub tenant_id: u32,
    /// Agent id.
    pub agent_id: u32,
    /// Bearer token of the tenant (a credential: never logged).
    pub token: [u8; 32],
    /// Random nonce, logged for tracing; not an authenticator.
    pub nonce: [u8; 16],
}

impl std::fmt::Debug for Connect {
    // The token is a credential: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("version", &self.version)
            .field("caps", &self.caps)
            .field("tenant_id", &self.tenant_id)
            .field("agent_id", &self.agent_id)
            .field("token", &"<redacted>")
            .field("nonce", &self.nonce)
            .finish()
    }
}

impl Connect {
    /// Parses a CONNECT payload, checking in the contract's order: version, then shape.
    pub fn parse(p: &[u8]) -> Result<Connect, PayloadError> {
        match p.first() {
            None => return Err(perr(ErrorCode::BadConnect, "empty CONNECT payload")),
            Some(&v) if v != crate::proto::VERSION => {
                return Err(perr(
                    ErrorCode::UnsupportedVersion,
                    "CONNECT version is not 1",
                ))
            }
            _ => {}
        }
        let (caps, caps_width, rest) = match p.len() {
            58 => (p[1], CapsWidth::U8, 2),
            59 => (p[2], CapsWidth::U16, 3),
            61 => (p[4], CapsWidth::U32, 5),
            _ => {
                return Err(perr(
                    ErrorCode::BadConnect,
                    "CONNECT payload must be 58, 59 or 61 bytes",
                ))
            }
        };
        let mut token = [0u8; 32];
        token.copy_from_slice(&p[rest + 8..rest + 40]);
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&p[rest + 40..rest + 56]);
        Ok(Connect {
            version: p[0],
            caps,
            caps_width,
            tenant_id: be32(p, rest),
            agent_id: be32(p, rest + 4),
            token,
            nonce,
        })
    }

    /// Appends the payload in the form given by `caps_width`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.version);
        match self.caps_width {
            CapsWidth::U8 => out.push(self.caps),
            CapsWidth::U16 => out.extend_from_slice(&(self.caps as u16).to_be_bytes()),
            CapsWidth::U32 => out.extend_from_slice(&(self.caps as u32).to_be_bytes()),
        }
        out.extend_from_slice(&self.tenant_id.to_be_bytes());
        out.extend_from_slice(&self.agent_id.to_be_bytes());
        out.extend_from_slice(&self.token);
        out.extend_from_slice(&self.nonce);
    }
}

/// ACCEPT payload (§2.2). `resume_token` is absent only in the legacy 6-byte form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    /// The new session's id (same as the header's).
    pub session_id: u32,
    /// Server protocol version (1).
    pub version: u8,
    /// Server capability bits (`0x02` RELIABLE, `0x04` ROAM supported).
    pub caps: u8,
    /// 128-bit resume token, the credential for RESUME (ext).
    pub resume_token: Option<[u8; 16]>,
}

impl Accept {
    /// Parses an ACCEPT payload: 6 bytes at least; the resume token is read from 22 on.
    pub fn parse(p: &[u8]) -> Result<Accept, PayloadError> {
        if p.len() < 6 {
            return Err(perr(
                ErrorCode::ProtocolViolation,
                "ACCEPT shorter than 6 bytes",
            ));
        }
        let resume_token = if p.len() >= 22 {
            let mut t = [0u8; 16];
            t.copy_from_slice(&p[6..22]);
            Some(t)
        } else {
            None
        };
        Ok(Accept {
            session_id: be32(p, 0),
            version: p[4],
            caps: p[5],
            resume_token,
        })
    }

    /// Appends the payload (the 22-byte form when `resume_token` is set, else 6 bytes).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.session_id.to_be_bytes());
        out.push(self.version);
        out.push(self.caps);
        if let Some(t) = &self.resume_token {
            out.extend_from_slice(t);
        }
    }
}

/// RESUME payload (§2.3).
#[derive(Clone, PartialEq, Eq)]
pub enum Resume {
    /// The 24-byte form: the normal, authenticated one.
    Full {
        /// The session to resume.
        session_id: u32,
        /// Highest server SEQ the client has received in this session (0 if none).
        last_seq: u32,
        /// Resume token from ACCEPT (or a ROAM token).
        token: [u8; 16],
    },
    /// The 4-byte legacy form: no credential.
    Legacy {
        /// The session to resume.
        session_id: u32,
    },
}

impl std::fmt::Debug for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resume::Full {
                session_id,
                last_seq,
                ..
            } => write!(f, "Resume::Full {{ session_id: {session_id}, last_seq: {last_seq}, token: <redacted> }}"),
            Resume::Legacy { session_id } => write!(f, "Resume::Legacy {{ session_id: {session_id} }}"),
        }
    }
}

impl Resume {
    /// Parses a RESUME payload: 24 or 4 bytes, anything else is `PROTOCOL_VIOLATION`.
    pub fn parse(p: &[u8]) -> Result<Resume, PayloadError> {
        match p.len() {
            24 => {
                let mut token = [0u8; 16];
                token.copy_from_slice(&p[8..24]);
                Ok(Resume::Full {
                    session_id: be32(p, 0),
                    last_seq: be32(p, 4),
                    token,
                })
            }
            4 => Ok(Resume::Legacy {
                session_id: be32(p, 0),
            }),
            _ => Err(perr(
                ErrorCode::ProtocolViolation,
                "RESUME payload must be 24 or 4 bytes",
            )),
        }
    }

    /// The session to resume, in either form.
    pub fn session_id(&self) -> u32 {
        match *self {
            Resume::Full { session_id, .. } | Resume::Legacy { session_id } => session_id,
        }
    }

    /// Appends the payload in its form (24 or 4 bytes).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Resume::Full {
                session_id,
                last_seq,
                token,
            } => {
                out.extend_from_slice(&session_id.to_be_bytes());
                out.extend_from_slice(&last_seq.to_be_bytes());
                out.extend_from_slice(token);
            }
            Resume::Legacy { session_id } => out.extend_from_slice(&session_id.to_be_bytes()),
        }
    }
}

/// RESUMED payload (§2.4).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// The session's id.
    pub session_id: u32,
    /// Highest SEQ of a client DATA frame the server has received in this session (0 if none).
    pub last_client_seq: u32,
    /// SEQ of the first DATA frame that follows as replay (0 if none).
    pub first_replay_seq: u32,
}

impl Resumed {
    /// Parses a RESUMED payload (exactly 12 bytes).
    pub fn parse(p: &[u8]) -> Result<Resumed, PayloadError> {
        if p.len() != 12 {
            return Err(perr(
                ErrorCode::ProtocolViolation,
                "RESUMED payload must be 12 bytes",
            ));
        }
        Ok(Resumed {
            session_id: be32(p, 0),
            last_client_seq: be32(p, 4),
            first_replay_seq: be32(p, 8),
        })
    }

    /// Appends the 12-byte payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.session_id.to_be_bytes());
        out.extend_from_slice(&self.last_client_seq.to_be_bytes());
        out.extend_from_slice(&self.first_replay_seq.to_be_bytes());
    }
}

/// ACK payload (§2.5).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Ack {
    /// Acknowledges the oldest unacknowledged DATA frame sent on this connection.
    Empty,
    /// Acknowledges every DATA frame with SEQ ≤ the value.
    Cumulative(u32),
}

impl Ack {
    /// Parses an ACK payload: 0 or 4 bytes.
    pub fn parse(p: &[u8]) -> Result<Ack, PayloadError> {
        match p.len() {
            0 => Ok(Ack::Empty),
            4 => Ok(Ack::Cumulative(be32(p, 0))),
            _ => Err(perr(
                ErrorCode::ProtocolViolation,
                "ACK payload must be 0 or 4 bytes",
            )),
        }
    }

    /// Appends the payload (nothing for [`Ack::Empty`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        if let Ack::Cumulative(s) = self {
            out.extend_from_slice(&s.to_be_bytes());
        }
    }
}

/// RESIZE payload.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Resize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

impl Resize {
    /// Parses a RESIZE payload (exactly 4 bytes).
    pub fn parse(p: &[u8]) -> Result<Resize, PayloadError> {
        if p.len() != 4 {
            return Err(perr(
                ErrorCode::ProtocolViolation,
                "RESIZE payload must be 4 bytes",
            ));
        }
        Ok(Resize {
            cols: be16(p, 0),
            rows: be16(p, 2),
        })
    }

    /// Appends the 4-byte payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.cols.to_be_bytes());
        out.extend_from_slice(&self.rows.to_be_bytes());
    }
}

/// ROAM payload (§2.6).
#[derive(Clone, PartialEq, Eq)]
pub struct Roam {
    /// Address of the node the session moved to (IPv4 or IPv6).
    pub addr: IpAddr,
    /// Port on that node.
    pub port: u16,
    /// Token to send in the RESUME there (a credential: never logged).
    pub roam_token: [u8; 16],
}

impl std::fmt::Debug for Roam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Roam {{ addr: {}, port: {}, roam_token: <redacted> }}",
            self.addr, self.port
        )
    }
}

impl Roam {
    /// Parses a ROAM payload: 23 bytes for IPv4, 35 for IPv6.
    pub fn parse(p: &[u8]) -> Result<Roam, PayloadError> {
        let bad = || perr(ErrorCode::ProtocolViolation, "ROAM payload malformed");
        let (addr, at) = match (p.first(), p.len()) {
            (Some(4), 23) => (IpAddr::V4(Ipv4Addr::new(p[1], p[2], p[3], p[4])), 5),
            (Some(6), 35) => {
                let mut a = [0u8; 16];
                a.copy_from_slice(&p[1..17]);
                (IpAddr::V6(Ipv6Addr::from(a)), 17)
            }
            _ => return Err(bad()),
        };
        let mut roam_token = [0u8; 16];
        roam_token.copy_from_slice(&p[at + 2..at + 18]);
        Ok(Roam {
            addr,
            port: be16(p, at),
            roam_token,
        })
    }

    /// Appends the payload (family byte 4 or 6, address, port, token).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self.addr {
            IpAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.octets());
            }
        }
        out.extend_from_slice(&self.port.to_be_bytes());
        out.extend_from_slice(&self.roam_token);
    }
}

/// ERROR payload: a code and a UTF-8 message (invalid UTF-8 is replaced, never an error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorFrame {
    /// The raw code (may be one this version does not know).
    pub code: u16,
    /// Human-readable message (may be empty; for people, not programs).
    pub message: String,
}

impl ErrorFrame {
    /// Parses an ERROR payload (at least 2 bytes).
    pub fn parse(p: &[u8]) -> Result<ErrorFrame, PayloadError> {
        if p.len() < 2 {
            return Err(perr(
                ErrorCode::ProtocolViolation,
                "ERROR payload shorter than 2 bytes",
            ));
        }
        Ok(ErrorFrame {
            code: be16(p, 0),
            message: String::from_utf8_lossy(&p[2..]).into_owned(),
        })
    }

    /// The known code, if any.
    pub fn known(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.code)
    }

    /// Appends an ERROR payload for `code` with `message`.
    pub fn encode_parts(code: ErrorCode, message: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(&(code as u16).to_be_bytes());
        out.extend_from_slice(message.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_checks_version_before_shape() {
        assert_eq!(
            Connect::parse(&[2, 0, 0]).unwrap_err().code,
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(
            Connect::parse(&[1, 0, 0]).unwrap_err().code,
            ErrorCode::BadConnect
        );
        assert_eq!(Connect::parse(&[]).unwrap_err().code, ErrorCode::BadConnect);
        for (len, w) in [
            (58, CapsWidth::U8),
            (59, CapsWidth::U16),
            (61, CapsWidth::U32),
        ] {
            let mut p = vec![0u8; len];
            p[0] = 1;
            p[len - 57] = 0x03; // low byte of caps
            let c = Connect::parse(&p).unwrap();
            assert_eq!((c.caps, c.caps_width), (3, w));
            let mut back = Vec::new();
            c.encode(&mut back);
            assert_eq!(back, p);
        }
        for len in [57, 60, 62] {
            let mut p = vec![0u8; len];
            p[0] = 1;
            assert_eq!(Connect::parse(&p).unwrap_err().code, ErrorCode::BadConnect);
        }
    }

    #[test]
    fn resume_forms() {
        assert!(matches!(
            Resume::parse(&[0, 0, 0, 9]),
            Ok(Resume::Legacy { session_id: 9 })
        ));
        assert_eq!(
            Resume::parse(&[0; 5]).unwrap_err().code,
            ErrorCode::ProtocolViolation
        );
        assert_eq!(
            Resume::parse(&[0; 23]).unwrap_err().code,
            ErrorCode::ProtocolViolation
        );
    }

    #[test]
    fn error_codes_round_trip() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(c as u16), Some(c));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(13), None);
    }

    #[test]
    fn tokens_are_not_printed() {
        let mut p = vec![0u8; 58];
        p[0] = 1;
        p[10..42].fill(0xAB); // the token
        let c = Connect::parse(&p).unwrap();
        assert!(!format!("{c:?}").contains("171"));
        assert!(!format!("{c:?}").to_lowercase().contains("abab"));
    }
}
