//! Pod-link messages: `LEN u32 | TYPE u8 | SESSION_ID u32 | BODY`, big-endian,
//! `LEN = 5 + len(BODY)`. A LEN below 5 or over 1 MiB + 5 breaks the link.

/// Bytes before the body.
pub const HEADER_LEN: usize = 9;
/// Largest body a message may carry.
pub const MAX_BODY: usize = 1 << 20;

/// Pod-link protocol version 1: the base protocol (POD-LINK.md §§2–5). A pod that says 1 in
/// its HELLO never receives EXPORT or STATE.
pub const VERSION: u8 = 1;

/// Pod-link protocol version 2: the base protocol plus session migration (ClawRoam,
/// POD-LINK.md §8: EXPORT, STATE and CLOSE reason 5). A pod says 2 in its HELLO when it can move
/// sessions. `clawtermd` says 2 in its HELLO and accepts pods that say 1 or 2 (it sends EXPORT
/// only to a pod that said 2); the agent SDK accepts a daemon that says 1 or 2.
pub const VERSION_MIGRATE: u8 = 2;

/// Message types (POD-LINK.md §3).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum MsgType {
    /// `0x01` HELLO (both directions): version and name, first on a link.
    Hello,
    /// `0x02` OPEN (daemon → pod): a new session.
    Open,
    /// `0x03` REOPEN (daemon → pod): an existing session re-bound to this pod.
    Reopen,
    /// `0x10` DATA (both directions): opaque session bytes.
    Data,
    /// `0x11` RESIZE (daemon → pod): terminal size.
    Resize,
    /// `0x20` DETACHED (daemon → pod): the client went away; the session lives on.
    Detached,
    /// `0x21` ATTACHED (daemon → pod): a client is back.
    Attached,
    /// `0x30` CLOSE (both directions): the session ends.
    Close,
    /// `0x40` PAUSE: stop sending DATA for this session.
    Pause,
    /// `0x41` CONTINUE: sending may resume.
    Continue,
    /// `0x50` EXPORT (daemon → pod): the session is leaving this node; send its state.
    Export,
    /// `0x51` STATE (both directions): a chunk of the session's opaque agent state.
    State,
    /// A type code this version does not know.
    Unknown(u8),
}

impl MsgType {
    /// The wire type code.
    pub const fn code(self) -> u8 {
        match self {
            MsgType::Hello => 0x01,
            MsgType::Open => 0x02,
            MsgType::Reopen => 0x03,
            MsgType::Data => 0x10,
            MsgType::Resize => 0x11,
            MsgType::Detached => 0x20,
            MsgType::Attached => 0x21,
            MsgType::Close => 0x30,
            MsgType::Pause => 0x40,
            MsgType::Continue => 0x41,
            MsgType::Export => 0x50,
            MsgType::State => 0x51,
            MsgType::Unknown(c) => c,
        }
    }

    /// The type for a wire code; unknown codes give [`MsgType::Unknown`].
    pub const fn from_code(c: u8) -> MsgType {
        match c {
            0x01 => MsgType::Hello,
            0x02 => MsgType::Open,
            0x03 => MsgType::Reopen,
            0x10 => MsgType::Data,
            0x11 => MsgType::Resize,
            0x20 => MsgType::Detached,
            0x21 => MsgType::Attached,
            0x30 => MsgType::Close,
            0x40 => MsgType::Pause,
            0x41 => MsgType::Continue,
            0x50 => MsgType::Export,
            0x51 => MsgType::State,
            c => MsgType::Unknown(c),
        }
    }

    /// The contract's name.
    pub const fn name(self) -> &'static str {
        match self {
            MsgType::Hello => "HELLO",
            MsgType::Open => "OPEN",
            MsgType::Reopen => "REOPEN",
            MsgType::Data => "DATA",
            MsgType::Resize => "RESIZE",
            MsgType::Detached => "DETACHED",
            MsgType::Attached => "ATTACHED",
            MsgType::Close => "CLOSE",
            MsgType::Pause => "PAUSE",
            MsgType::Continue => "CONTINUE",
            MsgType::Export => "EXPORT",
            MsgType::State => "STATE",
            MsgType::Unknown(_) => "UNKNOWN",
        }
    }
}

/// CLOSE reasons.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// 0: normal close.
    Normal,
    /// 1: the client disconnected.
    ClientDisconnect,
    /// 2: the suspend TTL expired.
    SuspendExpired,
    /// 3: an error.
    Error,
    /// 4: refused.
    Refused,
    /// 5: the session roamed to another node (POD-LINK.md §8); the pod forgets it.
    Roamed,
    /// A reason code this version does not know.
    Other(u8),
}

