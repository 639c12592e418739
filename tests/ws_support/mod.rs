//! A WebSocket client written from RFC 6455 for the tests (independent of the server's
//! `tungstenite`-based framing, so a bug they share cannot hide), and a bridge that lets the
//! black-box `Client` of `tests/common` speak over WebSocket: a local TCP port whose bytes
//! travel as binary messages split wherever the reads happen to split them.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Opens a WebSocket at `addr` (`GET /ws`); returns the stream and the 101 head, or the
/// non-101 response.
pub fn open(addr: SocketAddr, extra_headers: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra_headers}\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let head = read_head(&mut s)?;
    if !head.starts_with("HTTP/1.1 101 ") {
        return Err(head);
    }
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    Ok(s)
}

/// Reads an HTTP response head (up to the blank line), one byte at a time so that nothing
/// after it is consumed.
pub fn read_head(s: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            Ok(_) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&head))),
            Err(e) => return Err(format!("{e} after {:?}", String::from_utf8_lossy(&head))),
        }
        if head.len() > 16 * 1024 {
            return Err("head too long".into());
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// A whole HTTP exchange on a fresh connection: the response (head and body) until the server
/// closes.
pub fn http(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A client frame (masked unless `masked` is false).
pub fn frame(opcode: u8, fin: bool, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
    let m = if masked { 0x80 } else { 0 };
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
    if masked {
        let k: [u8; 4] = rand_mask();
        out.extend_from_slice(&k);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

fn rand_mask() -> [u8; 4] {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    n.to_le_bytes()
}

/// One server frame: (fin, opcode, payload); `None` on EOF.
pub fn read_frame(s: &mut TcpStream) -> Option<(bool, u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).ok()?;
    assert_eq!(h[1] & 0x80, 0, "a server frame must not be masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).ok()?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).ok()?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).ok()?;
    Some((h[0] & 0x80 != 0, h[0] & 0x0f, p))
}

/// Reads frames until a close frame: its code and reason (None: EOF first).
pub fn close_of(s: &mut TcpStream) -> Option<(u16, String)> {
    while let Some((_, op, p)) = read_frame(s) {
        if op == 0x8 {
            let code = u16::from_be_bytes([p[0], p[1]]);
            return Some((code, String::from_utf8_lossy(&p[2..]).into_owned()));
        }
    }
    None
}

/// A local TCP port that carries each connection to the server's WebSocket: every read from
/// the test's client goes out as one binary message, every binary message's payload comes
/// back as bytes. The test's client closing its side drops the WebSocket abruptly (no close
/// frame), like a network that died.
pub struct Bridge {
    pub addr: SocketAddr,
}

impl Bridge {
    pub fn start(ws: SocketAddr) -> Bridge {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { break };
                let Ok(w) = open(ws, "") else {
                    let _ = c.shutdown(Shutdown::Both);
                    continue;
                };
                let (mut c2, mut w2) = (c.try_clone().unwrap(), w.try_clone().unwrap());
                // Client → WebSocket.
                std::thread::spawn(move || {
                    let (mut c, mut w) = (c, w);
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if w.write_all(&frame(0x2, true, &buf[..n], true)).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = w.shutdown(Shutdown::Both);
                    let _ = c.shutdown(Shutdown::Both);
                });
                // WebSocket → client.
                std::thread::spawn(move || {
                    w2.set_read_timeout(None).unwrap();
                    while let Some((_, op, p)) = read_frame(&mut w2) {
                        match op {
                            0x2 | 0x0 if c2.write_all(&p).is_err() => break,
                            0x8 => break,
                            _ => {}
                        }
                    }
                    let _ = c2.shutdown(Shutdown::Both);
                    let _ = w2.shutdown(Shutdown::Both);
                });
            }
        });
        Bridge { addr }
    }
}
