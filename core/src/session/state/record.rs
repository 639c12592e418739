//! The session record: one session — ids, tokens, sequence counters, capabilities, state and
//! flags, timers, replay ring — as versioned bytes, so the same session can move to a new
//! process (live upgrade, restart from a state dir) or to another node (roaming) and carry on
//! exactly where it was. See `docs/ARCHITECTURE.md` ("The session record").
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! magic "CTSR" | version u16 | body length u32 | body | CRC-32C of everything before it (u32)
//! body (version 1):
//!   id u32 | tenant u32 | agent u32 | next_seq u32 | last_client_seq u32
//!   dropped_through u32 | acked_through u32 | caps u8 | state u8 | flags u16
//!   resume_token [16]
//!   wall_ms u64              the writer's wall clock (UNIX ms) when the record was made
//!   rx_age_ms u64            how long before wall_ms the last receive (or the suspension) was
//!   tx_age_ms u64            how long before wall_ms the last send was
//!   ack_check_in_ms u64      0 = no delivery check, else 1 + ms until it was due
//!   conn_dropped count u32, then that many SEQs (u32)
//!   ring frames u32, then per frame: seq u32 | len u32 | payload
//! ```
//!
//! Times are stored relative to the writer's wall clock, because the reader's session clock
//! (milliseconds since its shard started) is another one: [`Session::from_record`] takes the
//! reader's clock and wall clock, and ages every timer by the time that passed in between (a
//! restart after a crash, say), so a suspended session expires when it would have.
//!
//! A record is checked whole before anything is built from it: magic, version, length, CRC, the
//! state, the flag bits, payload lengths (never over the protocol's maximum) and that the ring
//! is in SEQ order. A record from another version is refused with [`RecordError::Version`],
//! never guessed at.

use super::{ReplayRing, Session, State, FLAGS_KNOWN};
use crate::proto::MAX_PAYLOAD;
use crc::{Crc, CRC_32_ISCSI};

/// The record's magic bytes.
pub const MAGIC: [u8; 4] = *b"CTSR";
/// The record version this code writes and reads.
pub const VERSION: u16 = 1;

const CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);
const HEAD: usize = 4 + 2 + 4;
const FIXED_BODY: usize = 7 * 4 + 1 + 1 + 2 + 16 + 4 * 8 + 4 + 4;

/// Why a record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Not a session record (wrong magic).
    #[error("not a session record (bad magic)")]
    Magic,
    /// A record of another format version.
    #[error("session record version {found}; this clawtermd reads version {VERSION}")]
    Version {
        /// The version the record says it is.
        found: u16,
    },
    /// Shorter than its header or its stated length.
    #[error("session record truncated")]
    Truncated,
    /// The checksum does not match: the bytes were damaged.
    #[error("session record damaged (CRC mismatch)")]
    Crc,
    /// Well-formed bytes that do not describe a valid session.
    #[error("session record invalid: {0}")]
    Invalid(&'static str),
}

impl Session {
    /// Appends this session's record to `out` (see the module documentation). `now` is the
    /// session clock (ms) and `wall_ms` the wall clock (UNIX ms) at the same instant.
    pub fn write_record(&self, now: u64, wall_ms: u64, out: &mut Vec<u8>) {
        self.write_record_with(now, wall_ms, true, out);
    }

    /// Appends this session's record without its ring (no frames): everything else of
    /// [`Session::write_record`]. A state journal writes this when a session's ids, counters or
    /// flags matter and its output is journaled frame by frame beside it (see
    /// [`Session::apply_meta`]).
    pub fn write_meta_record(&self, now: u64, wall_ms: u64, out: &mut Vec<u8>) {
        self.write_record_with(now, wall_ms, false, out);
    }

