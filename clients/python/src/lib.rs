//! `clawterm._native`: the Python binding of the ClawTerm client library. One class,
//! `Session`, over `clawterm_client::Session` (automatic resume with exact replay), with a VT
//! emulator (`vt100`) fed by everything the session receives, so `screen()` is what a
//! terminal of the session's size shows. Every blocking call releases the GIL. The
//! agent-facing layer (`run`, `expect`, asyncio) is Python, in `python/clawterm/`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use clawterm_client::{ClientError, Credentials, Event, Session as RustSession};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

create_exception!(
    _native,
    ClawtermError,
    PyException,
    "A ClawTerm session failed (the message says why)."
);
create_exception!(
    _native,
    SessionEnded,
    ClawtermError,
    "The session has ended (the agent closed it, or it was closed)."
);
create_exception!(
    _native,
    TakenOver,
    ClawtermError,
    "Another client resumed this session."
);

fn err(e: ClientError) -> PyErr {
    match e {
        ClientError::Closed => SessionEnded::new_err(e.to_string()),
        ClientError::TakenOver => TakenOver::new_err(e.to_string()),
        e => ClawtermError::new_err(e.to_string()),
    }
}

struct Inner {
    s: Option<RustSession>,
    /// The VT emulator behind `screen()` (None: the session was opened with `screen=False`).
    vt: Option<vt100::Parser>,
    gap: bool,
    ended: bool,
    /// Bytes received in total.
    received: u64,
}

impl Inner {
    fn session(&mut self) -> PyResult<&mut RustSession> {
        self.s
            .as_mut()
            .ok_or_else(|| SessionEnded::new_err("the session has ended"))
    }

    /// Waits up to `timeout` for output (None: until some comes); returns what came (empty
    /// on timeout). Reconnects happen inside.
    fn read(&mut self, timeout: Option<Duration>) -> Result<Vec<u8>, PyErr> {
        if self.ended {
            return Err(SessionEnded::new_err("the session has ended"));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut out = Vec::new();
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let s = self.session()?;
            let ev = match left {
                Some(l) if l.is_zero() => s.try_recv(),
                Some(l) => s.recv(l),
                None => s.recv(Duration::from_secs(3600)),
            };
            match ev.map_err(err)? {
                Some(Event::Data(d)) => {
                    if let Some(vt) = self.vt.as_mut() {
                        vt.process(&d);
                    }
                    self.received += d.len() as u64;
                    out.extend_from_slice(&d);
                    // Whatever else is already here, without waiting.
                    while let Some(ev) = self.session()?.try_recv().map_err(err)? {
                        match ev {
                            Event::Data(d) => {
                                if let Some(vt) = self.vt.as_mut() {
                                    vt.process(&d);
                                }
                                self.received += d.len() as u64;
                                out.extend_from_slice(&d);
                            }
                            Event::Gap => self.gap = true,
                            Event::Ended => {
                                self.ended = true;
                                break;
                            }
                            _ => {}
                        }
                    }
                    return Ok(out);
                }
                Some(Event::Gap) => self.gap = true,
                Some(Event::Ended) => {
                    self.ended = true;
                    return Err(SessionEnded::new_err("the session has ended"));
                }
                Some(_) => {}
                None => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(out);
                    }
                }
            }
        }
    }
}

/// A ClawTerm session that survives its connections: after a network drop it reconnects and
/// resumes by itself, every output byte delivered once, in order. Use one thread at a time
/// (calls are serialised).
#[pyclass(module = "clawterm._native")]
struct Session {
    inner: Mutex<Inner>,
}

impl Session {
    fn wrap(s: RustSession, rows: u16, cols: u16, screen: bool) -> Session {
        Session {
            inner: Mutex::new(Inner {
                s: Some(s),
                vt: screen.then(|| vt100::Parser::new(rows, cols, 0)),
                gap: false,
                ended: false,
                received: 0,
            }),
        }
    }

    fn with<R>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Inner) -> PyResult<R> + Send,
    ) -> PyResult<R>
    where
        R: Send,
    {
        py.detach(|| {
            let mut g = self
                .inner
                .lock()
                .map_err(|_| ClawtermError::new_err("a previous call panicked"))?;
            f(&mut g)
        })
    }
}

#[pymethods]
impl Session {
    /// Opens a new session. `endpoint`: `HOST:PORT` (plaintext), `tls://HOST:PORT?ca=FILE`,
    /// `quic://…` (as the `clawterm` CLI); `token`: the tenant token, 64 hex digits.
    /// `screen=False` skips the VT emulator (no `screen()`; for bulk output, where emulating
    /// the terminal is most of the cost).
    #[staticmethod]
    #[pyo3(signature = (endpoint, tenant, agent, token, cols=80, rows=24, screen=true))]
    #[allow(clippy::too_many_arguments)]
    fn connect(
        py: Python<'_>,
        endpoint: &str,
        tenant: u32,
        agent: u32,
        token: &str,
        cols: u16,
        rows: u16,
        screen: bool,
    ) -> PyResult<Session> {
        let mut t = [0u8; 32];
        hex::decode_to_slice(token.trim(), &mut t)
            .map_err(|_| PyValueError::new_err("token must be 64 hex digits"))?;
        let ep = endpoint.to_string();
        let s = py.detach(|| -> Result<RustSession, ClientError> {
            let mut s = RustSession::connect(&ep, tenant, agent, t)?;
            s.resize(cols, rows)?;
            Ok(s)
        });
        Ok(Session::wrap(s.map_err(err)?, rows, cols, screen))
    }

