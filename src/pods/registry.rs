//! The node-wide pod registry (POD-LINK §1 "Discovery").
//!
//! A pod serving tenant `T`, agent `A` listens on an `AF_UNIX` stream socket named `{T}_{A}` in
//! the shared socket directory. The registry scans that directory once at start-up and then
//! follows it with inotify (no polling) on a dedicated thread named `pod-registry`.
//!
//! Reads ([`Registry::contains`], [`Registry::len`], [`Registry::keys`]) are lock-free: the
//! watcher thread owns the authoritative state and publishes an immutable snapshot through an
//! [`ArcSwap`] after each batch of inotify events, *before* it reports the batch's events to the
//! callback. So once a `Removed(k)` event is delivered, `contains(k)` is already false (unless a
//! later event in the same batch re-added `k`).
//!
//! Identity: each registered socket is remembered by its `(dev, ino)`. A create/moved-in event
//! for a name whose socket is already registered with the same identity is a no-op (this absorbs
//! the race between adding the watch and the initial scan); a different identity means the pod's
//! socket was replaced, reported as `Removed` then `Added`.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

use arc_swap::ArcSwap;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

/// Identifies a pod: the tenant it serves and the agent it runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodKey {
    pub tenant: u32,
    pub agent: u32,
}

/// A change to the set of registered pods, reported after the initial scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodEvent {
    Added(PodKey),
    Removed(PodKey),
}

/// The callback the watcher thread reports [`PodEvent`]s to.
pub type OnEvent = Box<dyn Fn(PodEvent) + Send + Sync>;

type SharedOnEvent = Arc<dyn Fn(PodEvent) + Send + Sync>;

/// Parses a socket file name `{tenant}_{agent}`: both decimal `u32` without sign or leading
/// zeros (`"0_0"` is a pod name, `"07_1"` and `"1_01"` are not).
pub fn parse_pod_name(name: &str) -> Option<PodKey> {
    let (tenant, agent) = name.split_once('_')?;
    Some(PodKey {
        tenant: parse_u32_canonical(tenant)?,
        agent: parse_u32_canonical(agent)?,
    })
}

fn parse_u32_canonical(s: &str) -> Option<u32> {
    let bytes = s.as_bytes();
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if bytes.len() > 1 && bytes[0] == b'0' {
        return None;
    }
    s.parse().ok()
}

/// `(st_dev, st_ino)` of a registered socket file.
type FileId = (u64, u64);

/// What the directory holds under `name`, if it is a pod socket.
fn probe(dir: &Path, name: &OsStr) -> Option<(PodKey, Option<FileId>)> {
    let key = parse_pod_name(name.to_str()?)?;
    let id = match fs::symlink_metadata(dir.join(name)) {
        Ok(meta) if meta.file_type().is_socket() => Some((meta.dev(), meta.ino())),
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), name = ?name, error = %e, "pod registry: cannot stat socket");
            None
        }
    };
    Some((key, id))
}

/// All pod sockets currently in `dir`.
fn scan(dir: &Path) -> io::Result<HashMap<PodKey, FileId>> {
    let mut found = HashMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "pod registry: error reading directory entry");
                continue;
            }
        };
        if let Some((key, Some(id))) = probe(dir, &entry.file_name()) {
            found.insert(key, id);
        }
    }
    Ok(found)
}

/// State shared between the [`Registry`] handle and its watcher thread.
struct Shared {
    snapshot: ArcSwap<HashSet<PodKey>>,
    on_event: Mutex<Option<SharedOnEvent>>,
    stopping: AtomicBool,
}

impl Shared {
    fn callback(&self) -> MutexGuard<'_, Option<SharedOnEvent>> {
        // The callback slot holds no invariant a panic could break.
        self.on_event.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The node-wide set of reachable pods, kept in sync with the socket directory.
pub struct Registry {
    dir: PathBuf,
    shared: Arc<Shared>,
    /// Writing a byte here wakes the watcher thread up to stop (None: no watcher).
    wake: Option<UnixStream>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("dir", &self.dir)
            .field("pods", &self.len())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Creates `dir` if missing, scans it, starts the inotify watcher thread ("pod-registry"),
    /// and calls `on_event` from that thread for every change after the initial scan (a socket
    /// replaced by a new one = `Removed` then `Added`).
    pub fn start(dir: &Path, on_event: OnEvent) -> io::Result<Arc<Registry>> {
        Self::start_inner(dir, Some(Arc::from(on_event)))
    }

