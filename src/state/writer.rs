//! A shard's journal: the entries its work produces, and the rewrite that keeps the file from
//! growing without bound.

use super::journal::{Entry, Header};
use super::mapped::Appender;
use crate::session::Session;
use std::io;
use std::path::Path;

/// The journal is rewritten (compacted) once it has grown by this much, or by its own size
/// after the last rewrite, whichever is larger: the file stays within twice what it must hold
/// (plus 64 MiB), and each rewrite is paid for by at least as many bytes appended.
pub const COMPACT_MIN: u64 = 64 << 20;

fn compact_at(len: u64) -> u64 {
    len + COMPACT_MIN.max(len)
}

/// One shard's journal.
pub struct Journal {
    app: Appender,
    header: Header,
    window: usize,
    /// Rewrite once the file reaches this.
    compact_at: u64,
    /// Encoding buffer for records (reused).
    scratch: Vec<u8>,
    /// Entries and bytes appended (for the metrics).
    pub entries: u64,
}

impl Journal {
    /// A new journal file at `path` holding `initial` (encoded entries).
    pub fn create(
        path: &Path,
        header: Header,
        initial: &[u8],
        window: usize,
    ) -> io::Result<Journal> {
        let app = Appender::create(path, &header, initial, window)?;
        let compact_at = compact_at(app.len());
        Ok(Journal {
            app,
            header,
            window,
            compact_at,
            scratch: Vec::new(),
            entries: 0,
        })
    }

    /// The journal can no longer be kept up to date (a write failed): it is set aside as
    /// `.stale` so that a later start does not restore sessions from out-of-date counters
    /// (their clients could see input delivered twice); the sessions then end with this
    /// process, as the error said.
    pub fn set_aside(&self) {
        let to = self.app.path().with_extension("journal.stale");
        if let Err(e) = std::fs::rename(self.app.path(), &to) {
            tracing::error!(file = %self.app.path().display(), "cannot set the failed journal aside: {e}");
        }
    }

    /// Renames the file (see [`Appender::rename`]).
    pub fn rename(&mut self, to: &Path) -> io::Result<()> {
        self.app.rename(to)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        self.app.path()
    }

    /// Bytes in use.
    pub fn len(&self) -> u64 {
        self.app.len()
    }

    /// Whether only the header is there.
    pub fn is_empty(&self) -> bool {
        self.app.is_empty()
    }

    fn put(&mut self, e: &Entry<'_>) -> io::Result<()> {
        self.entries += 1;
        self.app.append(e)
    }

    /// A session's ids, counters and flags (at creation, after a resume, when the agent closed
    /// it): its ring is journaled frame by frame.
    pub fn meta(&mut self, s: &Session, now: u64, wall_ms: u64) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        s.write_meta_record(now, wall_ms, &mut buf);
        let r = self.put(&Entry::Meta(s.id(), &buf));
        self.scratch = buf;
        r
    }

    /// Agent output kept in the ring: `data` as frames of `piece` bytes from SEQ `first_seq`
    /// (as the session split it).
    pub fn output(
        &mut self,
        sid: u32,
        first_seq: u32,
        data: &[u8],
        piece: usize,
    ) -> io::Result<()> {
        let mut seq = first_seq;
        for p in data.chunks(piece.max(1)) {
            self.put(&Entry::Output {
                sid,
                seq,
                payload: p,
            })?;
            seq = seq.wrapping_add(1);
        }
        Ok(())
    }

    /// The session's counters (after input, acknowledgements, a resume).
    pub fn counters(&mut self, s: &Session) -> io::Result<()> {
        self.put(&Entry::Counters {
            sid: s.id(),
            next_seq: s.next_seq(),
            last_client_seq: s.last_client_seq(),
            acked: s.acked(),
        })
    }

    /// The session is gone.
    pub fn end(&mut self, sid: u32) -> io::Result<()> {
        self.put(&Entry::End(sid))
    }

    /// Client input held for the pod `key` (replacing what the journal said before for it).
    pub fn held(&mut self, key: (u32, u32), bytes: &[u8]) -> io::Result<()> {
        self.put(&Entry::Held { key, bytes })
    }

    /// Whether the file has grown enough to be rewritten.
    pub fn wants_compaction(&self) -> bool {
        self.app.len() >= self.compact_at
    }

    /// Rewrites the journal as one whole record per session (through a new file renamed into
    /// place) and appends there from now on. Returns the new size.
    pub fn compact<'a>(
        &mut self,
        sessions: impl Iterator<Item = &'a Session>,
        now: u64,
        wall_ms: u64,
    ) -> io::Result<u64> {
        let mut initial = Vec::new();
        let mut rec = std::mem::take(&mut self.scratch);
        for s in sessions {
            rec.clear();
            s.write_record(now, wall_ms, &mut rec);
            Entry::Record(s.id(), &rec).append_to(&mut initial);
        }
        self.scratch = rec;
        let path = self.app.path().to_path_buf();
        let tmp = path.with_extension("journal.new");
        let mut header = self.header;
        header.wall_ms = wall_ms;
        let mut app = Appender::create(&tmp, &header, &initial, self.window)?;
        app.rename(&path)?;
        self.app = app;
        self.header = header;
        self.compact_at = compact_at(self.app.len());
        Ok(self.app.len())
    }
}
