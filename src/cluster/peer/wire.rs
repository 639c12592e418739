//! The peer messages and their framing: a pure codec, no I/O.
//!
//! A frame is `LEN u32 | TYPE u8 | BODY`, big-endian, `LEN = 1 + len(BODY)`, at most
//! [`MAX_LEN`] (64 MiB: a session record with its replay ring plus the agent's state). Fields:
//! integers big-endian; a string is `len u16 | UTF-8` of at most [`MAX_STR`] bytes; a byte
//! field is `len u32 | bytes`. Every field is sized, so a body has exactly one encoding and any
//! byte left over inside a frame is an error.
//!
//! | type | message      | body                                                                   |
//! |------|--------------|------------------------------------------------------------------------|
//! | 0x01 | `Hello`      | `version u8, node str`                                                 |
//! | 0x02 | `Migrate`    | `sid u32, epoch u64, from str, caps_hint u8, record bytes, state bytes` |
//! | 0x03 | `Ready`      | `sid u32, epoch u64`                                                   |
//! | 0x04 | `Refuse`     | `sid u32, epoch u64, reason str`                                       |
//! | 0x05 | `Commit`     | `sid u32, epoch u64`                                                   |
//! | 0x06 | `Abort`      | `sid u32, epoch u64`                                                   |
//! | 0x07 | `Ping`       | `nonce u64`                                                            |
//! | 0x08 | `Pong`       | `nonce u64`                                                            |
//! | 0x20 | `RelayOpen`  | `stream u64, sid u32, bytes bytes`                                     |
//! | 0x21 | `RelayData`  | `stream u64, bytes bytes`                                              |
//! | 0x22 | `RelayClose` | `stream u64`                                                           |
//!
//! Type codes 0x20..=0x3f are reserved for relay traffic.

/// The largest `LEN` accepted (type byte plus body): 64 MiB.
pub const MAX_LEN: u32 = 64 * 1024 * 1024;
/// The longest string field, in bytes.
pub const MAX_STR: usize = 255;
/// The peer protocol version carried by [`PeerMsg::Hello`].
pub const VERSION: u8 = 1;

const T_HELLO: u8 = 0x01;
const T_MIGRATE: u8 = 0x02;
const T_READY: u8 = 0x03;
const T_REFUSE: u8 = 0x04;
const T_COMMIT: u8 = 0x05;
const T_ABORT: u8 = 0x06;
const T_PING: u8 = 0x07;
const T_PONG: u8 = 0x08;
const T_RELAY_OPEN: u8 = 0x20;
const T_RELAY_DATA: u8 = 0x21;
const T_RELAY_CLOSE: u8 = 0x22;

/// One message on the peer link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMsg {
    /// The first message each way after TLS.
    Hello { version: u8, node: String },
    /// Source → target: the session record (opaque here) and the agent's exported state.
    Migrate {
        sid: u32,
        epoch: u64,
        from: String,
        record: Vec<u8>,
        state: Vec<u8>,
        caps_hint: u8,
    },
    /// Target → source: warm and ready.
    Ready { sid: u32, epoch: u64 },
    /// Target → source: cannot take it.
    Refuse {
        sid: u32,
        epoch: u64,
        reason: String,
    },
    /// Source → target: you hold it now; serve.
    Commit { sid: u32, epoch: u64 },
    /// Source → target: called off; drop the warm copy.
    Abort { sid: u32, epoch: u64 },
    /// Liveness probe (the link answers it itself).
    Ping { nonce: u64 },
    /// Answer to a [`PeerMsg::Ping`].
    Pong { nonce: u64 },
    /// Relay: opens `stream` for session `sid` with its first bytes.
    RelayOpen {
        stream: u64,
        sid: u32,
        bytes: Vec<u8>,
    },
    /// Relay: more bytes on `stream`.
    RelayData { stream: u64, bytes: Vec<u8> },
    /// Relay: `stream` is finished.
    RelayClose { stream: u64 },
}

/// Why a frame cannot be decoded (the link breaks) or a message cannot be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame length {0} is below 1")]
    TooShort(u32),
    #[error("frame length {0} is over the {MAX_LEN}-byte limit")]
    TooLong(u64),
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("message type {0:#04x}: body ends inside a field")]
    Truncated(u8),
    #[error("message type {ty:#04x}: {extra} byte(s) left over inside the frame")]
    Trailing { ty: u8, extra: usize },
    #[error("message type {0:#04x}: a string is not UTF-8")]
    BadUtf8(u8),
    #[error("a string field is {0} bytes (at most {MAX_STR})")]
    StringTooLong(usize),
}

