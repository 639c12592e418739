//! `loadgen bulk`: keystroke echoes next to bulk output, through the clawterm client library.
//!
//! `--bulk B` sessions each keep four `--bulk-bytes` (default 60,000) DATA messages in flight
//! through the echo agent (so the server writes bulk output that it cuts into frames of at most
//! `--max-send-payload`), while `--sessions P` probe sessions each send a 32-byte keystroke
//! every 20 ms and time its echo. Reports the bulk throughput and the probes' round-trip
//! percentiles: run it against `clawtermd --max-send-payload 16384` and `65535` to see what the
//! frame size costs or saves (PROTOCOL.md §7.17; bench/run.sh does).

use crate::{emit, pct_json, Opts};
use clawterm_client::{Event, Session};
use hdrhistogram::Histogram;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bulk messages each bulk session keeps in flight.
const WINDOW: usize = 4;
/// A probe's keystroke period.
const PROBE_EVERY: Duration = Duration::from_millis(20);
const PROBE: &[u8] = b"probe-keystroke-echo-0123456789!";

fn connect(o: &Opts) -> Result<Session, String> {
    Session::connect(&o.target.to_string(), o.tenant, o.agent, o.token)
        .map_err(|e| format!("connect: {e}"))
}

/// Waits for `want` bytes of output; `Err` on anything but data.
fn read_exactly(s: &mut Session, want: usize, stop: &AtomicBool) -> Result<(), String> {
    let mut got = 0;
    while got < want {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        match s.recv(Duration::from_millis(200)) {
            Ok(Some(Event::Data(d))) => got += d.len(),
            Ok(None) => {}
            Ok(Some(e)) => return Err(format!("unexpected {e:?}")),
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
    Ok(())
}

/// Runs the scenario; returns the exit code.
pub fn run(o: &Opts) -> i32 {
    let stop = Arc::new(AtomicBool::new(false));
    let bulk_bytes = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
    ));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut threads = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..o.bulk + o.sessions {
        match connect(o) {
            Ok(s) => sessions.push(s),
            Err(e) => {
                eprintln!("[loadgen bulk] {e}");
                emit(
                    o,
                    &json!({"tool": "loadgen", "scenario": "bulk", "ok": false, "error": e}),
                );
                return 1;
            }
        }
    }
    let measuring = Arc::new(AtomicBool::new(false));
    for (i, mut s) in sessions.into_iter().enumerate() {
        let (stop, errors) = (stop.clone(), errors.clone());
        let (bulk_bytes, hist, measuring) = (bulk_bytes.clone(), hist.clone(), measuring.clone());
        let size = o.bulk_bytes;
        let is_bulk = i < o.bulk;
        threads.push(std::thread::spawn(move || {
            let r = if is_bulk {
                let msg: Vec<u8> = (0..size).map(|k| (k % 251) as u8).collect();
                (|| {
                    for _ in 0..WINDOW {
                        s.send(&msg).map_err(|e| format!("send: {e}"))?;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        read_exactly(&mut s, size, &stop)?;
                        if measuring.load(Ordering::Relaxed) {
                            bulk_bytes.fetch_add(size as u64, Ordering::Relaxed);
                        }
                        s.send(&msg).map_err(|e| format!("send: {e}"))?;
                    }
                    Ok(())
                })()
            } else {
                (|| {
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        s.send(PROBE).map_err(|e| format!("send: {e}"))?;
                        read_exactly(&mut s, PROBE.len(), &stop)?;
                        if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                            let us = t.elapsed().as_micros().max(1) as u64;
                            let _ = hist.lock().map(|mut h| h.record(us));
                        }
                        std::thread::sleep(PROBE_EVERY.saturating_sub(t.elapsed()));
                    }
                    Ok(())
                })()
            };
            if let Err(e) = r {
                if let Ok(mut v) = errors.lock() {
                    v.push(e);
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(o.warmup));
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let mut left = o.duration;
    while left > 0.0 {
        let step = left.min(1.0);
        std::thread::sleep(Duration::from_secs_f64(step));
        left -= step;
        eprintln!(
            "[loadgen bulk] {:.0} s: {:.1} MB of bulk output so far",
            t0.elapsed().as_secs_f64(),
            bulk_bytes.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
    measuring.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let errors = errors.lock().map(|v| v.clone()).unwrap_or_default();
    let h = hist.lock().map(|h| h.clone()).ok();
    let mb_s = bulk_bytes.load(Ordering::Relaxed) as f64 / 1e6 / secs;
    let probe = h.as_ref().map(pct_json).unwrap_or(json!({"count": 0}));
    let ok = errors.is_empty() && h.as_ref().is_some_and(|h| !h.is_empty());
    eprintln!(
        "[loadgen bulk] {} bulk sessions: {mb_s:.1} MB/s of output; {} probes: echo {probe}{}",
        o.bulk,
        o.sessions,
        if errors.is_empty() {
            String::new()
        } else {
            format!("; errors: {errors:?}")
        }
    );
    emit(
        o,
        &json!({
            "tool": "loadgen", "scenario": "bulk", "ok": ok,
            "bulk_sessions": o.bulk, "bulk_bytes": o.bulk_bytes, "probe_sessions": o.sessions,
            "seconds": secs, "bulk_mb_s": (mb_s * 10.0).round() / 10.0,
            "probe_rtt_us": probe, "errors": errors,
        }),
    );
    if ok {
        0
    } else {
        1
    }
}
