//! Fuzzes the frame decoder the way a receiver drives it: decode frames off the front of the
//! input until it is used up, incomplete, or broken; parse each frame's payload with the typed
//! parser for its type; and check that
//! * a frame never claims more bytes than it was given and re-encodes to exactly its bytes;
//! * a shorter prefix of a frame is incomplete, and a smaller maximum gives TOO_LARGE exactly
//!   when the payload is over it;
//! * every typed payload that parses re-encodes to bytes that parse to the same value, and to
//!   the very same bytes whenever the input was in canonical form.
#![no_main]

use clawterm::proto::frame::encode_with;
use clawterm::proto::payload::CapsWidth;
use clawterm::proto::{
    decode, encode_to_slice, encode_to_vec, Accept, Ack, Connect, DecodeError, Decoded, ErrorCode,
    ErrorFrame, FrameType, PayloadError, Resize, Resume, Resumed, Roam, MAX_PAYLOAD, OVERHEAD,
};
use libfuzzer_sys::fuzz_target;

/// A second, smaller receiver limit (the smallest `--max-payload` the server accepts).
const SMALL_MAX: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        match decode(rest, MAX_PAYLOAD) {
            Ok(Decoded::Frame(f, used)) => {
                assert!(used <= rest.len(), "used {used} of {}", rest.len());
                assert_eq!(used, f.wire_len());
                assert!(used >= OVERHEAD);
                let wire = &rest[..used];
                check_frame(wire, &f);
                check_payload(f.ty, f.payload);
                rest = &rest[used..];
            }
            Ok(Decoded::NeedMore(n)) => {
                assert!(n >= 1);
                break;
            }
            Err(e) => {
                match e {
                    DecodeError::BadFlag(b) => assert_eq!(b, rest[0]),
                    DecodeError::BadCrc { got, computed } => assert_ne!(got, computed),
                    DecodeError::TooLarge { .. } => unreachable!("LEN cannot exceed 65535"),
                }
                assert_eq!(e.error_code(), ErrorCode::BadFrame);
                let _ = e.to_string();
                break;
            }
        }
    }
});

fn check_frame(wire: &[u8], f: &clawterm::proto::Frame<'_>) {
    let mut again = Vec::with_capacity(wire.len());
    encode_to_vec(&mut again, f.session_id, f.seq, f.ty, f.flags, f.payload);
    assert_eq!(again, wire, "re-encoding differs");
    let mut slice = [0u8; 256];
    if wire.len() <= slice.len() {
        let n = encode_to_slice(&mut slice, f.session_id, f.seq, f.ty, f.flags, f.payload)
            .expect("slice is large enough");
        assert_eq!(&slice[..n], wire);
    }
    assert_eq!(FrameType::from_code(f.ty.code()), f.ty);

    match decode(&wire[..wire.len() - 1], MAX_PAYLOAD) {
        Ok(Decoded::NeedMore(n)) => assert_eq!(n, 1),
        other => panic!("prefix of a frame gave {other:?}"),
    }
    match decode(wire, SMALL_MAX) {
        Ok(Decoded::Frame(g, used)) => {
            assert!(f.payload.len() <= SMALL_MAX);
            assert_eq!((&g, used), (f, wire.len()));
        }
        Err(DecodeError::TooLarge { len, max }) => {
            assert_eq!((len, max), (f.payload.len(), SMALL_MAX));
            assert!(len > max);
        }
        other => panic!("decode with a smaller maximum gave {other:?}"),
    }
}

/// Parses `p`, re-encodes the value, and checks the round trip. `exact` says whether the input
/// was in canonical form (then the bytes must come back unchanged).
fn round_trip<T: PartialEq + std::fmt::Debug>(
    p: &[u8],
    parse: impl Fn(&[u8]) -> Result<T, PayloadError>,
    encode: impl Fn(&T, &mut Vec<u8>),
    exact: impl Fn(&T) -> bool,
    allowed_errors: &[ErrorCode],
) {
    match parse(p) {
        Ok(v) => {
            let _ = format!("{v:?}");
            let mut q = Vec::new();
            encode(&v, &mut q);
            let back = parse(&q).expect("re-encoded payload does not parse");
            assert_eq!(back, v, "payload round trip changed the value");
            if exact(&v) {
                assert_eq!(
                    q, p,
                    "canonical payload did not re-encode to the same bytes"
                );
            }
            // Whatever was read, the re-encoded form is a fixed point.
            let mut r = Vec::new();
            encode(&back, &mut r);
            assert_eq!(r, q);
            // And it is framed the same way by encode_with.
            let mut framed = Vec::new();
            encode_with(&mut framed, 1, 2, FrameType::Data, 0, |o| encode(&v, o));
            assert_eq!(&framed[13..framed.len() - 2], &q[..]);
        }
        Err(e) => {
            assert!(
                allowed_errors.contains(&e.code),
                "unexpected payload error code {e}"
            );
            let _ = e.to_string();
        }
    }
}

fn check_payload(ty: FrameType, p: &[u8]) {
    use ErrorCode::{BadConnect, ProtocolViolation, UnsupportedVersion};
    match ty {
        FrameType::Connect => round_trip(
            p,
            Connect::parse,
            Connect::encode,
            // Only the low 8 bits of a wide caps field are kept.
            |c| match c.caps_width {
                CapsWidth::U8 => true,
                CapsWidth::U16 => p[1] == 0,
                CapsWidth::U32 => p[1..4] == [0, 0, 0],
            },
            &[BadConnect, UnsupportedVersion],
        ),
        // Bytes after the 6-byte or 22-byte forms are ignored.
        FrameType::Accept => round_trip(
            p,
            Accept::parse,
            Accept::encode,
            |_| p.len() == 6 || p.len() == 22,
            &[ProtocolViolation],
        ),
        FrameType::Resume => round_trip(
            p,
            Resume::parse,
            Resume::encode,
            |_| true,
            &[ProtocolViolation],
        ),
        FrameType::Resumed => round_trip(
            p,
            Resumed::parse,
            Resumed::encode,
            |_| true,
            &[ProtocolViolation],
        ),
        FrameType::Ack => round_trip(p, Ack::parse, Ack::encode, |_| true, &[ProtocolViolation]),
        FrameType::Resize => round_trip(
            p,
            Resize::parse,
            Resize::encode,
            |_| true,
            &[ProtocolViolation],
        ),
        FrameType::Roam => round_trip(p, Roam::parse, Roam::encode, |_| true, &[ProtocolViolation]),
        FrameType::Error => match ErrorFrame::parse(p) {
            Ok(e) => match e.known() {
                // Invalid UTF-8 is replaced, so only valid text comes back byte for byte.
                Some(code) => round_trip(
                    p,
                    ErrorFrame::parse,
                    |e, o| ErrorFrame::encode_parts(code, &e.message, o),
                    |_| std::str::from_utf8(&p[2..]).is_ok(),
                    &[],
                ),
                None => assert!(!(1..=12).contains(&e.code)),
            },
            Err(e) => assert_eq!(e.code, ProtocolViolation),
        },
        FrameType::Data
        | FrameType::Nack
        | FrameType::Keepalive
        | FrameType::Suspend
        | FrameType::Disconnect
        | FrameType::Unknown(_) => {}
    }
}
