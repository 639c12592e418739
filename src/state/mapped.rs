//! Appending journal entries through a memory-mapped window of the journal file.
//!
//! A store into a `MAP_SHARED` mapping is in the file (the page cache; tmpfs in Kubernetes) the
//! moment it is made: when the process dies, even by SIGKILL, the kernel keeps it. So an entry
//! is durable against a crash as soon as [`Appender::append`] returns, at the cost of a memcpy —
//! no system call per entry. (A kernel crash or power loss is another matter: the state dir is
//! meant for tmpfs, which does not survive those either.)
//!
//! Only a window of the file is mapped (the tail being written): the mapped pages are all the
//! memory the journal costs the process, whatever the file's size or the number of sessions.
//! When an entry does not fit in the window, the file is extended and the window moves on.

use super::journal::{Entry, Header, HEADER_LEN};
use memmap2::{MmapMut, MmapOptions};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Default size of the mapped window.
pub const WINDOW: usize = 1 << 20;

/// Appends entries to one journal file.
pub struct Appender {
    path: PathBuf,
    file: File,
    map: MmapMut,
    /// File offset of the window's first byte (page-aligned).
    map_start: u64,
    /// File offset where the next entry goes.
    pos: u64,
    window: usize,
}

fn page() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions; it only reads a constant.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

impl Appender {
    /// Writes a new journal at `path`: the header, then `initial` (entries already encoded,
    /// e.g. every session's record), then maps its tail for appending. Callers write to a
    /// temporary name and rename it into place (see [`Appender::rename`]) so that a crash while
    /// writing leaves the previous file whole.
    pub fn create(
        path: &Path,
        header: &Header,
        initial: &[u8],
        window: usize,
    ) -> io::Result<Appender> {
        {
            // Resume tokens inside: the daemon's user alone reads it.
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(&header.encode())?;
            f.write_all(initial)?;
            f.flush()?;
        }
        Appender::open(path, (HEADER_LEN + initial.len()) as u64, window)
    }

    /// Renames the file (it stays open and mapped).
    pub fn rename(&mut self, to: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.path = to.to_path_buf();
        Ok(())
    }

    /// Opens an existing journal for appending at `pos` (where its entries end).
    pub fn open(path: &Path, pos: u64, window: usize) -> io::Result<Appender> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let window = window.max(page() as usize);
        let (map_start, map) = map_window(&file, pos, window)?;
        Ok(Appender {
            path: path.to_path_buf(),
            file,
            map,
            map_start,
            pos,
            window,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the entries end (the journal's size in use).
    pub fn len(&self) -> u64 {
        self.pos
    }

    /// Whether nothing follows the header.
    pub fn is_empty(&self) -> bool {
        self.pos <= HEADER_LEN as u64
    }

    /// Appends one entry; it survives the process from the moment this returns.
    pub fn append(&mut self, e: &Entry<'_>) -> io::Result<()> {
        let n = e.encoded_len();
        let mut at = (self.pos - self.map_start) as usize;
        // Room for the entry and the zero length after it (the journal's end marker).
        if at + n + 4 > self.map.len() {
            let size = self.window.max(n + 4 + page() as usize);
            let (start, map) = map_window(&self.file, self.pos, size)?;
            self.map = map;
            self.map_start = start;
            at = (self.pos - start) as usize;
        }
        e.write_to(&mut self.map[at..at + n]);
        self.pos += n as u64;
        Ok(())
    }
}

/// Maps `size` bytes of `file` from the page holding `pos`, extending the file (with zeros,
/// which read as the journal's end) to cover them.
fn map_window(file: &File, pos: u64, size: usize) -> io::Result<(u64, MmapMut)> {
    let start = pos & !(page() - 1);
    let end = start + (pos - start) + size as u64;
    let end = end.div_ceil(page()) * page();
    if file.metadata()?.len() < end {
        // Allocated, not just sized: a full tmpfs fails here with ENOSPC rather than with a
        // SIGBUS on the first store into the window.
        rustix::fs::fallocate(
            file,
            rustix::fs::FallocateFlags::empty(),
            start,
            end - start,
        )?;
    }
    // SAFETY: the mapping is of a journal file in the state dir, which this process holds
    // exclusively (the state dir's lock); no other process truncates or writes it while it is
    // mapped, so the memory stays valid and is only written through this `MmapMut`. The file
    // was extended above to cover the whole window, so no access faults with SIGBUS.
    let map = unsafe {
        MmapOptions::new()
            .offset(start)
            .len((end - start) as usize)
            .map_mut(file)?
    };
    Ok((start, map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::journal::Fold;

    fn header() -> Header {
        Header {
            shard: 0,
            shards: 1,
            generation: 1,
            wall_ms: 1,
        }
    }

    /// Entries appended through the window (across several window moves, one entry larger than
    /// the window) read back in order from the file; the file's zero tail ends the journal.
    #[test]
    fn appended_entries_read_back_across_window_moves() {
        let dir = std::env::temp_dir().join(format!("ct-mapped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("j");
        let mut a = Appender::create(&path, &header(), &[], 8192).unwrap();
        let big = vec![7u8; 20_000];
        let mut expect = Vec::new();
        for i in 0..500u32 {
            let payload: &[u8] = if i == 250 { &big } else { b"hello" };
            a.append(&Entry::Output {
                sid: 9,
                seq: i,
                payload,
            })
            .unwrap();
            expect.push((i, payload.len()));
        }
        let end = a.len();
        drop(a);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() as u64 >= end);
        let mut off = HEADER_LEN;
        let mut got = Vec::new();
        while let Some((e, used)) = Entry::read(&bytes[off..], off as u64).unwrap() {
            match e {
                Entry::Output { seq, payload, .. } => got.push((seq, payload.len())),
                other => panic!("{other:?}"),
            }
            off += used;
        }
        assert_eq!(got, expect);
        assert_eq!(off as u64, end);
        // Reopened for appending where it ended: the next entry follows.
        let mut a = Appender::open(&path, end, 8192).unwrap();
        a.append(&Entry::End(9)).unwrap();
        drop(a);
        let bytes = std::fs::read(&path).unwrap();
        let (e, _) = Entry::read(&bytes[end as usize..], end).unwrap().unwrap();
        assert_eq!(e, Entry::End(9));
        // Output for a session never recorded does not fold.
        assert!(Fold::default().apply(&bytes, 0, 0, 1 << 20).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
