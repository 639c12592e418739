//! Property tests for the frame codec (`proto`) and the pod-link codec (`podlink`).
//!
//! * round trips of arbitrary frames, pod-link messages and typed payloads;
//! * arbitrary bytes never panic any decoder or payload parser, and decoders never claim to use
//!   more bytes than they were given;
//! * any chunking of a valid stream gives the same frames / messages, in order;
//! * any single corrupted byte of a frame (LEN aside) is detected.
//!
//! 256 cases per property by default (`PROPTEST_CASES` overrides it).

use clawterm::podlink::{self, CloseReason, Msg, Open};
use clawterm::proto::frame::encode_with;
use clawterm::proto::payload::CapsWidth;
use clawterm::proto::{
    decode, encode_to_slice, encode_to_vec, Accept, Ack, Connect, DecodeError, Decoded, ErrorCode,
    ErrorFrame, FrameType, Resize, Resume, Resumed, Roam, HEADER_LEN, MAX_PAYLOAD, OVERHEAD,
};
use proptest::collection::vec;
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(256),
        ..ProptestConfig::default()
    }
}

/// An owned frame.
#[derive(Clone, Debug, PartialEq, Eq)]
struct OwnedFrame {
    session_id: u32,
    seq: u32,
    ty: u8,
    flags: u8,
    payload: Vec<u8>,
}

impl OwnedFrame {
    fn encode(&self, out: &mut Vec<u8>) {
        encode_to_vec(
            out,
            self.session_id,
            self.seq,
            FrameType::from_code(self.ty),
            self.flags,
            &self.payload,
        );
    }

    fn from(f: &clawterm::proto::Frame<'_>) -> OwnedFrame {
        OwnedFrame {
            session_id: f.session_id,
            seq: f.seq,
            ty: f.ty.code(),
            flags: f.flags,
            payload: f.payload.to_vec(),
        }
    }
}

fn frame_with(payload: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = OwnedFrame> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u8>(),
        any::<u8>(),
        payload,
    )
        .prop_map(|(session_id, seq, ty, flags, payload)| OwnedFrame {
            session_id,
            seq,
            ty,
            flags,
            payload,
        })
}

/// Payloads of 0..=2000 bytes, and now and then one of exactly the maximum size.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        30 => vec(any::<u8>(), 0..=2000),
        1 => (any::<u8>(), any::<u64>()).prop_map(|(fill, salt)| {
            let mut p = vec![fill; MAX_PAYLOAD];
            for (i, b) in salt.to_be_bytes().iter().enumerate() {
                p[i * 8191] = *b;
            }
            p
        }),
    ]
}

/// Splits `data` at the sorted, deduplicated `cuts` (taken modulo its length).
fn chunks<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|c| if data.is_empty() { 0 } else { c % data.len() })
        .collect();
    at.push(0);
    at.push(data.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &data[w[0]..w[1]]).collect()
}

/// A pod-link message that owns its body.
#[derive(Clone, Debug)]
enum OwnedMsg {
    Hello(u8, String),
    Open(u32, u32, u8, String),
    Reopen(u32, u32, u8, String),
    Data(Vec<u8>),
    Resize(u16, u16),
    Detached,
    Attached,
    Close(u8),
    Pause,
    Continue,
    Export,
    State(Vec<u8>),
    Unknown(u8, Vec<u8>),
}

impl OwnedMsg {
    fn as_msg(&self) -> Msg<'_> {
        match self {
            OwnedMsg::Hello(version, name) => Msg::Hello {
                version: *version,
                name,
            },
            OwnedMsg::Open(tenant, agent, client_caps, peer) => Msg::Open(Open {
                tenant: *tenant,
                agent: *agent,
                client_caps: *client_caps,
                peer,
            }),
            OwnedMsg::Reopen(tenant, agent, client_caps, peer) => Msg::Reopen(Open {
                tenant: *tenant,
                agent: *agent,
                client_caps: *client_caps,
                peer,
            }),
            OwnedMsg::Data(d) => Msg::Data(d),
            OwnedMsg::Resize(cols, rows) => Msg::Resize {
                cols: *cols,
                rows: *rows,
            },
            OwnedMsg::Detached => Msg::Detached,
            OwnedMsg::Attached => Msg::Attached,
            OwnedMsg::Close(r) => Msg::Close(CloseReason::from_code(*r)),
            OwnedMsg::Pause => Msg::Pause,
            OwnedMsg::Continue => Msg::Continue,
            OwnedMsg::Export => Msg::Export,
            OwnedMsg::State(b) => Msg::State(b),
            OwnedMsg::Unknown(ty, body) => Msg::Unknown { ty: *ty, body },
        }
    }
}

