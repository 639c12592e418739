//! Stopping a pod cleanly on SIGTERM / SIGINT.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

extern "C" fn on_stop_signal(_: libc::c_int) {
    // Async-signal-safe: an atomic load (the OnceLock is set before the handler is installed)
    // and an atomic store.
    if let Some(flag) = STOP.get() {
        flag.store(true, Ordering::SeqCst);
    }
}

/// Installs SIGTERM and SIGINT handlers that set the returned flag, for
/// [`AgentListener::serve`](super::AgentListener::serve): the pod then stops serving, and
/// dropping the listener removes its socket file (Kubernetes stops pods with SIGTERM).
///
/// Process-wide; every call returns the same flag.
pub fn stop_on_signals() -> Arc<AtomicBool> {
    let mut first = false;
    let flag = STOP.get_or_init(|| {
        first = true;
        Arc::new(AtomicBool::new(false))
    });
    if first {
        let handler = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: installs a handler that only touches atomics.
        unsafe {
            libc::signal(libc::SIGTERM, handler);
            libc::signal(libc::SIGINT, handler);
        }
    }
    Arc::clone(flag)
}
