//! The Python package (`clients/python`, issue 17) under the README's test command: a virtual
//! environment in `target/pyvenv` gets the pinned build and test tools from PyPI
//! (`clients/python/requirements-dev.txt`), `pip install ./clients/python` builds the
//! extension from source (maturin, PyO3), and pytest runs its tests against this build's
//! `clawtermd` and `claw-agent` (shell and echo pods). Needs python3 with venv and pip.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command, what: &str) -> String {
    clawterm_testkit::run_ok(
        cmd,
        what,
        "needs python3 with venv: apt-get install python3-venv",
    )
}

#[test]
fn the_python_package_passes_pytest_against_the_real_server() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target/pyvenv");
    let py = venv.join("bin/python");
    // maturin (the build backend, installed in the venv) must be on PATH for pip.
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    if !py.exists() {
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv",
        );
    }
    run(
        Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(root.join("clients/python/requirements-dev.txt")),
        "pip install the test tools",
    );
    run(
        Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-build-isolation",
                "--force-reinstall",
                "--no-deps",
            ])
            .arg(root.join("clients/python"))
            .env("PATH", &path)
            .env("CARGO_TARGET_DIR", root.join("target/python")),
        "pip install ./clients/python",
    );
    let bins = Path::new(env!("CARGO_BIN_EXE_clawtermd"))
        .parent()
        .expect("the binaries' directory");
    let text = run(
        Command::new(&py)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(root.join("clients/python/tests"))
            .env("CLAWTERM_BIN_DIR", bins),
        "pytest",
    );
    eprintln!("{text}");
}
