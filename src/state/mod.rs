//! The state dir (`--state-dir`): what lets sessions outlive the clawtermd process.
//!
//! - `lock`: held (flock) by the clawtermd serving the dir for its whole life, and holding its
//!   pid: a second daemon is refused, naming that pid and `--upgrade`.
//! - `FORMAT`: the state dir's format (`clawterm-state 1`); another is refused, never guessed
//!   at.
//! - `shard-N.journal`: shard N's sessions as a journal (see [`journal`]), appended through a
//!   memory-mapped window ([`mapped`]) as the shard works, so a crash loses nothing the shard
//!   had written.
//!
//! At start-up, [`StateDir::restore`] folds every journal into sessions, writes each shard a
//! fresh journal holding its share (a newer generation: until then the old files stand, so a
//! crash during start-up loses nothing either) and hands the sessions to the shards as
//! session records. See `docs/STATE.md`.

pub mod journal;
pub mod mapped;
mod writer;

pub use writer::Journal;

use crate::session::{IdSpace, Session};
use journal::{Entry, Fold, Header, JournalError};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The state dir format this code reads and writes.
pub const FORMAT: &str = "clawterm-state 1";

/// Why a state dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Another clawtermd holds it.
    #[error(
        "state dir {} is in use by a running clawtermd ({}); stop it first, or start this one with --upgrade to take its sessions over",
        dir.display(),
        match pid { Some(p) => format!("pid {p}"), None => "pid not yet written".to_string() }
    )]
    Held {
        /// The dir.
        dir: PathBuf,
        /// The holder's pid, if it wrote it already.
        pid: Option<u32>,
    },
    /// Written by an incompatible clawtermd.
    #[error(
        "state dir {} holds format {found:?}; this clawtermd reads {FORMAT:?} (a clawtermd of the matching version can read it; or move the dir away to start empty)",
        dir.display()
    )]
    Format {
        /// The dir.
        dir: PathBuf,
        /// What its FORMAT file says.
        found: String,
    },
    /// A journal cannot be read: refused whole rather than losing sessions silently.
    #[error(
        "state dir {}: {source} (the sessions in it cannot be restored; move the dir away to start empty)",
        path.display()
    )]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// What is wrong with it.
        source: JournalError,
    },
    /// Sessions whose ids this shard count cannot route.
    #[error(
        "state dir {} was written by a clawtermd with {was} shards; {sessions} of its sessions have ids that {now} shards cannot route: start with --shards {was}",
        dir.display()
    )]
    Shards {
        /// The dir.
        dir: PathBuf,
        /// The writer's shard count.
        was: u16,
        /// This process's.
        now: usize,
        /// Sessions that could not be placed.
        sessions: usize,
    },
    /// A file system error.
    #[error("state dir {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An open, locked state dir.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    /// Holds the flock for the life of the process (released by the kernel when it exits,
    /// however it exits).
    _lock: File,
}

/// What [`StateDir::restore`] found and did.
pub struct Restored {
    /// Per shard: its sessions as session records (read with the shard's own clock).
    pub records: Vec<Vec<Vec<u8>>>,
    /// Per shard: its journal, holding those sessions.
    pub journals: Vec<Journal>,
    /// Per shard: client input held for pods that were away, by pod (pod-link messages).
    pub held: Vec<Held>,
    /// Sessions restored.
    pub sessions: usize,
    /// Journal files read.
    pub files: usize,
    /// Ring bytes restored.
    pub ring_bytes: u64,
    /// Generation of the new journals.
    pub generation: u64,
    /// Time taken.
    pub took: std::time::Duration,
}

/// Client input held for pods that are away, by pod: whole pod-link messages, oldest first.
pub type Held = std::collections::HashMap<(u32, u32), Vec<u8>>;

