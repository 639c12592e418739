//! The C ABI of the ClawTerm client library (`libclawterm.so`, `libclawterm.a`,
//! `include/clawterm.h`): a thin layer over `clawterm_client::Session` — sessions that survive
//! their connections, with exact replay — for C programs and every language with a C FFI.
//!
//! Every exported function catches panics (none crosses the boundary: it becomes
//! `CLAWTERM_ERR_INTERNAL`), checks its pointers, and reports failures as a negative
//! [`ClawtermStatus`] with a message for [`clawterm_last_error`] (per thread).

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use clawterm_client::{ClientError, Credentials, Event, Session};

/// What a call came to: `CLAWTERM_STATUS_OK` (0) or a negative error.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClawtermStatus {
    /// Success.
    Ok = 0,
    /// A NULL pointer, a string that is not UTF-8, a token that is not 64 hex digits, …
    ErrInvalid = -1,
    /// The server cannot be reached (connect).
    ErrUnreachable = -2,
    /// The TLS handshake failed.
    ErrTls = -3,
    /// The server refused the token.
    ErrAuth = -4,
    /// The session is unknown or expired (resume).
    ErrNoSuchSession = -5,
    /// No agent serves this tenant and agent on the server.
    ErrNoAgent = -6,
    /// Another client resumed this session (take-over).
    ErrTakenOver = -7,
    /// Another refusal by the server (the message names it).
    ErrServer = -8,
    /// The server broke the protocol.
    ErrProtocol = -9,
    /// The session has ended (the agent closed it, or it was closed here).
    ErrClosed = -10,
    /// Credentials that cannot be read.
    ErrBadCredentials = -11,
    /// An I/O error.
    ErrIo = -12,
    /// A bug in the library (a caught panic).
    ErrInternal = -13,
}

/// A session (opaque).
pub struct ClawtermSession {
    s: Option<Session>,
    /// Output received and not yet handed to the caller.
    pending: Vec<u8>,
    at: usize,
    gap: bool,
    ended: bool,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl Into<String>) {
    let msg = msg.into().replace('\0', " ");
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(msg).unwrap_or_default());
}

fn status_of(e: &ClientError) -> ClawtermStatus {
    set_error(e.to_string());
    match e {
        ClientError::Unreachable { .. } => ClawtermStatus::ErrUnreachable,
        ClientError::Tls { .. } => ClawtermStatus::ErrTls,
        ClientError::AuthFailed => ClawtermStatus::ErrAuth,
        ClientError::NoSuchSession => ClawtermStatus::ErrNoSuchSession,
        ClientError::NoAgent { .. } => ClawtermStatus::ErrNoAgent,
        ClientError::TakenOver => ClawtermStatus::ErrTakenOver,
        ClientError::Server { .. } => ClawtermStatus::ErrServer,
        ClientError::Protocol(_) => ClawtermStatus::ErrProtocol,
        ClientError::Closed => ClawtermStatus::ErrClosed,
        ClientError::BadCredentials(_) => ClawtermStatus::ErrBadCredentials,
        _ => ClawtermStatus::ErrIo,
    }
}

fn invalid(msg: &str) -> ClawtermStatus {
    set_error(msg);
    ClawtermStatus::ErrInvalid
}

/// Runs `f`, turning a panic into `fallback` with a message.
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            set_error(format!("internal error in libclawterm: {what}"));
            fallback
        }
    }
}

/// A C string argument as `&str`.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives the call.
unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, ClawtermStatus> {
    if p.is_null() {
        return Err(invalid(&format!("{what} is NULL")));
    }
    // SAFETY: not NULL, and the caller promises a NUL-terminated string that outlives the call.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| invalid(&format!("{what} is not UTF-8")))
}

/// The session behind a pointer.
///
/// # Safety
/// `s` is NULL or a pointer from `clawterm_connect` / `clawterm_resume` not yet given back.
unsafe fn session<'a>(s: *mut ClawtermSession) -> Result<&'a mut ClawtermSession, ClawtermStatus> {
    // SAFETY: the caller promises a live session pointer (or NULL, refused here).
    match unsafe { s.as_mut() } {
        Some(s) => Ok(s),
        None => Err(invalid("the session is NULL")),
    }
}

