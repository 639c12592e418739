//! The official ClawTerm v1 test vectors (`tests/vectors/frames.json`, a copy of the contract's
//! `vectors/frames.json`) run against `proto` and `podlink`.
//!
//! Every key of every `decoded` object is checked; a key this file does not know fails the test
//! (so a new field in the vectors can never be skipped silently). Every failure names its vector.

use clawterm::podlink::{self, CloseReason, Msg, MsgType, Open};
use clawterm::proto::frame::{crc16, encode_with};
use clawterm::proto::payload::CapsWidth;
use clawterm::proto::{
    decode, encode_to_slice, encode_to_vec, Accept, Ack, Connect, DecodeError, Decoded, ErrorCode,
    ErrorFrame, FrameType, Resize, Resume, Resumed, Roam, MAX_PAYLOAD, OVERHEAD,
};
use serde_json::{Map, Value};
use std::net::IpAddr;

const VECTORS: &str = include_str!("vectors/frames.json");

/// The receiver's maximum payload for the `frames` section.
const MAX: usize = 65535;

fn vectors() -> Value {
    serde_json::from_str(VECTORS).expect("tests/vectors/frames.json is not valid JSON")
}

fn section<'a>(v: &'a Value, name: &str) -> &'a [Value] {
    v[name]
        .as_array()
        .unwrap_or_else(|| panic!("vectors: section {name:?} missing or not an array"))
}

fn unhex(name: &str, s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "[{name}] odd-length hex string");
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16)
                .unwrap_or_else(|_| panic!("[{name}] bad hex at {i}: {:?}", &s[i..i + 2]))
        })
        .collect()
}

fn str_field<'a>(name: &str, obj: &'a Map<String, Value>, key: &str) -> &'a str {
    obj.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("[{name}] key {key:?} missing or not a string"))
}

fn u64_of(name: &str, key: &str, v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("[{name}] {key}: expected an unsigned integer, got {v}"))
}

fn str_of<'a>(name: &str, key: &str, v: &'a Value) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("[{name}] {key}: expected a string, got {v}"))
}

/// Fails with the vector's name and the field when `got != want`.
#[track_caller]
fn same<T: PartialEq + std::fmt::Debug>(name: &str, key: &str, got: T, want: T) {
    assert!(
        got == want,
        "[{name}] {key}: decoded {got:?}, vector says {want:?}"
    );
}

/// Fails when an object has a key outside `allowed`.
fn only_keys(name: &str, what: &str, obj: &Map<String, Value>, allowed: &[&str]) {
    for k in obj.keys() {
        assert!(
            allowed.contains(&k.as_str()),
            "[{name}] {what} has key {k:?} that this test does not check (known: {allowed:?})"
        );
    }
}

/// The frame type named `name` in the contract, looked up independently of the decoder.
fn frame_type_named(vector: &str, name: &str) -> FrameType {
    (0..=255u8)
        .map(FrameType::from_code)
        .find(|t| !matches!(t, FrameType::Unknown(_)) && t.name() == name)
        .unwrap_or_else(|| panic!("[{vector}] unknown frame type name {name:?}"))
}

/// A payload parsed with the typed parser for its frame type.
#[derive(Debug)]
enum Typed {
    Connect(Connect),
    Accept(Accept),
    Resume(Resume),
    Resumed(Resumed),
    Ack(Ack),
    Resize(Resize),
    Roam(Roam),
    Error(ErrorFrame),
    /// DATA, NACK, KEEPALIVE, SUSPEND, DISCONNECT: no typed parser.
    Opaque,
}

impl Typed {
    fn parse(name: &str, ty: FrameType, p: &[u8]) -> Typed {
        let fail = |e: clawterm::proto::PayloadError| -> ! {
            panic!("[{name}] {} payload does not parse: {e}", ty.name())
        };
        match ty {
            FrameType::Connect => Typed::Connect(Connect::parse(p).unwrap_or_else(|e| fail(e))),
            FrameType::Accept => Typed::Accept(Accept::parse(p).unwrap_or_else(|e| fail(e))),
            FrameType::Resume => Typed::Resume(Resume::parse(p).unwrap_or_else(|e| fail(e))),
            FrameType::Resumed => Typed::Resumed(Resumed::parse(p).unwrap_or_else(|e| fail(e))),
            FrameType::Ack => Typed::Ack(Ack::parse(p).unwrap_or_else(|e| fail(e))),
            FrameType::Resize => Typed::Resize(Resize::parse(p).unwrap_or_else(|e| fail(e))),
            FrameType::Roam => Typed::Roam(Roam::parse(p).unwrap_or_else(|e| fail(e))),
            FrameType::Error => Typed::Error(ErrorFrame::parse(p).unwrap_or_else(|e| fail(e))),
            FrameType::Keepalive | FrameType::Suspend | FrameType::Disconnect => {
                assert!(p.is_empty(), "[{name}] {} must be empty", ty.name());
                Typed::Opaque
            }
            FrameType::Data | FrameType::Nack | FrameType::Unknown(_) => Typed::Opaque,
        }
    }

