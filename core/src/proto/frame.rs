//! Frame layout, CRC-16/UMTS, decoder and encoder.
//!
//! ```text
//! 0      1          5     9      10      11    13        13+LEN
//! | FLAG | SESSION  | SEQ | TYPE | FLAGS | LEN | PAYLOAD | CRC |
//! ```
//! All integers big-endian; the CRC covers FLAG through the end of PAYLOAD. There is no byte
//! stuffing and no resynchronisation: a wrong FLAG or CRC breaks the stream.

use crc::{Crc, Table, CRC_16_UMTS};
use std::fmt;

/// First byte of every frame.
pub const FLAG: u8 = 0x7E;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 13;
/// Bytes after the payload.
pub const CRC_LEN: usize = 2;
/// Fixed per-frame overhead.
pub const OVERHEAD: usize = HEADER_LEN + CRC_LEN;
/// Largest payload the LEN field can express.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// CRC-16/UMTS with slice-by-16 tables (the per-frame hot path).
static CRC16: Crc<u16, Table<16>> = Crc::<u16, Table<16>>::new(&CRC_16_UMTS);

/// CRC-16/UMTS of `bytes`.
#[inline]
pub fn crc16(bytes: &[u8]) -> u16 {
    CRC16.checksum(bytes)
}

/// Frame types of §2. Unknown codes are kept as [`FrameType::Unknown`] so a receiver can count
/// and ignore them after the handshake.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// `0x01` CONNECT (client → server): opens a new session.
    Connect,
    /// `0x02` ACCEPT (server → client): the new session's id, capabilities and resume token.
    Accept,
    /// `0x03` RESUME (client → server): re-attaches to an existing session.
    Resume,
    /// `0x04` RESUMED (server → client): answers a valid RESUME, before the replay.
    Resumed,
    /// `0x10` DATA (both directions): opaque terminal or agent I/O.
    Data,
    /// `0x11` ACK (both directions): acknowledges DATA frames.
    Ack,
    /// `0x12` NACK (both directions): reserved; receivers ignore it.
    Nack,
    /// `0x13` RESIZE (client → server, ext): terminal size.
    Resize,
    /// `0x20` KEEPALIVE (both directions): empty; never answered with a KEEPALIVE.
    Keepalive,
    /// `0x30` SUSPEND (client → server): empty; suspends the session.
    Suspend,
    /// `0x40` DISCONNECT (both directions): empty; ends the session.
    Disconnect,
    /// `0x50` ROAM (server → client, ext): the session moved to another node.
    Roam,
    /// `0xFF` ERROR (server → client): an error code and a message.
    Error,
    /// A type code this version does not know.
    Unknown(u8),
}

impl FrameType {
    /// The wire code.
    pub const fn code(self) -> u8 {
        match self {
            FrameType::Connect => 0x01,
            FrameType::Accept => 0x02,
            FrameType::Resume => 0x03,
            FrameType::Resumed => 0x04,
            FrameType::Data => 0x10,
            FrameType::Ack => 0x11,
            FrameType::Nack => 0x12,
            FrameType::Resize => 0x13,
            FrameType::Keepalive => 0x20,
            FrameType::Suspend => 0x30,
            FrameType::Disconnect => 0x40,
            FrameType::Roam => 0x50,
            FrameType::Error => 0xFF,
            FrameType::Unknown(c) => c,
        }
    }

    /// The type for a wire code.
    pub const fn from_code(code: u8) -> FrameType {
        match code {
            0x01 => FrameType::Connect,
            0x02 => FrameType::Accept,
            0x03 => FrameType::Resume,
            0x04 => FrameType::Resumed,
            0x10 => FrameType::Data,
            0x11 => FrameType::Ack,
            0x12 => FrameType::Nack,
            0x13 => FrameType::Resize,
            0x20 => FrameType::Keepalive,
            0x30 => FrameType::Suspend,
            0x40 => FrameType::Disconnect,
            0x50 => FrameType::Roam,
            0xFF => FrameType::Error,
            c => FrameType::Unknown(c),
        }
    }

    /// The name used in the contract (`"KEEPALIVE"`, …); `"UNKNOWN"` for other codes.
    pub const fn name(self) -> &'static str {
        match self {
            FrameType::Connect => "CONNECT",
            FrameType::Accept => "ACCEPT",
            FrameType::Resume => "RESUME",
            FrameType::Resumed => "RESUMED",
            FrameType::Data => "DATA",
            FrameType::Ack => "ACK",
            FrameType::Nack => "NACK",
            FrameType::Resize => "RESIZE",
            FrameType::Keepalive => "KEEPALIVE",
            FrameType::Suspend => "SUSPEND",
            FrameType::Disconnect => "DISCONNECT",
            FrameType::Roam => "ROAM",
            FrameType::Error => "ERROR",
            FrameType::Unknown(_) => "UNKNOWN",
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameType::Unknown(c) => write!(f, "UNKNOWN(0x{c:02x})"),
            t => f.write_str(t.name()),
        }
    }
}

