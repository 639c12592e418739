//! `clawterm-testkit`: the process and socket plumbing shared by the integration tests and the
//! measurement tools in `bench/`: temporary directories, children stopped on drop, starting
//! `clawtermd` and `claw-agent` and waiting for their "listening" lines, a TCP proxy the tests
//! can cut, /proc readers, the client-library helpers in [`session`], and the test
//! environments of the client ([`client`]) and TLS ([`tls`]) tests.
//!
//! The binaries (`clawtermd`, `claw-agent`, `clawterm`) are found by [`bin`]: in
//! `$CLAWTERM_BIN_DIR` if set, otherwise in the target directory of the running executable
//! (`target/PROFILE/`, whether it runs from `target/PROFILE/deps/` as a test or from
//! `target/PROFILE/` as a tool). `cargo test -p clawterm` builds them first; anything else must
//! `cargo build` (or `cargo build --release`) them.
//!
//! Protocol-specific helpers (raw frame codecs for hostile input) stay in the support modules
//! of the tests that use them.

#![allow(dead_code)]

pub mod client;
pub mod cluster;
pub mod session;
pub mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Directories

/// A unique path in the temporary directory, with nothing there (not created).
pub fn temp_path(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "ct-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A unique temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let d = temp_path(tag);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    /// A new directory with an (empty) `sock` subdirectory for the pods' sockets.
    pub fn with_sock(tag: &str) -> TempDir {
        let d = TempDir::new(tag);
        std::fs::create_dir_all(d.sock()).unwrap();
        d
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The `sock` subdirectory.
    pub fn sock(&self) -> PathBuf {
        self.0.join("sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Children

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid; no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits for a child to exit, up to `t`.
pub fn wait_timeout(child: &mut Child, t: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + t;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stops a child unless it has exited: SIGTERM, then SIGKILL after 3 s.
pub fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(child.id(), libc::SIGTERM);
    if wait_timeout(child, Duration::from_secs(3)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A child process stopped (SIGTERM, then SIGKILL) on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        stop(&mut self.0);
    }
}

/// Start times (clock ticks after boot) of the processes a test has looked at, by pid: pids
/// wrap quickly here (`pid_max` 32768 and a busy CI), so a pid that died can belong to an
/// unrelated new process a moment later.
static SEEN: std::sync::Mutex<Option<std::collections::HashMap<i32, u64>>> =
    std::sync::Mutex::new(None);

/// State letter and start time of `pid`, from `/proc/PID/stat`.
fn proc_state(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3 of stat(5), starttime field 22.
    let state = f.first()?.chars().next()?;
    let start = f.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Remembers which process `pid` is now, so that [`dead`] can tell it from a later process
/// that gets the same pid. Call it as soon as a test learns a pid; [`dead`] does it on first
/// sight otherwise.
pub fn remember(pid: i32) -> i32 {
    if let Some((_, start)) = proc_state(pid) {
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        seen.get_or_insert_with(Default::default)
            .entry(pid)
            .or_insert(start);
    }
    pid
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet, or the pid now belongs to
/// another process than the one [`remember`]ed).
pub fn dead(pid: i32) -> bool {
    let Some((state, start)) = proc_state(pid) else {
        return true;
    };
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let first = *seen
        .get_or_insert_with(Default::default)
        .entry(pid)
        .or_insert(start);
    first != start || state == 'Z' || state == 'X'
}

/// Waits until process `pid` is [`dead`]; panics after `within`.
pub fn wait_dead(pid: i32, within: Duration) {
    let deadline = Instant::now() + within;
    while !dead(pid) {
        assert!(Instant::now() < deadline, "process {pid} still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `cond` holds, up to `t`; returns whether it did.
pub fn wait_until(t: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + t;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `cmd` to completion and returns its stdout and stderr together; panics with `what`
/// and that output if it fails, or with `missing` (what to install) if it cannot start.
pub fn run_ok(cmd: &mut Command, what: &str, missing: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} ({missing})"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// `loadgen`, built beside `clawtermd` (`cargo build [--release] -p loadgen`); panics saying so
/// when it is not there.
pub fn loadgen_bin() -> PathBuf {
    bin("clawtermd")
        .parent()
        .map(|d| d.join("loadgen"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| panic!("loadgen not built: cargo build [--release] -p loadgen"))
}

/// A binary of the `clawterm` package: `$CLAWTERM_BIN_DIR/NAME` if that variable is set,
/// otherwise `NAME` in the running executable's target directory (`target/PROFILE/`, found from
/// `target/PROFILE/deps/TEST-HASH`, `target/PROFILE/examples/NAME` or `target/PROFILE/NAME`).
/// Panics, saying what to build, if it is not there.
pub fn bin(name: &str) -> PathBuf {
    if !matches!(
        name,
        "clawtermd" | "claw-agent" | "clawterm" | "clawtermctl"
    ) {
        panic!("no binary {name:?} in the clawterm package");
    }
    if let Some(d) = std::env::var_os("CLAWTERM_BIN_DIR") {
        let p = PathBuf::from(d).join(name);
        assert!(
            p.exists(),
            "{} not found (CLAWTERM_BIN_DIR is set): build it there first",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("the path of the running executable");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if matches!(
        dir.file_name().and_then(|n| n.to_str()),
        Some("deps" | "examples")
    ) {
        dir.pop();
    }
    let p = dir.join(name);
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_string();
    let flag = if profile == "release" {
        " --release"
    } else {
        ""
    };
    assert!(
        p.exists(),
        "{} not found: run `cargo build{flag} -p clawterm --bins` first (or set CLAWTERM_BIN_DIR)",
        p.display()
    );
    p
}

/// A shared log of a child's output lines.
pub type Lines = Arc<Mutex<Vec<String>>>;

/// Collects the lines of a child's stream on a thread; `on_line` sees each line first.
pub fn collect_lines(
    from: impl Read + Send + 'static,
    on_line: impl FnMut(&str) + Send + 'static,
) -> Lines {
    let lines = Lines::default();
    collect_lines_into(from, &lines, on_line);
    lines
}

/// Like [`collect_lines`], into an existing log (e.g. one shared by stdout and stderr).
pub fn collect_lines_into(
    from: impl Read + Send + 'static,
    lines: &Lines,
    mut on_line: impl FnMut(&str) + Send + 'static,
) {
    let lines = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            on_line(&line);
            lines.lock().unwrap().push(line);
        }
    });
}

/// Prints the last lines of a log when the current thread is failing.
pub fn dump_on_panic(what: &str, lines: &Mutex<Vec<String>>) {
    if std::thread::panicking() {
        let l = lines.lock().unwrap();
        eprintln!("---- last {} lines of {what} stderr ----", l.len().min(40));
        for line in &l[l.len().saturating_sub(40)..] {
            eprintln!("{line}");
        }
    }
}

/// The word after `key` in `line`.
pub fn word_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let i = line.find(key)?;
    line[i + key.len()..].split_whitespace().next()
}

/// The TCP address in `clawtermd`'s "listening on tcp ADDR ..." line.
pub fn tcp_addr(line: &str) -> Option<SocketAddr> {
    word_after(line, "listening on tcp ")?.parse().ok()
}

/// The QUIC address in `clawtermd`'s "listening on tcp ADDR ... and quic ADDR, ..." line.
pub fn quic_addr(line: &str) -> Option<SocketAddr> {
    word_after(line, " and quic ")?
        .trim_end_matches(',')
        .parse()
        .ok()
}

/// The WebSocket address in `clawtermd`'s "listening on tcp ADDR ..., websocket ADDR, ..." line.
pub fn ws_addr(line: &str) -> Option<SocketAddr> {
    word_after(line, ", websocket ")?
        .trim_end_matches(',')
        .parse()
        .ok()
}

/// A `clawtermd` command (no arguments yet) without the caller's `CLAWTERM*` settings, with
/// stdin and stdout null and stderr piped, for [`start_server`].
pub fn clawtermd() -> Command {
    let mut cmd = Command::new(bin("clawtermd"));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    clear_clawterm_env(&mut cmd);
    cmd
}

/// [`clawtermd`] `--bind 127.0.0.1 --port 0 --insecure-plaintext --tokens TOKENS --socket-dir
/// SOCK`: add the rest.
pub fn plaintext_clawtermd(tokens: &Path, sock: &Path) -> Command {
    let mut cmd = clawtermd();
    cmd.args(["--bind", "127.0.0.1", "--port", "0", "--insecure-plaintext"])
        .arg("--tokens")
        .arg(tokens)
        .arg("--socket-dir")
        .arg(sock);
    cmd
}

/// Removes every `CLAWTERM*` variable of this process's environment (`CLAWTERM_<OPTION>`
/// settings, `CLAWTERMD_*` test hooks) from `cmd`'s.
pub fn clear_clawterm_env(cmd: &mut Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("CLAWTERM") {
            cmd.env_remove(k);
        }
    }
}

/// Spawns a server (stderr piped), collects its stderr lines and waits up to 10 s for its
/// "listening on tcp" line. Returns the child, the lines, and that line; if the line does not
/// come, kills the child and panics with `what` and the stderr so far.
pub fn start_server(cmd: &mut Command, what: &str) -> (Child, Lines, String) {
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let (tx, rx) = mpsc::channel();
    let lines = collect_lines(child.stderr.take().unwrap(), move |line| {
        if line.contains("listening on tcp ") {
            let _ = tx.send(line.to_string());
        }
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) => (child, lines, line),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not report a listening address; stderr: {:?}",
                lines.lock().unwrap()
            );
        }
    }
}

/// `claw-agent -s SOCK --tenant T --agent A MODE...`, stdin null, stdout piped (for
/// [`wait_agent_listening`]), stderr null, `RUST_LOG=warn`.
pub fn agent_command(sock: &Path, tenant: u32, agent: u32, mode: &[&str]) -> Command {
    let mut cmd = Command::new(bin("claw-agent"));
    cmd.arg("-s")
        .arg(sock)
        .args([
            "--tenant",
            &tenant.to_string(),
            "--agent",
            &agent.to_string(),
        ])
        .args(mode)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd
}

/// Waits (bounded) for a `claw-agent`'s "listening on" line on its piped stdout, which it
/// prints once its socket accepts connections; panics if the agent exits first.
pub fn wait_agent_listening(child: &mut Child) {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("claw-agent's stdout piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains("listening on") {
                let _ = tx.send(());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if rx.recv_timeout(Duration::from_millis(20)).is_ok() {
            return;
        }
        if let Ok(Some(s)) = child.try_wait() {
            panic!("claw-agent exited early: {s}");
        }
        assert!(
            Instant::now() < deadline,
            "claw-agent never said it was listening"
        );
    }
}

/// Starts `claw-agent` ([`agent_command`]) and waits until it is listening.
pub fn start_agent(sock: &Path, tenant: u32, agent: u32, mode: &[&str]) -> Proc {
    let child = agent_command(sock, tenant, agent, mode)
        .spawn()
        .expect("spawn claw-agent");
    let mut p = Proc(child);
    wait_agent_listening(&mut p.0);
    p
}

/// The first line a child writes to its piped stdout within `t` (empty if none).
pub fn first_line(child: &mut Child, t: Duration) -> String {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(t).unwrap_or_default()
}

/// Runs `f` for every item, all of them even when some fail; returns one
/// "[`label(item)`] message" per failure.
pub fn failures_of<C: Copy>(
    items: &[C],
    label: impl Fn(C) -> String,
    f: impl Fn(C),
) -> Vec<String> {
    let mut failures = Vec::new();
    for &c in items {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(c)));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            failures.push(format!("[{}] {msg}", label(c)));
        }
    }
    failures
}

// ---------------------------------------------------------------------------------------------
// Bytes

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether `n` occurs in `h`.
pub fn contains(h: &[u8], n: &[u8]) -> bool {
    h.windows(n.len()).any(|w| w == n)
}

/// How often `n` occurs in `h` (overlapping occurrences counted).
pub fn count(h: &[u8], n: &[u8]) -> usize {
    h.windows(n.len()).filter(|w| *w == n).count()
}

// ---------------------------------------------------------------------------------------------
// /proc and the calling thread

/// A `KEY:  N kB` value of `/proc/PID/status` (e.g. `VmRSS:`), in KiB.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// VmHWM (peak resident set size since the process started) in KiB.
pub fn hwm_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// utime + stime of a process, in seconds.
pub fn proc_cpu_s(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is [0]; utime is field 14 of the line = [11], stime [12].
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t with one bit set; sched_setaffinity(0, ..) affects the calling
    // thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
    }
    Ok(())
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit then in force.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a plain struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return r.rlim_max as u64;
            }
        }
        r.rlim_cur as u64
    }
}

