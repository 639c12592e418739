//! The HTTP/1.1 side of the WebSocket port, sans-IO: a request head parsed with `httparse`,
//! routed to the WebSocket upgrade (`GET /ws`, RFC 6455 §4.2), to a file of the browser
//! terminal page, or to a refusal with its status and reason; and the responses. One request
//! per connection (`Connection: close` on everything but an upgrade).

use super::assets::{Asset, Assets};

/// Largest request head accepted (431 beyond).
pub const MAX_HEAD: usize = 8 * 1024;
/// The path of the WebSocket endpoint.
pub const WS_PATH: &str = "/ws";
/// The subprotocol a client may ask for (`Sec-WebSocket-Protocol: clawterm`).
pub const SUBPROTOCOL: &str = "clawterm";

/// Which pages may open a WebSocket (the `Origin` header browsers send).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    /// Origins allowed besides the server's own (`https://example.com`, exactly as browsers
    /// send them); `*` allows any.
    pub allowed: Vec<String>,
}

impl OriginPolicy {
    /// Whether a request from `origin` (None: not a browser) to `host` may upgrade. A browser
    /// page served by this port has an origin whose host equals the `Host` header.
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        if self
            .allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
        {
            return true;
        }
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
    }
}

/// A refusal: the HTTP status and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

const fn refuse(status: u16, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// A valid WebSocket upgrade: the `Sec-WebSocket-Key`, and whether the client offered the
    /// `clawterm` subprotocol.
    Upgrade { key: String, subprotocol: bool },
    /// A file of the page (`HEAD`: without its body).
    Asset { asset: &'a Asset, head: bool },
}

/// Parses and routes the request head at the start of `buf`. `Ok(None)`: incomplete (read
/// more); `Ok(Some((route, used)))`: the route and the bytes the head took (what follows
/// belongs to the WebSocket); `Err`: a head that cannot be served.
pub fn route<'a>(
    buf: &[u8],
    origins: &OriginPolicy,
    assets: &'a Assets,
) -> Result<Option<(Route<'a>, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(refuse(431, "request head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(refuse(431, "too many headers")),
        Err(_) => return Err(refuse(400, "malformed HTTP request")),
    };
    if used > MAX_HEAD {
        return Err(refuse(431, "request head too large"));
    }
    if req.version != Some(1) {
        return Err(refuse(505, "HTTP/1.1 only"));
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let method = req.method.unwrap_or("");
    let path = req.path.unwrap_or("/");
    let path = path.split(['?', '#']).next().unwrap_or("/");
    if path == WS_PATH {
        if method != "GET" {
            return Err(refuse(405, "the WebSocket endpoint takes GET"));
        }
        if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
            return Err(refuse(
                426,
                "this is the ClawTerm WebSocket endpoint: upgrade to websocket",
            ));
        }
        if header("sec-websocket-version") != Some("13") {
            return Err(refuse(426, "WebSocket version 13 only"));
        }
        let Some(key) = header("sec-websocket-key").filter(|k| valid_key(k)) else {
            return Err(refuse(400, "missing or malformed Sec-WebSocket-Key"));
        };
        if !origins.allows(header("origin"), header("host")) {
            return Err(refuse(403, "origin not allowed (see --ws-origin)"));
        }
        let subprotocol = has_token("sec-websocket-protocol", SUBPROTOCOL);
        return Ok(Some((
            Route::Upgrade {
                key: key.to_string(),
                subprotocol,
            },
            used,
        )));
    }
    if method != "GET" && method != "HEAD" {
        return Err(refuse(405, "method not allowed"));
    }
    match assets.get(path) {
        Some(asset) => Ok(Some((
            Route::Asset {
                asset,
                head: method == "HEAD",
            },
            used,
        ))),
        None => Err(refuse(404, "not found")),
    }
}

/// A `Sec-WebSocket-Key`: base64 of 16 bytes (24 characters, `==` at the end).
fn valid_key(k: &str) -> bool {
    k.len() == 24
        && k.ends_with("==")
        && k[..22]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// The 101 answer to a valid upgrade.
pub fn upgrade_response(key: &str, subprotocol: bool) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if subprotocol {
        r.push_str("Sec-WebSocket-Protocol: clawterm\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// A file of the page.
pub fn asset_response(asset: &Asset, head: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\n\
         X-Content-Type-Options: nosniff\r\nContent-Security-Policy: default-src 'self'; \
         connect-src 'self' ws: wss:; style-src 'self' 'unsafe-inline'\r\nConnection: close\r\n\r\n",
        asset.content_type,
        asset.body.len()
    )
    .into_bytes();
    if !head {
        r.extend_from_slice(&asset.body);
    }
    r
}

/// A refusal, with its reason as a plain-text body.
pub fn refusal_response(r: Refusal) -> Vec<u8> {
    let text = match r.status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    };
    let body = format!("{}\n", r.reason);
    let mut h = format!(
        "HTTP/1.1 {} {text}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        r.status,
        body.len()
    );
    if r.status == 426 {
        h.push_str("Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n");
    }
    h.push_str("\r\n");
    h.push_str(&body);
    h.into_bytes()
}

#[cfg(test)]
mod tests;