    /// Re-encodes through the typed encoder; `None` for opaque payloads.
    fn encode(&self, name: &str) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        match self {
            Typed::Connect(c) => c.encode(&mut out),
            Typed::Accept(a) => a.encode(&mut out),
            Typed::Resume(r) => r.encode(&mut out),
            Typed::Resumed(r) => r.encode(&mut out),
            Typed::Ack(a) => a.encode(&mut out),
            Typed::Resize(r) => r.encode(&mut out),
            Typed::Roam(r) => r.encode(&mut out),
            Typed::Error(e) => {
                let code = e
                    .known()
                    .unwrap_or_else(|| panic!("[{name}] ERROR code {} is not known", e.code));
                ErrorFrame::encode_parts(code, &e.message, &mut out);
            }
            Typed::Opaque => return None,
        }
        Some(out)
    }

    /// Checks one typed key of a `decoded` object; false if the key is not a typed field of
    /// this payload.
    fn check(&self, name: &str, key: &str, v: &Value) -> bool {
        let num = || u64_of(name, key, v);
        let hex = || unhex(name, str_of(name, key, v));
        match (self, key) {
            (Typed::Connect(c), "version") => same(name, key, c.version as u64, num()),
            (Typed::Connect(c), "caps") => same(name, key, c.caps as u64, num()),
            (Typed::Connect(c), "tenant_id") => same(name, key, c.tenant_id as u64, num()),
            (Typed::Connect(c), "agent_id") => same(name, key, c.agent_id as u64, num()),
            (Typed::Connect(c), "token_hex") => same(name, key, c.token.to_vec(), hex()),
            (Typed::Connect(c), "nonce_hex") => same(name, key, c.nonce.to_vec(), hex()),
            (Typed::Accept(a), "version") => same(name, key, a.version as u64, num()),
            (Typed::Accept(a), "caps") => same(name, key, a.caps as u64, num()),
            (Typed::Accept(a), "resume_token_hex") => {
                same(name, key, a.resume_token.map(|t| t.to_vec()), Some(hex()))
            }
            (Typed::Resume(Resume::Full { last_seq, .. }), "last_seq") => {
                same(name, key, *last_seq as u64, num())
            }
            (Typed::Resume(Resume::Full { token, .. }), "resume_token_hex") => {
                same(name, key, token.to_vec(), hex())
            }
            (Typed::Resumed(r), "last_client_seq") => {
                same(name, key, r.last_client_seq as u64, num())
            }
            (Typed::Resumed(r), "first_replay_seq") => {
                same(name, key, r.first_replay_seq as u64, num())
            }
            (Typed::Ack(a), "ack_seq") => same(name, key, *a, Ack::Cumulative(num() as u32)),
            (Typed::Resize(r), "cols") => same(name, key, r.cols as u64, num()),
            (Typed::Resize(r), "rows") => same(name, key, r.rows as u64, num()),
            (Typed::Roam(r), "family") => {
                let fam = match r.addr {
                    IpAddr::V4(_) => 4,
                    IpAddr::V6(_) => 6,
                };
                same(name, key, fam, num())
            }
            (Typed::Roam(r), "address") => {
                let want: IpAddr = str_of(name, key, v)
                    .parse()
                    .unwrap_or_else(|e| panic!("[{name}] address {v}: {e}"));
                same(name, key, r.addr, want)
            }
            (Typed::Roam(r), "port") => same(name, key, r.port as u64, num()),
            (Typed::Roam(r), "roam_token_hex") => same(name, key, r.roam_token.to_vec(), hex()),
            (Typed::Error(e), "code") => same(name, key, e.code as u64, num()),
            (Typed::Error(e), "message") => {
                same(name, key, e.message.as_str(), str_of(name, key, v))
            }
            _ => return false,
        }
        true
    }
}

