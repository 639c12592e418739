//! RFC 6455 framing for the server side, streaming and sans-IO: [`WsIn`] takes the bytes a
//! client sent (in any chunking) and yields the unmasked payload of its binary messages as one
//! byte stream (ClawTerm frames may be split across messages or share one), the control frames'
//! answers, and the close with its code when the client breaks a rule. It keeps no message
//! buffer: a data frame's payload is unmasked and passed on as it arrives, so an idle
//! WebSocket connection holds a few dozen bytes of state and nothing else. [`binary`] and
//! [`close`] encode what the server sends (unmasked, RFC 6455 §5.1). Header parsing and
//! encoding come from `tungstenite`.

use std::io::Cursor;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Why the server closes a WebSocket: the close code and its reason (sent to the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsClose {
    pub code: u16,
    pub reason: &'static str,
}

impl WsClose {
    const fn new(code: u16, reason: &'static str) -> WsClose {
        WsClose { code, reason }
    }
}

/// What the client's bytes amounted to, beyond the payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsState {
    /// Open: more may come.
    Open,
    /// The client sent a close frame (its code, if any); the answer is in `replies`. The
    /// connection ends once that is sent.
    PeerClosed(Option<u16>),
    /// The client broke a rule: the close frame that says so is in `replies`; the connection
    /// ends once it is sent, and nothing more is read.
    Failed(WsClose),
}

/// Largest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL: u64 = 125;

/// The decoder of one connection's client-to-server frames.
#[derive(Debug)]
pub struct WsIn {
    /// A header still arriving (at most 14 bytes).
    hdr: [u8; 14],
    hdr_len: u8,
    /// Payload bytes left in the current frame.
    remaining: u64,
    mask: [u8; 4],
    /// Position in the mask of the next payload byte.
    mask_pos: u8,
    /// The current frame is a control frame (its payload is collected in `control`).
    control: Option<Control>,
    /// A control frame's payload (allocated only while one is arriving).
    control_buf: Vec<u8>,
    /// A binary message is in progress (continuation frames may follow).
    in_message: bool,
    /// Bytes of the message in progress.
    message_len: u64,
    /// The largest message accepted.
    max_message: u64,
    /// Closed or failed: nothing more is decoded.
    done: bool,
}

impl WsIn {
    /// A decoder that refuses messages longer than `max_message` bytes (close 1009).
    pub fn new(max_message: u64) -> WsIn {
        WsIn {
            hdr: [0; 14],
            hdr_len: 0,
            remaining: 0,
            mask: [0; 4],
            mask_pos: 0,
            control: None,
            control_buf: Vec::new(),
            in_message: false,
            message_len: 0,
            max_message,
            done: false,
        }
    }

