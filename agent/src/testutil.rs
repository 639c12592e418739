//! Test support: a fake daemon on a `UnixStream::pair()` link or on a link to a real
//! [`AgentListener`] ([`Pod`]), and counts of the process-wide resources the event loop uses.
//! Tests that use them take [`serial`].

use crate::{serve_link, Agent, AgentListener, CloseReason};
use clawterm_core::podlink::codec::VERSION_MIGRATE;
use clawterm_core::podlink::{decode, encode, Decoded, Msg, Open};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) const T: Duration = Duration::from_secs(20);

pub(crate) struct Daemon {
    pub(crate) s: UnixStream,
    pub(crate) buf: Vec<u8>,
    pub(crate) out: HashMap<u32, Vec<u8>>,
    pub(crate) closed: HashMap<u32, CloseReason>,
    /// Input PAUSEs the agent sent, per session.
    pub(crate) input_pauses: HashMap<u32, usize>,
    /// Output that arrived for a session after its CLOSE.
    pub(crate) after_close: usize,
    /// The version of the agent's HELLO, once it arrived.
    pub(crate) hello: Option<u8>,
    /// STATE bodies the agent sent, per session, in order (the empty one included).
    pub(crate) states: HashMap<u32, Vec<Vec<u8>>>,
    /// Every message the agent sent: (SESSION_ID, type code), in order.
    pub(crate) seen: Vec<(u32, u8)>,
    pub(crate) link: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Daemon {
    pub(crate) fn start<A: Agent + Send + 'static>(agent: A) -> Daemon {
        let (a, b) = UnixStream::pair().unwrap();
        let link = std::thread::spawn(move || serve_link(b, agent));
        Daemon::on(a, Some(link))
    }

    /// A link to the listener at `path` (served by the listener's own thread).
    pub(crate) fn connect(path: &Path) -> Daemon {
        Daemon::on(UnixStream::connect(path).expect("connect to the pod"), None)
    }

    fn on(a: UnixStream, link: Option<std::thread::JoinHandle<std::io::Result<()>>>) -> Daemon {
        a.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut d = Daemon {
            s: a,
            buf: Vec::new(),
            out: HashMap::new(),
            closed: HashMap::new(),
            input_pauses: HashMap::new(),
            after_close: 0,
            hello: None,
            states: HashMap::new(),
            seen: Vec::new(),
            link,
        };
        // As clawtermd does: version 2 (the link tests in `link.rs` speak 1).
        d.send(
            0,
            &Msg::Hello {
                version: VERSION_MIGRATE,
                name: "test",
            },
        );
        d
    }

    /// REOPEN `sid` (as a daemon that restarted would, with the same SESSION_ID).
    pub(crate) fn reopen(&mut self, sid: u32) {
        self.send(
            sid,
            &Msg::Reopen(Open {
                tenant: 1,
                agent: 7,
                client_caps: 1,
                peer: "127.0.0.1:2",
            }),
        );
    }

    /// The daemon goes away (exits or crashes): the link ends, no CLOSE for any session.
    pub(crate) fn drop_link(self) {
        let _ = self.s.shutdown(std::net::Shutdown::Both);
    }

    /// What a shell session prints for `echo $$`: the shell's pid.
    pub(crate) fn shell_pid(&mut self, sid: u32) -> i32 {
        let from = self.out.get(&sid).map_or(0, |v| v.len());
        self.input(sid, "echo pid=$$ pid-end-$((40+2))\n");
        let text = self.wait_for_from(sid, from, "pid-end-42");
        // (The typed line echoes `pid=$$`; the shell's output has the number.)
        number_after(&text, "pid=").expect("the shell's pid")
    }

    /// Waits for `needle` in what `sid` received from byte `from` on; that text.
    pub(crate) fn wait_for_from(&mut self, sid: u32, from: usize, needle: &str) -> String {
        let t0 = Instant::now();
        loop {
            let text = String::from_utf8_lossy(
                self.out
                    .get(&sid)
                    .map_or(&[][..], |v| v.get(from..).unwrap_or_default()),
            )
            .into_owned();
            if text.contains(needle) {
                return text;
            }
            assert!(t0.elapsed() < T, "session {sid}: no {needle:?} in {text:?}");
            self.pump(Duration::from_millis(50));
        }
    }