    /// Like [`Registry::start`], with no callback yet: set one later with
    /// [`Registry::set_on_event`]. Until then changes only update the registry.
    pub fn start_without_callback(dir: &Path) -> io::Result<Arc<Registry>> {
        Self::start_inner(dir, None)
    }

    fn start_inner(dir: &Path, on_event: Option<SharedOnEvent>) -> io::Result<Arc<Registry>> {
        fs::create_dir_all(dir)?;
        let inotify = Inotify::init()?;
        // Watch first, then scan: a socket created in between is seen by both, and the
        // identity check turns the duplicate into a no-op instead of missing it.
        let wd = inotify.watches().add(
            dir,
            WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::DELETE_SELF
                | WatchMask::MOVE_SELF
                | WatchMask::ONLYDIR,
        )?;
        let pods = scan(dir)?;
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(pods.keys().copied().collect()),
            on_event: Mutex::new(on_event),
            stopping: AtomicBool::new(false),
        });
        let (wake, wake_rx) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        tracing::info!(dir = %dir.display(), pods = pods.len(), "pod registry started");

        let mut watcher = Watcher {
            dir: dir.to_path_buf(),
            shared: Arc::clone(&shared),
            inotify,
            wd: Some(wd),
            wake_rx,
            pods,
        };
        let thread = thread::Builder::new()
            .name("pod-registry".into())
            .spawn(move || watcher.run())?;