fn boxed(s: Session, out: *mut *mut ClawtermSession) -> ClawtermStatus {
    let b = Box::new(ClawtermSession {
        s: Some(s),
        pending: Vec::new(),
        at: 0,
        gap: false,
        ended: false,
    });
    // SAFETY: `out` was checked not NULL by the caller of this function and points to
    // writable storage for one pointer (the documented contract).
    unsafe { *out = Box::into_raw(b) };
    ClawtermStatus::Ok
}

/// Opens a new session. `endpoint`: `HOST:PORT` (plaintext), `tls://HOST:PORT[?ca=FILE]
/// [&pin=SHA256HEX][&name=SNI]` or `quic://…` (as the `clawterm` CLI); `token_hex`: the
/// tenant token, 64 hex digits. On success `*out` is the session (give it back with
/// `clawterm_close` or `clawterm_detach`).
///
/// # Safety
/// `endpoint` and `token_hex` are NUL-terminated strings; `out` points to writable storage
/// for one pointer.
#[no_mangle]
pub unsafe extern "C" fn clawterm_connect(
    endpoint: *const c_char,
    tenant: u32,
    agent: u32,
    token_hex: *const c_char,
    out: *mut *mut ClawtermSession,
) -> ClawtermStatus {
    guard(ClawtermStatus::ErrInternal, || {
        if out.is_null() {
            return invalid("out is NULL");
        }
        // SAFETY: the caller's contract for both strings.
        let (ep, tok) =
            match unsafe { (str_arg(endpoint, "endpoint"), str_arg(token_hex, "token")) } {
                (Ok(e), Ok(t)) => (e, t),
                (Err(e), _) | (_, Err(e)) => return e,
            };
        let mut token = [0u8; 32];
        if hex::decode_to_slice(tok.trim(), &mut token).is_err() {
            return invalid("the token must be 64 hex digits");
        }
        match Session::connect(ep, tenant, agent, token) {
            Ok(s) => boxed(s, out),
            Err(e) => status_of(&e),
        }
    })
}

/// Resumes a session from credentials (`clawterm_export` / `clawterm_detach`'s JSON), from
/// this or another process or machine; it takes the session over from any other client.
///
/// # Safety
/// `credentials_json` is a NUL-terminated string; `out` points to writable storage for one
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn clawterm_resume(
    credentials_json: *const c_char,
    out: *mut *mut ClawtermSession,
) -> ClawtermStatus {
    guard(ClawtermStatus::ErrInternal, || {
        if out.is_null() {
            return invalid("out is NULL");
        }
        // SAFETY: the caller's contract.
        let json = match unsafe { str_arg(credentials_json, "credentials") } {
            Ok(j) => j,
            Err(e) => return e,
        };
        let creds = match Credentials::from_json(json) {
            Ok(c) => c,
            Err(e) => return status_of(&e),
        };
        match Session::resume(&creds) {
            Ok(s) => boxed(s, out),
            Err(e) => status_of(&e),
        }
    })
}

/// Queues input for the agent (sent now, or after the reconnect when the connection is down;
/// kept until the server has it).
///
/// # Safety
/// `s` is a live session; `data` points to `len` readable bytes (or `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn clawterm_send(
    s: *mut ClawtermSession,
    data: *const u8,
    len: usize,
) -> ClawtermStatus {
    guard(ClawtermStatus::ErrInternal, || {
        // SAFETY: the caller's contract.
        let cs = match unsafe { session(s) } {
            Ok(c) => c,
            Err(e) => return e,
        };
        if len == 0 {
            return ClawtermStatus::Ok;
        }
        if data.is_null() {
            return invalid("data is NULL");
        }
        // SAFETY: not NULL; the caller promises `len` readable bytes.
        let bytes = unsafe { std::slice::from_raw_parts(data, len) };
        match cs.s.as_mut() {
            Some(sess) => match sess.send(bytes) {
                Ok(()) => ClawtermStatus::Ok,
                Err(e) => status_of(&e),
            },
            None => {
                set_error("the session has ended");
                ClawtermStatus::ErrClosed
            }
        }
    })
}

