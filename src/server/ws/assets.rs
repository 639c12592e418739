//! The browser terminal page's files, read into memory once at start (the shard never touches
//! the disk while serving): every file under the web root (`--web-root`, by default the
//! page built in the source tree beside the binary or `/usr/share/clawterm/web`), or, when no
//! page was built, a built-in one that says how to build it.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// Largest page served (all files together).
const MAX_TOTAL: u64 = 32 << 20;
/// Most files read from a web root.
const MAX_FILES: usize = 256;

/// One file of the page.
#[derive(Debug, PartialEq, Eq)]
pub struct Asset {
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// The page's files by URL path (`/index.html`, `/app.js`, …).
#[derive(Debug, Default)]
pub struct Assets {
    files: HashMap<String, Asset>,
    /// Read from this directory (None: the built-in placeholder).
    pub root: Option<PathBuf>,
}

const PLACEHOLDER: &str = "<!doctype html>
<html><head><meta charset=\"utf-8\"><title>clawterm</title></head>
<body style=\"font-family: sans-serif; max-width: 40em; margin: 3em auto\">
<h1>clawterm</h1>
<p>The browser terminal page has not been built on this machine. Build it with
<code>scripts/build-web.sh</code> (Node.js and npm; packages come from the npm registry), then
restart <code>clawtermd</code> or point <code>--web-root</code> at
<code>clients/web/dist</code>.</p>
<p>The WebSocket endpoint itself is live at <code>/ws</code>.</p>
</body></html>
";

impl Assets {
    /// The built-in placeholder page.
    pub fn placeholder() -> Assets {
        let mut files = HashMap::new();
        files.insert(
            "/index.html".to_string(),
            Asset {
                content_type: "text/html; charset=utf-8",
                body: PLACEHOLDER.as_bytes().to_vec(),
            },
        );
        Assets { files, root: None }
    }

    /// Every regular file under `root` (subfolders included; hidden files and links skipped).
    pub fn load(root: &Path) -> io::Result<Assets> {
        let mut files = HashMap::new();
        let mut total = 0u64;
        let mut dirs = vec![root.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            let rd = std::fs::read_dir(&dir)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
            for entry in rd {
                let entry = entry?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with('.') {
                    continue;
                }
                let ft = entry.file_type()?;
                let path = entry.path();
                if ft.is_dir() {
                    dirs.push(path);
                    continue;
                }
                if !ft.is_file() {
                    continue;
                }
                if files.len() >= MAX_FILES {
                    return Err(io::Error::other(format!(
                        "{}: more than {MAX_FILES} files",
                        root.display()
                    )));
                }
                let body = std::fs::read(&path)?;
                total += body.len() as u64;
                if total > MAX_TOTAL {
                    return Err(io::Error::other(format!(
                        "{}: more than {} MiB of files",
                        root.display(),
                        MAX_TOTAL >> 20
                    )));
                }
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let url = format!("/{}", rel.to_string_lossy().replace('\\', "/"));
                files.insert(
                    url,
                    Asset {
                        content_type: content_type(name),
                        body,
                    },
                );
            }
        }
        if !files.contains_key("/index.html") {
            return Err(io::Error::other(format!(
                "{}: no index.html (build the page: scripts/build-web.sh)",
                root.display()
            )));
        }
        Ok(Assets {
            files,
            root: Some(root.to_path_buf()),
        })
    }

    /// The web root to use when none is configured: the page built in the source tree of this
    /// binary (`target/<profile>/clawtermd` → `clients/web/dist`), then the installed one.
    pub fn default_root() -> Option<PathBuf> {
        let exe = std::env::current_exe().ok()?;
        let mut candidates = Vec::new();
        if let Some(tree) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            candidates.push(tree.join("clients/web/dist"));
        }
        candidates.push(PathBuf::from("/usr/share/clawterm/web"));
        candidates
            .into_iter()
            .find(|p| p.join("index.html").is_file())
    }

    /// The file for a URL path (`/` is `/index.html`).
    pub fn get(&self, path: &str) -> Option<&Asset> {
        let path = if path == "/" { "/index.html" } else { path };
        self.files.get(path)
    }

    /// How many files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// No files (never, for a loaded root).
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}
