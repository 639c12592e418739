//! The state journal: what one shard writes so that its sessions outlive the process.
//!
//! A journal file is a header followed by entries, appended as the shard works (through a
//! memory-mapped window, see [`super::mapped`]), so a crash — even SIGKILL — loses nothing the
//! shard had finished writing. This module is the format alone: encoding, decoding and folding
//! a journal back into sessions, with no file or clock of its own (tested without either).
//!
//! ```text
//! header (64 bytes): magic "CTSJ" | version u16 | shard u16 | shards u16 | generation u64
//!                    | created wall ms u64 | zeros
//! entry:             len u32 | kind u8 | session id u32 | body | CRC-32C u32
//!                    len counts kind..CRC; the CRC covers kind..body
//! kinds:  1 RECORD    body: a whole session record (CTSR, ring included)
//!         2 META      body: a session record without ring frames (ids, counters, flags)
//!         3 OUTPUT    body: seq u32 | payload — one frame of agent output, kept in the ring
//!         4 COUNTERS  body: next_seq u32 | last_client_seq u32 | acked u32 | has_acked u8
//!         5 END       body: empty — the session is gone
//!         6 HELD      (session id 0) body: tenant u32 | agent u32 | pod-link messages —
//!                     client input held for a pod that is away, replacing what this file
//!                     said before for that pod (empty: none any more)
//! ```
//!
//! The writer stores an entry's `len` last: an entry cut short by a crash still reads as
//! `len = 0`, the end of the journal. A non-zero `len` whose entry does not check out (CRC,
//! kind, size) is damage, refused with its offset rather than read past.

use crate::session::{RecordError, Session};
use crc::{Crc, CRC_32_ISCSI};
use std::collections::HashMap;

/// The journal's magic bytes.
pub const MAGIC: [u8; 4] = *b"CTSJ";
/// The journal format this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the file header.
pub const HEADER_LEN: usize = 64;
/// The largest entry body accepted (a record with a full ring may be large; 256 MiB bounds
/// what a damaged length can make the reader believe).
pub const MAX_BODY: usize = 256 << 20;

/// Slice-by-16 tables: every agent frame is checksummed on the shard's path.
const CRC32C: Crc<u32, crc::Table<16>> = Crc::<u32, crc::Table<16>>::new(&CRC_32_ISCSI);
/// kind u8 + session id u32.
const ENTRY_HEAD: usize = 1 + 4;

/// A journal file's header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The shard that wrote it.
    pub shard: u16,
    /// How many shards the writing process had.
    pub shards: u16,
    /// Grows with every rewrite of the state dir: a newer file's sessions replace an older's.
    pub generation: u64,
    /// When the file was started (UNIX ms).
    pub wall_ms: u64,
}

impl Header {
    /// The header's 64 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_be_bytes());
        h[6..8].copy_from_slice(&self.shard.to_be_bytes());
        h[8..10].copy_from_slice(&self.shards.to_be_bytes());
        h[10..18].copy_from_slice(&self.generation.to_be_bytes());
        h[18..26].copy_from_slice(&self.wall_ms.to_be_bytes());
        h
    }

    /// Reads a header.
    pub fn decode(b: &[u8]) -> Result<Header, JournalError> {
        if b.len() < HEADER_LEN {
            return Err(JournalError::Truncated { offset: 0 });
        }
        if b[..4] != MAGIC {
            return Err(JournalError::Magic);
        }
        let version = u16::from_be_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(JournalError::Version { found: version });
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(a)
        };
        Ok(Header {
            shard: u16::from_be_bytes([b[6], b[7]]),
            shards: u16::from_be_bytes([b[8], b[9]]),
            generation: u64_at(10),
            wall_ms: u64_at(18),
        })
    }
}