impl PeerMsg {
    /// The type code on the wire.
    pub fn type_code(&self) -> u8 {
        match self {
            PeerMsg::Hello { .. } => T_HELLO,
            PeerMsg::Migrate { .. } => T_MIGRATE,
            PeerMsg::Ready { .. } => T_READY,
            PeerMsg::Refuse { .. } => T_REFUSE,
            PeerMsg::Commit { .. } => T_COMMIT,
            PeerMsg::Abort { .. } => T_ABORT,
            PeerMsg::Ping { .. } => T_PING,
            PeerMsg::Pong { .. } => T_PONG,
            PeerMsg::RelayOpen { .. } => T_RELAY_OPEN,
            PeerMsg::RelayData { .. } => T_RELAY_DATA,
            PeerMsg::RelayClose { .. } => T_RELAY_CLOSE,
        }
    }

    /// A `Refuse` whose reason is cut (at a character boundary) to fit [`MAX_STR`].
    pub fn refuse(sid: u32, epoch: u64, reason: &str) -> PeerMsg {
        let mut end = reason.len().min(MAX_STR);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        PeerMsg::Refuse {
            sid,
            epoch,
            reason: reason[..end].to_string(),
        }
    }

    /// The whole frame's size in bytes (header included), or why it cannot be encoded.
    pub fn encoded_len(&self) -> Result<usize, WireError> {
        fn s(v: &str) -> Result<usize, WireError> {
            if v.len() > MAX_STR {
                return Err(WireError::StringTooLong(v.len()));
            }
            Ok(2 + v.len())
        }
        fn b(v: &[u8]) -> usize {
            4 + v.len()
        }
        let body = match self {
            PeerMsg::Hello { node, .. } => 1 + s(node)?,
            PeerMsg::Migrate {
                from,
                record,
                state,
                ..
            } => 4 + 8 + s(from)? + 1 + b(record) + b(state),
            PeerMsg::Ready { .. } | PeerMsg::Commit { .. } | PeerMsg::Abort { .. } => 12,
            PeerMsg::Refuse { reason, .. } => 12 + s(reason)?,
            PeerMsg::Ping { .. } | PeerMsg::Pong { .. } | PeerMsg::RelayClose { .. } => 8,
            PeerMsg::RelayOpen { bytes, .. } => 8 + 4 + b(bytes),
            PeerMsg::RelayData { bytes, .. } => 8 + b(bytes),
        };
        let len = 1 + body as u64;
        if len > u64::from(MAX_LEN) {
            return Err(WireError::TooLong(len));
        }
        Ok(4 + len as usize)
    }
}

