//! Fuzzes the pre-handshake decision (`proto::handshake::check`) the way the shard handler
//! drives it on a connection that has not authenticated yet: on every arrival it judges the
//! buffered bytes from the frame header and either refuses at once, waits for more, or lets the
//! decoder read a whole CONNECT / RESUME. The input is the byte stream a client sends. Checks,
//! for the largest and the smallest `--max-payload` and for limits at the frame's LEN:
//! * it never panics, and whenever it waits, the bytes it waits for (with what is already
//!   buffered) fit in one 61-byte CONNECT frame: 76 bytes (PROTOCOL.md §7.7);
//! * the decision does not depend on how the bytes arrived: once taken on a prefix, every
//!   longer prefix gets the same one;
//! * for a complete frame it gives the answer the full decoder and the typed parsers give for
//!   the whole frame (CONNECT: version, then shape; RESUME: shape, then header SESSION_ID;
//!   any other type: PROTOCOL_VIOLATION; a CONNECT with a SESSION_ID: PROTOCOL_VIOLATION);
//! * only a CONNECT or RESUME of an acceptable length is read whole and CRC-checked: a bad CRC
//!   is BAD_FRAME for those, and does not change the header's answer for anything else.
#![no_main]

use clawterm::proto::frame::crc16;
use clawterm::proto::handshake::{check, Early, CONNECT_LENS, RESUME_LENS};
use clawterm::proto::{
    decode, Connect, Decoded, ErrorCode, Frame, FrameType, Header, Resume, CRC_LEN, FLAG,
    HEADER_LEN, MAX_PAYLOAD,
};
use libfuzzer_sys::fuzz_target;

/// The most an unauthenticated connection may make the server hold: one 61-byte CONNECT.
const PRE_AUTH_MAX: usize = HEADER_LEN + 61 + CRC_LEN;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// Waiting until this many bytes are buffered.
    Wait(usize),
    /// ERROR with this code, connection closed.
    Refuse(ErrorCode),
    /// An acceptable CONNECT / RESUME of this many bytes: on to authentication.
    Handshake(usize),
}

/// What the contract says about a whole, CRC-valid handshake frame (what the server checks
/// after decoding it, before looking at credentials).
fn contract_answer(f: &Frame<'_>) -> Option<ErrorCode> {
    match f.ty {
        FrameType::Connect if f.session_id != 0 => Some(ErrorCode::ProtocolViolation),
        FrameType::Connect => Connect::parse(f.payload).err().map(|e| e.code),
        FrameType::Resume => match Resume::parse(f.payload) {
            Err(e) => Some(e.code),
            Ok(r) => (f.session_id != 0 && f.session_id != r.session_id())
                .then_some(ErrorCode::ProtocolViolation),
        },
        _ => Some(ErrorCode::ProtocolViolation),
    }
}

fn after_decode(buf: &[u8], max: usize) -> Verdict {
    match decode(buf, max) {
        Err(e) => Verdict::Refuse(e.error_code()),
        Ok(Decoded::NeedMore(n)) => {
            assert!(n >= 1);
            Verdict::Wait(buf.len() + n)
        }
        Ok(Decoded::Frame(f, used)) => match contract_answer(&f) {
            Some(code) => Verdict::Refuse(code),
            None => Verdict::Handshake(used),
        },
    }
}

/// The server's path: the early check first, then the decoder.
fn server(buf: &[u8], max: usize) -> Verdict {
    match check(buf, max) {
        Early::Refuse(code) => Verdict::Refuse(code),
        Early::NeedMore(n) => {
            assert!(n >= 1, "NeedMore(0)");
            Verdict::Wait(buf.len() + n)
        }
        Early::Decode => after_decode(buf, max),
    }
}

/// Whether the contract has this frame read whole (§7.7).
fn read_whole(h: &Header) -> bool {
    let len = h.len as usize;
    match h.ty {
        FrameType::Connect => h.session_id == 0 && CONNECT_LENS.contains(&len),
        FrameType::Resume => RESUME_LENS.contains(&len),
        _ => false,
    }
}