    pub(crate) fn send(&mut self, sid: u32, m: &Msg<'_>) {
        let mut v = Vec::new();
        encode(&mut v, sid, m);
        self.s.write_all(&v).unwrap();
    }

    pub(crate) fn open(&mut self, sid: u32) {
        self.send(
            sid,
            &Msg::Open(Open {
                tenant: 1,
                agent: 7,
                client_caps: 1,
                peer: "127.0.0.1:1",
            }),
        );
    }

    pub(crate) fn input(&mut self, sid: u32, text: &str) {
        self.send(sid, &Msg::Data(text.as_bytes()));
    }

    /// Reads and files what the agent sent, for up to `wait`; whether anything came.
    pub(crate) fn pump(&mut self, wait: Duration) -> bool {
        let mut chunk = [0u8; 65536];
        let got = match self.s.read(&mut chunk) {
            Ok(0) => panic!("agent closed the link"),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => {
                std::thread::sleep(wait.min(Duration::from_millis(1)));
                false
            }
        };
        let mut at = 0;
        while let Ok(Decoded::Msg {
            session_id,
            msg,
            used,
        }) = decode(&self.buf[at..])
        {
            at += used;
            self.seen.push((session_id, msg.ty().code()));
            match msg {
                Msg::Hello { version, .. } => self.hello = Some(version),
                Msg::State(b) => self.states.entry(session_id).or_default().push(b.to_vec()),
                Msg::Data(b) => {
                    if self.closed.contains_key(&session_id) {
                        self.after_close += 1;
                    }
                    self.out.entry(session_id).or_default().extend_from_slice(b);
                }
                Msg::Close(r) => {
                    self.closed.insert(session_id, r);
                }
                Msg::Pause => *self.input_pauses.entry(session_id).or_default() += 1,
                _ => {}
            }
        }
        self.buf.drain(..at);
        got
    }

    pub(crate) fn text(&self, sid: u32) -> String {
        String::from_utf8_lossy(self.out.get(&sid).map_or(&[][..], |v| v)).into_owned()
    }

    pub(crate) fn wait_for(&mut self, sid: u32, needle: &str) {
        let t0 = Instant::now();
        while !self.text(sid).contains(needle) {
            assert!(
                t0.elapsed() < T,
                "session {sid}: no {needle:?} in {:?}",
                self.text(sid)
            );
            self.pump(Duration::from_millis(50));
        }
    }

    /// Waits for the agent's HELLO; its version.
    pub(crate) fn wait_hello(&mut self) -> u8 {
        let t0 = Instant::now();
        loop {
            if let Some(v) = self.hello {
                return v;
            }
            assert!(t0.elapsed() < T, "no HELLO from the agent");
            self.pump(Duration::from_millis(50));
        }
    }

    /// Waits for the empty STATE that ends `sid`'s exported state; the STATE bodies before it.
    pub(crate) fn wait_state(&mut self, sid: u32) -> Vec<Vec<u8>> {
        let t0 = Instant::now();
        loop {
            if let Some(v) = self.states.get(&sid) {
                if v.last().is_some_and(|b| b.is_empty()) {
                    return v[..v.len() - 1].to_vec();
                }
            }
            assert!(t0.elapsed() < T, "session {sid}: no empty STATE");
            self.pump(Duration::from_millis(50));
        }
    }

    pub(crate) fn wait_close(&mut self, sid: u32) -> CloseReason {
        let t0 = Instant::now();
        loop {
            if let Some(r) = self.closed.get(&sid) {
                return *r;
            }
            assert!(t0.elapsed() < T, "session {sid}: no CLOSE");
            self.pump(Duration::from_millis(50));
        }
    }

