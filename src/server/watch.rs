//! Reloads files when they change: a thread watching their directories with inotify (the
//! tokens file and the TLS certificate are replaced in place or by rename, as Kubernetes does
//! with Secret volumes, so the directory is watched, not the file).

use inotify::{Inotify, WatchMask};
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Calls `on_change(path)` (from a thread named `file-watch`) whenever one of `files` is
/// written, created or moved into place. Runs for the life of the process.
pub fn watch(
    files: Vec<PathBuf>,
    on_change: impl Fn(&Path) + Send + 'static,
) -> std::io::Result<()> {
    let mut inotify = Inotify::init()?;
    let mut names: HashMap<inotify::WatchDescriptor, Vec<(OsString, PathBuf)>> = HashMap::new();
    for f in files {
        let dir = f
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let Some(name) = f.file_name().map(|n| n.to_os_string()) else {
            continue;
        };
        let wd = inotify.watches().add(
            &dir,
            WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE,
        )?;
        names.entry(wd).or_default().push((name, f));
    }
    // Kubernetes swaps a `..data` symlink; any event in the directory re-checks the files.
    std::thread::Builder::new()
        .name("file-watch".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let events = match inotify.read_events_blocking(&mut buf) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!("file watch stopped: {e}");
                        return;
                    }
                };
                let mut changed: Vec<PathBuf> = Vec::new();
                for ev in events {
                    let Some(list) = names.get(&ev.wd) else {
                        continue;
                    };
                    for (name, path) in list {
                        let hit = match ev.name {
                            Some(n) => {
                                n == name.as_os_str() || n.to_string_lossy().starts_with("..")
                            }
                            None => false,
                        };
                        if hit && !changed.contains(path) {
                            changed.push(path.clone());
                        }
                    }
                }
                for p in changed {
                    on_change(&p);
                }
            }
        })?;
    Ok(())
}