    fn write_record_with(&self, now: u64, wall_ms: u64, ring: bool, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let body = out.len();
        for v in [
            self.id,
            self.tenant,
            self.agent,
            self.next_seq,
            self.last_client_seq,
            self.dropped_through,
            self.acked_through,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.push(self.caps);
        out.push(match self.state {
            State::Attached => 0,
            State::Suspended => 1,
            State::Closed => 2,
        });
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.resume_token);
        let ack_check_in = if self.ack_check == 0 {
            0
        } else {
            self.ack_check.saturating_sub(now).saturating_add(1)
        };
        for v in [
            wall_ms,
            now.saturating_sub(self.last_rx),
            now.saturating_sub(self.last_tx),
            ack_check_in,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        let dropped: &[u32] = match &self.conn_dropped {
            Some(q) => q.as_slices().0,
            None => &[],
        };
        let dropped_tail: &[u32] = match &self.conn_dropped {
            Some(q) => q.as_slices().1,
            None => &[],
        };
        out.extend_from_slice(&((dropped.len() + dropped_tail.len()) as u32).to_be_bytes());
        for s in dropped.iter().chain(dropped_tail) {
            out.extend_from_slice(&s.to_be_bytes());
        }
        let frames = if ring { self.ring.len() } else { 0 };
        out.extend_from_slice(&(frames as u32).to_be_bytes());
        for rec in self.ring.iter().take(frames) {
            out.extend_from_slice(&rec.seq.to_be_bytes());
            let len_at = out.len();
            out.extend_from_slice(&[0; 4]);
            let at = out.len();
            rec.for_each_piece(|p| out.extend_from_slice(p));
            let n = (out.len() - at) as u32;
            out[len_at..len_at + 4].copy_from_slice(&n.to_be_bytes());
        }
        let body_len = (out.len() - body) as u32;
        out[len_at..len_at + 4].copy_from_slice(&body_len.to_be_bytes());
        let crc = CRC32C.checksum(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }

    /// This session's record (see [`Session::write_record`]).
    pub fn to_record(&self, now: u64, wall_ms: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD + FIXED_BODY + 4 + self.ring.heap_bytes());
        self.write_record(now, wall_ms, &mut out);
        out
    }

    /// Reads one record from the front of `bytes`: the session, and how many bytes the record
    /// took. `now` is the reader's session clock (ms) and `wall_ms` its wall clock (UNIX ms):
    /// every timer is aged by the wall-clock time since the record was written. The session is
    /// in the state it was written in (an ATTACHED one has no connection yet: the caller binds
    /// the connection that moved with it, or detaches it). Session times cannot go below 0: a
    /// reader whose clock reads less than a restored age (last receive, last send) gets that
    /// time at 0, and the timer it drives runs late by the difference, so a reader's session
    /// clock should start well along (e.g. a day) rather than at 0.
    pub fn from_record(
        bytes: &[u8],
        now: u64,
        wall_ms: u64,
    ) -> Result<(Session, usize), RecordError> {
        if bytes.len() < HEAD {
            return Err(if bytes.len() >= 4 && bytes[..4] != MAGIC {
                RecordError::Magic
            } else {
                RecordError::Truncated
            });
        }
        if bytes[..4] != MAGIC {
            return Err(RecordError::Magic);
        }
        let version = u16::from_be_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(RecordError::Version { found: version });
        }
        let body_len = u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]) as usize;
        let total = HEAD
            .checked_add(body_len)
            .and_then(|n| n.checked_add(4))
            .ok_or(RecordError::Truncated)?;
        if bytes.len() < total {
            return Err(RecordError::Truncated);
        }
        let crc_at = HEAD + body_len;
        let crc = u32::from_be_bytes([
            bytes[crc_at],
            bytes[crc_at + 1],
            bytes[crc_at + 2],
            bytes[crc_at + 3],
        ]);
        if CRC32C.checksum(&bytes[..crc_at]) != crc {
            return Err(RecordError::Crc);
        }
        let mut r = Reader {
            b: &bytes[HEAD..crc_at],
        };
        let id = r.u32()?;
        let tenant = r.u32()?;
        let agent = r.u32()?;
        let next_seq = r.u32()?;
        let last_client_seq = r.u32()?;
        let dropped_through = r.u32()?;
        let acked_through = r.u32()?;
        let caps = r.u8()?;
        let state = match r.u8()? {
            0 => State::Attached,
            1 => State::Suspended,
            2 => State::Closed,
            _ => return Err(RecordError::Invalid("unknown state")),
        };
        let flags = r.u16()?;
        if flags & !FLAGS_KNOWN != 0 {
            return Err(RecordError::Invalid("unknown flag bits"));
        }
        let mut resume_token = [0u8; 16];
        resume_token.copy_from_slice(r.take(16)?);
        if id == 0 {
            return Err(RecordError::Invalid("session id 0"));
        }
        let written_wall = r.u64()?;
        let rx_age = r.u64()?;
        let tx_age = r.u64()?;
        let ack_check_in = r.u64()?;
        let away = wall_ms.saturating_sub(written_wall);
        let n_dropped = r.u32()? as usize;
        if n_dropped > r.b.len() / 4 {
            return Err(RecordError::Truncated);
        }
        let conn_dropped = if n_dropped == 0 {
            None
        } else {
            let mut q = std::collections::VecDeque::with_capacity(n_dropped);
            for _ in 0..n_dropped {
                q.push_back(r.u32()?);
            }
            Some(Box::new(q))
        };
        let frames = r.u32()? as usize;
        if frames > r.b.len() / 8 {
            return Err(RecordError::Truncated);
        }
        let mut ring = ReplayRing::new();
        let mut prev: Option<u32> = None;
        for _ in 0..frames {
            let seq = r.u32()?;
            let len = r.u32()? as usize;
            if len > MAX_PAYLOAD {
                return Err(RecordError::Invalid("ring frame over the maximum payload"));
            }
            let payload = r.take(len)?;
            if prev.is_some_and(|p| !crate::proto::seq::gt(seq, p)) {
                return Err(RecordError::Invalid("ring frames out of SEQ order"));
            }
            prev = Some(seq);
            ring.append_unbounded(seq, payload);
        }
        if !r.b.is_empty() {
            return Err(RecordError::Invalid("bytes after the ring"));
        }
        let ago = |age: u64| now.saturating_sub(age.saturating_add(away));
        let session = Session {
            id,
            tenant,
            agent,
            next_seq,
            last_client_seq,
            dropped_through,
            acked_through,
            conn_dropped,
            caps,
            state,
            flags,
            resume_token,
            ring,
            last_rx: ago(rx_age),
            last_tx: ago(tx_age),
            ack_check: if ack_check_in == 0 {
                0
            } else {
                // Due when it was due, but never 0 (which means "none").
                now.saturating_add(ack_check_in - 1)
                    .saturating_sub(away)
                    .max(1)
            },
            armed: 0,
        };
        Ok((session, total))
    }
}

/// A cursor over a record's body.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.b.len() < n {
            return Err(RecordError::Truncated);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
}
