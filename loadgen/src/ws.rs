//! The WebSocket transport of loadgen (`--transport ws`), client side, sans-IO: the upgrade
//! request, the check of the 101 answer, masked binary messages out (one per write, as the
//! browser page and `@clawterm/client` send them) and the server's frames in (binary payloads
//! as one byte stream; pings answered). [`WsStream`] wraps a blocking stream with it (the
//! warm-up session); the epoll driver calls [`WsClient`] directly.

use std::io::{self, Read, Write};

/// The request that opens the WebSocket at `host` (`HOST:PORT`).
pub fn request(host: &str) -> Vec<u8> {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: clawterm\r\n\r\n"
    )
    .into_bytes()
}

/// The `Sec-WebSocket-Accept` the fixed key above must get (RFC 6455 §1.3).
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// One connection's WebSocket, client side.
pub struct WsClient {
    /// The 101 head while it arrives (None once open).
    head: Option<Vec<u8>>,
    /// A server frame header while it arrives.
    hdr: Vec<u8>,
    /// Payload bytes left in the current frame, and whether they are a control frame's.
    remaining: u64,
    control: Option<u8>,
    control_buf: Vec<u8>,
    /// xorshift state for the masks.
    rng: u32,
}

impl WsClient {
    pub fn new(seed: u32) -> WsClient {
        WsClient {
            head: Some(Vec::new()),
            hdr: Vec::new(),
            remaining: 0,
            control: None,
            control_buf: Vec::new(),
            rng: seed | 1,
        }
    }

    pub fn is_open(&self) -> bool {
        self.head.is_none()
    }

    /// Bytes from the server: binary payload is appended to `payload`, frames to send back
    /// (pongs) to `reply`. `Ok(true)` when this call completed the upgrade.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        payload: &mut Vec<u8>,
        reply: &mut Vec<u8>,
    ) -> Result<bool, String> {
        let mut opened = false;
        if let Some(head) = self.head.as_mut() {
            head.extend_from_slice(data);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                if head.len() > 16 * 1024 {
                    return Err("WebSocket: no end to the HTTP answer".into());
                }
                return Ok(false);
            };
            let text = String::from_utf8_lossy(&head[..end]).into_owned();
            if !text.starts_with("HTTP/1.1 101") {
                return Err(format!(
                    "WebSocket upgrade refused: {}",
                    text.lines().next().unwrap_or("")
                ));
            }
            if !text.contains(ACCEPT) {
                return Err("WebSocket: wrong Sec-WebSocket-Accept".into());
            }
            let rest = head[end + 4..].to_vec();
            self.head = None;
            opened = true;
            self.frames(&rest, payload, reply)?;
            data = &[];
        }
        self.frames(data, payload, reply)?;
        Ok(opened)
    }

    fn frames(
        &mut self,
        mut data: &[u8],
        payload: &mut Vec<u8>,
        reply: &mut Vec<u8>,
    ) -> Result<(), String> {
        while !data.is_empty() {
            if self.remaining == 0 && self.control.is_none() {
                // A header: 2 bytes, then the extended length.
                let need = |h: &[u8]| match h.get(1).map(|b| b & 0x7f) {
                    None => 2,
                    Some(126) => 4,
                    Some(127) => 10,
                    Some(_) => 2,
                };
                while self.hdr.len() < need(&self.hdr) && !data.is_empty() {
                    self.hdr.push(data[0]);
                    data = &data[1..];
                }
                if self.hdr.len() < need(&self.hdr) {
                    return Ok(());
                }
                let h = std::mem::take(&mut self.hdr);
                if h[1] & 0x80 != 0 {
                    return Err("WebSocket: the server masked a frame".into());
                }
                let len = match h[1] & 0x7f {
                    126 => u16::from_be_bytes([h[2], h[3]]) as u64,
                    127 => u64::from_be_bytes(h[2..10].try_into().unwrap_or([0; 8])),
                    n => n as u64,
                };
                match h[0] & 0x0f {
                    0x0 | 0x2 => {}
                    0x8 => return Err("WebSocket closed by the server".into()),
                    op @ (0x9 | 0xA) => {
                        self.control = Some(op);
                        self.control_buf.clear();
                    }
                    op => return Err(format!("WebSocket: unexpected opcode {op:#x}")),
                }
                self.remaining = len;
                if len == 0 {
                    self.end_control(reply);
                }
                continue;
            }
            let n = self.remaining.min(data.len() as u64) as usize;
            if self.control.is_some() {
                self.control_buf.extend_from_slice(&data[..n]);
            } else {
                payload.extend_from_slice(&data[..n]);
            }
            data = &data[n..];
            self.remaining -= n as u64;
            if self.remaining == 0 {
                self.end_control(reply);
            }
        }
        Ok(())
    }

    fn end_control(&mut self, reply: &mut Vec<u8>) {
        if let Some(op) = self.control.take() {
            if op == 0x9 {
                let body = std::mem::take(&mut self.control_buf);
                self.frame_op(reply, 0xA, &body);
            }
        }
    }

    /// Appends one masked binary message holding `payload`.
    pub fn frame(&mut self, out: &mut Vec<u8>, payload: &[u8]) {
        self.frame_op(out, 0x2, payload);
    }

    fn frame_op(&mut self, out: &mut Vec<u8>, op: u8, payload: &[u8]) {
        out.push(0x80 | op);
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 17;
        self.rng ^= self.rng << 5;
        let k = self.rng.to_le_bytes();
        out.extend_from_slice(&k);
        let at = out.len();
        out.extend_from_slice(payload);
        for (i, b) in out[at..].iter_mut().enumerate() {
            *b ^= k[i & 3];
        }
    }
}

