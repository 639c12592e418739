//! Pseudo-terminals for agents that run programs in a terminal (`claw-agent shell`), and the
//! process-session helpers that go with them.
//!
//! [`PtyCommand::spawn`] starts a program as the leader of a new session whose controlling
//! terminal is the slave side of a fresh PTY, and returns the master side ([`PtyMaster`]) and
//! the child's pid. The session id (and process group id) of everything the program starts in
//! that terminal is that pid, which [`signal_session`] and [`session_members`] use to reach
//! background jobs too (they live in process groups of their own under job control).
//!
//! It does so without `fork()`: it opens only the master and starts the program with
//! `posix_spawn(3)` (glibc: `clone(CLONE_VM | CLONE_VFORK)`, so nothing of the agent's memory
//! is copied, however big the agent has grown), which makes the child a session leader
//! (`POSIX_SPAWN_SETSID`) and opens the slave by its path as the child's fd 0 (the first
//! terminal a session leader opens becomes its controlling terminal), then dups it to 1 and 2.
//! The slave is never open in the agent. This is what [`ShellAgent`] uses; see
//! `docs/POD-LINK.md` ("Shell sessions: one event loop, posix_spawn").
//!
//! Every descriptor made here is close-on-exec, so no other program spawned by the agent
//! inherits a terminal it doesn't own.
//!
//! [`ShellAgent`]: crate::ShellAgent

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// The master side of a PTY. Reading it gives what the program wrote to its terminal; writing
/// it is typing. Once every process has closed the slave side, reads fail with `EIO` (Linux)
/// or return 0.
#[derive(Debug)]
pub struct PtyMaster {
    file: File,
}

impl PtyMaster {
    /// Sets the terminal's window size; the foreground process group gets `SIGWINCH`.
    pub fn resize(&self, cols: u16, rows: u16) -> io::Result<()> {
        set_winsize(self.file.as_fd(), cols, rows)
    }

    /// Switches the master to non-blocking mode (reads and writes fail with `WouldBlock`
    /// instead of waiting); use [`clawterm_poll::wait`] to wait.
    pub fn set_nonblocking(&self) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own; no pointers involved.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The master as a `File` (`&File` implements `Read` and `Write`, so threads can share it).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl From<PtyMaster> for OwnedFd {
    fn from(m: PtyMaster) -> OwnedFd {
        m.file.into()
    }
}

impl AsFd for PtyMaster {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for PtyMaster {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Sets the window size of the terminal behind `fd` (`TIOCSWINSZ`).
pub fn set_winsize(fd: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TIOCSWINSZ,
            &ws as *const libc::winsize,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a new PTY master (close-on-exec, not our controlling terminal) with the slave
/// unlocked, and returns it with the slave's path. The slave itself is not opened.
fn open_master() -> io::Result<(OwnedFd, CString)> {
    // SAFETY: posix_openpt takes flags only and returns a new descriptor or -1.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `m` is a fresh descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt on the master we just opened; no pointers involved.
    if unsafe { libc::grantpt(m) } != 0 || unsafe { libc::unlockpt(m) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name of at most `name.len()` bytes into `name`.
    let rc = unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_owned();
    Ok((master, path))
}

/// A program to start in a new PTY without forking the agent ([`PtyCommand::spawn`]): its
/// path (searched in `PATH` when it has no `/`), `argv` (`argv[0]` defaults to the path), its
/// environment (this process's, plus [`PtyCommand::env`]) and working directory.
#[derive(Clone, Debug)]
pub struct PtyCommand {
    program: OsString,
    arg0: Option<OsString>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<OsString>,
}

/// A program started by [`PtyCommand::spawn`]: the PTY's master and the child's pid (also its
/// session id and process group id). The child is not reaped for you: wait for it (e.g.
/// `waitpid`, or a pidfd) or it stays a zombie.
#[derive(Debug)]
pub struct PtyChild {
    pub master: PtyMaster,
    pub pid: libc::pid_t,
}

fn cstring(s: &OsStr, what: &str) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte: {s:?}"),
        )
    })
}

/// Owns a `posix_spawnattr_t` / `posix_spawn_file_actions_t` and destroys it when dropped.
struct SpawnAttr(libc::posix_spawnattr_t);
struct FileActions(libc::posix_spawn_file_actions_t);

impl Drop for SpawnAttr {
    fn drop(&mut self) {
        // SAFETY: initialised by posix_spawnattr_init (the only way one is made).
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised by posix_spawn_file_actions_init (the only way one is made).
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// `rc` (a posix_spawn* return value: 0 or an error number) as a `Result`.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

impl PtyCommand {
    /// `program` with no arguments, in this process's environment and directory.
    pub fn new(program: impl AsRef<OsStr>) -> PtyCommand {
        PtyCommand {
            program: program.as_ref().to_owned(),
            arg0: None,
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
        }
    }

    /// Sets `argv[0]` (e.g. `-bash` for a login shell).
    pub fn arg0(&mut self, arg0: impl AsRef<OsStr>) -> &mut PtyCommand {
        self.arg0 = Some(arg0.as_ref().to_owned());
        self
    }

    /// Adds an argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut PtyCommand {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Sets an environment variable for the program (over this process's value, if any).
    pub fn env(&mut self, key: impl AsRef<OsStr>, val: impl AsRef<OsStr>) -> &mut PtyCommand {
        let key = key.as_ref().to_owned();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, val.as_ref().to_owned()));
        self
    }