#[test]
fn vector_file_is_complete() {
    let v = vectors();
    let top = v.as_object().expect("vectors: top level is not an object");
    only_keys(
        "<file>",
        "top level",
        top,
        &[
            "about",
            "crc",
            "frames",
            "bad_frames",
            "incomplete_frames",
            "pod_messages",
        ],
    );
    // The counts of the official file; a truncated or mangled copy fails here.
    assert_eq!(section(&v, "frames").len(), 19, "frames count");
    assert_eq!(section(&v, "bad_frames").len(), 7, "bad_frames count");
    assert_eq!(
        section(&v, "incomplete_frames").len(),
        6,
        "incomplete_frames count"
    );
    assert_eq!(section(&v, "pod_messages").len(), 10, "pod_messages count");
    // Names are unique within a section, so every failure points at exactly one vector.
    for sec in ["frames", "bad_frames", "incomplete_frames", "pod_messages"] {
        let mut names: Vec<&str> = section(&v, sec)
            .iter()
            .map(|e| e["name"].as_str().expect("vector without a name"))
            .collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(n, names.len(), "duplicate vector names in {sec}");
    }
}

#[test]
fn crc_parameters_and_check_value() {
    let v = vectors();
    let crc = v["crc"].as_object().expect("crc section");
    only_keys(
        "crc",
        "crc",
        crc,
        &[
            "name",
            "poly",
            "init",
            "refin",
            "refout",
            "xorout",
            "check_ascii_123456789",
        ],
    );
    let hex16 = |k: &str| {
        let s = str_field("crc", crc, k);
        u16::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("crc {k}"))
    };
    let alg = &crc::CRC_16_UMTS;
    assert_eq!(str_field("crc", crc, "name"), "CRC-16/UMTS");
    assert_eq!(alg.poly, hex16("poly"), "crc poly");
    assert_eq!(alg.init, hex16("init"), "crc init");
    assert_eq!(alg.xorout, hex16("xorout"), "crc xorout");
    assert_eq!(Some(alg.refin), crc["refin"].as_bool(), "crc refin");
    assert_eq!(Some(alg.refout), crc["refout"].as_bool(), "crc refout");
    assert_eq!(hex16("check_ascii_123456789"), 0xFEE8);
    assert_eq!(crc16(b"123456789"), 0xFEE8);
    assert_eq!(crc16(b"123456789"), hex16("check_ascii_123456789"));
    assert_eq!(reference_crc(b"123456789"), 0xFEE8);
}

/// Bit-at-a-time CRC-16/UMTS straight from the parameters, to cross-check the table version.
fn reference_crc(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x8005
            } else {
                crc << 1
            };
        }
    }
    crc
}

const FRAME_KEYS: &[&str] = &[
    "session_id",
    "seq",
    "type",
    "flags",
    "payload_hex",
    "payload_len",
];

