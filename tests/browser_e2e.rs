//! The browser terminal (`clients/web`, issue 16) under the README's test command: the page is
//! built (`scripts/build-web.sh`: npm packages from the registry through the lock files, then
//! esbuild), and its test drives Debian's Chromium with playwright-core against this build's
//! `clawtermd` and `claw-agent shell` (clients/web/test/browser.test.mjs). Node, npm and
//! Chromium are required (`.ci/run` installs `nodejs`, `npm` and `chromium` when missing).

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command, what: &str) -> String {
    clawterm_testkit::run_ok(
        cmd,
        what,
        "install Node.js, npm and chromium: apt-get install nodejs npm chromium",
    )
}

#[test]
fn the_browser_terminal_survives_cuts_reloads_and_floods() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    run(
        Command::new("bash").arg(root.join("scripts/build-web.sh")),
        "scripts/build-web.sh",
    );
    let bins = Path::new(env!("CARGO_BIN_EXE_clawtermd"))
        .parent()
        .expect("the binaries' directory");
    let text = run(
        Command::new("npm")
            .args(["test", "--silent"])
            .current_dir(root.join("clients/web"))
            .env("CLAWTERM_BIN_DIR", bins),
        "the browser terminal's test",
    );
    assert!(text.contains("# fail 0"), "{text}");
    // The figures it measured (reported, not asserted).
    if let Some(line) = text.lines().find(|l| l.contains("# figures ")) {
        eprintln!("{line}");
    }
}
