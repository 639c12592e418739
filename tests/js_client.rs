//! The TypeScript client library (`clients/js`, issue 16) under the README's test command: its
//! own tests (Node's built-in runner) run here: the codec against the project's vectors, the
//! sans-IO core, and sessions against this build's `clawtermd` and `claw-agent echo` over TCP
//! and WebSocket. Its packages
//! come from the npm registry, pinned by `clients/js/package-lock.json` (`npm ci`, run here
//! when `node_modules` is missing or older than the lock file). Node and npm are required
//! (`.ci/run` installs Debian's `nodejs` and `npm` when they are missing).

use std::path::Path;
use std::process::Command;

fn npm(dir: &Path, args: &[&str]) -> (bool, String) {
    // The session tests run this build's clawtermd and claw-agent.
    let bins = Path::new(env!("CARGO_BIN_EXE_clawtermd"))
        .parent()
        .expect("the binaries' directory");
    let out = Command::new("npm")
        .args(args)
        .current_dir(dir)
        .env("CLAWTERM_BIN_DIR", bins)
        .output()
        .unwrap_or_else(|e| {
            panic!("npm {args:?}: {e} (install Node.js and npm: apt-get install nodejs npm)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn typescript_library_passes_its_tests_against_the_vectors_and_the_real_server() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js");
    let modules = dir.join("node_modules");
    let lock = dir.join("package-lock.json");
    let stale = match (modules.metadata(), lock.metadata()) {
        (Ok(m), Ok(l)) => match (m.modified(), l.modified()) {
            (Ok(m), Ok(l)) => m < l,
            _ => true,
        },
        _ => true,
    };
    if stale {
        let (ok, text) = npm(&dir, &["ci", "--no-audit", "--no-fund"]);
        assert!(ok, "npm ci failed:\n{text}");
    }
    let (ok, text) = npm(&dir, &["test"]);
    assert!(ok, "the TypeScript library's tests failed:\n{text}");
    assert!(text.contains("# fail 0"), "{text}");
}
