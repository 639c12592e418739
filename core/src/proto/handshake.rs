//! Early decisions on a connection that has not completed its handshake.
//!
//! Before the handshake only CONNECT (58, 59 or 61 bytes) and RESUME (24 or 4 bytes) can be
//! accepted, so everything else can be answered from the 13-byte header — plus, for a CONNECT
//! of the wrong size, its first payload byte (the version, checked before the shape) — without
//! buffering the payload. An unauthenticated peer therefore never makes the server hold more
//! than one 61-byte CONNECT, whatever LEN it announces, and still gets the answer the contract
//! gives for the whole frame (PROTOCOL.md §2, §2.1, §2.3, §7.7).

use super::frame::{FrameType, Header, FLAG, HEADER_LEN};
use super::payload::ErrorCode;

/// What to do with the bytes at the front of a connection that is waiting for CONNECT or
/// RESUME.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Early {
    /// Decode the frame with [`super::decode`] (which also reports a wrong FLAG, an oversize
    /// LEN and a bad CRC): it is a CONNECT or RESUME of an acceptable size, or cannot be
    /// judged from its header.
    Decode,
    /// Wait for at least this many more bytes.
    NeedMore(usize),
    /// Refuse the connection with this code without reading further.
    Refuse(ErrorCode),
}

/// CONNECT payload sizes the server accepts (§2.1).
pub const CONNECT_LENS: [usize; 3] = [58, 59, 61];
/// RESUME payload sizes (§2.3).
pub const RESUME_LENS: [usize; 2] = [24, 4];

/// Judges the frame at the front of `buf` (received before the handshake) from its header.
///
/// Order: a wrong FLAG and a LEN over `max_payload` are left to the decoder (`BAD_FRAME`,
/// `TOO_LARGE`); a type other than CONNECT or RESUME is `PROTOCOL_VIOLATION`; a CONNECT with a
/// SESSION_ID is `PROTOCOL_VIOLATION` (§7.1); a CONNECT of another size is
/// `UNSUPPORTED_VERSION` when its first payload byte is not 1, `BAD_CONNECT` otherwise (also
/// when empty); a RESUME of another size is `PROTOCOL_VIOLATION`.
pub fn check(buf: &[u8], max_payload: usize) -> Early {
    if buf.first() != Some(&FLAG) {
        return Early::Decode;
    }
    let Some(h) = Header::peek(buf) else {
        return Early::Decode;
    };
    let len = h.len as usize;
    if len > max_payload {
        return Early::Decode;
    }
    match h.ty {
        FrameType::Connect => {
            if h.session_id != 0 {
                return Early::Refuse(ErrorCode::ProtocolViolation);
            }
            if CONNECT_LENS.contains(&len) {
                return Early::Decode;
            }
            if len == 0 {
                return Early::Refuse(ErrorCode::BadConnect);
            }
            match buf.get(HEADER_LEN) {
                None => Early::NeedMore(1),
                Some(&v) if v != super::VERSION => Early::Refuse(ErrorCode::UnsupportedVersion),
                Some(_) => Early::Refuse(ErrorCode::BadConnect),
            }
        }
        FrameType::Resume if RESUME_LENS.contains(&len) => Early::Decode,
        _ => Early::Refuse(ErrorCode::ProtocolViolation),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::encode_to_vec;

    fn hdr(sid: u32, ty: FrameType, len: u16) -> Vec<u8> {
        let mut v = vec![FLAG];
        v.extend_from_slice(&sid.to_be_bytes());
        v.extend_from_slice(&1u32.to_be_bytes());
        v.push(ty.code());
        v.push(0);
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    #[test]
    fn acceptable_handshake_frames_are_decoded() {
        for len in CONNECT_LENS {
            assert_eq!(
                check(&hdr(0, FrameType::Connect, len as u16), 65535),
                Early::Decode
            );
        }
        for len in RESUME_LENS {
            assert_eq!(
                check(&hdr(0, FrameType::Resume, len as u16), 65535),
                Early::Decode
            );
            assert_eq!(
                check(&hdr(9, FrameType::Resume, len as u16), 65535),
                Early::Decode
            );
        }
        // Too short to judge, or a wrong FLAG: the decoder's business.
        assert_eq!(check(&[], 65535), Early::Decode);
        assert_eq!(
            check(&hdr(0, FrameType::Data, 9)[..12], 65535),
            Early::Decode
        );
        assert_eq!(check(&[0x7F; 20], 65535), Early::Decode);
        // Oversize: TOO_LARGE from the decoder, whatever the type.
        assert_eq!(check(&hdr(0, FrameType::Data, 2000), 1024), Early::Decode);
        assert_eq!(
            check(&hdr(0, FrameType::Connect, 2000), 1024),
            Early::Decode
        );
    }

    #[test]
    fn wrong_sizes_and_types_are_refused_from_the_header() {
        let pv = Early::Refuse(ErrorCode::ProtocolViolation);
        assert_eq!(check(&hdr(0, FrameType::Data, 1000), 65535), pv);
        assert_eq!(check(&hdr(0, FrameType::Keepalive, 0), 65535), pv);
        assert_eq!(check(&hdr(0, FrameType::Unknown(0x77), 3), 65535), pv);
        assert_eq!(check(&hdr(0, FrameType::Resume, 100), 65535), pv);
        assert_eq!(check(&hdr(0, FrameType::Resume, 0), 65535), pv);
        assert_eq!(check(&hdr(5, FrameType::Connect, 58), 65535), pv);
        assert_eq!(
            check(&hdr(0, FrameType::Connect, 0), 65535),
            Early::Refuse(ErrorCode::BadConnect)
        );
        // A wrong-size CONNECT waits for its version byte, checked first.
        let h = hdr(0, FrameType::Connect, 200);
        assert_eq!(check(&h, 65535), Early::NeedMore(1));
        let mut v1 = h.clone();
        v1.push(1);
        assert_eq!(check(&v1, 65535), Early::Refuse(ErrorCode::BadConnect));
        let mut v2 = h;
        v2.push(2);
        assert_eq!(
            check(&v2, 65535),
            Early::Refuse(ErrorCode::UnsupportedVersion)
        );
    }

    #[test]
    fn a_whole_valid_connect_is_left_to_the_decoder() {
        let mut v = Vec::new();
        encode_to_vec(&mut v, 0, 1, FrameType::Connect, 0, &[1u8; 58]);
        assert_eq!(check(&v, 65535), Early::Decode);
    }
}
