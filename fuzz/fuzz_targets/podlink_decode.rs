//! Fuzzes the pod-link decoder the way a link reader drives it: decode messages off the front
//! of the input until it is used up, incomplete, or broken, and check that
//! * a message never claims more bytes than it was given, and a shorter prefix is incomplete;
//! * re-encoding a message gives exactly its bytes, except where the decoder is lenient by
//!   design (a body on a message type that has none, a CLOSE body that is not 1 byte); there the
//!   re-encoded bytes decode to the same message and are a fixed point.
#![no_main]

use clawterm::podlink::{decode, encode, DecodeError, Decoded, Msg, HEADER_LEN, MAX_BODY};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        match decode(rest) {
            Ok(Decoded::Msg {
                session_id,
                msg,
                used,
            }) => {
                assert!(used <= rest.len(), "used {used} of {}", rest.len());
                assert!((HEADER_LEN..=HEADER_LEN + MAX_BODY).contains(&used));
                let wire = &rest[..used];
                check_msg(wire, session_id, &msg);
                rest = &rest[used..];
            }
            Ok(Decoded::NeedMore(n)) => {
                assert!(n >= 1);
                break;
            }
            Err(e) => {
                if let DecodeError::BadLen(len) = e {
                    assert!(len < 5 || len as usize > MAX_BODY + 5);
                }
                let _ = e.to_string();
                break;
            }
        }
    }
});

fn check_msg(wire: &[u8], session_id: u32, msg: &Msg<'_>) {
    let _ = format!("{msg:?}");
    assert_eq!(msg.ty().code(), wire[4]);
    let body = &wire[HEADER_LEN..];
    let lenient = match msg {
        Msg::Detached | Msg::Attached | Msg::Pause | Msg::Continue | Msg::Export => {
            !body.is_empty()
        }
        Msg::Close(_) => body.len() != 1,
        _ => false,
    };
    let mut again = Vec::with_capacity(wire.len());
    encode(&mut again, session_id, msg);
    if lenient {
        match decode(&again) {
            Ok(Decoded::Msg {
                session_id: s,
                msg: m,
                used,
            }) => {
                assert_eq!((s, &m, used), (session_id, msg, again.len()));
                let mut third = Vec::new();
                encode(&mut third, s, &m);
                assert_eq!(third, again);
            }
            other => panic!("re-encoded message decodes to {other:?}"),
        }
    } else {
        assert_eq!(again, wire, "re-encoding differs");
    }
    match decode(&wire[..wire.len() - 1]) {
        Ok(Decoded::NeedMore(n)) => assert_eq!(n, 1),
        other => panic!("prefix of a message gave {other:?}"),
    }
}