#[test]
fn frames_decode_and_reencode() {
    let v = vectors();
    for e in section(&v, "frames") {
        let e = e.as_object().expect("frame vector is not an object");
        let name = str_field("?", e, "name");
        only_keys(name, "vector", e, &["name", "hex", "decoded"]);
        let wire = unhex(name, str_field(name, e, "hex"));
        let want = e["decoded"]
            .as_object()
            .unwrap_or_else(|| panic!("[{name}] no decoded object"));

        let (f, used) = match decode(&wire, MAX) {
            Ok(Decoded::Frame(f, used)) => (f, used),
            other => panic!("[{name}] expected one frame, got {other:?}"),
        };
        same(name, "bytes used", used, wire.len());
        same(name, "wire_len", f.wire_len(), wire.len());
        // The CRC on the wire is also what the bitwise reference computes.
        let body_end = wire.len() - 2;
        same(
            name,
            "reference crc",
            reference_crc(&wire[..body_end]).to_be_bytes(),
            [wire[body_end], wire[body_end + 1]],
        );

        let typed = Typed::parse(name, f.ty, f.payload);
        let mut seen_payload = false;
        for (key, val) in want {
            let num = || u64_of(name, key, val);
            match key.as_str() {
                "session_id" => same(name, key, f.session_id as u64, num()),
                "seq" => same(name, key, f.seq as u64, num()),
                "type" => same(name, key, f.ty.name(), str_of(name, key, val)),
                "flags" => same(name, key, f.flags as u64, num()),
                "payload_hex" => {
                    seen_payload = true;
                    same(
                        name,
                        key,
                        f.payload,
                        &unhex(name, str_of(name, key, val))[..],
                    )
                }
                "payload_len" => {
                    seen_payload = true;
                    same(name, key, f.payload.len() as u64, num())
                }
                k => assert!(
                    typed.check(name, k, val),
                    "[{name}] decoded key {k:?} is not checked by this test (frame keys: \
                     {FRAME_KEYS:?}; typed payload: {typed:?})"
                ),
            }
        }
        assert!(seen_payload, "[{name}] vector lists no payload");
        for k in ["session_id", "seq", "type", "flags"] {
            assert!(want.contains_key(k), "[{name}] vector lacks {k}");
        }

        // Re-encoding from the vector's own fields (type looked up by name) gives the same bytes.
        let ty = frame_type_named(name, str_field(name, want, "type"));
        same(name, "type code", f.ty, ty);
        let mut again = Vec::new();
        encode_to_vec(&mut again, f.session_id, f.seq, ty, f.flags, f.payload);
        assert!(
            again == wire,
            "[{name}] encode_to_vec differs from the vector"
        );
        let mut slice = vec![0u8; wire.len()];
        let n = encode_to_slice(&mut slice, f.session_id, f.seq, ty, f.flags, f.payload)
            .unwrap_or_else(|e| panic!("[{name}] encode_to_slice: {e}"));
        assert!(
            n == wire.len() && slice == wire,
            "[{name}] encode_to_slice differs"
        );

        // And the typed encoder reproduces the payload and, through encode_with, the frame.
        if let Some(p) = typed.encode(name) {
            assert!(
                p == f.payload,
                "[{name}] typed encode differs from the payload"
            );
            let mut framed = Vec::new();
            encode_with(&mut framed, f.session_id, f.seq, ty, f.flags, |o| {
                o.extend_from_slice(&p)
            });
            assert!(framed == wire, "[{name}] encode_with(typed) differs");
        }

        // Header-level typed checks the vectors imply but do not spell out.
        match &typed {
            Typed::Accept(a) => same(
                name,
                "ACCEPT payload session_id",
                a.session_id,
                f.session_id,
            ),
            Typed::Resume(r) if f.session_id != 0 => same(
                name,
                "RESUME payload session_id",
                r.session_id(),
                f.session_id,
            ),
            Typed::Resumed(r) => same(
                name,
                "RESUMED payload session_id",
                r.session_id,
                f.session_id,
            ),
            Typed::Connect(c) => {
                let w = match f.payload.len() {
                    58 => CapsWidth::U8,
                    59 => CapsWidth::U16,
                    _ => CapsWidth::U32,
                };
                same(name, "CONNECT caps width", c.caps_width, w);
                same(name, "CONNECT header session_id", f.session_id, 0);
            }
            _ => {}
        }

        // Every strict prefix is incomplete, never an error or a frame.
        for cut in (0..wire.len()).filter(|c| *c < 64 || c % 997 == 0 || *c > wire.len() - 64) {
            match decode(&wire[..cut], MAX) {
                Ok(Decoded::NeedMore(n)) => assert!(
                    n >= 1 && cut + n <= wire.len(),
                    "[{name}] prefix {cut}: NeedMore({n}) overshoots the frame"
                ),
                other => panic!("[{name}] prefix {cut}: {other:?}"),
            }
        }
    }
}

#[test]
fn frames_as_one_stream() {
    let v = vectors();
    let entries = section(&v, "frames");
    let mut stream = Vec::new();
    for e in entries {
        stream.extend(unhex("stream", e["hex"].as_str().unwrap()));
    }
    let mut at = 0;
    for e in entries {
        let name = e["name"].as_str().unwrap();
        let len = e["hex"].as_str().unwrap().len() / 2;
        match decode(&stream[at..], MAX) {
            Ok(Decoded::Frame(f, used)) => {
                same(name, "used in stream", used, len);
                same(
                    name,
                    "type in stream",
                    f.ty.name(),
                    e["decoded"]["type"].as_str().unwrap(),
                );
            }
            other => panic!("[{name}] in a stream: {other:?}"),
        }
        at += len;
    }
    assert_eq!(at, stream.len());
    assert_eq!(decode(&stream[at..], MAX), Ok(Decoded::NeedMore(13)));
}