/// The fixed 13-byte header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// SESSION_ID (0 until the server has assigned one).
    pub session_id: u32,
    /// SEQ: per sender, per session.
    pub seq: u32,
    /// TYPE.
    pub ty: FrameType,
    /// FLAGS bit field: [`FLAG_REPLAY`](super::FLAG_REPLAY), [`FLAG_GAP`](super::FLAG_GAP).
    pub flags: u8,
    /// LEN: payload length in bytes.
    pub len: u16,
}

impl Header {
    /// The header at the front of `buf`, once its [`HEADER_LEN`] bytes are there (`None`
    /// before). Does not check FLAG or the CRC: for decisions that must be taken before the
    /// payload is buffered.
    #[inline]
    pub fn peek(buf: &[u8]) -> Option<Header> {
        (buf.len() >= HEADER_LEN).then(|| Header::parse(buf))
    }

    /// Parses the header from at least [`HEADER_LEN`] bytes. Does not check FLAG.
    #[inline]
    fn parse(b: &[u8]) -> Header {
        Header {
            session_id: u32::from_be_bytes([b[1], b[2], b[3], b[4]]),
            seq: u32::from_be_bytes([b[5], b[6], b[7], b[8]]),
            ty: FrameType::from_code(b[9]),
            flags: b[10],
            len: u16::from_be_bytes([b[11], b[12]]),
        }
    }
}

/// A complete, CRC-verified frame whose payload borrows the input buffer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// SESSION_ID.
    pub session_id: u32,
    /// SEQ.
    pub seq: u32,
    /// TYPE.
    pub ty: FrameType,
    /// FLAGS bit field.
    pub flags: u8,
    /// PAYLOAD, `LEN` bytes, borrowed from the input buffer.
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Bytes this frame occupies on the wire.
    pub fn wire_len(&self) -> usize {
        OVERHEAD + self.payload.len()
    }
}

/// Outcome of [`decode`] on a buffer that holds no error.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame, and how many bytes of the buffer it used.
    Frame(Frame<'a>, usize),
    /// The buffer holds part of a frame; at least this many more bytes are needed.
    NeedMore(usize),
}

/// Why a byte stream is broken. Every variant ends the connection (§6).
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The first byte of a frame is not `0x7E` (→ `BAD_FRAME`).
    #[error("bad frame: flag byte is 0x{0:02x}, expected 0x7e")]
    BadFlag(u8),
    /// The CRC does not match (→ `BAD_FRAME`).
    #[error("bad frame: CRC 0x{got:04x} does not match computed 0x{computed:04x}")]
    BadCrc {
        /// CRC carried by the frame.
        got: u16,
        /// CRC computed over FLAG through the end of PAYLOAD.
        computed: u16,
    },
    /// LEN is over the receiver's maximum payload (→ `TOO_LARGE`).
    #[error("frame payload of {len} bytes is over the maximum of {max}")]
    TooLarge {
        /// The frame's LEN.
        len: usize,
        /// The receiver's maximum payload.
        max: usize,
    },
}

impl DecodeError {
    /// The ERROR code the server answers this with.
    pub fn error_code(&self) -> crate::proto::ErrorCode {
        match self {
            DecodeError::BadFlag(_) | DecodeError::BadCrc { .. } => {
                crate::proto::ErrorCode::BadFrame
            }
            DecodeError::TooLarge { .. } => crate::proto::ErrorCode::TooLarge,
        }
    }
}

/// Decodes the first frame in `buf`.
///
/// `buf` may hold any number of frames or part of one. A wrong FLAG is reported as soon as the
/// first byte is there, and an oversize LEN as soon as the header is, so a hostile peer cannot
/// make the receiver buffer a frame it will refuse anyway.
#[inline]
pub fn decode(buf: &[u8], max_payload: usize) -> Result<Decoded<'_>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(Decoded::NeedMore(HEADER_LEN));
    };
    if first != FLAG {
        return Err(DecodeError::BadFlag(first));
    }
    if buf.len() < HEADER_LEN {
        return Ok(Decoded::NeedMore(HEADER_LEN - buf.len()));
    }
    let h = Header::parse(buf);
    let len = h.len as usize;
    if len > max_payload {
        return Err(DecodeError::TooLarge {
            len,
            max: max_payload,
        });
    }
    let total = OVERHEAD + len;
    if buf.len() < total {
        return Ok(Decoded::NeedMore(total - buf.len()));
    }
    let body_end = HEADER_LEN + len;
    let got = u16::from_be_bytes([buf[body_end], buf[body_end + 1]]);
    let computed = crc16(&buf[..body_end]);
    if got != computed {
        return Err(DecodeError::BadCrc { got, computed });
    }
    Ok(Decoded::Frame(
        Frame {
            session_id: h.session_id,
            seq: h.seq,
            ty: h.ty,
            flags: h.flags,
            payload: &buf[HEADER_LEN..body_end],
        },
        total,
    ))
}