/// Receives output into `buf` (at most `cap` bytes), waiting up to `timeout_ms` (0: do not
/// wait; negative: until output comes). Returns the number of bytes (> 0), 0 when nothing came
/// in time, or a negative `clawterm_status` (`CLAWTERM_STATUS_ERR_CLOSED` once the session
/// ended, after all its output was received). Lost connections are reconnected and resumed
/// inside; output lost while away (the server's ring overflowed) is flagged for
/// `clawterm_take_gap`.
///
/// # Safety
/// `s` is a live session; `buf` points to `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn clawterm_recv(
    s: *mut ClawtermSession,
    buf: *mut u8,
    cap: usize,
    timeout_ms: c_int,
) -> isize {
    guard(ClawtermStatus::ErrInternal as isize, || {
        // SAFETY: the caller's contract.
        let cs = match unsafe { session(s) } {
            Ok(c) => c,
            Err(e) => return e as isize,
        };
        if buf.is_null() || cap == 0 {
            return invalid("buf is NULL or cap is 0") as isize;
        }
        // SAFETY: not NULL; the caller promises `cap` writable bytes.
        let out = unsafe { std::slice::from_raw_parts_mut(buf, cap) };
        recv_into(cs, out, timeout_ms)
    })
}

fn take_pending(cs: &mut ClawtermSession, out: &mut [u8]) -> isize {
    let n = out.len().min(cs.pending.len() - cs.at);
    out[..n].copy_from_slice(&cs.pending[cs.at..cs.at + n]);
    cs.at += n;
    if cs.at == cs.pending.len() {
        cs.pending.clear();
        cs.at = 0;
    }
    n as isize
}

fn recv_into(cs: &mut ClawtermSession, out: &mut [u8], timeout_ms: c_int) -> isize {
    if cs.at < cs.pending.len() {
        return take_pending(cs, out);
    }
    if cs.ended {
        set_error("the session has ended");
        return ClawtermStatus::ErrClosed as isize;
    }
    let deadline =
        (timeout_ms >= 0).then(|| Instant::now() + Duration::from_millis(timeout_ms as u64));
    let Some(sess) = cs.s.as_mut() else {
        set_error("the session has ended");
        return ClawtermStatus::ErrClosed as isize;
    };
    loop {
        let ev = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    sess.try_recv()
                } else {
                    sess.recv(left)
                }
            }
            None => sess.recv(Duration::from_secs(3600)),
        };
        match ev {
            Ok(Some(Event::Data(d))) => {
                cs.pending = d;
                cs.at = 0;
                return take_pending(cs, out);
            }
            Ok(Some(Event::Gap)) => cs.gap = true,
            Ok(Some(Event::Ended)) => {
                cs.ended = true;
                set_error("the session has ended");
                return ClawtermStatus::ErrClosed as isize;
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return 0;
                }
            }
            Err(e) => return status_of(&e) as isize,
        }
    }
}

/// A file descriptor that becomes readable when `clawterm_recv` may have something (for
/// poll/epoll/select in an event loop; then call `clawterm_recv` with timeout 0), or -1 while
/// there is no connection (call `clawterm_recv` with a short timeout to drive the reconnect).
///
/// # Safety
/// `s` is a live session.
#[no_mangle]
pub unsafe extern "C" fn clawterm_poll_fd(s: *mut ClawtermSession) -> c_int {
    guard(-1, || {
        // SAFETY: the caller's contract.
        let Ok(cs) = (unsafe { session(s) }) else {
            return -1;
        };
        use std::os::fd::AsRawFd;
        cs.s.as_ref()
            .and_then(|x| x.poll_fd().map(|fd| fd.as_raw_fd()))
            .unwrap_or(-1)
    })
}

/// Tells the agent the terminal's size.
///
/// # Safety
/// `s` is a live session.
#[no_mangle]
pub unsafe extern "C" fn clawterm_resize(
    s: *mut ClawtermSession,
    cols: u16,
    rows: u16,
) -> ClawtermStatus {
    guard(ClawtermStatus::ErrInternal, || {
        // SAFETY: the caller's contract.
        let cs = match unsafe { session(s) } {
            Ok(c) => c,
            Err(e) => return e,
        };
        match cs.s.as_mut().map(|x| x.resize(cols, rows)) {
            Some(Ok(())) => ClawtermStatus::Ok,
            Some(Err(e)) => status_of(&e),
            None => ClawtermStatus::ErrClosed,
        }
    })
}

/// 1 when the session is attached over a live connection now, 0 otherwise.
///
/// # Safety
/// `s` is a live session.
#[no_mangle]
pub unsafe extern "C" fn clawterm_is_connected(s: *mut ClawtermSession) -> c_int {
    guard(0, || {
        // SAFETY: the caller's contract.
        match unsafe { session(s) } {
            Ok(cs) => cs.s.as_ref().is_some_and(|x| x.is_connected()) as c_int,
            Err(_) => 0,
        }
    })
}