impl CloseReason {
    /// The wire reason code.
    pub const fn code(self) -> u8 {
        match self {
            CloseReason::Normal => 0,
            CloseReason::ClientDisconnect => 1,
            CloseReason::SuspendExpired => 2,
            CloseReason::Error => 3,
            CloseReason::Refused => 4,
            CloseReason::Roamed => 5,
            CloseReason::Other(c) => c,
        }
    }

    /// The reason for a wire code; unknown codes give [`CloseReason::Other`].
    pub const fn from_code(c: u8) -> CloseReason {
        match c {
            0 => CloseReason::Normal,
            1 => CloseReason::ClientDisconnect,
            2 => CloseReason::SuspendExpired,
            3 => CloseReason::Error,
            4 => CloseReason::Refused,
            5 => CloseReason::Roamed,
            c => CloseReason::Other(c),
        }
    }

    /// A short name for logs (`other` for codes this version does not know).
    pub const fn name(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::ClientDisconnect => "client disconnect",
            CloseReason::SuspendExpired => "suspend TTL expired",
            CloseReason::Error => "error",
            CloseReason::Refused => "refused",
            CloseReason::Roamed => "roamed",
            CloseReason::Other(_) => "other",
        }
    }
}

/// OPEN / REOPEN body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open<'a> {
    /// Tenant id.
    pub tenant: u32,
    /// Agent id.
    pub agent: u32,
    /// The client's capability bits, from its CONNECT.
    pub client_caps: u8,
    /// The client's address, as UTF-8 text (e.g. `127.0.0.1:50000`).
    pub peer: &'a str,
}

/// A decoded message whose body borrows the input buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    /// HELLO: sent first in both directions (SESSION_ID 0).
    Hello {
        /// Pod-link protocol version ([`VERSION`]).
        version: u8,
        /// The sender's name (may be empty).
        name: &'a str,
    },
    /// OPEN: a new session.
    Open(Open<'a>),
    /// REOPEN: an existing session re-bound to this pod (same SESSION_ID as before).
    Reopen(Open<'a>),
    /// DATA: opaque bytes; boundaries are kept end to end.
    Data(&'a [u8]),
    /// RESIZE: the client's terminal size.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// DETACHED: the client went away; the session lives on.
    Detached,
    /// ATTACHED: a client is back.
    Attached,
    /// CLOSE: nothing more is sent for this SESSION_ID (an empty body decodes as `Normal`).
    Close(CloseReason),
    /// PAUSE: stop sending DATA for this session.
    Pause,
    /// CONTINUE: sending may resume.
    Continue,
    /// EXPORT (pod-link version 2): the session is leaving this node; the pod answers with its
    /// state as [`Msg::State`] chunks ending with an empty one, then sends nothing more for it.
    /// The body is empty (a body is ignored, as for PAUSE and CONTINUE).
    Export,
    /// STATE (pod-link version 2): a chunk (at most [`MAX_BODY`] bytes) of the session's opaque
    /// agent state; an empty one ends the state.
    State(&'a [u8]),
    /// A type this version does not know: receivers ignore it.
    Unknown {
        /// The type code.
        ty: u8,
        /// The raw body.
        body: &'a [u8],
    },
}

impl Msg<'_> {
    /// The message's type.
    pub fn ty(&self) -> MsgType {
        match self {
            Msg::Hello { .. } => MsgType::Hello,
            Msg::Open(_) => MsgType::Open,
            Msg::Reopen(_) => MsgType::Reopen,
            Msg::Data(_) => MsgType::Data,
            Msg::Resize { .. } => MsgType::Resize,
            Msg::Detached => MsgType::Detached,
            Msg::Attached => MsgType::Attached,
            Msg::Close(_) => MsgType::Close,
            Msg::Pause => MsgType::Pause,
            Msg::Continue => MsgType::Continue,
            Msg::Export => MsgType::Export,
            Msg::State(_) => MsgType::State,
            Msg::Unknown { ty, .. } => MsgType::Unknown(*ty),
        }
    }
}

/// Outcome of [`decode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole message for `session_id`, and the bytes it used.
    Msg {
        /// The message's SESSION_ID.
        session_id: u32,
        /// The decoded message.
        msg: Msg<'a>,
        /// Bytes of `buf` the message took (header included).
        used: usize,
    },
    /// At least this many more bytes are needed.
    NeedMore(usize),
}

/// The link is broken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// LEN outside `5..=MAX_BODY + 5`.
    #[error("pod-link message LEN {0} is below 5 or over 1 MiB + 5")]
    BadLen(u32),
    /// A body that does not fit its type.
    #[error("pod-link {ty} body of {len} bytes is malformed: {what}")]
    BadBody {
        /// Name of the message type.
        ty: &'static str,
        /// Body length in bytes.
        len: usize,
        /// What is wrong with it.
        what: &'static str,
    },
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn bad(ty: MsgType, len: usize, what: &'static str) -> DecodeError {
    DecodeError::BadBody {
        ty: ty.name(),
        len,
        what,
    }
}

fn parse_open(body: &[u8], ty: MsgType) -> Result<Open<'_>, DecodeError> {
    if body.len() < 9 {
        return Err(bad(ty, body.len(), "shorter than 9 bytes"));
    }
    let peer =
        std::str::from_utf8(&body[9..]).map_err(|_| bad(ty, body.len(), "address is not UTF-8"))?;
    Ok(Open {
        tenant: be32(body, 0),
        agent: be32(body, 4),
        client_caps: body[8],
        peer,
    })
}