    /// Sets the program's working directory.
    pub fn current_dir(&mut self, dir: impl AsRef<OsStr>) -> &mut PtyCommand {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// Starts the program in a new PTY of `cols` x `rows`, as the leader of a new session whose
    /// controlling terminal is the PTY's slave (its stdin, stdout and stderr), with every
    /// signal at its default action and none blocked. Errors starting it (no such program, not
    /// executable, ...) are returned here, not found later.
    ///
    /// Uses `posix_spawnp` with `POSIX_SPAWN_SETSID` (glibc 2.26+, musl 1.1.24+): glibc starts
    /// the child with `clone(CLONE_VM | CLONE_VFORK)`, so the cost doesn't grow with the
    /// agent's memory, and the set-up (session, terminal, descriptors, signals) runs in
    /// libc's own child code, which is async-signal-safe.
    pub fn spawn(&self, cols: u16, rows: u16) -> io::Result<PtyChild> {
        // Everything the child gets is built before it starts.
        let program = cstring(&self.program, "program path")?;
        let mut argv = vec![cstring(
            self.arg0.as_deref().unwrap_or(&self.program),
            "argument",
        )?];
        for a in &self.args {
            argv.push(cstring(a, "argument")?);
        }
        let mut envp = Vec::new();
        for (k, v) in std::env::vars_os() {
            if !self.env.iter().any(|(k2, _)| *k2 == k) {
                envp.push(env_entry(&k, &v)?);
            }
        }
        for (k, v) in &self.env {
            envp.push(env_entry(k, v)?);
        }
        let cwd = self
            .cwd
            .as_deref()
            .map(|d| cstring(d, "directory"))
            .transpose()?;
        let mut argv_p: Vec<*mut libc::c_char> =
            argv.iter().map(|a| a.as_ptr() as *mut _).collect();
        argv_p.push(std::ptr::null_mut());
        let mut envp_p: Vec<*mut libc::c_char> =
            envp.iter().map(|a| a.as_ptr() as *mut _).collect();
        envp_p.push(std::ptr::null_mut());

        let (master, slave_path) = open_master()?;
        set_winsize(master.as_fd(), cols, rows)?;

        // SAFETY: an all-zero posix_spawnattr_t is only storage; posix_spawnattr_init
        // initialises it before any other use (and SpawnAttr destroys it once initialised).
        let mut attr = unsafe { std::mem::zeroed::<libc::posix_spawnattr_t>() };
        // SAFETY: initialises the attribute object at a valid address.
        check(unsafe { libc::posix_spawnattr_init(&mut attr) })?;
        let mut attr = SpawnAttr(attr);
        let flags = libc::POSIX_SPAWN_SETSID as libc::c_int
            | libc::POSIX_SPAWN_SETSIGMASK
            | libc::POSIX_SPAWN_SETSIGDEF;
        // SAFETY: sigset_t is plain storage that sigemptyset/sigfillset initialise; the attr
        // functions read the sets and the flags from valid pointers.
        unsafe {
            let mut none = std::mem::zeroed::<libc::sigset_t>();
            let mut all = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut none);
            libc::sigfillset(&mut all);
            check(libc::posix_spawnattr_setflags(
                &mut attr.0,
                flags as libc::c_short,
            ))?;
            check(libc::posix_spawnattr_setsigmask(&mut attr.0, &none))?;
            // Signals this process ignores (SIGPIPE, ...) must not stay ignored in the child.
            check(libc::posix_spawnattr_setsigdefault(&mut attr.0, &all))?;
        }

        // SAFETY: as for the attributes: zeroed storage, initialised by the init call.
        let mut fa = unsafe { std::mem::zeroed::<libc::posix_spawn_file_actions_t>() };
        // SAFETY: initialises the file actions object at a valid address.
        check(unsafe { libc::posix_spawn_file_actions_init(&mut fa) })?;
        let mut fa = FileActions(fa);
        // SAFETY: the file actions object is initialised; the path strings are NUL-terminated
        // and outlive the posix_spawnp call below (the actions copy them anyway).
        unsafe {
            // The child is a session leader by then (setsid runs before the file actions), so
            // opening the slave without O_NOCTTY makes it its controlling terminal.
            check(libc::posix_spawn_file_actions_addopen(
                &mut fa.0,
                0,
                slave_path.as_ptr(),
                libc::O_RDWR,
                0,
            ))?;
            check(libc::posix_spawn_file_actions_adddup2(&mut fa.0, 0, 1))?;
            check(libc::posix_spawn_file_actions_adddup2(&mut fa.0, 0, 2))?;
            if let Some(cwd) = &cwd {
                check(libc::posix_spawn_file_actions_addchdir_np(
                    &mut fa.0,
                    cwd.as_ptr(),
                ))?;
            }
        }

        let mut pid: libc::pid_t = 0;
        // SAFETY: every pointer is valid for the call: `pid` is writable, the attribute and
        // file actions objects are initialised, `program` is NUL-terminated, and `argv_p` and
        // `envp_p` are null-terminated arrays of NUL-terminated strings (`argv`, `envp`) that
        // outlive the call. posix_spawnp doesn't keep any of them.
        check(unsafe {
            libc::posix_spawnp(
                &mut pid,
                program.as_ptr(),
                &fa.0,
                &attr.0,
                argv_p.as_ptr(),
                envp_p.as_ptr(),
            )
        })?;
        Ok(PtyChild {
            master: PtyMaster {
                file: File::from(master),
            },
            pid,
        })
    }
}

fn env_entry(k: &OsStr, v: &OsStr) -> io::Result<CString> {
    let mut b = Vec::with_capacity(k.len() + v.len() + 1);
    b.extend_from_slice(k.as_bytes());
    b.push(b'=');
    b.extend_from_slice(v.as_bytes());
    CString::new(b).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("environment variable {k:?} contains a NUL byte"),
        )
    })
}

