//! The admin endpoint: `/metrics` (Prometheus text), `/healthz`, `/readyz`, and what
//! `clawtermctl` asks (`GET /v1/sessions`, `GET /v1/nodes`, `POST /v1/roam`, `POST /v1/drain`;
//! the two that move sessions only from a loopback address).
//!
//! A tiny HTTP/1.1 server outside the shards, so a misbehaving scraper cannot affect sessions:
//! one thread accepts, and each connection gets a short-lived thread of its own (at most
//! [`MAX_CONNS`] at once; beyond that a connection gets `503` at once), so a slow client never
//! delays the kubelet's probes on another connection. One request per connection; the request
//! head must arrive within [`HEAD_DEADLINE`] in total (not per read: trickling bytes does not
//! extend it) and be at most 8 KiB. `GET` and `HEAD` (headers only) are answered.

use super::metrics::Metrics;
use crate::pods::Registry;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections served at once; more are answered `503` without reading their request.
pub const MAX_CONNS: usize = 32;
/// Time a client has to send its whole request head.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(1);
/// Time a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head read.
const MAX_HEAD: usize = 8192;

/// A running admin endpoint.
pub struct Admin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct State {
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    ops: Option<Arc<super::ops::Ops>>,
    /// Connections being served.
    active: AtomicUsize,
}

