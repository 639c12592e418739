//! The live-upgrade hand-off format: what a running clawtermd and the `--upgrade` one that
//! takes over say to each other on `DIR/upgrade.sock` (a Unix stream socket; descriptors
//! travel with SCM_RIGHTS on the message that names them). Plain encoding and decoding, no
//! socket: fuzzed (`fuzz/fuzz_targets/upgrade_wire.rs`) and tested without one.
//!
//! ```text
//! message:  len u32 | type u8 | body          len counts type + body; at most MAX_MESSAGE
//! 0x01 HELLO    new → old  "CTUP" | version u16 | pid u32 | shards u16
//! 0x02 ACCEPT   old → new  version u16 | shards u16 | tcp u16 | udp u16 | udp_steered u8 |
//!                          open u32 (the old one's descriptor table size: the new one makes room
//!                          for them before its threads start)
//!                          fds: the state dir's lock, then `tcp` listeners, then `udp` sockets
//! 0x03 REFUSE   old → new  reason (UTF-8): nothing was handed over, the old one serves on
//! 0x04 START    new → old  (empty): the new one's shards run (accepting paused): freeze and
//!                          send; FAILED instead: nothing moved, the old one serves on
//! 0x10 SESSION  old → new  shard u16 | session record (CTSR, ring included)
//! 0x11 CONN     old → new  shard u16 | session u32 (0: before CONNECT/RESUME) | peer (u16 len,
//!                          UTF-8) | unread (u32 len, bytes) | unsent (u32 len, bytes);  fd: 1
//! 0x12 LINK     old → new  shard u16 | tenant u32 | agent u32 | hello seen u8 | unread (u32
//!                          len, bytes) | unsent (u32 len, bytes);  fd: 1
//! 0x13 HELD     old → new  shard u16 | tenant u32 | agent u32 | pod-link messages: client
//!                          input held for a pod that is away (its link does not move)
//! 0x1E SHARD    old → new  shard u16 | sessions u32 | conns u32 | links u32: that shard's
//!                          part is complete (its sessions can be served at once)
//! 0x1F DONE     old → new  sessions u32 | conns u32 | links u32
//! 0x22 SHARD_IN new → old  shard u16: that shard serves its part in the new process; the old
//!                          one freezes the next shard only then
//! 0x20 READY    new → old  (empty): the new one serves; the old releases what it kept, exits
//! 0x21 FAILED   new → old  reason (UTF-8)
//! ```
//!
//! HELLO's first six bytes never change, so any two versions can tell each other apart: a
//! HELLO of another version is answered with REFUSE before anything moves.

/// HELLO's magic.
pub const MAGIC: [u8; 4] = *b"CTUP";
/// The hand-off format this code speaks.
/// 2: START, SHARD and SHARD_IN (the new process runs its shards before the freeze; the
/// shards move one at a time, each served by the new process as soon as its part is in).
pub const VERSION: u16 = 2;
/// Largest message (a session record with a full ring fits many times over).
pub const MAX_MESSAGE: usize = 64 << 20;