fn pod_msg() -> impl Strategy<Value = OwnedMsg> {
    let text = || ".{0,40}";
    prop_oneof![
        (any::<u8>(), text()).prop_map(|(v, n)| OwnedMsg::Hello(v, n)),
        (any::<u32>(), any::<u32>(), any::<u8>(), text())
            .prop_map(|(t, a, c, p)| OwnedMsg::Open(t, a, c, p)),
        (any::<u32>(), any::<u32>(), any::<u8>(), text())
            .prop_map(|(t, a, c, p)| OwnedMsg::Reopen(t, a, c, p)),
        vec(any::<u8>(), 0..600).prop_map(OwnedMsg::Data),
        (any::<u16>(), any::<u16>()).prop_map(|(c, r)| OwnedMsg::Resize(c, r)),
        Just(OwnedMsg::Detached),
        Just(OwnedMsg::Attached),
        any::<u8>().prop_map(OwnedMsg::Close),
        Just(OwnedMsg::Pause),
        Just(OwnedMsg::Continue),
        Just(OwnedMsg::Export),
        vec(any::<u8>(), 0..600).prop_map(OwnedMsg::State),
        (
            any::<u8>().prop_filter("an unknown type code", |c| {
                matches!(
                    podlink::MsgType::from_code(*c),
                    podlink::MsgType::Unknown(_)
                )
            }),
            vec(any::<u8>(), 0..100)
        )
            .prop_map(|(t, b)| OwnedMsg::Unknown(t, b)),
    ]
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<[u8; 16]>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ]
}

fn caps_width() -> impl Strategy<Value = CapsWidth> {
    prop_oneof![
        Just(CapsWidth::U8),
        Just(CapsWidth::U16),
        Just(CapsWidth::U32)
    ]
}

/// Encodes with `enc`, frames the result with `encode_with`, decodes the frame and parses the
/// payload back with `parse`.
fn typed_round_trip<T: PartialEq + std::fmt::Debug>(
    value: &T,
    ty: FrameType,
    enc: impl Fn(&T, &mut Vec<u8>),
    parse: impl Fn(&[u8]) -> Result<T, clawterm::proto::PayloadError>,
) -> Result<Vec<u8>, TestCaseError> {
    let mut payload = Vec::new();
    enc(value, &mut payload);
    let back = parse(&payload).map_err(|e| TestCaseError::fail(format!("parse: {e}")))?;
    prop_assert_eq!(&back, value);
    let mut framed = Vec::new();
    encode_with(&mut framed, 5, 6, ty, 0, |o| enc(value, o));
    match decode(&framed, MAX_PAYLOAD) {
        Ok(Decoded::Frame(f, used)) => {
            prop_assert_eq!(used, framed.len());
            prop_assert_eq!(f.ty, ty);
            prop_assert_eq!(f.payload, &payload[..]);
            let back = parse(f.payload).map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert_eq!(&back, value);
        }
        other => prop_assert!(false, "{:?}", other),
    }
    Ok(payload)
}

/// Feeds `chunks` through an accumulate-and-decode loop, as a receiver would.
fn receive_frames(chunks: &[&[u8]]) -> Result<Vec<OwnedFrame>, TestCaseError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let remaining_total: usize = chunks.iter().map(|c| c.len()).sum();
    let mut fed = 0;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        fed += chunk.len();
        loop {
            match decode(&buf, MAX_PAYLOAD) {
                Ok(Decoded::Frame(f, used)) => {
                    prop_assert!(used <= buf.len());
                    prop_assert_eq!(used, f.wire_len());
                    out.push(OwnedFrame::from(&f));
                    buf.drain(..used);
                }
                Ok(Decoded::NeedMore(n)) => {
                    prop_assert!(n >= 1);
                    // A valid stream always has at least the announced bytes still to come
                    // (or is finished, with an empty buffer).
                    prop_assert!(
                        buf.is_empty() || n <= remaining_total - fed,
                        "NeedMore({}) but only {} bytes left",
                        n,
                        remaining_total - fed
                    );
                    break;
                }
                Err(e) => prop_assert!(false, "valid stream reported {:?}", e),
            }
        }
    }
    prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());
    Ok(out)
}