// ---------------------------------------------------------------------------------------------
// Sockets

fn sockaddr_in(a: std::net::SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = a.port().to_be();
    sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    sa
}

/// A TCP connection to `addr`, the connect bounded by `timeout`; panics on failure.
pub fn connect_tcp(addr: SocketAddr, timeout: Duration) -> TcpStream {
    TcpStream::connect_timeout(&addr, timeout)
        .unwrap_or_else(|e| panic!("TCP connect to {addr}: {e}"))
}

/// TCP_NODELAY and writes bounded by `timeout`.
pub fn set_client_opts(stream: &TcpStream, timeout: Duration) {
    stream.set_nodelay(true).unwrap();
    stream.set_write_timeout(Some(timeout)).unwrap();
}

/// A TCP connection from source address `src` (port chosen by the kernel) to `dst` (IPv4).
pub fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(dst) = dst else {
        panic!("IPv4 only")
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let (sa, da) = (
        sockaddr_in(std::net::SocketAddrV4::new(src, 0)),
        sockaddr_in(dst),
    );
    // SAFETY: plain socket syscalls on a fresh fd that is handed to TcpStream on success (it
    // closes it on failure); the sockaddr structs live on the stack for the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        if libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) != 0
            || libc::connect(fd, &da as *const _ as *const libc::sockaddr, len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// A TCP connection whose receive buffer is set to `rcvbuf` bytes before it connects (so the
/// kernel cannot absorb more than that for a client that does not read).
pub fn connect_with_rcvbuf(dst: SocketAddr, rcvbuf: i32) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(dst) = dst else {
        panic!("IPv4 only")
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let da = sockaddr_in(dst);
    // SAFETY: plain socket syscalls on a fresh fd that is handed to TcpStream at once (which
    // closes it on failure); the option value and the sockaddr live on the stack for the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let v: libc::c_int = rcvbuf;
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
            || libc::connect(fd, &da as *const _ as *const libc::sockaddr, len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// Closes `stream` with a TCP reset (SO_LINGER 0): the abrupt loss of a client.
pub fn reset(stream: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a descriptor the stream owns, with a linger struct on the stack.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

/// A loopback listener with the given accept-queue length (`listen(fd, backlog)`).
pub fn listener_with_backlog(backlog: i32) -> TcpListener {
    let a = sockaddr_in(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    // SAFETY: socket/bind/listen on a descriptor we own; the sockaddr_in is fully initialized
    // and passed with its size; the descriptor is then owned by the TcpListener.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let r = libc::bind(
            fd,
            (&a as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        assert_eq!(libc::listen(fd, backlog), 0, "listen");
        TcpListener::from_raw_fd(fd)
    }
}

/// Waits up to `ms` milliseconds for a connection to accept on `l`.
fn poll_readable(l: &TcpListener, ms: i32) {
    let mut p = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// A TCP proxy that can be cut (every connection reset; new ones accepted and closed at once),
/// turned into a black hole (every connection reset; new ones accepted and then never
/// answered), stalled (every connection reset; no more accepts, so once its accept queue is
/// full new connects hang), and restored.
pub struct Proxy {
    pub addr: SocketAddr,
    pub cut: Arc<AtomicBool>,
    pub blackhole: Arc<AtomicBool>,
    pub stalled: Arc<AtomicBool>,
    pub conns: Arc<Mutex<Vec<TcpStream>>>,
    /// Connections accepted since the start (forwarded or not).
    pub accepted: Arc<AtomicU32>,
    /// When the first connection after the last [`Proxy::restore`] was accepted.
    first_accept: Arc<Mutex<Option<Instant>>>,
    armed: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        Proxy::start_with_backlog(target, 128)
    }

    /// A proxy whose listener has an accept queue of `backlog` (0: one connection), so that
    /// [`Proxy::stall`] plus [`Proxy::fill_queue`] make new connects hang.
    pub fn start_with_backlog(target: SocketAddr, backlog: i32) -> Proxy {
        let l = listener_with_backlog(backlog);
        l.set_nonblocking(true).unwrap();
        let p = Proxy {
            addr: l.local_addr().unwrap(),
            cut: Arc::new(AtomicBool::new(false)),
            blackhole: Arc::new(AtomicBool::new(false)),
            stalled: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
            accepted: Arc::new(AtomicU32::new(0)),
            first_accept: Arc::new(Mutex::new(None)),
            armed: Arc::new(AtomicBool::new(false)),
        };
        let (c2, b2, s2, n2, a2, f2, r2) = (
            p.cut.clone(),
            p.blackhole.clone(),
            p.stalled.clone(),
            p.conns.clone(),
            p.accepted.clone(),
            p.first_accept.clone(),
            p.armed.clone(),
        );
        std::thread::spawn(move || loop {
            if s2.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let client = match l.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    poll_readable(&l, 2);
                    continue;
                }
                Err(_) => continue,
            };
            let now = Instant::now();
            let _ = client.set_nonblocking(false);
            a2.fetch_add(1, Ordering::SeqCst);
            let mut g = n2.lock().unwrap_or_else(|e| e.into_inner());
            if r2.swap(false, Ordering::SeqCst) {
                *f2.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
            }
            if b2.load(Ordering::SeqCst) {
                // Held open, never read or answered (closed by the next cut or restore).
                g.push(client);
                continue;
            }
            if c2.load(Ordering::SeqCst) {
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            g.push(client.try_clone().unwrap());
            g.push(server.try_clone().unwrap());
            drop(g);
            pump(client.try_clone().unwrap(), server.try_clone().unwrap());
            pump(server, client);
        });
        p
    }

    fn reset_all(&self, flag: &AtomicBool) {
        let mut g = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        flag.store(true, Ordering::SeqCst);
        for s in g.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn cut(&self) {
        self.reset_all(&self.cut);
    }

    /// Like [`Proxy::cut`], but new connections are accepted and then never answered (the
    /// server looks alive at the TCP level and silent above it).
    pub fn black_hole(&self) {
        self.reset_all(&self.blackhole);
    }

    /// Resets every connection and stops accepting: with the accept queue full (see
    /// [`Proxy::fill_queue`]) new connects hang, as with a host that drops everything.
    pub fn stall(&self) {
        self.reset_all(&self.stalled);
    }

    /// Connects until a connect hangs (300 ms): the stalled proxy's accept queue is full.
    /// Returns the connections that got in (close them to free the queue).
    pub fn fill_queue(&self) -> Vec<TcpStream> {
        let mut v = Vec::new();
        for _ in 0..16 {
            match TcpStream::connect_timeout(&self.addr, Duration::from_millis(300)) {
                Ok(s) => v.push(s),
                Err(_) => return v,
            }
        }
        panic!("the stalled proxy's accept queue never filled (is it stalled?)");
    }

    pub fn restore(&self) {
        let mut g = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        *self.first_accept.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.armed.store(true, Ordering::SeqCst);
        self.cut.store(false, Ordering::SeqCst);
        self.stalled.store(false, Ordering::SeqCst);
        if self.blackhole.swap(false, Ordering::SeqCst) {
            for s in g.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// When the first connection after the last [`Proxy::restore`] was accepted.
    pub fn first_accept(&self) -> Option<Instant> {
        *self.first_accept.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

/// Copies `from` to `to` on a thread until either side ends, then shuts both down.
pub fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}