/// A blocking stream speaking WebSocket over `S`.
pub struct WsStream<S> {
    inner: S,
    ws: WsClient,
    inbuf: Vec<u8>,
}

impl<S: Read + Write> WsStream<S> {
    /// Opens the WebSocket (blocking until the 101).
    pub fn open(mut inner: S, host: &str) -> io::Result<WsStream<S>> {
        inner.write_all(&request(host))?;
        let mut ws = WsClient::new(0x9e37_79b9);
        let mut inbuf = Vec::new();
        let mut buf = [0u8; 4096];
        while !ws.is_open() {
            let n = inner.read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed during the upgrade",
                ));
            }
            let mut reply = Vec::new();
            ws.feed(&buf[..n], &mut inbuf, &mut reply)
                .map_err(io::Error::other)?;
        }
        Ok(WsStream { inner, ws, inbuf })
    }
}

impl<S: Read + Write> Read for WsStream<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut buf = [0u8; 16 * 1024];
        while self.inbuf.is_empty() {
            let n = self.inner.read(&mut buf)?;
            if n == 0 {
                return Ok(0);
            }
            let mut reply = Vec::new();
            self.ws
                .feed(&buf[..n], &mut self.inbuf, &mut reply)
                .map_err(io::Error::other)?;
            if !reply.is_empty() {
                self.inner.write_all(&reply)?;
            }
        }
        let n = out.len().min(self.inbuf.len());
        out[..n].copy_from_slice(&self.inbuf[..n]);
        self.inbuf.drain(..n);
        Ok(n)
    }
}

impl<S: Read + Write> Write for WsStream<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut out = Vec::with_capacity(data.len() + 14);
        self.ws.frame(&mut out, data);
        self.inner.write_all(&out)?;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame.
    fn server(op: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | op];
        match payload.len() {
            n @ 0..=125 => out.push(n as u8),
            n @ 126..=0xffff => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn upgrade_then_frames_in_any_chunking() {
        let big = vec![3u8; 70_000];
        let mut wire =
            format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {ACCEPT}\r\n\r\n")
                .into_bytes();
        wire.extend(server(0x2, b"abc"));
        wire.extend(server(0x9, b"p"));
        wire.extend(server(0x2, &big));
        wire.extend(server(0x2, b""));
        let mut want = b"abc".to_vec();
        want.extend_from_slice(&big);
        for chunk in [1, 3, 50, 4096, wire.len()] {
            let mut c = WsClient::new(7);
            let (mut p, mut r) = (Vec::new(), Vec::new());
            let mut opened = 0;
            for part in wire.chunks(chunk) {
                if c.feed(part, &mut p, &mut r).unwrap() {
                    opened += 1;
                }
            }
            assert_eq!(opened, 1, "{chunk}");
            assert_eq!(p, want, "{chunk}");
            // The pong is masked and carries the ping's payload.
            assert_eq!(r[0], 0x8A);
            assert_eq!(r[1], 0x81);
            assert_eq!(r[6] ^ r[2], b'p');
        }
    }

    #[test]
    fn refusals_and_closes_are_errors() {
        let mut c = WsClient::new(7);
        let e = c.feed(
            b"HTTP/1.1 403 Forbidden\r\n\r\n",
            &mut Vec::new(),
            &mut Vec::new(),
        );
        assert!(e.unwrap_err().contains("403"));
        let mut c = WsClient::new(7);
        let mut wire =
            format!("HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: {ACCEPT}\r\n\r\n").into_bytes();
        wire.extend(server(0x8, &1000u16.to_be_bytes()));
        assert!(c.feed(&wire, &mut Vec::new(), &mut Vec::new()).is_err());
    }

    #[test]
    fn client_frames_are_masked_binary() {
        let mut c = WsClient::new(7);
        let mut out = Vec::new();
        c.frame(&mut out, b"hello");
        assert_eq!(out[0], 0x82);
        assert_eq!(out[1], 0x80 | 5);
        let k = &out[2..6];
        let p: Vec<u8> = out[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ k[i % 4])
            .collect();
        assert_eq!(p, b"hello");
    }
}
