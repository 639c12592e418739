use super::*;

/// A client frame: masked with `mask`.
fn client_frame(opcode: u8, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(m | n as u8),
        n @ 126..=0xffff => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

const K: Option<[u8; 4]> = Some([0x12, 0x34, 0x56, 0x78]);

fn feed_all(ws: &mut WsIn, bytes: &[u8], chunk: usize) -> (Vec<u8>, Vec<u8>, WsState) {
    let (mut payload, mut replies) = (Vec::new(), Vec::new());
    let mut st = WsState::Open;
    for c in bytes.chunks(chunk.max(1)) {
        st = ws.feed(c, &mut payload, &mut replies);
        if st != WsState::Open {
            break;
        }
    }
    (payload, replies, st)
}

/// The server frames in `bytes`: (opcode, payload).
fn server_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert_eq!(bytes[1] & 0x80, 0, "server frames are not masked");
        let (len, at) = match bytes[1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        out.push((bytes[0] & 0x0f, bytes[at..at + len].to_vec()));
        bytes = &bytes[at + len..];
    }
    out
}

#[test]
fn binary_messages_become_one_byte_stream_in_any_chunking() {
    let a: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    let b: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
    let mut wire = client_frame(0x2, true, &a, K);
    // A fragmented message with a ping in the middle, then an empty binary message.
    wire.extend(client_frame(0x2, false, &b[..10], K));
    wire.extend(client_frame(0x9, true, b"hi", K));
    wire.extend(client_frame(0x0, false, &b[10..1000], K));
    wire.extend(client_frame(0x0, true, &b[1000..], K));
    wire.extend(client_frame(0x2, true, b"", K));
    let mut want = a.clone();
    want.extend_from_slice(&b);
    for chunk in [1, 2, 3, 7, 13, 100, 4096, wire.len()] {
        let mut ws = WsIn::new(1 << 20);
        let (payload, replies, st) = feed_all(&mut ws, &wire, chunk);
        assert_eq!(st, WsState::Open, "chunk {chunk}");
        assert_eq!(payload, want, "chunk {chunk}");
        assert_eq!(
            server_frames(&replies),
            vec![(0xA, b"hi".to_vec())],
            "chunk {chunk}: pong"
        );
    }
}

#[test]
fn every_broken_rule_closes_with_its_code_and_reason() {
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (client_frame(0x2, true, b"x", None), 1002, "masked"),
        (client_frame(0x1, true, b"text", K), 1003, "binary"),
        (client_frame(0x3, true, b"", K), 1002, "malformed"),
        (client_frame(0xB, true, b"", K), 1002, "malformed"),
        (client_frame(0x9, false, b"", K), 1002, "control"),
        (client_frame(0x9, true, &[0; 126], K), 1002, "control"),
        (client_frame(0x0, true, b"x", K), 1002, "continuation"),
        (
            [
                client_frame(0x2, false, b"x", K),
                client_frame(0x2, true, b"y", K),
            ]
            .concat(),
            1002,
            "new message",
        ),
        (client_frame(0x2, true, &vec![0; 2000], K), 1009, "too big"),
        (
            [
                client_frame(0x2, false, &[0; 600], K),
                client_frame(0x0, true, &[0; 600], K),
            ]
            .concat(),
            1009,
            "too big",
        ),
        (client_frame(0x8, true, &[3], K), 1002, "one byte"),
        (
            client_frame(0x8, true, &1005u16.to_be_bytes(), K),
            1002,
            "invalid close",
        ),
        (
            {
                let mut f = client_frame(0x2, true, b"x", K);
                f[0] |= 0x40;
                f
            },
            1002,
            "reserved bits",
        ),
    ];
    for (wire, code, reason) in cases {
        let mut ws = WsIn::new(1024);
        let (_, replies, st) = feed_all(&mut ws, &wire, 5);
        let WsState::Failed(c) = st else {
            panic!("{reason}: not refused: {st:?}");
        };
        assert_eq!(c.code, code, "{reason}");
        assert!(c.reason.contains(reason), "{reason}: {:?}", c.reason);
        let f = server_frames(&replies);
        assert_eq!(f.len(), 1, "{reason}");
        assert_eq!(f[0].0, 0x8, "{reason}: a close frame");
        assert_eq!(u16::from_be_bytes([f[0].1[0], f[0].1[1]]), code, "{reason}");
        assert!(ws.is_done());
        // Nothing more is decoded.
        let mut p = Vec::new();
        ws.feed(
            &client_frame(0x2, true, b"late", K),
            &mut p,
            &mut Vec::new(),
        );
        assert!(p.is_empty(), "{reason}");
    }
}

#[test]
fn a_close_is_answered_with_its_code() {
    let mut wire = client_frame(0x2, true, b"ab", K);
    let mut body = 1001u16.to_be_bytes().to_vec();
    body.extend_from_slice(b"bye");
    wire.extend(client_frame(0x8, true, &body, K));
    wire.extend(client_frame(0x2, true, b"after", K));
    let mut ws = WsIn::new(1024);
    let (payload, replies, st) = feed_all(&mut ws, &wire, 3);
    assert_eq!(st, WsState::PeerClosed(Some(1001)));
    assert_eq!(payload, b"ab");
    assert_eq!(
        server_frames(&replies),
        vec![(0x8, 1001u16.to_be_bytes().to_vec())]
    );
    // An empty close gets 1000.
    let mut ws = WsIn::new(1024);
    let (_, replies, st) = feed_all(&mut ws, &client_frame(0x8, true, b"", K), 1);
    assert_eq!(st, WsState::PeerClosed(None));
    assert_eq!(
        server_frames(&replies),
        vec![(0x8, 1000u16.to_be_bytes().to_vec())]
    );
}

#[test]
fn server_frames_encode_every_length_form() {
    for n in [0usize, 1, 125, 126, 0xffff, 0x10000] {
        let p = vec![7u8; n];
        let mut out = Vec::new();
        binary(&mut out, &p);
        let (h, hn) = binary_header(n);
        assert_eq!(&out[..hn], &h[..hn], "{n}");
        assert_eq!(out.len(), hn + n, "{n}");
        assert_eq!(server_frames(&out), vec![(0x2, p)], "{n}");
    }
    let mut out = Vec::new();
    close(&mut out, 1008, &"é".repeat(100));
    let f = server_frames(&out);
    assert!(f[0].1.len() <= 125);
    assert!(
        std::str::from_utf8(&f[0].1[2..]).is_ok(),
        "the reason is cut on a char boundary"
    );
}