/// Decodes the first message in `buf`.
pub fn decode(buf: &[u8]) -> Result<Decoded<'_>, DecodeError> {
    if buf.len() < 4 {
        return Ok(Decoded::NeedMore(HEADER_LEN - buf.len()));
    }
    let len = be32(buf, 0);
    if !(5..=(MAX_BODY as u32 + 5)).contains(&len) {
        return Err(DecodeError::BadLen(len));
    }
    let total = 4 + len as usize;
    if buf.len() < total {
        return Ok(Decoded::NeedMore(total - buf.len()));
    }
    let ty = MsgType::from_code(buf[4]);
    let session_id = be32(buf, 5);
    let body = &buf[HEADER_LEN..total];
    let msg = match ty {
        MsgType::Hello => {
            let Some((&version, name)) = body.split_first() else {
                return Err(bad(ty, 0, "missing version"));
            };
            let name =
                std::str::from_utf8(name).map_err(|_| bad(ty, body.len(), "name is not UTF-8"))?;
            Msg::Hello { version, name }
        }
        MsgType::Open => Msg::Open(parse_open(body, ty)?),
        MsgType::Reopen => Msg::Reopen(parse_open(body, ty)?),
        MsgType::Data => Msg::Data(body),
        MsgType::Resize => {
            if body.len() != 4 {
                return Err(bad(ty, body.len(), "must be 4 bytes"));
            }
            Msg::Resize {
                cols: u16::from_be_bytes([body[0], body[1]]),
                rows: u16::from_be_bytes([body[2], body[3]]),
            }
        }
        MsgType::Detached => Msg::Detached,
        MsgType::Attached => Msg::Attached,
        MsgType::Close => match body {
            [r, ..] => Msg::Close(CloseReason::from_code(*r)),
            [] => Msg::Close(CloseReason::Normal),
        },
        MsgType::Pause => Msg::Pause,
        MsgType::Continue => Msg::Continue,
        // Like PAUSE and CONTINUE, a body on EXPORT is ignored (a later version may add one).
        MsgType::Export => Msg::Export,
        MsgType::State => Msg::State(body),
        MsgType::Unknown(ty) => Msg::Unknown { ty, body },
    };
    Ok(Decoded::Msg {
        session_id,
        msg,
        used: total,
    })
}