/// One journal entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry<'a> {
    /// A whole session record, ring included: replaces anything known of the session.
    Record(u32, &'a [u8]),
    /// A session record without its ring: replaces the session's ids, counters and flags and
    /// keeps its ring.
    Meta(u32, &'a [u8]),
    /// One frame of agent output.
    Output {
        /// The session.
        sid: u32,
        /// The frame's SEQ.
        seq: u32,
        /// The frame's payload.
        payload: &'a [u8],
    },
    /// The session's counters after a batch of client input or acknowledgements.
    Counters {
        /// The session.
        sid: u32,
        /// The SEQ the server's next frame takes.
        next_seq: u32,
        /// Newest client DATA SEQ received.
        last_client_seq: u32,
        /// Newest server SEQ acknowledged (`None`: none yet).
        acked: Option<u32>,
    },
    /// The session is gone.
    End(u32),
    /// Client input held for the pod (tenant, agent), as pod-link messages.
    Held {
        /// The pod.
        key: (u32, u32),
        /// Whole pod-link messages (empty: nothing held any more).
        bytes: &'a [u8],
    },
}

impl Entry<'_> {
    fn kind(&self) -> u8 {
        match self {
            Entry::Record(..) => 1,
            Entry::Meta(..) => 2,
            Entry::Output { .. } => 3,
            Entry::Counters { .. } => 4,
            Entry::End(_) => 5,
            Entry::Held { .. } => 6,
        }
    }

    fn sid(&self) -> u32 {
        match *self {
            Entry::Record(s, _) | Entry::Meta(s, _) | Entry::End(s) => s,
            Entry::Output { sid, .. } | Entry::Counters { sid, .. } => sid,
            Entry::Held { .. } => 0,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Entry::Record(_, b) | Entry::Meta(_, b) => b.len(),
            Entry::Output { payload, .. } => 4 + payload.len(),
            Entry::Counters { .. } => 13,
            Entry::End(_) => 0,
            Entry::Held { bytes, .. } => 8 + bytes.len(),
        }
    }

    /// Bytes the entry takes in the journal.
    pub fn encoded_len(&self) -> usize {
        4 + ENTRY_HEAD + self.body_len() + 4
    }

    /// Writes the entry into `out` (exactly [`Entry::encoded_len`] bytes), its length field
    /// last: until that store, the entry reads as the journal's end.
    pub fn write_to(&self, out: &mut [u8]) {
        let n = self.encoded_len();
        let out = &mut out[..n];
        let body = &mut out[4..n - 4];
        body[0] = self.kind();
        body[1..5].copy_from_slice(&self.sid().to_be_bytes());
        let rest = &mut body[ENTRY_HEAD..];
        match self {
            Entry::Record(_, b) | Entry::Meta(_, b) => rest.copy_from_slice(b),
            Entry::Output { seq, payload, .. } => {
                rest[..4].copy_from_slice(&seq.to_be_bytes());
                rest[4..].copy_from_slice(payload);
            }
            Entry::Counters {
                next_seq,
                last_client_seq,
                acked,
                ..
            } => {
                rest[..4].copy_from_slice(&next_seq.to_be_bytes());
                rest[4..8].copy_from_slice(&last_client_seq.to_be_bytes());
                rest[8..12].copy_from_slice(&acked.unwrap_or(0).to_be_bytes());
                rest[12] = u8::from(acked.is_some());
            }
            Entry::End(_) => {}
            Entry::Held { key, bytes } => {
                rest[..4].copy_from_slice(&key.0.to_be_bytes());
                rest[4..8].copy_from_slice(&key.1.to_be_bytes());
                rest[8..].copy_from_slice(bytes);
            }
        }
        let crc = CRC32C.checksum(body);
        out[n - 4..].copy_from_slice(&crc.to_be_bytes());
        // The length goes in after everything else, and the compiler must not move the stores
        // above below it: a process killed in between leaves a zero length, which reads as the
        // journal's end (another process reads the same memory, so program order is enough).
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::Release);
        out[..4].copy_from_slice(&((n - 4) as u32).to_be_bytes());
    }

    /// Appends the entry to `out`.
    pub fn append_to(&self, out: &mut Vec<u8>) {
        let at = out.len();
        out.resize(at + self.encoded_len(), 0);
        self.write_to(&mut out[at..]);
    }

    /// Reads the entry at the front of `b` (after the header). `Ok(None)`: the journal ends here
    /// (no more bytes, or a zero length: nothing, or an entry a crash cut short).
    pub fn read(b: &[u8], offset: u64) -> Result<Option<(Entry<'_>, usize)>, JournalError> {
        if b.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len == 0 {
            return Ok(None);
        }
        if !(ENTRY_HEAD + 4..=ENTRY_HEAD + MAX_BODY + 4).contains(&len) {
            return Err(JournalError::Damaged {
                offset,
                why: "entry length out of range",
            });
        }
        if b.len() < 4 + len {
            return Err(JournalError::Truncated { offset });
        }
        let body = &b[4..4 + len - 4];
        let crc = u32::from_be_bytes([b[len], b[len + 1], b[len + 2], b[len + 3]]);
        if CRC32C.checksum(body) != crc {
            return Err(JournalError::Damaged {
                offset,
                why: "CRC mismatch",
            });
        }
        let sid = u32::from_be_bytes([body[1], body[2], body[3], body[4]]);
        let rest = &body[ENTRY_HEAD..];
        let u32_at =
            |i: usize| u32::from_be_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
        let e = match body[0] {
            1 => Entry::Record(sid, rest),
            2 => Entry::Meta(sid, rest),
            3 if rest.len() >= 4 => Entry::Output {
                sid,
                seq: u32_at(0),
                payload: &rest[4..],
            },
            4 if rest.len() == 13 && rest[12] <= 1 => Entry::Counters {
                sid,
                next_seq: u32_at(0),
                last_client_seq: u32_at(4),
                acked: (rest[12] == 1).then(|| u32_at(8)),
            },
            5 if rest.is_empty() => Entry::End(sid),
            6 if rest.len() >= 8 && sid == 0 => Entry::Held {
                key: (u32_at(0), u32_at(4)),
                bytes: &rest[8..],
            },
            _ => {
                return Err(JournalError::Damaged {
                    offset,
                    why: "unknown entry kind or wrong body size",
                })
            }
        };
        Ok(Some((e, 4 + len)))
    }
}