/// The live (not zombie) processes of session `sid`, as pids. Linux only (reads `/proc`);
/// elsewhere an empty list.
pub fn session_members(sid: libc::pid_t) -> Vec<libc::pid_t> {
    members_of(|s| s == sid)
        .into_iter()
        .map(|(p, _)| p)
        .collect()
}

/// The live (not zombie) processes whose session id passes `want`, as (pid, session id), from
/// one pass over `/proc`. Linux only; elsewhere an empty list.
fn members_of(want: impl Fn(libc::pid_t) -> bool) -> Vec<(libc::pid_t, libc::pid_t)> {
    let mut pids = Vec::new();
    if !cfg!(any(target_os = "linux", target_os = "android")) {
        return pids;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<libc::pid_t>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp session ..."; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut f = rest.split_ascii_whitespace();
        let state = f.next().unwrap_or("Z");
        let session = f.nth(2).and_then(|x| x.parse::<libc::pid_t>().ok());
        if let Some(session) = session {
            if want(session) && state != "Z" && state != "X" {
                pids.push((pid, session));
            }
        }
    }
    pids
}

/// [`signal_session`] for many sessions at once, with one pass over `/proc` for all of them:
/// sends each of `sigs` (in order) to every live process of each session in `sids`, given as
/// (session id, `leader_alive`).
pub fn signal_sessions(sids: &[(libc::pid_t, bool)], sigs: &[libc::c_int]) {
    let set: std::collections::HashSet<libc::pid_t> =
        sids.iter().map(|&(s, _)| s).filter(|&s| s > 0).collect();
    if set.is_empty() {
        return;
    }
    for &(sid, alive) in sids {
        if alive && sid > 0 {
            for &sig in sigs {
                // SAFETY: plain syscall; `sid` is the pid of our unreaped child, hence its
                // process group id.
                unsafe { libc::killpg(sid, sig) };
            }
        }
    }
    for (pid, _) in members_of(|s| set.contains(&s)) {
        for &sig in sigs {
            // SAFETY: plain syscall on a pid that was a member of the session a moment ago.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// Sends `sig` to every live process of session `sid`: its leader's process group, and (on
/// Linux) each member found in `/proc`, so background jobs in process groups of their own
/// are reached too. Set `leader_alive` only while the leader `sid` has not been reaped yet
/// (so the id can't have been reused). Errors (`ESRCH`: already gone) are ignored.
pub fn signal_session(sid: libc::pid_t, sig: libc::c_int, leader_alive: bool) {
    if sid <= 0 {
        return;
    }
    if leader_alive {
        // SAFETY: plain syscall; `sid` is the pid of our unreaped child, hence its group id.
        unsafe { libc::killpg(sid, sig) };
    }
    for pid in session_members(sid) {
        // SAFETY: plain syscall on a pid that was a member of the session a moment ago.
        unsafe { libc::kill(pid, sig) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        crate::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything a posix_spawn'd child reads from its master until the terminal closes.
    fn read_all(master: &PtyMaster) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match master.file().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break, // EIO: the slave is closed
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn reap(pid: libc::pid_t) -> i32 {
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid place for the result.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    /// The child of `PtyCommand::spawn` leads a new session whose controlling terminal is the
    /// PTY (stdin, stdout and stderr all on it), of the given size, with its argv[0], extra
    /// environment and working directory, and SIGPIPE at its default action even though this
    /// process ignores it (no standard signal is ignored; glibc leaves its two internal
    /// real-time signals ignored, as it does for any posix_spawn).
    #[test]
    fn pty_command_starts_a_session_leader_on_the_terminal() {
        let _g = serial();
        let mut cmd = PtyCommand::new("sh");
        cmd.arg0("my-sh")
            .arg("-c")
            .arg(
                "stty size; test -t 0 && test -t 1 && test -t 2 && echo all-tty; \
                 read -r _ c _ _ _ sid _ _ < /proc/$$/stat; \
                 [ \"$sid\" = \"$$\" ] && echo leader; echo comm=$c; \
                 echo foo=$CLAW_FOO; pwd; \
                 ign=$(awk '/^SigIgn/ {print $2}' /proc/$$/status); \
                 [ $((0x$ign & 0x7fffffff)) = 0 ] && echo no-ignored; \
                 echo ctty=$(ps -o tty= -p $$ 2>/dev/null || echo ?); echo pid=$$",
            )
            .env("CLAW_FOO", "bar baz")
            .current_dir("/tmp");
        let child = cmd.spawn(91, 17).expect("spawn");
        let text = read_all(&child.master);
        reap(child.pid);
        for want in [
            "17 91",
            "all-tty",
            "leader",
            "foo=bar baz",
            "/tmp",
            "no-ignored",
        ] {
            assert!(text.contains(want), "{want:?} in {text:?}");
        }
        assert!(text.contains(&format!("pid={}", child.pid)), "{text:?}");
        assert!(!text.contains("ctty=?"), "{text:?}");
    }

    #[test]
    fn pty_command_reports_a_missing_program() {
        let _g = serial();
        let e = PtyCommand::new("/no/such/program")
            .spawn(80, 24)
            .expect_err("no such program");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let e = PtyCommand::new("sh")
            .env("BAD", "a\0b")
            .spawn(80, 24)
            .expect_err("NUL in the environment");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }

    /// Input typed before the program reads it, and the exit: the master then reads EIO.
    #[test]
    fn spawn_runs_in_a_terminal_of_the_given_size() {
        let _g = serial();
        let mut cmd = PtyCommand::new("/bin/sh");
        cmd.arg("-c").arg("stty size; test -t 0 && echo tty");
        let child = cmd.spawn(91, 17).expect("spawn");
        let text = read_all(&child.master);
        reap(child.pid);
        assert!(text.contains("17 91"), "{text:?}");
        assert!(text.contains("tty"), "{text:?}");
    }

    #[test]
    fn resize_and_write() {
        let _g = serial();
        let mut cmd = PtyCommand::new("/bin/sh");
        cmd.arg("-c").arg("read x; stty size; echo got-$x");
        let child = cmd.spawn(80, 24).expect("spawn");
        child.master.resize(120, 40).expect("resize");
        child.master.file().write_all(b"abc\n").expect("write");
        let text = read_all(&child.master);
        reap(child.pid);
        assert!(text.contains("40 120"), "{text:?}");
        assert!(text.contains("got-abc"), "{text:?}");
    }

    #[test]
    fn pty_command_input_and_exit() {
        let _g = serial();
        let mut cmd = PtyCommand::new("/bin/sh");
        cmd.arg("-c").arg("read x; echo got-$x; exit 7");
        let child = cmd.spawn(80, 24).expect("spawn");
        child.master.file().write_all(b"abc\n").expect("write");
        let text = read_all(&child.master);
        assert!(text.contains("got-abc"), "{text:?}");
        let status = reap(child.pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7);
    }
}