/// The caller's buffer is too small for the frame.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("buffer of {have} bytes cannot hold a {need}-byte frame")]
pub struct BufferTooSmall {
    /// Bytes the frame needs.
    pub need: usize,
    /// Bytes the buffer has.
    pub have: usize,
}

/// Writes a frame into `out`, returning the number of bytes written.
///
/// # Panics
/// If `payload` is longer than [`MAX_PAYLOAD`] (a caller bug: split DATA before encoding).
pub fn encode_to_slice(
    out: &mut [u8],
    session_id: u32,
    seq: u32,
    ty: FrameType,
    flags: u8,
    payload: &[u8],
) -> Result<usize, BufferTooSmall> {
    assert!(payload.len() <= MAX_PAYLOAD, "payload over 65535 bytes");
    let total = OVERHEAD + payload.len();
    if out.len() < total {
        return Err(BufferTooSmall {
            need: total,
            have: out.len(),
        });
    }
    write_header(
        &mut out[..HEADER_LEN],
        session_id,
        seq,
        ty,
        flags,
        payload.len() as u16,
    );
    out[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    let body_end = HEADER_LEN + payload.len();
    let crc = crc16(&out[..body_end]);
    out[body_end..total].copy_from_slice(&crc.to_be_bytes());
    Ok(total)
}

/// Appends a frame to `out`.
///
/// # Panics
/// If `payload` is longer than [`MAX_PAYLOAD`].
pub fn encode_to_vec(
    out: &mut Vec<u8>,
    session_id: u32,
    seq: u32,
    ty: FrameType,
    flags: u8,
    payload: &[u8],
) {
    encode_with(out, session_id, seq, ty, flags, |o| {
        o.extend_from_slice(payload)
    });
}

/// Appends a frame whose payload is written by `write_payload` straight into `out` (no
/// intermediate buffer); LEN and CRC are filled in afterwards.
///
/// # Panics
/// If the payload written is longer than [`MAX_PAYLOAD`].
pub fn encode_with(
    out: &mut Vec<u8>,
    session_id: u32,
    seq: u32,
    ty: FrameType,
    flags: u8,
    write_payload: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    write_payload(out);
    let len = out.len() - start - HEADER_LEN;
    assert!(len <= MAX_PAYLOAD, "payload over 65535 bytes");
    write_header(
        &mut out[start..start + HEADER_LEN],
        session_id,
        seq,
        ty,
        flags,
        len as u16,
    );
    let crc = crc16(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

#[inline]
fn write_header(h: &mut [u8], session_id: u32, seq: u32, ty: FrameType, flags: u8, len: u16) {
    h[0] = FLAG;
    h[1..5].copy_from_slice(&session_id.to_be_bytes());
    h[5..9].copy_from_slice(&seq.to_be_bytes());
    h[9] = ty.code();
    h[10] = flags;
    h[11..13].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_check_value() {
        assert_eq!(crc16(b"123456789"), 0xFEE8);
    }

    #[test]
    fn round_trip_and_need_more() {
        let mut v = Vec::new();
        encode_to_vec(&mut v, 7, 9, FrameType::Data, 0, b"hello");
        for cut in 0..v.len() {
            match decode(&v[..cut], MAX_PAYLOAD).unwrap() {
                Decoded::NeedMore(n) => assert!(n >= 1 && cut + n <= v.len()),
                Decoded::Frame(..) => panic!("frame from a prefix of {cut}"),
            }
        }
        let Decoded::Frame(f, used) = decode(&v, MAX_PAYLOAD).unwrap() else {
            panic!("no frame")
        };
        assert_eq!(used, v.len());
        assert_eq!(
            (f.session_id, f.seq, f.ty, f.flags, f.payload),
            (7, 9, FrameType::Data, 0, &b"hello"[..])
        );
        let mut s = [0u8; 64];
        let n = encode_to_slice(&mut s, 7, 9, FrameType::Data, 0, b"hello").unwrap();
        assert_eq!(&s[..n], &v[..]);
        assert_eq!(
            encode_to_slice(&mut s[..10], 7, 9, FrameType::Data, 0, b"hello"),
            Err(BufferTooSmall { need: 20, have: 10 })
        );
    }

    #[test]
    fn too_large_is_reported_from_the_header() {
        let mut v = Vec::new();
        encode_to_vec(&mut v, 1, 1, FrameType::Data, 0, &[0u8; 2000]);
        assert_eq!(
            decode(&v[..HEADER_LEN], 1024),
            Err(DecodeError::TooLarge {
                len: 2000,
                max: 1024
            })
        );
    }

    #[test]
    fn type_codes_round_trip() {
        for c in 0..=255u8 {
            assert_eq!(FrameType::from_code(c).code(), c);
        }
    }
}