    /// Whether the connection's WebSocket has ended (closed or failed).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Decodes `data`: binary payload bytes are appended to `payload` (unmasked), frames the
    /// server must send in answer (pong, close) to `replies`.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        payload: &mut Vec<u8>,
        replies: &mut Vec<u8>,
    ) -> WsState {
        while !data.is_empty() && !self.done {
            if self.remaining == 0 {
                // A header: gather up to its full length, then parse it.
                let take = (14 - self.hdr_len as usize).min(data.len());
                let at = self.hdr_len as usize;
                self.hdr[at..at + take].copy_from_slice(&data[..take]);
                let mut cur = Cursor::new(&self.hdr[..at + take]);
                match FrameHeader::parse(&mut cur) {
                    Ok(None) => {
                        self.hdr_len += take as u8;
                        data = &data[take..];
                        continue;
                    }
                    Ok(Some((h, len))) => {
                        // Bytes of `data` that belonged to the header.
                        let used = cur.position() as usize - at;
                        data = &data[used..];
                        self.hdr_len = 0;
                        if let Err(c) = self.start_frame(&h, len) {
                            return self.fail(c, replies);
                        }
                        if len == 0 {
                            if let Some(st) = self.end_frame(replies) {
                                return st;
                            }
                        }
                    }
                    Err(_) => {
                        return self.fail(WsClose::new(1002, "malformed frame header"), replies);
                    }
                }
                continue;
            }
            let n = (self.remaining.min(data.len() as u64)) as usize;
            let (chunk, rest) = data.split_at(n);
            data = rest;
            self.remaining -= n as u64;
            let out = if self.control.is_some() {
                &mut self.control_buf
            } else {
                &mut *payload
            };
            let at = out.len();
            out.extend_from_slice(chunk);
            for b in &mut out[at..] {
                *b ^= self.mask[self.mask_pos as usize & 3];
                self.mask_pos = self.mask_pos.wrapping_add(1);
            }
            if self.remaining == 0 {
                if let Some(st) = self.end_frame(replies) {
                    return st;
                }
            }
        }
        WsState::Open
    }

    fn start_frame(&mut self, h: &FrameHeader, len: u64) -> Result<(), WsClose> {
        if h.rsv1 || h.rsv2 || h.rsv3 {
            return Err(WsClose::new(
                1002,
                "reserved bits set (no extension was agreed)",
            ));
        }
        let Some(mask) = h.mask else {
            return Err(WsClose::new(
                1002,
                "client frames must be masked (RFC 6455 5.1)",
            ));
        };
        self.mask = mask;
        self.mask_pos = 0;
        match h.opcode {
            OpCode::Control(c) => {
                if matches!(c, Control::Reserved(_)) {
                    return Err(WsClose::new(1002, "reserved control opcode"));
                }
                if !h.is_final || len > MAX_CONTROL {
                    return Err(WsClose::new(
                        1002,
                        "control frames are short and unfragmented",
                    ));
                }
                self.control = Some(c);
                self.control_buf = Vec::with_capacity(len as usize);
            }
            OpCode::Data(Data::Text) => {
                return Err(WsClose::new(
                    1003,
                    "ClawTerm frames travel in binary messages",
                ));
            }
            OpCode::Data(Data::Reserved(_)) => {
                return Err(WsClose::new(1002, "reserved data opcode"));
            }
            OpCode::Data(Data::Binary) => {
                if self.in_message {
                    return Err(WsClose::new(
                        1002,
                        "a new message before the last one ended",
                    ));
                }
                self.in_message = !h.is_final;
                self.message_len = len;
            }
            OpCode::Data(Data::Continue) => {
                if !self.in_message {
                    return Err(WsClose::new(1002, "a continuation frame outside a message"));
                }
                self.in_message = !h.is_final;
                self.message_len = self.message_len.saturating_add(len);
            }
        }
        if self.control.is_none() {
            if self.message_len > self.max_message {
                return Err(WsClose::new(1009, "message too big"));
            }
            if !self.in_message {
                self.message_len = 0;
            }
        }
        self.remaining = len;
        Ok(())
    }

    /// A frame's payload is complete: a control frame is acted on.
    fn end_frame(&mut self, replies: &mut Vec<u8>) -> Option<WsState> {
        let c = self.control.take()?;
        let body = std::mem::take(&mut self.control_buf);
        match c {
            Control::Ping => {
                frame(replies, OpCode::Control(Control::Pong), &body);
                None
            }
            Control::Pong | Control::Reserved(_) => None,
            Control::Close => {
                self.done = true;
                let code = match body.len() {
                    0 => None,
                    1 => {
                        return Some(
                            self.fail(WsClose::new(1002, "a close frame of one byte"), replies),
                        )
                    }
                    _ => Some(u16::from_be_bytes([body[0], body[1]])),
                };
                if let Some(code) = code {
                    if !valid_close_code(code) || std::str::from_utf8(&body[2..]).is_err() {
                        return Some(self.fail(WsClose::new(1002, "invalid close frame"), replies));
                    }
                }
                // Echo the code (RFC 6455 5.5.1), or a normal close.
                close(replies, code.unwrap_or(1000), "");
                Some(WsState::PeerClosed(code))
            }
        }
    }

    fn fail(&mut self, c: WsClose, replies: &mut Vec<u8>) -> WsState {
        self.done = true;
        self.control = None;
        self.control_buf = Vec::new();
        close(replies, c.code, c.reason);
        WsState::Failed(c)
    }
}

/// Close codes a peer may send (RFC 6455 7.4).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

fn frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    let h = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: None,
    };
    // Writing into a Vec cannot fail.
    let _ = h.format(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// Appends one binary message (the server's frames are not masked) holding `payload`.
pub fn binary(out: &mut Vec<u8>, payload: &[u8]) {
    frame(out, OpCode::Data(Data::Binary), payload);
}

/// Appends a close frame with `code` and `reason` (cut to fit a control frame).
pub fn close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut body = code.to_be_bytes().to_vec();
    let mut r = reason.as_bytes();
    if r.len() > 123 {
        r = &r[..123];
        while std::str::from_utf8(r).is_err() {
            r = &r[..r.len() - 1];
        }
    }
    body.extend_from_slice(r);
    frame(out, OpCode::Control(Control::Close), &body);
}

/// The header of a binary message of `len` bytes: the first `.1` bytes of `.0`.
pub fn binary_header(len: usize) -> ([u8; 10], usize) {
    let h = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode: OpCode::Data(Data::Binary),
        mask: None,
    };
    let mut buf = [0u8; 10];
    let mut cur = Cursor::new(&mut buf[..]);
    // At most 10 bytes for an unmasked header: it fits.
    let _ = h.format(len as u64, &mut cur);
    let n = cur.position() as usize;
    (buf, n)
}

#[cfg(test)]
mod tests;