/// 1 if output was lost while away since the last call (and clears it), else 0.
///
/// # Safety
/// `s` is a live session.
#[no_mangle]
pub unsafe extern "C" fn clawterm_take_gap(s: *mut ClawtermSession) -> c_int {
    guard(0, || {
        // SAFETY: the caller's contract.
        match unsafe { session(s) } {
            Ok(cs) => std::mem::take(&mut cs.gap) as c_int,
            Err(_) => 0,
        }
    })
}

/// Drops the connection as a network failure would (the next `clawterm_recv` reconnects and
/// resumes): for a network change the program knows of, and for tests.
///
/// # Safety
/// `s` is a live session.
#[no_mangle]
pub unsafe extern "C" fn clawterm_drop_connection(s: *mut ClawtermSession) -> ClawtermStatus {
    guard(ClawtermStatus::ErrInternal, || {
        // SAFETY: the caller's contract.
        match unsafe { session(s) } {
            Ok(cs) => {
                if let Some(x) = cs.s.as_mut() {
                    x.drop_connection("dropped by the program");
                }
                ClawtermStatus::Ok
            }
            Err(e) => e,
        }
    })
}

fn c_string(s: String) -> *mut c_char {
    match CString::new(s) {
        Ok(c) => c.into_raw(),
        Err(_) => {
            set_error("credentials with a NUL byte");
            std::ptr::null_mut()
        }
    }
}

/// The session's credentials as JSON (what `clawterm_resume` takes, the CLI's format), or
/// NULL on error. The session goes on. Free the string with `clawterm_string_free`. They
/// hold the resume token: keep them as secret as the session.
///
/// # Safety
/// `s` is a live session.
#[no_mangle]
pub unsafe extern "C" fn clawterm_export(s: *mut ClawtermSession) -> *mut c_char {
    guard(std::ptr::null_mut(), || {
        // SAFETY: the caller's contract.
        match unsafe { session(s) } {
            Ok(cs) => match cs.s.as_ref() {
                Some(x) => c_string(x.credentials("").to_json()),
                None => {
                    set_error("the session has ended");
                    std::ptr::null_mut()
                }
            },
            Err(_) => std::ptr::null_mut(),
        }
    })
}

/// Detaches (SUSPEND: the session stays on the server for a later `clawterm_resume`) and gives
/// the session back; returns its credentials (free with `clawterm_string_free`), or NULL on
/// error (the session is given back all the same).
///
/// # Safety
/// `s` is a live session, not used again after this call.
#[no_mangle]
pub unsafe extern "C" fn clawterm_detach(s: *mut ClawtermSession) -> *mut c_char {
    guard(std::ptr::null_mut(), || {
        if s.is_null() {
            set_error("the session is NULL");
            return std::ptr::null_mut();
        }
        // SAFETY: a pointer from Box::into_raw (clawterm_connect/resume), given back once.
        let b = unsafe { Box::from_raw(s) };
        match b.s {
            Some(x) => c_string(x.detach().to_json()),
            None => {
                set_error("the session has ended");
                std::ptr::null_mut()
            }
        }
    })
}

/// Ends the session (DISCONNECT: the agent is told) and gives it back. NULL is ignored.
///
/// # Safety
/// `s` is NULL or a live session, not used again after this call.
#[no_mangle]
pub unsafe extern "C" fn clawterm_close(s: *mut ClawtermSession) {
    guard((), || {
        if s.is_null() {
            return;
        }
        // SAFETY: a pointer from Box::into_raw (clawterm_connect/resume), given back once.
        let b = unsafe { Box::from_raw(s) };
        if let Some(x) = b.s {
            x.end();
        }
    })
}

/// Frees a string the library returned. NULL is ignored.
///
/// # Safety
/// `p` is NULL or a string from `clawterm_export` / `clawterm_detach`, freed once.
#[no_mangle]
pub unsafe extern "C" fn clawterm_string_free(p: *mut c_char) {
    guard((), || {
        if !p.is_null() {
            // SAFETY: from CString::into_raw in this library, freed once (the contract).
            drop(unsafe { CString::from_raw(p) });
        }
    })
}

/// The message of the last error on this thread ("" if none). Valid until the next call of
/// this library on this thread; do not free it.
#[no_mangle]
pub extern "C" fn clawterm_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library's version ("0.1.0").
#[no_mangle]
pub extern "C" fn clawterm_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}
