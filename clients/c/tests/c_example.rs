//! The C example (`examples/echo.c`) against a real `clawtermd` and `claw-agent echo`,
//! compiled with gcc: connect, echo, the connection dropped twice mid-stream with exact replay,
//! credentials exported and the session resumed from a second process; once built with
//! AddressSanitizer (no invalid access, no leak), once run under valgrind when it is installed
//! (no invalid access, no definite leak).

use clawterm_testkit as harness;
use harness::client::{hex, AGENT, TENANT, TOKEN};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory with the libraries as C programs link them (`libclawterm.so`, `libclawterm.a`,
/// as scripts/install-c.sh installs them), copied from what cargo built beside the test
/// binaries (`libclawterm_ffi.*`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/PROFILE/deps (where cargo builds a test's dependencies), then target/PROFILE.
    let deps = exe.parent().expect("deps dir").to_path_buf();
    let profile = deps.parent().expect("target dir").to_path_buf();
    let dir = profile.join("c-libs");
    std::fs::create_dir_all(&dir).expect("c-libs dir");
    for (from, to) in [
        ("libclawterm_ffi.so", "libclawterm.so"),
        ("libclawterm_ffi.a", "libclawterm.a"),
    ] {
        let src = [deps.join(from), profile.join(from)]
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{from} not built (cargo build -p clawterm-ffi)"));
        // A fresh name each time: a running test may be using the previous copy.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!("{to}.{}.{n}", std::process::id()));
        std::fs::copy(&src, &tmp).expect("copy the library");
        std::fs::rename(&tmp, dir.join(to)).expect("rename the library");
    }
    dir
}

fn gcc(out: &Path, extra: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    let st = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g"])
        .args(extra)
        .arg(root.join("examples/echo.c"))
        .arg("-I")
        .arg(root.join("include"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lclawterm", "-o"])
        .arg(out)
        .status()
        .expect("gcc (apt-get install gcc)");
    assert!(st.success(), "gcc failed");
}

struct Env {
    _server: harness::Proc,
    _agent: harness::Proc,
    addr: String,
    dir: harness::TempDir,
}

fn env() -> Env {
    let dir = harness::TempDir::with_sock("c-example");
    let sock = dir.sock();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).unwrap();
    let agent = harness::start_agent(&sock, TENANT, AGENT, &["echo"]);
    let mut cmd = harness::plaintext_clawtermd(&tokens, &sock);
    cmd.args(["--admin", "off", "--no-quic", "--no-ws", "--shards", "2"]);
    let (child, _lines, line) = harness::start_server(&mut cmd, "clawtermd");
    Env {
        _server: harness::Proc(child),
        _agent: agent,
        addr: harness::tcp_addr(&line).unwrap().to_string(),
        dir,
    }
}

fn run(wrapper: &[&str], exe: &Path, args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = Command::new(wrapper.first().copied().unwrap_or(exe.to_str().unwrap()))
        .args(wrapper.iter().skip(1))
        .args(if wrapper.is_empty() {
            vec![]
        } else {
            vec![exe.to_str().unwrap()]
        })
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run the C example");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{exe:?} {args:?} failed:\n{text}");
    text
}

fn example(wrapper: &[&str], exe: &Path, envs: &[(&str, &str)]) {
    let e = env();
    let creds = e.dir.path().join("creds.json");
    let token = hex(&TOKEN);
    let (t, a) = (TENANT.to_string(), AGENT.to_string());
    let out = run(
        wrapper,
        exe,
        &[&e.addr, &t, &a, &token, creds.to_str().unwrap()],
        envs,
    );
    assert!(out.contains("echo ok"), "{out}");
    assert!(out.contains("replay ok"), "{out}");
    assert!(out.contains("detached"), "{out}");
    let json = std::fs::read_to_string(&creds).unwrap();
    assert!(json.contains("\"resume_token\""), "{json}");
    // A second process resumes the session.
    let out = run(wrapper, exe, &["--resume", creds.to_str().unwrap()], envs);
    assert!(out.contains("resume ok"), "{out}");
    assert!(out.contains("errors ok"), "{out}");
}

#[test]
fn the_c_example_under_address_sanitizer() {
    let dir = harness::TempDir::new("c-asan");
    let exe = dir.path().join("echo-asan");
    gcc(
        &exe,
        &["-fsanitize=address,undefined", "-fno-omit-frame-pointer"],
    );
    example(
        &[],
        &exe,
        &[
            ("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1"),
            ("UBSAN_OPTIONS", "halt_on_error=1"),
        ],
    );
}

#[test]
fn the_c_example_under_valgrind() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("valgrind is not installed: the AddressSanitizer test covers memory errors");
        return;
    }
    let dir = harness::TempDir::new("c-valgrind");
    let exe = dir.path().join("echo");
    gcc(&exe, &["-O1"]);
    example(
        &[
            "valgrind",
            "--error-exitcode=3",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--quiet",
        ],
        &exe,
        &[],
    );
}

/// The pkg-config file (what scripts/install-c.sh installs) gives what a build needs: the
/// example compiles and links with `pkg-config --cflags --libs clawterm` against a prefix laid
/// out as the script lays it out (static and shared libraries, the header).
#[test]
fn the_pkg_config_file_builds_the_example() {
    if Command::new("pkg-config")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("pkg-config is not installed");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = harness::TempDir::new("c-pkgconfig");
    let prefix = dir.path().join("prefix");
    let (inc, lib) = (prefix.join("include"), prefix.join("lib"));
    std::fs::create_dir_all(lib.join("pkgconfig")).unwrap();
    std::fs::create_dir_all(&inc).unwrap();
    std::fs::copy(root.join("include/clawterm.h"), inc.join("clawterm.h")).unwrap();
    for f in ["libclawterm.so", "libclawterm.a"] {
        std::fs::copy(lib_dir().join(f), lib.join(f)).unwrap();
    }
    let pc = std::fs::read_to_string(root.join("clawterm.pc.in"))
        .unwrap()
        .replace("@PREFIX@", prefix.to_str().unwrap())
        .replace("@VERSION@", env!("CARGO_PKG_VERSION"));
    std::fs::write(lib.join("pkgconfig/clawterm.pc"), pc).unwrap();
    let flags = Command::new("pkg-config")
        .args(["--cflags", "--libs", "--static", "clawterm"])
        .env("PKG_CONFIG_PATH", lib.join("pkgconfig"))
        .output()
        .unwrap();
    assert!(flags.status.success(), "{flags:?}");
    let flags = String::from_utf8(flags.stdout).unwrap();
    assert!(flags.contains("-lclawterm"), "{flags}");
    // Static link: the program carries the library (no rpath needed to run it).
    let exe = dir.path().join("echo-static");
    let st = Command::new("gcc")
        .arg(root.join("examples/echo.c"))
        .args(["-o", exe.to_str().unwrap()])
        .arg(format!("-I{}", inc.display()))
        .arg(lib.join("libclawterm.a"))
        .args(
            flags
                .split_whitespace()
                .filter(|f| !f.starts_with("-I") && *f != "-lclawterm"),
        )
        .status()
        .unwrap();
    assert!(st.success(), "gcc with pkg-config's flags failed: {flags}");
    let out = Command::new(&exe).arg("--version-only").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains(&format!("libclawterm {}", env!("CARGO_PKG_VERSION"))));
}