/// `buf` truncated to its first frame, with the CRC made correct.
fn with_good_crc(buf: &[u8], len: usize) -> Vec<u8> {
    let mut v = buf[..HEADER_LEN + len].to_vec();
    let crc = crc16(&v);
    v.extend_from_slice(&crc.to_be_bytes());
    v
}

fn check_stream(data: &[u8], max: usize) {
    // Every arrival pattern is a sequence of prefixes; judge each one up to the decision.
    let mut decided: Option<(usize, Verdict)> = None;
    for k in 0..=data.len() {
        let v = server(&data[..k], max);
        match (decided, v) {
            (None, Verdict::Wait(t)) => {
                assert!(t > k, "waits for {t} bytes with {k} buffered");
                assert!(
                    t <= PRE_AUTH_MAX,
                    "unauthenticated peer makes the server wait for {t} bytes (max {max})"
                );
            }
            (None, v) => decided = Some((k, v)),
            (Some((_, d)), v) => assert_eq!(v, d, "decision changed at {k} bytes"),
        }
        // Past the decision, a few more bytes and the whole input are enough.
        if let Some((at, _)) = decided {
            if k >= at + 80 {
                assert_eq!(server(data, max), decided.unwrap().1);
                break;
            }
        }
    }
    let Some((at, verdict)) = decided else {
        return;
    };
    let buf = &data[..at];
    match verdict {
        Verdict::Handshake(used) => {
            assert_eq!(used, at);
            assert!(used <= PRE_AUTH_MAX);
        }
        Verdict::Refuse(code) => {
            if buf[0] != FLAG {
                assert_eq!((at, code), (1, ErrorCode::BadFrame));
                return;
            }
            let h = Header::peek(buf).expect("refused before the header");
            let len = h.len as usize;
            if len > max {
                assert_eq!((at, code), (HEADER_LEN, ErrorCode::TooLarge));
                return;
            }
            if at < HEADER_LEN + len + CRC_LEN {
                // Refused from the header (and perhaps the version byte), before the frame
                // was complete: only for what the contract does not read whole.
                assert!(
                    !read_whole(&h),
                    "{h:?} refused with {code} before it was read"
                );
                assert!(at <= HEADER_LEN + 1);
            } else {
                // Read whole: the CRC was checked.
                assert!(read_whole(&h), "{h:?} read whole");
            }
        }
        Verdict::Wait(_) => unreachable!(),
    }
}

/// For a complete first frame: the server's answer agrees with the full decoder and the typed
/// parsers on the whole frame.
fn check_complete(data: &[u8], max: usize) {
    let Some(h) = Header::peek(data) else { return };
    if data[0] != FLAG || h.len as usize > max {
        return;
    }
    let len = h.len as usize;
    if data.len() < HEADER_LEN + len + CRC_LEN {
        return;
    }
    let good = with_good_crc(data, len);
    let reference = after_decode(&good, max);
    assert!(!matches!(reference, Verdict::Wait(_)));
    assert_eq!(server(&good, max), reference, "{h:?}");
    let frame = &data[..HEADER_LEN + len + CRC_LEN];
    if frame == &good[..] {
        assert_eq!(server(data, max), reference);
    } else if read_whole(&h) {
        assert_eq!(server(data, max), Verdict::Refuse(ErrorCode::BadFrame));
    } else {
        // Never read whole: the answer comes from the header, the CRC never matters.
        assert!(matches!(reference, Verdict::Refuse(_)));
        assert_eq!(server(data, max), reference, "{h:?} with a bad CRC");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut maxima = vec![MAX_PAYLOAD, 1024];
    if let Some(h) = Header::peek(data) {
        let len = h.len as usize;
        maxima.push(len.clamp(1024, MAX_PAYLOAD));
        maxima.push(len.saturating_sub(1).clamp(1024, MAX_PAYLOAD));
    }
    // The bytes as they are, then completed with zeros up to where the server decides (a
    // truncated frame still gets judged in full that way).
    let mut completed = data.to_vec();
    loop {
        match server(&completed, MAX_PAYLOAD) {
            Verdict::Wait(t) if t <= PRE_AUTH_MAX => completed.resize(t, 0),
            _ => break,
        }
    }
    for &max in &maxima {
        check_stream(data, max);
        check_complete(data, max);
        check_stream(&completed, max);
        check_complete(&completed, max);
    }
});
