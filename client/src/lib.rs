//! The ClawTerm client library: sessions that survive network loss.
//!
//! * [`core`]: the sans-IO protocol core (handshake, RELIABLE resend, replay de-duplication,
//!   ACKs, keepalives).
//! * [`Session`]: a blocking transport on top (plaintext TCP or TLS 1.3, see [`transport`]),
//!   with automatic reconnect ([`Backoff`]: exponential, full jitter, 100 ms → 3 s by
//!   default); every reconnect opens a new TCP connection and a new TLS handshake.
//! * [`creds`]: saved per-session credentials (0600 files) and the export/import blob.
//! * [`interactive`]: the `clawterm` terminal (raw mode, escapes, resize, status line), on
//!   the [`tty`] helpers; [`cli`]: the rest of the CLI's logic (endpoints, tokens, trust).
//!
//! ```no_run
//! use clawterm_client::{Event, Session};
//! use std::time::Duration;
//! let mut s = Session::connect("127.0.0.1:7220", 7, 1, [0xAB; 32]).unwrap();
//! s.send(b"hello\n").unwrap();
//! while let Some(ev) = s.recv(Duration::from_secs(1)).unwrap() {
//!     if let Event::Data(d) = ev {
//!         print!("{}", String::from_utf8_lossy(&d));
//!     }
//! }
//! ```

pub mod backoff;
pub mod cli;
pub mod core;
pub mod creds;
pub mod interactive;
pub mod quic;
mod session;
pub mod transport;
pub mod tty;

pub use backoff::Backoff;
pub use creds::{Credentials, LocalState, StateRecord, Store};
pub use session::{Event, Options, Session};
pub use transport::{Target, TlsTrust, Transport};

use clawterm_core::proto::ErrorCode;

/// What went wrong, with a message that says what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the server at {endpoint}: {reason}; check the address and port and that clawtermd is running there")]
    Unreachable { endpoint: String, reason: String },
    #[error("TLS with {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
    #[error("authentication failed: the server refused the token for this tenant; check --token / --token-file and --tenant")]
    AuthFailed,
    #[error("session expired or unknown; start a new one with `clawterm connect`")]
    NoSuchSession,
    #[error("no agent is serving tenant {tenant} agent {agent} on the server; start its claw-agent pod or check --tenant/--agent")]
    NoAgent { tenant: u32, agent: u32 },
    #[error("taken over by another device: another device resumed this session (run `clawterm resume NAME` here to take it back)")]
    TakenOver,
    #[error("the server refused: {name} ({code}){sep}{message}", sep = if message.is_empty() { "" } else { ": " })]
    Server {
        code: u16,
        name: &'static str,
        message: String,
    },
    #[error("protocol error talking to the server: {0}")]
    Protocol(String),
    #[error("the session has ended")]
    Closed,
    #[error("invalid session credentials: {0}")]
    BadCredentials(String),
    #[error("no saved session named {0:?}; `clawterm list` shows the saved ones")]
    NotSaved(String),
    #[error("session store: {0}")]
    Store(String),
    #[error("{0}")]
    Io(String),
}

impl ClientError {
    /// The error for an ERROR frame's code.
    pub fn from_code(code: u16, message: String, tenant: u32, agent: u32) -> ClientError {
        match ErrorCode::from_u16(code) {
            Some(ErrorCode::AuthFailed) => ClientError::AuthFailed,
            Some(ErrorCode::NoSuchSession) => ClientError::NoSuchSession,
            Some(ErrorCode::TakenOver) => ClientError::TakenOver,
            Some(ErrorCode::NoAgent) => ClientError::NoAgent { tenant, agent },
            Some(c) => ClientError::Server {
                code,
                name: c.name(),
                message,
            },
            None => ClientError::Server {
                code,
                name: "UNKNOWN",
                message,
            },
        }
    }

    /// Whether retrying cannot help (the session is gone or refused for good).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            ClientError::Unreachable { .. }
                | ClientError::Tls { .. }
                | ClientError::Io(_)
                | ClientError::Protocol(_)
                | ClientError::Server { .. }
        )
    }

    /// The `clawterm` exit status for this error: 3 unreachable, 4 auth failed, 5 session
    /// expired/unknown, 6 taken over, 7 TLS failure (certificate not trusted, pin mismatch,
    /// no TLS 1.3), 2 usage, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Unreachable { .. } => 3,
            ClientError::AuthFailed => 4,
            ClientError::NoSuchSession => 5,
            ClientError::TakenOver => 6,
            ClientError::Tls { .. } => 7,
            ClientError::BadCredentials(_) | ClientError::NotSaved(_) => 2,
            _ => 1,
        }
    }
}