/// Why a journal could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// Not a journal (wrong magic).
    #[error("not a clawterm state journal (bad magic)")]
    Magic,
    /// A journal of another format version.
    #[error("state journal format {found}; this clawtermd reads format {VERSION}")]
    Version {
        /// The version the file says it is.
        found: u16,
    },
    /// The file ends inside its header or inside an entry whose length was written.
    #[error("state journal truncated at byte {offset}")]
    Truncated {
        /// Where.
        offset: u64,
    },
    /// An entry that does not check out.
    #[error("state journal damaged at byte {offset}: {why}")]
    Damaged {
        /// Where.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// A session record inside the journal could not be read.
    #[error("state journal damaged at byte {offset}: {source}")]
    Record {
        /// Where.
        offset: u64,
        /// The record's error.
        source: RecordError,
    },
    /// Entries that do not fit together (output for a session never recorded…).
    #[error("state journal inconsistent at byte {offset}: {why}")]
    Inconsistent {
        /// Where.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
}

/// Sessions folded from journals, in the reader's session clock.
#[derive(Default)]
pub struct Fold {
    /// The sessions by id.
    pub sessions: HashMap<u32, Session>,
    /// Entries read.
    pub entries: u64,
    /// Bytes of agent output replayed into rings.
    pub output_bytes: u64,
    /// Client input held for pods that were away, per file folded and pod: see
    /// [`Fold::held`].
    held_by_file: Vec<HashMap<(u32, u32), Vec<u8>>>,
}

impl Fold {
    /// Applies one journal file (`bytes`, header included) on top of what is folded so far.
    /// `now`/`wall_ms`: the reader's session clock and wall clock (see
    /// [`Session::from_record`]); `cap`: the most ring bytes a restored session keeps.
    /// Returns the file's header.
    pub fn apply(
        &mut self,
        bytes: &[u8],
        now: u64,
        wall_ms: u64,
        cap: usize,
    ) -> Result<Header, JournalError> {
        let header = Header::decode(bytes)?;
        let mut off = HEADER_LEN;
        let mut held: HashMap<(u32, u32), Vec<u8>> = HashMap::new();
        let record = |b: &[u8], off: usize| -> Result<Session, JournalError> {
            let (s, used) =
                Session::from_record(b, now, wall_ms).map_err(|source| JournalError::Record {
                    offset: off as u64,
                    source,
                })?;
            if used != b.len() {
                return Err(JournalError::Damaged {
                    offset: off as u64,
                    why: "bytes after the session record",
                });
            }
            Ok(s)
        };
        while let Some((e, used)) = Entry::read(&bytes[off..], off as u64)? {
            self.entries += 1;
            let mismatch = JournalError::Inconsistent {
                offset: off as u64,
                why: "the record's session id is not the entry's",
            };
            match e {
                Entry::Record(sid, b) => {
                    let s = record(b, off)?;
                    if s.id() != sid {
                        return Err(mismatch);
                    }
                    self.sessions.insert(sid, s);
                }
                Entry::Meta(sid, b) => {
                    let meta = record(b, off)?;
                    if meta.id() != sid {
                        return Err(mismatch);
                    }
                    match self.sessions.get_mut(&sid) {
                        Some(s) => s.apply_meta(meta),
                        None => {
                            self.sessions.insert(sid, meta);
                        }
                    }
                }
                Entry::Output { sid, seq, payload } => {
                    let s = self
                        .sessions
                        .get_mut(&sid)
                        .ok_or(JournalError::Inconsistent {
                            offset: off as u64,
                            why: "output for a session with no record",
                        })?;
                    if payload.len() > crate::proto::MAX_PAYLOAD {
                        return Err(JournalError::Damaged {
                            offset: off as u64,
                            why: "output frame over the maximum payload",
                        });
                    }
                    s.restore_output(seq, payload, cap);
                    self.output_bytes += payload.len() as u64;
                }
                Entry::Counters {
                    sid,
                    next_seq,
                    last_client_seq,
                    acked,
                } => {
                    let s = self
                        .sessions
                        .get_mut(&sid)
                        .ok_or(JournalError::Inconsistent {
                            offset: off as u64,
                            why: "counters for a session with no record",
                        })?;
                    s.restore_counters(next_seq, last_client_seq, acked);
                }
                Entry::End(sid) => {
                    self.sessions.remove(&sid);
                }
                Entry::Held { key, bytes } => {
                    held.insert(key, bytes.to_vec());
                }
            }
            off += used;
        }
        self.held_by_file.push(held);
        Ok(header)
    }

    /// Client input held for each pod that was away, from every file folded (each file's
    /// last word for its pods), as whole pod-link messages of sessions that are still there.
    pub fn held(&self) -> HashMap<(u32, u32), Vec<u8>> {
        let mut out: HashMap<(u32, u32), Vec<u8>> = HashMap::new();
        for file in &self.held_by_file {
            for (key, bytes) in file {
                let mut off = 0;
                while let Ok(crate::podlink::Decoded::Msg {
                    session_id, used, ..
                }) = crate::podlink::decode(&bytes[off..])
                {
                    if self.sessions.contains_key(&session_id) {
                        out.entry(*key)
                            .or_default()
                            .extend_from_slice(&bytes[off..off + used]);
                    }
                    off += used;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{ResumeFrom, SessionConfig};

    struct Null(Vec<u8>);
    impl crate::session::Sink for Null {
        fn client(&mut self) -> &mut Vec<u8> {
            &mut self.0
        }
        fn pod(&mut self, _: u32, _: crate::podlink::Msg<'_>) {}
    }

    fn header() -> Header {
        Header {
            shard: 0,
            shards: 1,
            generation: 3,
            wall_ms: 1000,
        }
    }

    /// A session's life as a shard journals it — created, output, counters, more output, a
    /// resume, then the end of another session — folds back to the same session: ring,
    /// counters, token; the other session is gone.
    #[test]
    fn a_journal_folds_back_into_its_sessions() {
        let cfg = SessionConfig::default();
        let now = 86_400_000;
        let mut sink = Null(Vec::new());
        let mut s = Session::new(0x11, 7, 9, 0x03, [5; 16], now);
        s.accept(0x03, "peer", now, &mut sink);
        let mut j = header().encode().to_vec();
        let mut meta = Vec::new();
        s.write_meta_record(now, 1000, &mut meta);
        Entry::Meta(0x11, &meta).append_to(&mut j);
        let other = Session::new(0x21, 7, 9, 0, [6; 16], now);
        Entry::Record(0x21, &other.to_record(now, 1000)).append_to(&mut j);
        for chunk in [&b"one"[..], b"two", b"three"] {
            let first = s.next_seq();
            s.on_agent_data(chunk, now, &cfg, &mut sink);
            Entry::Output {
                sid: 0x11,
                seq: first,
                payload: chunk,
            }
            .append_to(&mut j);
        }
        // The client acknowledges "one" by resuming from it.
        let one = s.ring().front_seq().unwrap();
        s.detach(now, &cfg, &mut sink);
        s.resume(ResumeFrom::LastSeq(one), now, &cfg, &mut sink);
        Entry::Counters {
            sid: 0x11,
            next_seq: s.next_seq(),
            last_client_seq: s.last_client_seq(),
            acked: s.acked(),
        }
        .append_to(&mut j);
        Entry::End(0x21).append_to(&mut j);
        j.extend_from_slice(&[0; 64]); // the zero tail of a mapped file

        let mut f = Fold::default();
        let h = f.apply(&j, now, 1000, cfg.hard_ring_bytes()).unwrap();
        assert_eq!(h, header());
        assert_eq!(f.sessions.len(), 1);
        let r = &f.sessions[&0x11];
        assert_eq!(r.resume_token(), s.resume_token());
        assert_eq!(r.next_seq(), s.next_seq());
        assert_eq!(r.acked(), Some(one));
        let ring: Vec<(u32, Vec<u8>)> = r.ring().iter().map(|x| (x.seq, x.to_vec())).collect();
        let want: Vec<(u32, Vec<u8>)> = s.ring().iter().map(|x| (x.seq, x.to_vec())).collect();
        assert_eq!(ring, want);
        assert_eq!(ring.len(), 2);
        assert_eq!(f.output_bytes, 11);

        // A crash inside the last entry: its length was not stored yet, so it reads as the
        // end and everything before it stands.
        let mut torn = j.clone();
        let at = torn.len() - 64;
        let e = Entry::End(0x11);
        torn.truncate(at);
        let mut cut = vec![0u8; e.encoded_len()];
        e.write_to(&mut cut);
        cut[..4].copy_from_slice(&[0; 4]);
        torn.extend_from_slice(&cut);
        let mut f2 = Fold::default();
        f2.apply(&torn, now, 1000, cfg.hard_ring_bytes()).unwrap();
        assert_eq!(f2.sessions.len(), 1);

        // A damaged byte in an entry with its length stored is refused, with its offset.
        let mut bad = j.clone();
        bad[HEADER_LEN + 10] ^= 1;
        let err = Fold::default()
            .apply(&bad, now, 1000, cfg.hard_ring_bytes())
            .unwrap_err();
        assert!(
            matches!(err, JournalError::Damaged { offset: 64, .. }),
            "{err}"
        );
        // Cut inside an entry: truncated.
        let err = Fold::default()
            .apply(&j[..HEADER_LEN + 20], now, 1000, cfg.hard_ring_bytes())
            .unwrap_err();
        assert!(matches!(err, JournalError::Truncated { .. }), "{err}");
        // Another version.
        let mut v = j.clone();
        v[5] = 9;
        assert_eq!(
            Fold::default().apply(&v, now, 1000, 1 << 20).unwrap_err(),
            JournalError::Version { found: 9 }
        );
    }
}
