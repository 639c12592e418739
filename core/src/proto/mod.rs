//! The ClawTerm v1 wire protocol (see `docs/PROTOCOL.md`).
//!
//! * [`frame`]: the frame layout, CRC, a zero-copy incremental decoder and an encoder that writes
//!   into the caller's buffer.
//! * [`payload`]: typed payloads (CONNECT, ACCEPT, RESUME, RESUMED, ACK, RESIZE, ROAM, ERROR).
//! * [`seq`]: RFC 1982 serial-number arithmetic for SEQ comparisons.
//! * [`handshake`]: what to answer a not-yet-authenticated connection from a frame's header,
//!   before its payload is buffered.
//!
//! Everything here is plain data and functions: no sockets, no clock.

pub mod frame;
pub mod handshake;
pub mod payload;
pub mod seq;

pub use frame::{
    decode, encode_to_slice, encode_to_vec, DecodeError, Decoded, Frame, FrameType, Header,
    CRC_LEN, FLAG, HEADER_LEN, MAX_PAYLOAD, OVERHEAD,
};
pub use payload::{
    Accept, Ack, Connect, ErrorCode, ErrorFrame, PayloadError, Resize, Resume, Resumed, Roam,
};

/// ALPN protocol name both sides of a QUIC connection (and of TLS on 7220) must offer.
pub const ALPN: &[u8] = b"clawterm/1";

/// FLAGS bit: a DATA frame re-sent during a resume replay.
pub const FLAG_REPLAY: u8 = 0x01;
/// FLAGS bit: on RESUMED, frames the client asked for were dropped from the replay ring.
pub const FLAG_GAP: u8 = 0x02;

/// Protocol version spoken by this implementation.
pub const VERSION: u8 = 1;

/// Client capability bit: v1 client (informative).
pub const CAP_V1: u8 = 0x01;
/// Capability bit: RELIABLE (client keeps DATA until acknowledged; server sends cumulative ACKs).
pub const CAP_RELIABLE: u8 = 0x02;
/// Server capability bit: ROAM supported.
pub const CAP_ROAM: u8 = 0x04;