    /// Ends the link and waits for the agent's side to finish.
    pub(crate) fn end(mut self) {
        let _ = self.s.shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.link.take() {
            let _ = h.join();
        }
        // The loop thread ends once its shells are reaped (the tests run one at a time,
        // so any loop thread is ours).
        let t0 = Instant::now();
        while loop_threads_ptys_pidfds().0 > 0 {
            assert!(t0.elapsed() < T, "the loop thread outlived its link");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Threads called `claw-shells`, PTY masters and pidfds open in this process.
pub(crate) fn loop_threads_ptys_pidfds() -> (usize, usize, usize) {
    let threads = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "claw-shells")
        })
        .count();
    let (mut ptys, mut pidfds) = (0, 0);
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if t == "/dev/ptmx" || t.starts_with("/dev/pts/ptmx") {
            ptys += 1;
        } else if t.contains("pidfd") {
            pidfds += 1;
        }
    }
    (threads, ptys, pidfds)
}

pub(crate) fn settle(want: (usize, usize, usize)) {
    let t0 = Instant::now();
    loop {
        let now = loop_threads_ptys_pidfds();
        if now == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "(loop threads, PTY masters, pidfds) = {now:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn serial() -> std::sync::MutexGuard<'static, ()> {
    crate::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Pipe ends open in this process.
pub(crate) fn pipes() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("pipe:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// The first number right after some `key` in `text`.
pub(crate) fn number_after(text: &str, key: &str) -> Option<i32> {
    text.split(key).skip(1).find_map(|r| {
        let digits: String = r.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    })
}

/// The lines of `text` that are just a number, in order.
pub(crate) fn numbers(text: &str) -> Vec<u32> {
    text.split(['\r', '\n'])
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether process `pid` exists and is not a zombie.
pub(crate) fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
}

pub(crate) fn wait_dead(pid: i32) {
    let t0 = Instant::now();
    while alive(pid) {
        assert!(t0.elapsed() < T, "process {pid} still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `f` holds (at most [`T`]).
pub(crate) fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < T, "never: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A real [`AgentListener`] in a fresh directory, serving on its own thread: links to it are
/// [`Daemon::connect`]ed, and a session left open by one can be re-bound by another.
pub(crate) struct Pod {
    listener: Arc<AgentListener>,
    stop: Arc<AtomicBool>,
    serve: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    /// A scratch directory for the test (the socket is in it).
    pub(crate) dir: PathBuf,
}

impl Pod {
    /// Serves `factory`'s agents with a daemon grace of `grace`.
    pub(crate) fn start<F, A>(grace: Duration, factory: F) -> Pod
    where
        F: Fn() -> A + Send + Sync + 'static,
        A: Agent + Send + 'static,
    {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "claw-agent-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let listener = Arc::new(
            AgentListener::bind(&dir, 1, 7)
                .expect("bind the pod's socket")
                .daemon_grace(grace),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let serve = {
            let (l, stop) = (Arc::clone(&listener), Arc::clone(&stop));
            std::thread::spawn(move || l.serve(factory, stop))
        };
        Pod {
            listener,
            stop,
            serve: Some(serve),
            dir,
        }
    }

    pub(crate) fn connect(&self) -> Daemon {
        Daemon::connect(self.listener.path())
    }

    pub(crate) fn orphans(&self) -> usize {
        self.listener.orphaned_sessions()
    }

    /// Waits until the listener keeps exactly `n` sessions for a REOPEN.
    pub(crate) fn wait_orphans(&self, n: usize) {
        wait_until(&format!("{n} orphaned sessions"), || self.orphans() == n);
    }

    /// Stops serving (the kept sessions end too) and waits for every loop thread to end.
    pub(crate) fn stop(mut self) {
        self.stop_serving();
        let t0 = Instant::now();
        while loop_threads_ptys_pidfds().0 > 0 {
            assert!(t0.elapsed() < T, "a loop thread outlived the pod");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop_serving(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.serve.take() {
            h.join().expect("serve thread").expect("serve");
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.stop_serving();
        } else {
            self.stop.store(true, Ordering::SeqCst);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