/// Appends the frame for `msg` to `out`; on error `out` is left as it was.
pub fn encode(msg: &PeerMsg, out: &mut Vec<u8>) -> Result<(), WireError> {
    let total = msg.encoded_len()?;
    out.reserve(total);
    let start = out.len();
    out.extend_from_slice(&((total - 4) as u32).to_be_bytes());
    out.push(msg.type_code());
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend_from_slice(&(v.len() as u16).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    fn b(out: &mut Vec<u8>, v: &[u8]) {
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }
    match msg {
        PeerMsg::Hello { version, node } => {
            out.push(*version);
            s(out, node);
        }
        PeerMsg::Migrate {
            sid,
            epoch,
            from,
            record,
            state,
            caps_hint,
        } => {
            out.extend_from_slice(&sid.to_be_bytes());
            out.extend_from_slice(&epoch.to_be_bytes());
            s(out, from);
            out.push(*caps_hint);
            b(out, record);
            b(out, state);
        }
        PeerMsg::Ready { sid, epoch }
        | PeerMsg::Commit { sid, epoch }
        | PeerMsg::Abort { sid, epoch } => {
            out.extend_from_slice(&sid.to_be_bytes());
            out.extend_from_slice(&epoch.to_be_bytes());
        }
        PeerMsg::Refuse { sid, epoch, reason } => {
            out.extend_from_slice(&sid.to_be_bytes());
            out.extend_from_slice(&epoch.to_be_bytes());
            s(out, reason);
        }
        PeerMsg::Ping { nonce } | PeerMsg::Pong { nonce } => {
            out.extend_from_slice(&nonce.to_be_bytes());
        }
        PeerMsg::RelayOpen { stream, sid, bytes } => {
            out.extend_from_slice(&stream.to_be_bytes());
            out.extend_from_slice(&sid.to_be_bytes());
            b(out, bytes);
        }
        PeerMsg::RelayData { stream, bytes } => {
            out.extend_from_slice(&stream.to_be_bytes());
            b(out, bytes);
        }
        PeerMsg::RelayClose { stream } => {
            out.extend_from_slice(&stream.to_be_bytes());
        }
    }
    debug_assert_eq!(out.len() - start, total);
    Ok(())
}

fn known_type(ty: u8) -> bool {
    matches!(ty, T_HELLO..=T_PONG | T_RELAY_OPEN..=T_RELAY_CLOSE)
}

/// Decodes the frame at the start of `buf`: `Ok(Some((msg, consumed)))`, `Ok(None)` when more
/// bytes are needed, or an error (the link must break). A bad length or an unknown type is
/// refused as soon as the header shows it; nothing is allocated beyond the frame's own fields.
pub fn decode(buf: &[u8]) -> Result<Option<(PeerMsg, usize)>, WireError> {
    let Some(hdr) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    if len < 1 {
        return Err(WireError::TooShort(len));
    }
    if len > MAX_LEN {
        return Err(WireError::TooLong(u64::from(len)));
    }
    let Some(&ty) = buf.get(4) else {
        return Ok(None);
    };
    if !known_type(ty) {
        return Err(WireError::UnknownType(ty));
    }
    let total = 4 + len as usize;
    let Some(body) = buf.get(5..total) else {
        return Ok(None);
    };
    let mut r = Reader { b: body, ty };
    let msg = match ty {
        T_HELLO => PeerMsg::Hello {
            version: r.u8()?,
            node: r.str()?,
        },
        T_MIGRATE => PeerMsg::Migrate {
            sid: r.u32()?,
            epoch: r.u64()?,
            from: r.str()?,
            caps_hint: r.u8()?,
            record: r.bytes()?,
            state: r.bytes()?,
        },
        T_READY => PeerMsg::Ready {
            sid: r.u32()?,
            epoch: r.u64()?,
        },
        T_REFUSE => PeerMsg::Refuse {
            sid: r.u32()?,
            epoch: r.u64()?,
            reason: r.str()?,
        },
        T_COMMIT => PeerMsg::Commit {
            sid: r.u32()?,
            epoch: r.u64()?,
        },
        T_ABORT => PeerMsg::Abort {
            sid: r.u32()?,
            epoch: r.u64()?,
        },
        T_PING => PeerMsg::Ping { nonce: r.u64()? },
        T_PONG => PeerMsg::Pong { nonce: r.u64()? },
        T_RELAY_OPEN => PeerMsg::RelayOpen {
            stream: r.u64()?,
            sid: r.u32()?,
            bytes: r.bytes()?,
        },
        T_RELAY_DATA => PeerMsg::RelayData {
            stream: r.u64()?,
            bytes: r.bytes()?,
        },
        T_RELAY_CLOSE => PeerMsg::RelayClose { stream: r.u64()? },
        _ => return Err(WireError::UnknownType(ty)),
    };
    if !r.b.is_empty() {
        return Err(WireError::Trailing {
            ty,
            extra: r.b.len(),
        });
    }
    Ok(Some((msg, total)))
}

/// A cursor over one frame's body.
struct Reader<'a> {
    b: &'a [u8],
    ty: u8,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated(self.ty));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn str(&mut self) -> Result<String, WireError> {
        let n = usize::from(u16::from_be_bytes(self.array()?));
        if n > MAX_STR {
            return Err(WireError::StringTooLong(n));
        }
        let raw = self.take(n)?;
        std::str::from_utf8(raw)
            .map(str::to_string)
            .map_err(|_| WireError::BadUtf8(self.ty))
    }

    fn bytes(&mut self) -> Result<Vec<u8>, WireError> {
        let n = u32::from_be_bytes(self.array()?) as usize;
        // `take` checks `n` against what the frame holds before anything is copied.
        Ok(self.take(n)?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn samples() -> Vec<PeerMsg> {
        vec![
            PeerMsg::Hello {
                version: VERSION,
                node: "node-a".into(),
            },
            PeerMsg::Hello {
                version: 7,
                node: String::new(),
            },
            PeerMsg::Migrate {
                sid: 0xdead_beef,
                epoch: u64::MAX - 3,
                from: "nœud-b".into(),
                record: (0..=255u8).collect(),
                state: vec![9; 1000],
                caps_hint: 0x5a,
            },
            PeerMsg::Migrate {
                sid: 0,
                epoch: 0,
                from: String::new(),
                record: Vec::new(),
                state: Vec::new(),
                caps_hint: 0,
            },
            PeerMsg::Ready { sid: 1, epoch: 2 },
            PeerMsg::Refuse {
                sid: 3,
                epoch: 4,
                reason: "x".repeat(MAX_STR),
            },
            PeerMsg::Commit { sid: 5, epoch: 6 },
            PeerMsg::Abort { sid: 7, epoch: 8 },
            PeerMsg::Ping { nonce: 9 },
            PeerMsg::Pong { nonce: u64::MAX },
            PeerMsg::RelayOpen {
                stream: 10,
                sid: 11,
                bytes: b"hello".to_vec(),
            },
            PeerMsg::RelayData {
                stream: 12,
                bytes: vec![0; 70_000],
            },
            PeerMsg::RelayClose { stream: 13 },
        ]
    }

    fn enc(m: &PeerMsg) -> Vec<u8> {
        let mut v = Vec::new();
        encode(m, &mut v).unwrap();
        v
    }

    #[test]
    fn every_message_roundtrips() {
        let mut stream = Vec::new();
        for m in samples() {
            let f = enc(&m);
            assert_eq!(f.len(), m.encoded_len().unwrap());
            assert_eq!(
                u32::from_be_bytes(f[..4].try_into().unwrap()) as usize,
                f.len() - 4
            );
            assert_eq!(f[4], m.type_code());
            let (got, n) = decode(&f).unwrap().unwrap();
            assert_eq!(got, m);
            assert_eq!(n, f.len());
            stream.extend_from_slice(&f);
        }
        // Back to back in one buffer.
        let mut at = 0;
        for m in samples() {
            let (got, n) = decode(&stream[at..]).unwrap().unwrap();
            assert_eq!(got, m);
            at += n;
        }
        assert_eq!(at, stream.len());
        assert_eq!(decode(&stream[at..]).unwrap(), None);
    }

    #[test]
    fn the_wire_layout_is_as_documented() {
        assert_eq!(
            enc(&PeerMsg::Ready { sid: 1, epoch: 2 }),
            [0, 0, 0, 13, 0x03, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2]
        );
        assert_eq!(
            enc(&PeerMsg::Hello {
                version: 1,
                node: "ab".into()
            }),
            [0, 0, 0, 6, 0x01, 1, 0, 2, b'a', b'b']
        );
        assert_eq!(
            enc(&PeerMsg::RelayData {
                stream: 1,
                bytes: vec![7]
            }),
            [0, 0, 0, 14, 0x21, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 7]
        );
    }

    #[test]
    fn every_truncation_needs_more() {
        for m in samples() {
            let f = enc(&m);
            for cut in 0..f.len() {
                assert_eq!(decode(&f[..cut]), Ok(None), "{m:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn a_shortened_len_is_an_error_never_a_panic() {
        // Lower LEN so the frame ends inside a field: a typed error, never a short success.
        for m in samples() {
            let f = enc(&m);
            let len = f.len() - 4;
            for short in 1..len {
                let mut g = f[..4 + short].to_vec();
                g[..4].copy_from_slice(&(short as u32).to_be_bytes());
                assert!(decode(&g).is_err(), "{m:?} shortened to {short}");
            }
        }
    }

    #[test]
    fn oversize_and_zero_len_are_refused_from_the_header() {
        let big = (MAX_LEN + 1).to_be_bytes();
        assert_eq!(
            decode(&big),
            Err(WireError::TooLong(u64::from(MAX_LEN) + 1))
        );
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(WireError::TooLong(u64::from(u32::MAX)))
        );
        assert_eq!(decode(&[0, 0, 0, 0]), Err(WireError::TooShort(0)));
        // MAX_LEN itself is fine: it only waits for the bytes.
        let mut hdr = MAX_LEN.to_be_bytes().to_vec();
        hdr.push(T_RELAY_DATA);
        assert_eq!(decode(&hdr), Ok(None));
    }

    #[test]
    fn encode_refuses_what_decode_would() {
        let long = PeerMsg::Hello {
            version: 1,
            node: "n".repeat(MAX_STR + 1),
        };
        let mut out = vec![1, 2, 3];
        assert_eq!(
            encode(&long, &mut out),
            Err(WireError::StringTooLong(MAX_STR + 1))
        );
        assert_eq!(out, [1, 2, 3]);
        let huge = PeerMsg::RelayData {
            stream: 0,
            bytes: vec![0; MAX_LEN as usize],
        };
        assert!(matches!(huge.encoded_len(), Err(WireError::TooLong(_))));
        // The largest body that fits.
        let fits = PeerMsg::RelayData {
            stream: 0,
            bytes: vec![0; MAX_LEN as usize - 1 - 8 - 4],
        };
        assert_eq!(fits.encoded_len().unwrap(), 4 + MAX_LEN as usize);
        let f = enc(&fits);
        assert_eq!(decode(&f).unwrap().unwrap().1, f.len());
        // A refuse reason is cut to fit, at a character boundary.
        let r = PeerMsg::refuse(1, 2, &"é".repeat(200));
        let PeerMsg::Refuse { reason, .. } = &r else {
            unreachable!()
        };
        assert_eq!(reason.len(), 254);
        assert!(r.encoded_len().is_ok());
    }

    #[test]
    fn unknown_types_are_refused() {
        for ty in 0..=255u8 {
            let f = [0, 0, 0, 1, ty];
            let known = known_type(ty);
            match decode(&f) {
                Err(WireError::UnknownType(t)) => {
                    assert!(!known);
                    assert_eq!(t, ty);
                }
                // Known types with an empty body: truncated (none has an empty body).
                Err(WireError::Truncated(t)) => {
                    assert!(known);
                    assert_eq!(t, ty);
                }
                other => panic!("type {ty:#x}: {other:?}"),
            }
            // Refused before the body is there.
            if !known {
                assert!(decode(&[0, 0, 1, 0, ty]).is_err());
            }
        }
    }

    #[test]
    fn trailing_bytes_bad_utf8_and_long_strings_are_refused() {
        for m in samples() {
            let mut f = enc(&m);
            f.push(0);
            let len = u32::from_be_bytes(f[..4].try_into().unwrap()) + 1;
            f[..4].copy_from_slice(&len.to_be_bytes());
            assert_eq!(
                decode(&f),
                Err(WireError::Trailing {
                    ty: m.type_code(),
                    extra: 1
                }),
                "{m:?}"
            );
        }
        let mut f = enc(&PeerMsg::Hello {
            version: 1,
            node: "ab".into(),
        });
        f[8] = 0xff;
        assert_eq!(decode(&f), Err(WireError::BadUtf8(T_HELLO)));
        // A string length over MAX_STR is refused even when the bytes are there.
        let mut f = vec![0, 0, 1, 2, T_HELLO, 1, 1, 0];
        f.extend_from_slice(&[b'a'; 256]);
        assert_eq!(decode(&f), Err(WireError::StringTooLong(256)));
        // A byte field claiming more than the frame holds.
        let mut f = enc(&PeerMsg::RelayData {
            stream: 1,
            bytes: vec![1, 2, 3],
        });
        f[13..17].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&f), Err(WireError::Truncated(T_RELAY_DATA)));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x9ee7_c1a5);
        let frames: Vec<Vec<u8>> = samples()
            .iter()
            .filter(|m| m.encoded_len().unwrap() < 4096)
            .map(enc)
            .collect();
        let mut decoded = 0;
        for i in 0..20_000 {
            let buf: Vec<u8> = if i % 2 == 0 {
                // Pure noise, with a plausible length now and then.
                let n = rng.gen_range(0..64);
                let mut b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                if b.len() >= 4 && rng.gen_bool(0.5) {
                    let len = rng.gen_range(1..(b.len() as u32));
                    b[..4].copy_from_slice(&len.to_be_bytes());
                    if b.len() > 4 && rng.gen_bool(0.7) {
                        b[4] = [T_HELLO, T_MIGRATE, T_REFUSE, T_RELAY_OPEN][rng.gen_range(0..4)];
                    }
                }
                b
            } else {
                // A valid frame with a few bytes flipped and maybe cut.
                let mut b = frames[rng.gen_range(0..frames.len())].clone();
                for _ in 0..rng.gen_range(1..4) {
                    let at = rng.gen_range(0..b.len());
                    b[at] = rng.gen();
                }
                let keep = rng.gen_range(0..=b.len());
                b.truncate(keep);
                b
            };
            if let Ok(Some((m, n))) = decode(&buf) {
                decoded += 1;
                assert!(n <= buf.len());
                // The encoding is canonical: what decodes re-encodes to the same bytes.
                assert_eq!(enc(&m), buf[..n]);
            }
        }
        assert!(
            decoded > 0,
            "the mutations should still decode now and then"
        );
    }
}