#[test]
fn bad_frames_break_the_stream() {
    let v = vectors();
    for e in section(&v, "bad_frames") {
        let e = e.as_object().expect("bad_frames vector is not an object");
        let name = str_field("?", e, "name");
        only_keys(name, "vector", e, &["name", "hex", "error"]);
        let wire = unhex(name, str_field(name, e, "hex"));
        let want = str_field(name, e, "error");
        let err = match decode(&wire, MAX) {
            Err(err) => err,
            Ok(d) => panic!("[{name}] expected {want}, decoded {d:?}"),
        };
        same(name, "error code", err.error_code().name(), want);
        match want {
            "BAD_FRAME" => {
                assert!(
                    matches!(err, DecodeError::BadFlag(_) | DecodeError::BadCrc { .. }),
                    "[{name}] BAD_FRAME must be BadFlag or BadCrc, got {err:?}"
                );
                same(name, "error_code()", err.error_code(), ErrorCode::BadFrame);
            }
            "TOO_LARGE" => assert!(matches!(err, DecodeError::TooLarge { .. }), "[{name}]"),
            other => panic!("[{name}] unknown expected error {other:?}"),
        }
        match err {
            // A wrong FLAG is refused from the first byte on, before anything is buffered.
            DecodeError::BadFlag(b) => {
                same(name, "flag byte", b, wire[0]);
                same(name, "1-byte prefix", decode(&wire[..1], MAX), Err(err));
            }
            DecodeError::BadCrc { got, computed } => {
                let end = wire.len() - 2;
                same(
                    name,
                    "crc got",
                    got,
                    u16::from_be_bytes([wire[end], wire[end + 1]]),
                );
                same(name, "crc computed", computed, reference_crc(&wire[..end]));
                assert_ne!(got, computed, "[{name}]");
            }
            DecodeError::TooLarge { .. } => {}
        }
    }
}

#[test]
fn incomplete_frames_need_more() {
    let v = vectors();
    for e in section(&v, "incomplete_frames") {
        let e = e
            .as_object()
            .expect("incomplete_frames vector is not an object");
        let name = str_field("?", e, "name");
        only_keys(name, "vector", e, &["name", "hex", "need_more"]);
        assert_eq!(e["need_more"], Value::Bool(true), "[{name}] need_more");
        let wire = unhex(name, str_field(name, e, "hex"));
        match decode(&wire, MAX) {
            Ok(Decoded::NeedMore(n)) => {
                assert!(n >= 1, "[{name}] NeedMore(0)");
                // Exact while LEN is unknown or known: header first, then the rest of the frame.
                let exact = if wire.len() < 13 {
                    13 - wire.len()
                } else {
                    OVERHEAD + u16::from_be_bytes([wire[11], wire[12]]) as usize - wire.len()
                };
                same(name, "NeedMore", n, exact);
            }
            other => panic!("[{name}] expected NeedMore, got {other:?}"),
        }
    }
}

#[test]
fn max_payload_bounds_the_frames() {
    // data_max_65535 is exactly at the limit; one below it is TOO_LARGE from the header alone.
    let v = vectors();
    let e = section(&v, "frames")
        .iter()
        .find(|e| e["name"] == "data_max_65535")
        .expect("data_max_65535 vector");
    let wire = unhex("data_max_65535", e["hex"].as_str().unwrap());
    assert!(matches!(decode(&wire, MAX_PAYLOAD), Ok(Decoded::Frame(..))));
    let err = decode(&wire[..13], 65534).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            len: 65535,
            max: 65534
        }
    );
    assert_eq!(err.error_code(), ErrorCode::TooLarge);
}

const POD_KEYS: &[&str] = &[
    "type",
    "session_id",
    "body_hex",
    "tenant",
    "agent",
    "client_caps",
    "peer",
];