/// Splits held input by the shard that owns each message's session.
fn held_by_shard(held: &Held, ids: IdSpace, shards: usize) -> Vec<Held> {
    let mut out: Vec<Held> = (0..shards).map(|_| Held::new()).collect();
    for (key, bytes) in held {
        let mut off = 0;
        while let Ok(crate::podlink::Decoded::Msg {
            session_id, used, ..
        }) = crate::podlink::decode(&bytes[off..])
        {
            let owner = ids.owner(session_id);
            if owner < shards {
                out[owner]
                    .entry(*key)
                    .or_default()
                    .extend_from_slice(&bytes[off..off + used]);
            }
            off += used;
        }
    }
    out
}

/// Milliseconds since the UNIX epoch.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The session clock used while folding (any value works; it only has to be well past 0 so
/// restored ages do not saturate).
const FOLD_NOW: u64 = 86_400_000;

impl StateDir {
    /// Opens `dir` (created if missing), takes its lock, and checks its format.
    pub fn open(dir: &Path) -> Result<StateDir, StateError> {
        // The dir holds resume tokens: the daemon's user alone reads it.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let lock_path = dir.join("lock");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        if let Err(e) =
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            if e == rustix::io::Errno::WOULDBLOCK {
                // The holder writes its pid right after taking the lock: give it a moment.
                // Until it has, the file may still name an earlier holder that has exited
                // (the pid stays behind when a process ends): only a live pid is the holder.
                let alive = |p: &u32| Path::new(&format!("/proc/{p}")).exists();
                let mut pid = None;
                for _ in 0..100 {
                    let mut s = String::new();
                    let _ = lock.rewind();
                    let _ = lock.read_to_string(&mut s);
                    pid = s.trim().parse::<u32>().ok().filter(alive);
                    if pid.is_some() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                return Err(StateError::Held {
                    dir: dir.to_path_buf(),
                    pid,
                });
            }
            return Err(StateError::Io {
                path: lock_path,
                source: e.into(),
            });
        }
        lock.set_len(0).map_err(io_err(&lock_path))?;
        lock.rewind().map_err(io_err(&lock_path))?;
        writeln!(lock, "{}", std::process::id()).map_err(io_err(&lock_path))?;
        let format_path = dir.join("FORMAT");
        match std::fs::read_to_string(&format_path) {
            Ok(s) if s.trim() == FORMAT => {}
            Ok(s) => {
                return Err(StateError::Format {
                    dir: dir.to_path_buf(),
                    found: s.trim().chars().take(80).collect(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::write(&format_path, format!("{FORMAT}\n"))
                    .map_err(io_err(&format_path))?;
            }
            Err(e) => return Err(io_err(&format_path)(e)),
        }
        Ok(StateDir {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// The state dir of a live upgrade: `lock` is the running clawtermd's lock, handed over
    /// (the same open file, so the flock is shared until that process exits). Checks the
    /// format and writes this process's pid into the lock file.
    pub fn with_lock(dir: &Path, lock: std::os::fd::OwnedFd) -> Result<StateDir, StateError> {
        let lock_path = dir.join("lock");
        let mut lock = File::from(lock);
        lock.set_len(0).map_err(io_err(&lock_path))?;
        lock.rewind().map_err(io_err(&lock_path))?;
        writeln!(lock, "{}", std::process::id()).map_err(io_err(&lock_path))?;
        let format_path = dir.join("FORMAT");
        let found = std::fs::read_to_string(&format_path).map_err(io_err(&format_path))?;
        if found.trim() != FORMAT {
            return Err(StateError::Format {
                dir: dir.to_path_buf(),
                found: found.trim().chars().take(80).collect(),
            });
        }
        Ok(StateDir {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// A new descriptor of the lock (a live upgrade hands it to the next process).
    pub fn lock_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        Ok(self._lock.try_clone()?.into())
    }

    /// The generation journals written now must carry: newer than any file there.
    pub fn next_generation(&self) -> Result<u64, StateError> {
        let mut generation = 0;
        for (path, _) in self.journal_files()? {
            let mut head = [0u8; journal::HEADER_LEN];
            if let Ok(mut f) = File::open(&path) {
                if f.read_exact(&mut head).is_ok() {
                    if let Ok(h) = Header::decode(&head) {
                        generation = generation.max(h.generation);
                    }
                }
            }
        }
        Ok(generation + 1)
    }

    /// A fresh journal for shard `shard` of `shards`, holding the sessions a live upgrade
    /// handed over (records whole) and the input held for pods that are away; written beside
    /// the old file and renamed over it. Shards are installed one by one as their parts
    /// arrive: a crash part way leaves generations side by side, and the newer records win
    /// on the next start.
    pub fn install_shard(
        &self,
        shard: usize,
        shards: usize,
        generation: u64,
        records: &[Vec<u8>],
        held: &Held,
        window: usize,
    ) -> Result<Journal, StateError> {
        // A record's session id is its first body field (after magic, version and length).
        let id = |r: &[u8]| {
            r.get(10..14)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let mut initial = Vec::new();
        for rec in records {
            Entry::Record(id(rec), rec).append_to(&mut initial);
        }
        for (key, bytes) in held {
            Entry::Held { key: *key, bytes }.append_to(&mut initial);
        }
        let header = Header {
            shard: shard as u16,
            shards: shards as u16,
            generation,
            wall_ms: wall_ms(),
        };
        let path = self.journal_path(shard).with_extension("journal.new");
        let mut j = Journal::create(&path, header, &initial, window).map_err(io_err(&path))?;
        let to = self.journal_path(shard);
        j.rename(&to).map_err(io_err(&to))?;
        Ok(j)
    }

    /// Writes one fresh journal per shard holding `(id, record)` entries, then renames them
    /// into place and removes journals of shards beyond `shards`.
    fn write_journals<'a>(
        &self,
        per_shard: impl Iterator<Item = Vec<(u32, &'a Vec<u8>)>>,
        held: &[Held],
        shards: usize,
        generation: u64,
        window: usize,
    ) -> Result<Vec<Journal>, StateError> {
        let wall = wall_ms();
        let old = self.journal_files()?;
        let mut journals = Vec::with_capacity(shards);
        for (i, list) in per_shard.enumerate() {
            let mut initial = Vec::new();
            for (id, rec) in list {
                Entry::Record(id, rec).append_to(&mut initial);
            }
            for (key, bytes) in held.get(i).into_iter().flatten() {
                Entry::Held { key: *key, bytes }.append_to(&mut initial);
            }
            let header = Header {
                shard: i as u16,
                shards: shards as u16,
                generation,
                wall_ms: wall,
            };
            let path = self.journal_path(i).with_extension("journal.new");
            journals.push(Journal::create(&path, header, &initial, window).map_err(io_err(&path))?);
        }
        // Every session is in the new journals: they replace the old ones (in any order: a
        // crash part way leaves older and newer generations side by side, and the newer
        // records win on the next start).
        for (i, j) in journals.iter_mut().enumerate() {
            let to = self.journal_path(i);
            j.rename(&to).map_err(io_err(&to))?;
        }
        for (path, i) in &old {
            if *i >= shards {
                std::fs::remove_file(path).map_err(io_err(path))?;
            }
        }
        Ok(journals)
    }

    /// The dir.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The journal file of shard `i`.
    pub fn journal_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("shard-{i}.journal"))
    }

    /// The journal files present, as (path, shard index).
    fn journal_files(&self) -> Result<Vec<(PathBuf, usize)>, StateError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let e = e.map_err(io_err(&self.dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(i) = name
                .strip_prefix("shard-")
                .and_then(|r| r.strip_suffix(".journal"))
                .and_then(|n| n.parse::<usize>().ok())
            {
                out.push((e.path(), i));
            }
        }
        Ok(out)
    }

    /// Folds every journal into sessions, gives each of `shards` shards a fresh journal with
    /// its share (ids route to their owner shard), removes what the new journals replace, and
    /// returns the sessions as records. `cap`: the most ring bytes a restored session keeps.
    pub fn restore(
        &self,
        shards: usize,
        cap: usize,
        window: usize,
    ) -> Result<Restored, StateError> {
        let started = Instant::now();
        let wall = wall_ms();
        // Headers first (64 bytes each), then one file at a time in memory.
        let mut files = Vec::new();
        for (path, i) in self.journal_files()? {
            let mut head = Vec::with_capacity(journal::HEADER_LEN);
            File::open(&path)
                .and_then(|f| f.take(journal::HEADER_LEN as u64).read_to_end(&mut head))
                .map_err(io_err(&path))?;
            let header = Header::decode(&head).map_err(|source| StateError::Journal {
                path: path.clone(),
                source,
            })?;
            files.push((header.generation, i, path));
        }
        // Older generations first: a newer file's sessions replace theirs.
        files.sort_by_key(|f| (f.0, f.1));
        let mut fold = Fold::default();
        let mut was_shards = shards as u16;
        let mut generation = 0;
        for (g, _, path) in &files {
            let bytes = std::fs::read(path).map_err(io_err(path))?;
            let h =
                fold.apply(&bytes, FOLD_NOW, wall, cap)
                    .map_err(|source| StateError::Journal {
                        path: path.clone(),
                        source,
                    })?;
            was_shards = h.shards;
            generation = generation.max(*g);
        }
        let ids = IdSpace::new(0, shards);
        let unroutable = fold
            .sessions
            .keys()
            .filter(|&&id| ids.owner(id) >= shards)
            .count();
        if unroutable > 0 {
            return Err(StateError::Shards {
                dir: self.dir.clone(),
                was: was_shards,
                now: shards,
                sessions: unroutable,
            });
        }
        let fold_held = fold.held();
        let mut per_shard: Vec<Vec<Session>> = (0..shards).map(|_| Vec::new()).collect();
        let sessions = fold.sessions.len();
        let mut ring_bytes = 0u64;
        for (id, mut s) in fold.sessions {
            s.restored(FOLD_NOW);
            ring_bytes += s.ring().payload_bytes() as u64;
            per_shard[ids.owner(id)].push(s);
        }
        let generation = generation + 1;
        let records: Vec<Vec<(u32, Vec<u8>)>> = per_shard
            .iter()
            .map(|list| {
                list.iter()
                    .map(|s| (s.id(), s.to_record(FOLD_NOW, wall)))
                    .collect()
            })
            .collect();
        let held = held_by_shard(&fold_held, ids, shards);
        let journals = self.write_journals(
            records
                .iter()
                .map(|l| l.iter().map(|(id, r)| (*id, r)).collect()),
            &held,
            shards,
            generation,
            window,
        )?;
        let records = records
            .into_iter()
            .map(|l| l.into_iter().map(|(_, r)| r).collect())
            .collect();
        Ok(Restored {
            records,
            journals,
            held,
            sessions,
            files: files.len(),
            ring_bytes,
            generation,
            took: started.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The dir and its files hold resume tokens: the daemon's user alone may read them; a
    /// second open of a held dir is refused naming the holder's pid.
    #[test]
    fn the_state_dir_is_private_and_exclusive() {
        let dir = std::env::temp_dir().join(format!("ct-state-perm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sd = StateDir::open(&dir).unwrap();
        let r = sd.restore(1, 1 << 20, 1 << 16).unwrap();
        assert_eq!(r.sessions, 0);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("lock")), 0o600);
        assert_eq!(mode(&sd.journal_path(0)), 0o600);
        match StateDir::open(&dir) {
            Err(StateError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("a held dir opened twice: {other:?}"),
        }
        drop(r);
        drop(sd);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
