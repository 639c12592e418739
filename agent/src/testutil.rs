//! Test support: a fake daemon on a `UnixStream::pair()` link, and counts of the process-wide
//! resources the event loop uses. Tests that use them take [`serial`].

use crate::{serve_link, Agent, CloseReason};
use clawterm_core::podlink::codec::VERSION;
use clawterm_core::podlink::{decode, encode, Decoded, Msg, Open};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
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
    pub(crate) link: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Daemon {
    pub(crate) fn start<A: Agent + Send + 'static>(agent: A) -> Daemon {
        let (a, b) = UnixStream::pair().unwrap();
        let link = std::thread::spawn(move || serve_link(b, agent));
        a.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut d = Daemon {
            s: a,
            buf: Vec::new(),
            out: HashMap::new(),
            closed: HashMap::new(),
            input_pauses: HashMap::new(),
            after_close: 0,
            link: Some(link),
        };
        d.send(
            0,
            &Msg::Hello {
                version: VERSION,
                name: "test",
            },
        );
        d
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
            match msg {
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