    /// Resumes a session from its credentials (`export()` / `detach()`, or the CLI's saved
    /// JSON), taking it over from any other client.
    #[staticmethod]
    #[pyo3(signature = (credentials, cols=80, rows=24, screen=true))]
    fn resume(
        py: Python<'_>,
        credentials: &str,
        cols: u16,
        rows: u16,
        screen: bool,
    ) -> PyResult<Session> {
        let creds = Credentials::from_json(credentials).map_err(err)?;
        let s = py.detach(|| -> Result<RustSession, ClientError> {
            let mut s = RustSession::resume(&creds)?;
            s.resize(cols, rows)?;
            Ok(s)
        });
        Ok(Session::wrap(s.map_err(err)?, rows, cols, screen))
    }

    /// Sends input (str is encoded as UTF-8). Queued while the connection is down, resent
    /// until the server has it.
    fn send(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let bytes: Vec<u8> = if let Ok(s) = data.extract::<String>() {
            s.into_bytes()
        } else {
            data.extract::<Vec<u8>>()?
        };
        self.with(py, move |i| i.session()?.send(&bytes).map_err(err))
    }

    /// Output received since the last read, waiting up to `timeout` seconds for some (None:
    /// until some comes). b"" when nothing came in time. Raises SessionEnded once the session
    /// ended.
    #[pyo3(signature = (timeout=None))]
    fn read<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyBytes>> {
        let t = match timeout {
            Some(t) if !(t >= 0.0 && t.is_finite()) => {
                return Err(PyValueError::new_err(
                    "timeout must be a non-negative number of seconds",
                ))
            }
            t => t.map(Duration::from_secs_f64),
        };
        let out = self.with(py, move |i| i.read(t))?;
        Ok(PyBytes::new(py, &out))
    }

    /// The terminal screen as text (rows joined by newlines): what a terminal of the session's
    /// size shows after everything received so far.
    fn screen(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |i| match i.vt.as_ref() {
            Some(vt) => Ok(vt.screen().contents()),
            None => Err(ClawtermError::new_err(
                "opened with screen=False: no screen",
            )),
        })
    }

    /// The cursor position (row, col), 0-based.
    fn cursor(&self, py: Python<'_>) -> PyResult<(u16, u16)> {
        self.with(py, |i| match i.vt.as_ref() {
            Some(vt) => Ok(vt.screen().cursor_position()),
            None => Err(ClawtermError::new_err(
                "opened with screen=False: no screen",
            )),
        })
    }

    /// Tells the agent (and the screen) the terminal's size.
    fn resize(&self, py: Python<'_>, cols: u16, rows: u16) -> PyResult<()> {
        self.with(py, move |i| {
            if let Some(vt) = i.vt.as_mut() {
                vt.screen_mut().set_size(rows, cols);
            }
            i.session()?.resize(cols, rows).map_err(err)
        })
    }

    /// True if output was lost while away since the last call (and clears it).
    fn take_gap(&self, py: Python<'_>) -> PyResult<bool> {
        self.with(py, |i| Ok(std::mem::take(&mut i.gap)))
    }

    /// Drops the connection as a network failure would (the next read reconnects).
    fn drop_connection(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |i| {
            i.session()?.drop_connection("dropped by the program");
            Ok(())
        })
    }

    /// The session's credentials (JSON, the CLI's format) to resume it elsewhere. They hold
    /// the resume token: keep them secret.
    fn export(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |i| Ok(i.session()?.credentials("").to_json()))
    }

    /// Detaches (the session stays on the server) and returns its credentials.
    fn detach(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |i| {
            let s =
                i.s.take()
                    .ok_or_else(|| SessionEnded::new_err("the session has ended"))?;
            i.ended = true;
            Ok(s.detach().to_json())
        })
    }

    /// Ends the session (the agent is told). Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |i| {
            if let Some(s) = i.s.take() {
                s.end();
            }
            i.ended = true;
            Ok(())
        })
    }

    /// The session id.
    #[getter]
    fn session_id(&self, py: Python<'_>) -> PyResult<u32> {
        self.with(py, |i| Ok(i.session()?.session_id()))
    }

    /// Whether the session is attached over a live connection now.
    #[getter]
    fn connected(&self, py: Python<'_>) -> PyResult<bool> {
        self.with(py, |i| Ok(i.s.as_ref().is_some_and(|s| s.is_connected())))
    }

    /// Bytes of output received so far.
    #[getter]
    fn received(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |i| Ok(i.received))
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Session>()?;
    m.add("ClawtermError", m.py().get_type::<ClawtermError>())?;
    m.add("SessionEnded", m.py().get_type::<SessionEnded>())?;
    m.add("TakenOver", m.py().get_type::<TakenOver>())?;
    Ok(())
}