/// The message the contract says `ty`+`body` is, built without the decoder.
fn expected_msg<'a>(name: &str, ty: &str, body: &'a [u8]) -> Msg<'a> {
    let utf8 = |b: &'a [u8]| {
        std::str::from_utf8(b).unwrap_or_else(|_| panic!("[{name}] body text is not UTF-8"))
    };
    let open = || {
        assert!(body.len() >= 9, "[{name}] OPEN body too short");
        Open {
            tenant: u32::from_be_bytes(body[0..4].try_into().unwrap()),
            agent: u32::from_be_bytes(body[4..8].try_into().unwrap()),
            client_caps: body[8],
            peer: utf8(&body[9..]),
        }
    };
    let empty = |m: Msg<'a>| {
        assert!(body.is_empty(), "[{name}] {ty} body must be empty");
        m
    };
    match ty {
        "HELLO" => Msg::Hello {
            version: body[0],
            name: utf8(&body[1..]),
        },
        "OPEN" => Msg::Open(open()),
        "REOPEN" => Msg::Reopen(open()),
        "DATA" => Msg::Data(body),
        "RESIZE" => {
            assert_eq!(body.len(), 4, "[{name}] RESIZE body");
            Msg::Resize {
                cols: u16::from_be_bytes([body[0], body[1]]),
                rows: u16::from_be_bytes([body[2], body[3]]),
            }
        }
        "DETACHED" => empty(Msg::Detached),
        "ATTACHED" => empty(Msg::Attached),
        "CLOSE" => {
            assert_eq!(body.len(), 1, "[{name}] CLOSE body");
            Msg::Close(CloseReason::from_code(body[0]))
        }
        "PAUSE" => empty(Msg::Pause),
        "CONTINUE" => empty(Msg::Continue),
        other => panic!("[{name}] unknown pod message type {other:?}"),
    }
}

#[test]
fn pod_messages_decode_and_reencode() {
    let v = vectors();
    let mut stream = Vec::new();
    let mut expect = Vec::new();
    for e in section(&v, "pod_messages") {
        let e = e.as_object().expect("pod_messages vector is not an object");
        let name = str_field("?", e, "name");
        only_keys(name, "vector", e, &["name", "hex", "decoded"]);
        let wire = unhex(name, str_field(name, e, "hex"));
        let want = e["decoded"]
            .as_object()
            .unwrap_or_else(|| panic!("[{name}] no decoded object"));
        let (session_id, msg, used) = match podlink::decode(&wire) {
            Ok(podlink::Decoded::Msg {
                session_id,
                msg,
                used,
            }) => (session_id, msg, used),
            other => panic!("[{name}] expected one message, got {other:?}"),
        };
        same(name, "bytes used", used, wire.len());
        same(
            name,
            "LEN field",
            u32::from_be_bytes(wire[0..4].try_into().unwrap()) as usize,
            wire.len() - 4,
        );
        let body = &wire[podlink::HEADER_LEN..];
        let open = match &msg {
            Msg::Open(o) | Msg::Reopen(o) => Some(o),
            _ => None,
        };
        for (key, val) in want {
            let num = || u64_of(name, key, val);
            let open = || open.unwrap_or_else(|| panic!("[{name}] {key} on a {:?}", msg.ty()));
            match key.as_str() {
                "type" => same(name, key, msg.ty().name(), str_of(name, key, val)),
                "session_id" => same(name, key, session_id as u64, num()),
                "body_hex" => same(name, key, body, &unhex(name, str_of(name, key, val))[..]),
                "tenant" => same(name, key, open().tenant as u64, num()),
                "agent" => same(name, key, open().agent as u64, num()),
                "client_caps" => same(name, key, open().client_caps as u64, num()),
                "peer" => same(name, key, open().peer, str_of(name, key, val)),
                k => panic!("[{name}] decoded key {k:?} is not checked (known: {POD_KEYS:?})"),
            }
        }
        for k in ["type", "session_id", "body_hex"] {
            assert!(want.contains_key(k), "[{name}] vector lacks {k}");
        }
        let ty = str_field(name, want, "type");
        same(name, "message", &msg, &expected_msg(name, ty, body));
        same(name, "type code", msg.ty(), MsgType::from_code(wire[4]));
        if ty == "HELLO" {
            same(name, "HELLO session_id", session_id, 0);
        }

        let mut again = Vec::new();
        podlink::encode(&mut again, session_id, &msg);
        assert!(
            again == wire,
            "[{name}] re-encoding differs from the vector"
        );

        for cut in 0..wire.len() {
            match podlink::decode(&wire[..cut]) {
                Ok(podlink::Decoded::NeedMore(n)) => assert!(
                    n >= 1 && cut + n <= wire.len(),
                    "[{name}] prefix {cut}: NeedMore({n}) overshoots"
                ),
                other => panic!("[{name}] prefix {cut}: {other:?}"),
            }
        }
        stream.extend_from_slice(&wire);
        expect.push((name.to_string(), wire.len()));
    }

    // All messages back to back on one link.
    let mut at = 0;
    for (name, len) in expect {
        match podlink::decode(&stream[at..]) {
            Ok(podlink::Decoded::Msg { used, .. }) => same(&name, "used in stream", used, len),
            other => panic!("[{name}] in a stream: {other:?}"),
        }
        at += len;
    }
    assert_eq!(at, stream.len());
}