/// Appends `msg` for `session_id` to `out`.
///
/// # Panics
/// If a DATA or STATE body is over [`MAX_BODY`] (split it first).
pub fn encode(out: &mut Vec<u8>, session_id: u32, msg: &Msg<'_>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    out.push(msg.ty().code());
    out.extend_from_slice(&session_id.to_be_bytes());
    match msg {
        Msg::Hello { version, name } => {
            out.push(*version);
            out.extend_from_slice(name.as_bytes());
        }
        Msg::Open(o) | Msg::Reopen(o) => {
            out.extend_from_slice(&o.tenant.to_be_bytes());
            out.extend_from_slice(&o.agent.to_be_bytes());
            out.push(o.client_caps);
            out.extend_from_slice(o.peer.as_bytes());
        }
        Msg::Data(d) | Msg::State(d) => out.extend_from_slice(d),
        Msg::Resize { cols, rows } => {
            out.extend_from_slice(&cols.to_be_bytes());
            out.extend_from_slice(&rows.to_be_bytes());
        }
        Msg::Close(r) => out.push(r.code()),
        Msg::Detached | Msg::Attached | Msg::Pause | Msg::Continue | Msg::Export => {}
        Msg::Unknown { body, .. } => out.extend_from_slice(body),
    }
    let len = out.len() - start - 4;
    assert!(len <= MAX_BODY + 5, "pod-link body over 1 MiB");
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn len_bounds_break_the_link() {
        assert_eq!(decode(&[0, 0, 0, 4, 1]), Err(DecodeError::BadLen(4)));
        assert_eq!(
            decode(&[0, 0x10, 0, 6]),
            Err(DecodeError::BadLen(0x0010_0006))
        );
        assert!(matches!(decode(&[0, 0x10, 0, 5]), Ok(Decoded::NeedMore(_))));
        assert_eq!(decode(&[0, 0, 0]), Ok(Decoded::NeedMore(6)));
    }

    #[test]
    fn round_trip_each_type() {
        let open = Open {
            tenant: 7,
            agent: 42,
            client_caps: 3,
            peer: "[::1]:5",
        };
        let msgs = [
            Msg::Hello {
                version: 1,
                name: "x",
            },
            Msg::Open(open.clone()),
            Msg::Reopen(open),
            Msg::Data(b"ls\n"),
            Msg::Resize { cols: 80, rows: 24 },
            Msg::Detached,
            Msg::Attached,
            Msg::Close(CloseReason::Refused),
            Msg::Pause,
            Msg::Continue,
            Msg::Close(CloseReason::Roamed),
            Msg::Hello {
                version: VERSION_MIGRATE,
                name: "",
            },
            Msg::Export,
            Msg::State(b"soul"),
            Msg::State(b""),
            Msg::Unknown {
                ty: 0x77,
                body: b"zz",
            },
        ];
        for m in msgs {
            let mut v = Vec::new();
            encode(&mut v, 99, &m);
            match decode(&v).unwrap() {
                Decoded::Msg {
                    session_id,
                    msg,
                    used,
                } => {
                    assert_eq!((session_id, &msg, used), (99, &m, v.len()));
                }
                d => panic!("{d:?}"),
            }
        }
    }

    #[test]
    fn migration_codes_are_the_contracts() {
        assert_eq!(MsgType::Export.code(), 0x50);
        assert_eq!(MsgType::State.code(), 0x51);
        assert_eq!(MsgType::from_code(0x50), MsgType::Export);
        assert_eq!(MsgType::from_code(0x51), MsgType::State);
        assert_eq!(MsgType::Export.name(), "EXPORT");
        assert_eq!(MsgType::State.name(), "STATE");
        assert_eq!(CloseReason::Roamed.code(), 5);
        assert_eq!(CloseReason::from_code(5), CloseReason::Roamed);
        assert_eq!(CloseReason::Roamed.name(), "roamed");
        assert_eq!(CloseReason::from_code(6), CloseReason::Other(6));
        assert_eq!((VERSION, VERSION_MIGRATE), (1, 2));
    }

    fn one(buf: &[u8]) -> (u32, Msg<'_>, usize) {
        match decode(buf).unwrap() {
            Decoded::Msg {
                session_id,
                msg,
                used,
            } => (session_id, msg, used),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn export_and_state_on_the_wire() {
        let mut v = Vec::new();
        encode(&mut v, 7, &Msg::Export);
        assert_eq!(v, [0, 0, 0, 5, 0x50, 0, 0, 0, 7]);
        v.clear();
        encode(&mut v, 7, &Msg::State(b""));
        assert_eq!(
            v,
            [0, 0, 0, 5, 0x51, 0, 0, 0, 7],
            "the empty STATE ends the state"
        );
        v.clear();
        encode(&mut v, 7, &Msg::State(b"ab"));
        assert_eq!(v, [0, 0, 0, 7, 0x51, 0, 0, 0, 7, b'a', b'b']);
        // EXPORT with a body: the body is ignored, as for PAUSE and CONTINUE.
        assert_eq!(
            one(&[0, 0, 0, 6, 0x50, 0, 0, 0, 7, 9]),
            (7, Msg::Export, 10)
        );
    }

    #[test]
    fn a_state_chunk_of_the_largest_body_round_trips_and_one_more_byte_breaks_the_link() {
        let body = vec![0x5a; MAX_BODY];
        let mut v = Vec::new();
        encode(&mut v, 3, &Msg::State(&body));
        assert_eq!(v.len(), HEADER_LEN + MAX_BODY);
        assert_eq!(one(&v), (3, Msg::State(&body), v.len()));
        // LEN of a 1 MiB + 1 body.
        let mut over = ((MAX_BODY + 6) as u32).to_be_bytes().to_vec();
        over.extend_from_slice(&[0x51, 0, 0, 0, 3]);
        assert_eq!(decode(&over), Err(DecodeError::BadLen(MAX_BODY as u32 + 6)));
    }

    #[test]
    #[should_panic(expected = "over 1 MiB")]
    fn encoding_a_state_chunk_over_the_limit_panics() {
        let body = vec![0; MAX_BODY + 1];
        encode(&mut Vec::new(), 1, &Msg::State(&body));
    }
}