/// Decrements the active-connection count when a connection thread ends (also on a panic).
struct Slot(Arc<State>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admin {
    /// Binds `addr` and serves on a thread named `admin`.
    pub fn start(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        registry: Arc<Registry>,
    ) -> std::io::Result<Admin> {
        Admin::start_with_ops(addr, metrics, registry, None)
    }

    /// [`Admin::start`] with the node's operations (`clawtermctl`).
    pub fn start_with_ops(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        registry: Arc<Registry>,
        ops: Option<Arc<super::ops::Ops>>,
    ) -> std::io::Result<Admin> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("admin endpoint {addr}: {e}")))?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let state = Arc::new(State {
            metrics,
            registry,
            ops,
            active: AtomicUsize::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || accept_loop(&listener, &stop2, &state))?;
        Ok(Admin {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits up to `ms` for the listener to be readable (so `stop` is seen within that time).
fn wait_readable(listener: &TcpListener, ms: i32) {
    let _ = clawterm_poll::readable(listener.as_fd(), ms);
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, state: &Arc<State>) {
    while !stop.load(Ordering::Relaxed) {
        wait_readable(listener, 200);
        loop {
            let s = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!("admin endpoint: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            if state.active.fetch_add(1, Ordering::Relaxed) >= MAX_CONNS {
                state.active.fetch_sub(1, Ordering::Relaxed);
                tracing::debug!("admin endpoint: {MAX_CONNS} connections busy; refusing one");
                let mut s = s;
                let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
                let _ = respond(&mut s, false, "503 Service Unavailable", "busy\n");
                continue;
            }
            let slot = Slot(state.clone());
            let spawned = std::thread::Builder::new()
                .name("admin-conn".into())
                .stack_size(128 * 1024)
                .spawn(move || {
                    let st = &slot.0;
                    if let Err(e) = serve(s, st) {
                        tracing::debug!("admin request failed: {e}");
                    }
                });
            if let Err(e) = spawned {
                // The closure (and its slot) was dropped: the count is already released.
                tracing::warn!("admin endpoint: cannot start a connection thread: {e}");
            }
        }
    }
}

/// Reads one request head (bounded in size and total time) and answers it.
fn serve(mut s: TcpStream, st: &State) -> std::io::Result<()> {
    let (metrics, registry) = (&st.metrics, &st.registry);
    s.set_nonblocking(false)?;
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let deadline = Instant::now() + HEAD_DEADLINE;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return respond(&mut s, false, "408 Request Timeout", "request too slow\n");
        }
        s.set_read_timeout(Some(left))?;
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return respond(&mut s, false, "408 Request Timeout", "request too slow\n");
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HEAD {
            return respond(
                &mut s,
                false,
                "431 Request Header Fields Too Large",
                "request too large\n",
            );
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head_only = method == "HEAD";
    let route = path.split('?').next().unwrap_or("");
    if route.starts_with("/v1/") {
        return serve_ops(&mut s, st.ops.as_deref(), method, path);
    }
    if method != "GET" && !head_only {
        return respond(&mut s, false, "405 Method Not Allowed", "use GET or HEAD\n");
    }
    match route {
        "/metrics" => respond_typed(
            &mut s,
            head_only,
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &metrics.render(registry.len()),
        ),
        "/healthz" => match metrics.health() {
            Ok(()) => respond(&mut s, head_only, "200 OK", "ok\n"),
            Err(why) => respond(
                &mut s,
                head_only,
                "503 Service Unavailable",
                &format!("{why}\n"),
            ),
        },
        "/readyz" if metrics.ready() => respond(&mut s, head_only, "200 OK", "ready\n"),
        "/readyz" => respond(
            &mut s,
            head_only,
            "503 Service Unavailable",
            "not every shard is serving\n",
        ),
        _ => respond(
            &mut s,
            head_only,
            "404 Not Found",
            "try /metrics, /healthz or /readyz\n",
        ),
    }
}

/// The value of `key` in the query string of `path` (no percent-decoding: ids and node
/// names are plain).
fn query<'a>(path: &'a str, key: &str) -> Option<&'a str> {
    path.split_once('?')?
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// `clawtermctl`'s routes. Moving sessions is refused unless the request comes from this
/// machine (the endpoint may be bound wider for scrapers).
fn serve_ops(
    s: &mut TcpStream,
    ops: Option<&super::ops::Ops>,
    method: &str,
    path: &str,
) -> std::io::Result<()> {
    let Some(ops) = ops else {
        return respond(
            s,
            false,
            "503 Service Unavailable",
            "no operations on this endpoint\n",
        );
    };
    let json = |s: &mut TcpStream, status: &str, v: &serde_json::Value| {
        respond_typed(s, false, status, "application/json", &format!("{v}\n"))
    };
    let route = path.split('?').next().unwrap_or("");
    let mutating = matches!(route, "/v1/roam" | "/v1/drain");
    match (method, mutating) {
        ("GET", false) | ("POST", true) => {}
        _ => {
            return respond(
                s,
                false,
                "405 Method Not Allowed",
                "GET /v1/sessions, GET /v1/nodes, POST /v1/roam, POST /v1/drain\n",
            )
        }
    }
    if mutating && !s.peer_addr().is_ok_and(|a| a.ip().is_loopback()) {
        return respond(
            s,
            false,
            "403 Forbidden",
            "moving sessions is allowed from this machine only (run clawtermctl on the node)\n",
        );
    }
    let force = query(path, "force").is_some_and(|v| v == "1" || v == "true");
    match route {
        "/v1/sessions" => json(s, "200 OK", &ops.sessions_json()),
        "/v1/nodes" => match ops.nodes_json() {
            Ok(v) => json(s, "200 OK", &v),
            Err(e) => json(
                s,
                "503 Service Unavailable",
                &serde_json::json!({ "error": e }),
            ),
        },
        "/v1/roam" => {
            let id = query(path, "id").and_then(|i| u32::from_str_radix(i, 16).ok());
            let (Some(id), Some(to)) = (id, query(path, "to")) else {
                return json(
                    s,
                    "400 Bad Request",
                    &serde_json::json!({ "error": "give id=SESSION_ID (hex) and to=NODE" }),
                );
            };
            let v = match ops.roam(id, to, force) {
                super::cluster::RoamOutcome::Moved { to, took_us } => {
                    serde_json::json!({ "result": "moved", "to": to, "took_ms": took_us as f64 / 1000.0 })
                }
                super::cluster::RoamOutcome::CalledOff(why) => {
                    serde_json::json!({ "result": "called_off", "why": why })
                }
                super::cluster::RoamOutcome::Refused(why) => {
                    serde_json::json!({ "result": "refused", "why": why })
                }
            };
            json(s, "200 OK", &v)
        }
        "/v1/drain" => {
            // Progress lines as they come, then the summary; the body ends with the connection.
            s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n",
            )?;
            let to = query(path, "to");
            // The DaemonSet's preStop names its own pod: under hostNetwork the endpoint may be
            // served by the newer pod's clawtermd that took this one's sessions over (a live
            // upgrade), whose sessions must stay.
            if let Some(pod) = query(path, "pod") {
                let mine = std::env::var("POD_NAME").unwrap_or_default();
                if pod != mine {
                    let v = serde_json::json!({
                        "summary": true, "total": 0, "moved": 0, "failed": 0, "failures": [],
                        "elapsed_s": 0.0, "per_second": 0.0,
                        "skipped": format!("this endpoint is served by pod `{mine}`, not `{pod}` (a live upgrade took over): nothing of `{pod}` to drain"),
                    });
                    s.write_all(format!("{v}\n").as_bytes())?;
                    return s.flush();
                }
            }
            let window = query(path, "window")
                .and_then(|w| w.parse().ok())
                .unwrap_or(super::ops::DRAIN_WINDOW);
            let res = ops.drain(to, force, window, |line| {
                s.write_all(format!("{line}\n").as_bytes()).is_ok() && s.flush().is_ok()
            });
            if let Err(e) = res {
                s.write_all(format!("{}\n", serde_json::json!({ "error": e })).as_bytes())?;
            }
            s.flush()
        }
        _ => respond(s, false, "404 Not Found", "no such route\n"),
    }
}

fn respond(s: &mut TcpStream, head_only: bool, status: &str, body: &str) -> std::io::Result<()> {
    respond_typed(s, head_only, status, "text/plain; charset=utf-8", body)
}

/// Writes the response; for HEAD only the header (with the length the body would have).
fn respond_typed(
    s: &mut TcpStream,
    head_only: bool,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        body.len(),
        if status.starts_with("405") {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        }
    );
    if !head_only {
        out.push_str(body);
    }
    s.write_all(out.as_bytes())?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn request(addr: SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn head_has_no_body_and_healthz_follows_shard_liveness() {
        let dir = Dir(std::env::temp_dir().join(format!("clawterm-admin-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let metrics = Arc::new(Metrics::new(2));
        let registry = Registry::start_without_callback(&dir.0).unwrap();
        let admin = Admin::start(
            "127.0.0.1:0".parse().unwrap(),
            metrics.clone(),
            registry.clone(),
        )
        .unwrap();
        let a = admin.local_addr();

        let get = request(a, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(get.ends_with("\r\n\r\nok\n"), "{get}");
        let head = request(a, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.ends_with("\r\n\r\n"),
            "HEAD answered with a body: {head}"
        );
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(len > 100, "{head}");
        let post = request(a, "POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("Allow: GET, HEAD\r\n"), "{post}");

        // A shard thread that dies (here: panics) makes /healthz fail.
        let m2 = metrics.clone();
        let _ = std::thread::spawn(move || {
            m2.watch_shard_thread();
            panic!("shard bug");
        })
        .join();
        let sick = request(a, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(sick.starts_with("HTTP/1.1 503 "), "{sick}");
        assert!(
            sick.contains("1 of 2 shards stopped unexpectedly"),
            "{sick}"
        );
        let sick_head = request(a, "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(sick_head.starts_with("HTTP/1.1 503 "), "{sick_head}");
        assert!(sick_head.ends_with("\r\n\r\n"), "{sick_head}");
        drop(admin);
        registry.stop();
    }

    #[test]
    fn a_silent_client_gets_408_within_the_deadline() {
        let dir =
            Dir(std::env::temp_dir().join(format!("clawterm-admin408-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let registry = Registry::start_without_callback(&dir.0).unwrap();
        let admin = Admin::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Metrics::new(1)),
            registry.clone(),
        )
        .unwrap();
        let mut s = TcpStream::connect(admin.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metr").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
        drop(admin);
        registry.stop();
    }
}