proptest! {
    #![proptest_config(config())]

    /// (a) Any frame encodes and decodes back to itself, with all three encoders agreeing.
    #[test]
    fn frame_round_trip(f in frame_with(payload()), cut in any::<usize>()) {
        let mut wire = Vec::new();
        f.encode(&mut wire);
        prop_assert_eq!(wire.len(), OVERHEAD + f.payload.len());

        let mut slice = vec![0u8; wire.len()];
        let n = encode_to_slice(
            &mut slice, f.session_id, f.seq, FrameType::from_code(f.ty), f.flags, &f.payload,
        ).unwrap();
        prop_assert_eq!(n, wire.len());
        prop_assert!(slice == wire);
        let mut with = vec![0xAAu8; 3];
        encode_with(&mut with, f.session_id, f.seq, FrameType::from_code(f.ty), f.flags,
            |o| o.extend_from_slice(&f.payload));
        prop_assert!(with[3..] == wire[..] && with[..3] == [0xAA; 3]);

        match decode(&wire, MAX_PAYLOAD) {
            Ok(Decoded::Frame(d, used)) => {
                prop_assert_eq!(used, wire.len());
                prop_assert_eq!(OwnedFrame::from(&d), f.clone());
            }
            other => prop_assert!(false, "{:?}", other),
        }
        // The receiver's maximum is inclusive.
        let len = f.payload.len();
        prop_assert!(matches!(decode(&wire, len), Ok(Decoded::Frame(..))));
        if len > 0 {
            prop_assert_eq!(
                decode(&wire[..HEADER_LEN], len - 1),
                Err(DecodeError::TooLarge { len, max: len - 1 })
            );
        }
        // A strict prefix is incomplete, and says how much is missing at most.
        let cut = cut % wire.len();
        match decode(&wire[..cut], MAX_PAYLOAD) {
            Ok(Decoded::NeedMore(n)) => prop_assert!(n >= 1 && cut + n <= wire.len()),
            other => prop_assert!(false, "prefix {}: {:?}", cut, other),
        }
    }

    /// (a') One corrupted byte anywhere but LEN breaks the stream: BadFlag for byte 0, BadCrc
    /// elsewhere (CRC-16 catches every burst of up to 16 bits).
    #[test]
    fn single_byte_corruption_is_detected(
        f in frame_with(vec(any::<u8>(), 0..=300)),
        pos in any::<usize>(),
        xor in 1u8..=255,
    ) {
        let mut wire = Vec::new();
        f.encode(&mut wire);
        let candidates: Vec<usize> = (0..wire.len()).filter(|i| *i != 11 && *i != 12).collect();
        let pos = candidates[pos % candidates.len()];
        wire[pos] ^= xor;
        match decode(&wire, MAX_PAYLOAD) {
            Err(DecodeError::BadFlag(b)) => prop_assert!(pos == 0 && b == 0x7E ^ xor),
            Err(DecodeError::BadCrc { got, computed }) => {
                prop_assert!(pos != 0);
                prop_assert_ne!(got, computed);
            }
            other => prop_assert!(false, "corruption at {} not detected: {:?}", pos, other),
        }
    }

    /// (b) Arbitrary bytes never panic a decoder or a payload parser, and a decoder never
    /// claims more bytes than it was given.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..4096), max in 0usize..=70000) {
        for m in [MAX_PAYLOAD, max] {
            match decode(&bytes, m) {
                Ok(Decoded::Frame(f, used)) => {
                    prop_assert!(used <= bytes.len());
                    prop_assert_eq!(used, f.wire_len());
                    prop_assert!(f.payload.len() <= m);
                }
                Ok(Decoded::NeedMore(n)) => prop_assert!(n >= 1),
                Err(DecodeError::TooLarge { len, max }) => prop_assert!(len > max),
                Err(_) => {}
            }
        }
        let _ = Connect::parse(&bytes);
        let _ = Accept::parse(&bytes);
        let _ = Resume::parse(&bytes);
        let _ = Resumed::parse(&bytes);
        let _ = Ack::parse(&bytes);
        let _ = Resize::parse(&bytes);
        let _ = Roam::parse(&bytes);
        let _ = ErrorFrame::parse(&bytes);
        match podlink::decode(&bytes) {
            Ok(podlink::Decoded::Msg { used, .. }) => {
                prop_assert!(used <= bytes.len());
                prop_assert!(used >= podlink::HEADER_LEN);
            }
            Ok(podlink::Decoded::NeedMore(n)) => prop_assert!(n >= 1),
            Err(_) => {}
        }
    }

    /// (b') The same with inputs that look like frames (valid FLAG, plausible LEN), so the
    /// decoders get past their first checks.
    #[test]
    fn framelike_bytes_never_panic(
        mut bytes in vec(any::<u8>(), 13..600),
        len in 0u16..700,
    ) {
        bytes[0] = 0x7E;
        bytes[11..13].copy_from_slice(&len.to_be_bytes());
        let r = decode(&bytes, MAX_PAYLOAD);
        if let Ok(Decoded::Frame(_, used)) = r {
            prop_assert!(used <= bytes.len());
        }
        let p = &bytes[HEADER_LEN..];
        let _ = (Connect::parse(p), Accept::parse(p), Resume::parse(p), Roam::parse(p));
        let mut pod = bytes.clone();
        pod[0..4].copy_from_slice(&((len as u32) + 5).to_be_bytes());
        if let Ok(podlink::Decoded::Msg { used, .. }) = podlink::decode(&pod) {
            prop_assert!(used <= pod.len());
        }
    }

    /// (c) Any chunking of a stream of frames gives the same frames in order.
    #[test]
    fn frame_stream_any_split(
        frames in vec(frame_with(vec(any::<u8>(), 0..=300)), 1..8),
        cuts in vec(any::<usize>(), 0..20),
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let got = receive_frames(&chunks(&wire, &cuts))?;
        prop_assert_eq!(&got, &frames);
        // Byte at a time, the worst case.
        let singles: Vec<&[u8]> = wire.chunks(1).collect();
        prop_assert_eq!(receive_frames(&singles)?, frames);
    }

    /// (d) Any chunking of a stream of pod-link messages gives the same messages in order.
    #[test]
    fn podlink_stream_any_split(
        msgs in vec((any::<u32>(), pod_msg()), 1..8),
        cuts in vec(any::<usize>(), 0..20),
    ) {
        let mut wire = Vec::new();
        for (sid, m) in &msgs {
            podlink::encode(&mut wire, *sid, &m.as_msg());
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut got: Vec<(u32, Vec<u8>)> = Vec::new();
        for chunk in chunks(&wire, &cuts) {
            buf.extend_from_slice(chunk);
            loop {
                match podlink::decode(&buf) {
                    Ok(podlink::Decoded::Msg { session_id, msg, used }) => {
                        prop_assert!(used <= buf.len());
                        let (want_sid, want) = &msgs[got.len()];
                        prop_assert_eq!(session_id, *want_sid);
                        prop_assert_eq!(&msg, &want.as_msg());
                        // Re-encoding the decoded message gives its bytes back.
                        let mut again = Vec::new();
                        podlink::encode(&mut again, session_id, &msg);
                        prop_assert!(again[..] == buf[..used]);
                        got.push((session_id, again));
                        buf.drain(..used);
                    }
                    Ok(podlink::Decoded::NeedMore(n)) => {
                        prop_assert!(n >= 1);
                        break;
                    }
                    Err(e) => prop_assert!(false, "valid link reported {:?}", e),
                }
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got.len(), msgs.len());
        let joined: Vec<u8> = got.into_iter().flat_map(|(_, b)| b).collect();
        prop_assert!(joined == wire);
    }

    /// (e) CONNECT in all three widths.
    #[test]
    fn connect_round_trip(
        caps in any::<u8>(), width in caps_width(), tenant_id in any::<u32>(),
        agent_id in any::<u32>(), token in any::<[u8; 32]>(), nonce in any::<[u8; 16]>(),
    ) {
        let c = Connect { version: 1, caps, caps_width: width, tenant_id, agent_id, token, nonce };
        let p = typed_round_trip(&c, FrameType::Connect, Connect::encode, Connect::parse)?;
        let want_len = match width { CapsWidth::U8 => 58, CapsWidth::U16 => 59, CapsWidth::U32 => 61 };
        prop_assert_eq!(p.len(), want_len);
        // Another version is refused before the shape is looked at.
        let mut other = p.clone();
        other[0] = 2;
        prop_assert_eq!(Connect::parse(&other).unwrap_err().code, ErrorCode::UnsupportedVersion);
    }

    /// (e) ACCEPT with and without the resume token.
    #[test]
    fn accept_round_trip(
        session_id in any::<u32>(), version in any::<u8>(), caps in any::<u8>(),
        resume_token in proptest::option::of(any::<[u8; 16]>()),
    ) {
        let a = Accept { session_id, version, caps, resume_token };
        let p = typed_round_trip(&a, FrameType::Accept, Accept::encode, Accept::parse)?;
        prop_assert_eq!(p.len(), if resume_token.is_some() { 22 } else { 6 });
    }

    /// (e) RESUME in both forms.
    #[test]
    fn resume_round_trip(
        session_id in any::<u32>(), last_seq in any::<u32>(), token in any::<[u8; 16]>(),
        legacy in any::<bool>(),
    ) {
        let r = if legacy {
            Resume::Legacy { session_id }
        } else {
            Resume::Full { session_id, last_seq, token }
        };
        let p = typed_round_trip(&r, FrameType::Resume, Resume::encode, Resume::parse)?;
        prop_assert_eq!(p.len(), if legacy { 4 } else { 24 });
        prop_assert_eq!(r.session_id(), session_id);
    }

    /// (e) RESUMED, ACK (both forms) and RESIZE.
    #[test]
    fn resumed_ack_resize_round_trip(
        a in any::<u32>(), b in any::<u32>(), c in any::<u32>(),
        cumulative in any::<bool>(), cols in any::<u16>(), rows in any::<u16>(),
    ) {
        let r = Resumed { session_id: a, last_client_seq: b, first_replay_seq: c };
        prop_assert_eq!(
            typed_round_trip(&r, FrameType::Resumed, Resumed::encode, Resumed::parse)?.len(),
            12
        );
        let ack = if cumulative { Ack::Cumulative(c) } else { Ack::Empty };
        prop_assert_eq!(
            typed_round_trip(&ack, FrameType::Ack, Ack::encode, Ack::parse)?.len(),
            if cumulative { 4 } else { 0 }
        );
        let z = Resize { cols, rows };
        prop_assert_eq!(
            typed_round_trip(&z, FrameType::Resize, Resize::encode, Resize::parse)?.len(),
            4
        );
    }

    /// (e) ROAM with IPv4 and IPv6 addresses.
    #[test]
    fn roam_round_trip(addr in ip(), port in any::<u16>(), roam_token in any::<[u8; 16]>()) {
        let r = Roam { addr, port, roam_token };
        let p = typed_round_trip(&r, FrameType::Roam, Roam::encode, Roam::parse)?;
        prop_assert_eq!(p.len(), if addr.is_ipv4() { 23 } else { 35 });
    }

    /// (e) ERROR: every known code with any UTF-8 message.
    #[test]
    fn error_round_trip(i in 0usize..ErrorCode::ALL.len(), message in ".{0,200}") {
        let code = ErrorCode::ALL[i];
        let e = ErrorFrame { code: code as u16, message: message.clone() };
        let p = typed_round_trip(
            &e,
            FrameType::Error,
            |e, o| ErrorFrame::encode_parts(e.known().unwrap(), &e.message, o),
            ErrorFrame::parse,
        )?;
        prop_assert_eq!(p.len(), 2 + message.len());
        prop_assert_eq!(ErrorFrame::parse(&p).unwrap().known(), Some(code));
    }
}