/// One message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    Hello {
        version: u16,
        pid: u32,
        shards: u16,
    },
    Accept {
        version: u16,
        shards: u16,
        tcp: u16,
        udp: u16,
        udp_steered: bool,
        open: u32,
    },
    Refuse(&'a str),
    Start,
    Session {
        shard: u16,
        record: &'a [u8],
    },
    Conn {
        shard: u16,
        sid: u32,
        peer: &'a str,
        unread: &'a [u8],
        unsent: &'a [u8],
    },
    Link {
        shard: u16,
        tenant: u32,
        agent: u32,
        hello_seen: bool,
        unread: &'a [u8],
        unsent: &'a [u8],
    },
    Held {
        shard: u16,
        tenant: u32,
        agent: u32,
        bytes: &'a [u8],
    },
    ShardEnd {
        shard: u16,
        sessions: u32,
        conns: u32,
        links: u32,
    },
    Done {
        sessions: u32,
        conns: u32,
        links: u32,
    },
    Ready,
    Failed(&'a str),
    ShardIn {
        shard: u16,
    },
}

/// Why bytes are not a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("hand-off message too short")]
    Short,
    #[error("hand-off message of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("unknown hand-off message type {0:#04x}")]
    Type(u8),
    #[error("not a clawtermd hand-off (bad magic)")]
    Magic,
    #[error("hand-off message {0:#04x} malformed: {1}")]
    Malformed(u8, &'static str),
}

impl Msg<'_> {
    /// How many descriptors travel with the message.
    pub fn fds(&self) -> usize {
        match self {
            Msg::Accept { tcp, udp, .. } => 1 + *tcp as usize + *udp as usize,
            Msg::Conn { .. } | Msg::Link { .. } => 1,
            _ => 0,
        }
    }

    fn ty(&self) -> u8 {
        match self {
            Msg::Hello { .. } => 0x01,
            Msg::Accept { .. } => 0x02,
            Msg::Refuse(_) => 0x03,
            Msg::Start => 0x04,
            Msg::Session { .. } => 0x10,
            Msg::Conn { .. } => 0x11,
            Msg::Link { .. } => 0x12,
            Msg::Held { .. } => 0x13,
            Msg::ShardEnd { .. } => 0x1E,
            Msg::Done { .. } => 0x1F,
            Msg::Ready => 0x20,
            Msg::Failed(_) => 0x21,
            Msg::ShardIn { .. } => 0x22,
        }
    }

    /// Appends the message (length prefix included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        out.push(self.ty());
        let bytes = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        };
        match self {
            Msg::Hello {
                version,
                pid,
                shards,
            } => {
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&pid.to_be_bytes());
                out.extend_from_slice(&shards.to_be_bytes());
            }
            Msg::Accept {
                version,
                shards,
                tcp,
                udp,
                udp_steered,
                open,
            } => {
                for v in [*version, *shards, *tcp, *udp] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
                out.push(u8::from(*udp_steered));
                out.extend_from_slice(&open.to_be_bytes());
            }
            Msg::Refuse(r) | Msg::Failed(r) => out.extend_from_slice(r.as_bytes()),
            Msg::Session { shard, record } => {
                out.extend_from_slice(&shard.to_be_bytes());
                out.extend_from_slice(record);
            }
            Msg::Conn {
                shard,
                sid,
                peer,
                unread,
                unsent,
            } => {
                out.extend_from_slice(&shard.to_be_bytes());
                out.extend_from_slice(&sid.to_be_bytes());
                let p = &peer.as_bytes()[..peer.len().min(u16::MAX as usize)];
                out.extend_from_slice(&(p.len() as u16).to_be_bytes());
                out.extend_from_slice(p);
                bytes(out, unread);
                bytes(out, unsent);
            }
            Msg::Link {
                shard,
                tenant,
                agent,
                hello_seen,
                unread,
                unsent,
            } => {
                out.extend_from_slice(&shard.to_be_bytes());
                out.extend_from_slice(&tenant.to_be_bytes());
                out.extend_from_slice(&agent.to_be_bytes());
                out.push(u8::from(*hello_seen));
                bytes(out, unread);
                bytes(out, unsent);
            }
            Msg::Held {
                shard,
                tenant,
                agent,
                bytes,
            } => {
                out.extend_from_slice(&shard.to_be_bytes());
                out.extend_from_slice(&tenant.to_be_bytes());
                out.extend_from_slice(&agent.to_be_bytes());
                out.extend_from_slice(bytes);
            }
            Msg::Done {
                sessions,
                conns,
                links,
            } => {
                for v in [*sessions, *conns, *links] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Msg::ShardEnd {
                shard,
                sessions,
                conns,
                links,
            } => {
                out.extend_from_slice(&shard.to_be_bytes());
                for v in [*sessions, *conns, *links] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Msg::ShardIn { shard } => out.extend_from_slice(&shard.to_be_bytes()),
            Msg::Ready | Msg::Start => {}
        }
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// The length a message's 4-byte prefix announces, checked against [`MAX_MESSAGE`].
    pub fn announced(prefix: [u8; 4]) -> Result<usize, WireError> {
        let n = u32::from_be_bytes(prefix) as usize;
        if n == 0 {
            return Err(WireError::Short);
        }
        if n > MAX_MESSAGE {
            return Err(WireError::TooLarge(n));
        }
        Ok(n)
    }
}

/// A cursor over a message body.
struct Rd<'a> {
    b: &'a [u8],
    ty: u8,
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Malformed(self.ty, "truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Malformed(self.ty, "boolean not 0 or 1")),
        }
    }
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self, n: usize) -> Result<&'a str, WireError> {
        let b = self.take(n)?;
        std::str::from_utf8(b).map_err(|_| WireError::Malformed(self.ty, "text not UTF-8"))
    }
    fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed(self.ty, "bytes after the body"))
        }
    }
}