        Ok(Arc::new(Registry {
            dir: dir.to_path_buf(),
            shared,
            wake: Some(wake),
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// A registry that watches nothing: its pods are whatever [`Registry::set_present`] says.
    /// For the simulated node (`server::sim`), where no thread, no inotify and no socket
    /// should take part. `dir` is only where pod sockets would be.
    pub fn detached(dir: &Path) -> Arc<Registry> {
        Arc::new(Registry {
            dir: dir.to_path_buf(),
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(HashSet::new()),
                on_event: Mutex::new(None),
                stopping: AtomicBool::new(false),
            }),
            wake: None,
            thread: Mutex::new(None),
        })
    }

    /// Registers or forgets a pod of a [`Registry::detached`] registry (of a watching one, the
    /// next directory change overrides it). Calls no callback.
    pub fn set_present(&self, key: PodKey, present: bool) {
        self.shared.snapshot.rcu(|pods| {
            let mut pods = HashSet::clone(pods);
            if present {
                pods.insert(key);
            } else {
                pods.remove(&key);
            }
            pods
        });
    }

    /// Sets or replaces the event callback. Changes seen while no callback is set only update
    /// the registry (read [`Registry::keys`] after setting it to catch up).
    /// After [`Registry::stop`] this is a no-op (`f` is dropped).
    pub fn set_on_event(&self, f: OnEvent) {
        let f: SharedOnEvent = Arc::from(f);
        let old = {
            let mut slot = self.shared.callback();
            if self.shared.stopping.load(Ordering::SeqCst) {
                return;
            }
            slot.replace(f)
        };
        drop(old); // outside the lock: its destructor may do anything
    }

    /// Removes the event callback.
    pub fn clear_on_event(&self) {
        let old = self.shared.callback().take();
        drop(old);
    }

    /// Lock-free: is a pod registered for `key`?
    pub fn contains(&self, key: PodKey) -> bool {
        self.shared.snapshot.load().contains(&key)
    }

    /// How many pods are registered.
    pub fn len(&self) -> usize {
        self.shared.snapshot.load().len()
    }

    /// Whether no pod is registered.
    pub fn is_empty(&self) -> bool {
        self.shared.snapshot.load().is_empty()
    }

    /// The registered pods, in no particular order.
    pub fn keys(&self) -> Vec<PodKey> {
        self.shared.snapshot.load().iter().copied().collect()
    }

    /// The socket directory this registry follows.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the watcher thread and waits for it (unless called from the watcher thread itself,
    /// i.e. from the event callback). The registry keeps answering from its last snapshot.
    /// The callback is dropped (breaking any reference cycle through it). Idempotent; also done
    /// on drop.
    pub fn stop(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            // Stopped before (e.g. `Server::shutdown`, then drop): the watcher is gone and its
            // end of the wake-up socket closed; nothing more to do.
            return;
        }
        let callback = self.shared.callback().take();
        drop(callback);
        // A full buffer already holds a wake-up, so WouldBlock is fine.
        if let Some(wake) = &self.wake {
            if let Err(e) = (&*wake).write(&[1]) {
                if e.kind() != io::ErrorKind::WouldBlock {
                    tracing::warn!(error = %e, "pod registry: cannot wake watcher thread");
                }
            }
        }
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            if handle.thread().id() == thread::current().id() {
                // Called from the callback: the thread sees `stopping` once the callback returns.
                return;
            }
            if handle.join().is_err() {
                tracing::warn!("pod registry: watcher thread panicked");
            }
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The watcher thread's state.
struct Watcher {
    dir: PathBuf,
    shared: Arc<Shared>,
    inotify: Inotify,
    /// `None` once the directory itself is gone (deleted, moved, unmounted).
    wd: Option<WatchDescriptor>,
    wake_rx: UnixStream,
    /// Authoritative state; `shared.snapshot` is published from it.
    pods: HashMap<PodKey, FileId>,
}

impl Watcher {
    fn run(&mut self) {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut backoff = false;
        while !self.shared.stopping.load(Ordering::SeqCst) {
            match self.wait(backoff) {
                Ok(Wake::Stop) => break,
                Ok(Wake::Timeout) => backoff = false,
                Ok(Wake::Inotify) => match self.drain(&mut buffer) {
                    Ok(()) => backoff = false,
                    Err(e) => {
                        tracing::warn!(dir = %self.dir.display(), error = %e, "pod registry: reading inotify events failed");
                        // Don't spin on a persistent error; wait a little before retrying.
                        backoff = true;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "pod registry: poll failed");
                    backoff = true;
                }
            }
        }
        tracing::info!(dir = %self.dir.display(), "pod registry stopped");
    }

    /// Blocks until inotify has events or a stop was requested (with `backoff`: at most 100 ms).
    fn wait(&self, backoff: bool) -> io::Result<Wake> {
        let timeout = if backoff { 100 } else { -1 };
        loop {
            let mut revents = [0i16; 2];
            let n = clawterm_poll::wait(
                &[
                    (self.inotify.as_fd(), libc::POLLIN),
                    (self.wake_rx.as_fd(), libc::POLLIN),
                ],
                &mut revents,
                timeout,
            )?;
            if n == 0 {
                return Ok(Wake::Timeout);
            }
            if revents[1] != 0 {
                let mut sink = [0u8; 16];
                let _ = (&self.wake_rx).read(&mut sink);
                if self.shared.stopping.load(Ordering::SeqCst) {
                    return Ok(Wake::Stop);
                }
            }
            if revents[0] != 0 {
                return Ok(Wake::Inotify);
            }
        }
    }

    /// Reads and applies every queued inotify event.
    fn drain(&mut self, buffer: &mut [u8]) -> io::Result<()> {
        loop {
            let mut changes = Vec::new();
            let mut rescan = false;
            let mut dir_gone = false;
            match self.inotify.read_events(buffer) {
                Ok(events) => {
                    for event in events {
                        if event.mask.contains(EventMask::Q_OVERFLOW) {
                            rescan = true;
                            continue;
                        }
                        if self.wd.as_ref() != Some(&event.wd) {
                            continue; // stale events of a watch already dropped
                        }
                        if event.mask.intersects(
                            EventMask::DELETE_SELF
                                | EventMask::MOVE_SELF
                                | EventMask::IGNORED
                                | EventMask::UNMOUNT,
                        ) {
                            dir_gone = true;
                            break;
                        }
                        if event.mask.contains(EventMask::ISDIR) {
                            continue;
                        }
                        let Some(name) = event.name else { continue };
                        if event
                            .mask
                            .intersects(EventMask::DELETE | EventMask::MOVED_FROM)
                        {
                            if let Some(key) = name.to_str().and_then(parse_pod_name) {
                                if self.pods.remove(&key).is_some() {
                                    changes.push(PodEvent::Removed(key));
                                }
                            }
                        } else if event
                            .mask
                            .intersects(EventMask::CREATE | EventMask::MOVED_TO)
                        {
                            if let Some((key, id)) = probe(&self.dir, name) {
                                self.upsert(key, id, &mut changes);
                            }
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if dir_gone {
                self.directory_gone(&mut changes);
            } else if rescan {
                tracing::warn!(dir = %self.dir.display(), "pod registry: inotify queue overflowed; rescanning");
                self.rescan(&mut changes);
            }
            self.publish(changes);
        }
    }

    /// A create/moved-in for `key`: `id` is what the directory holds now (`None`: no socket).
    fn upsert(&mut self, key: PodKey, id: Option<FileId>, changes: &mut Vec<PodEvent>) {
        match (self.pods.get(&key).copied(), id) {
            (Some(old), Some(new)) if old == new => {}
            (Some(_), Some(new)) => {
                changes.push(PodEvent::Removed(key));
                changes.push(PodEvent::Added(key));
                self.pods.insert(key, new);
            }
            (None, Some(new)) => {
                changes.push(PodEvent::Added(key));
                self.pods.insert(key, new);
            }
            (Some(_), None) => {
                // Replaced by something that is not a socket.
                changes.push(PodEvent::Removed(key));
                self.pods.remove(&key);
            }
            // Not a socket, or already gone again (its delete event follows).
            (None, None) => {}
        }
    }

    fn rescan(&mut self, changes: &mut Vec<PodEvent>) {
        let found = match scan(&self.dir) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "pod registry: rescan failed");
                return;
            }
        };
        let gone: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|key| !found.contains_key(key))
            .copied()
            .collect();
        for key in gone {
            self.pods.remove(&key);
            changes.push(PodEvent::Removed(key));
        }
        for (key, id) in found {
            self.upsert(key, Some(id), changes);
        }
    }

    /// The watched directory was deleted, moved away or unmounted: no pod is reachable.
    fn directory_gone(&mut self, changes: &mut Vec<PodEvent>) {
        tracing::error!(dir = %self.dir.display(), pods = self.pods.len(), "pod registry: socket directory removed or moved; all pods dropped");
        if let Some(wd) = self.wd.take() {
            // After a move the watch is still live; after a delete the kernel has dropped it.
            let _ = self.inotify.watches().remove(wd);
        }
        changes.extend(self.pods.drain().map(|(key, _)| PodEvent::Removed(key)));
    }

    /// Publishes the snapshot, then reports `changes` in order to the callback that was set
    /// when the snapshot was published: a callback set afterwards (one that may already see
    /// these pods in the snapshot) gets only later changes, never a stale one.
    fn publish(&self, changes: Vec<PodEvent>) {
        if changes.is_empty() {
            return;
        }
        // Cloned out of the lock, so the callback may call `set_on_event` itself.
        let callback = self.shared.callback().clone();
        self.shared
            .snapshot
            .store(Arc::new(self.pods.keys().copied().collect()));
        for change in changes {
            match &change {
                PodEvent::Added(key) => {
                    tracing::info!(tenant = key.tenant, agent = key.agent, "pod added")
                }
                PodEvent::Removed(key) => {
                    tracing::info!(tenant = key.tenant, agent = key.agent, "pod removed")
                }
            }
            if let Some(callback) = &callback {
                if catch_unwind(AssertUnwindSafe(|| callback(change.clone()))).is_err() {
                    tracing::warn!(event = ?change, "pod registry: event callback panicked");
                }
            }
        }
    }
}

enum Wake {
    Inotify,
    Stop,
    Timeout,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A detached registry lists what it is told, runs no thread and stops cleanly.
    #[test]
    fn detached_registry_lists_what_it_is_told() {
        let r = Registry::detached(Path::new("/nonexistent/sockets"));
        let k = PodKey {
            tenant: 7,
            agent: 42,
        };
        assert!(!r.contains(k));
        r.set_present(k, true);
        assert!(r.contains(k));
        assert_eq!(r.keys(), vec![k]);
        r.set_present(k, false);
        assert!(r.is_empty());
        r.stop();
        r.stop();
    }

    #[test]
    fn parses_canonical_names_only() {
        assert_eq!(
            parse_pod_name("0_0"),
            Some(PodKey {
                tenant: 0,
                agent: 0
            })
        );
        assert_eq!(
            parse_pod_name("4294967295_10"),
            Some(PodKey {
                tenant: u32::MAX,
                agent: 10
            })
        );
        for bad in [
            "",
            "_",
            "0",
            "07_1",
            "1_01",
            "1_",
            "_1",
            "a_b",
            "1_2_3",
            "+1_2",
            "4294967296_1",
        ] {
            assert_eq!(parse_pod_name(bad), None, "{bad:?}");
        }
    }
}