/// Decodes one message from `b` (its type byte and body, without the length prefix).
pub fn decode(b: &[u8]) -> Result<Msg<'_>, WireError> {
    let (&ty, body) = b.split_first().ok_or(WireError::Short)?;
    let mut r = Rd { b: body, ty };
    let m = match ty {
        0x01 => {
            if r.take(4)? != MAGIC {
                return Err(WireError::Magic);
            }
            let version = r.u16()?;
            if version != VERSION {
                // Whatever follows belongs to another version's layout.
                return Ok(Msg::Hello {
                    version,
                    pid: 0,
                    shards: 0,
                });
            }
            Msg::Hello {
                version,
                pid: r.u32()?,
                shards: r.u16()?,
            }
        }
        0x02 => Msg::Accept {
            version: r.u16()?,
            shards: r.u16()?,
            tcp: r.u16()?,
            udp: r.u16()?,
            udp_steered: r.bool()?,
            open: r.u32()?,
        },
        0x03 => Msg::Refuse(r.str(body.len())?),
        0x04 => Msg::Start,
        0x10 => Msg::Session {
            shard: r.u16()?,
            record: r.take(body.len() - 2.min(body.len()))?,
        },
        0x11 => {
            let shard = r.u16()?;
            let sid = r.u32()?;
            let n = r.u16()? as usize;
            Msg::Conn {
                shard,
                sid,
                peer: r.str(n)?,
                unread: r.bytes()?,
                unsent: r.bytes()?,
            }
        }
        0x12 => Msg::Link {
            shard: r.u16()?,
            tenant: r.u32()?,
            agent: r.u32()?,
            hello_seen: r.bool()?,
            unread: r.bytes()?,
            unsent: r.bytes()?,
        },
        0x13 => {
            let shard = r.u16()?;
            let tenant = r.u32()?;
            let agent = r.u32()?;
            let n = r.b.len();
            Msg::Held {
                shard,
                tenant,
                agent,
                bytes: r.take(n)?,
            }
        }
        0x1E => Msg::ShardEnd {
            shard: r.u16()?,
            sessions: r.u32()?,
            conns: r.u32()?,
            links: r.u32()?,
        },
        0x1F => Msg::Done {
            sessions: r.u32()?,
            conns: r.u32()?,
            links: r.u32()?,
        },
        0x20 => Msg::Ready,
        0x21 => Msg::Failed(r.str(body.len())?),
        0x22 => Msg::ShardIn { shard: r.u16()? },
        t => return Err(WireError::Type(t)),
    };
    if !matches!(m, Msg::Hello { version, .. } if version != VERSION) {
        r.end()?;
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips_and_damage_is_an_error() {
        let msgs = [
            Msg::Hello {
                version: VERSION,
                pid: 42,
                shards: 3,
            },
            Msg::Accept {
                version: VERSION,
                shards: 3,
                tcp: 3,
                udp: 0,
                udp_steered: false,
                open: 10_000,
            },
            Msg::Refuse("no"),
            Msg::Start,
            Msg::Session {
                shard: 1,
                record: b"CTSR...",
            },
            Msg::Conn {
                shard: 2,
                sid: 77,
                peer: "127.0.0.1:5000",
                unread: b"abc",
                unsent: b"",
            },
            Msg::Link {
                shard: 0,
                tenant: 1,
                agent: 2,
                hello_seen: true,
                unread: b"",
                unsent: b"xyz",
            },
            Msg::Held {
                shard: 1,
                tenant: 7,
                agent: 9,
                bytes: b"held",
            },
            Msg::ShardEnd {
                shard: 2,
                sessions: 1,
                conns: 2,
                links: 3,
            },
            Msg::Done {
                sessions: 1,
                conns: 2,
                links: 3,
            },
            Msg::Ready,
            Msg::Failed("why"),
            Msg::ShardIn { shard: 1 },
        ];
        for m in &msgs {
            let mut out = Vec::new();
            m.encode(&mut out);
            let n = Msg::announced(out[..4].try_into().unwrap()).unwrap();
            assert_eq!(n, out.len() - 4);
            assert_eq!(&decode(&out[4..]).unwrap(), m);
            // Every truncation is an error, never a panic or a wrong message.
            for cut in 0..out.len() - 4 {
                if let Ok(d) = decode(&out[4..4 + cut]) {
                    assert_ne!(&d, m, "a truncated {m:?} decoded as itself");
                }
            }
        }
        // A HELLO of another version is recognised as such whatever follows it.
        let mut out = Vec::new();
        Msg::Hello {
            version: VERSION,
            pid: 1,
            shards: 1,
        }
        .encode(&mut out);
        out[9..11].copy_from_slice(&7u16.to_be_bytes());
        out.truncate(11);
        assert!(matches!(
            decode(&out[4..]),
            Ok(Msg::Hello { version: 7, .. })
        ));
        assert_eq!(decode(&[0x99]), Err(WireError::Type(0x99)));
        assert_eq!(
            Msg::announced((MAX_MESSAGE as u32 + 1).to_be_bytes()),
            Err(WireError::TooLarge(MAX_MESSAGE + 1))
        );
    }
}
