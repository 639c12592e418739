//! The WebSocket port (`--ws-port`, default 7222), sans-IO: the HTTP request that opens a
//! connection ([`http`]: the upgrade at `/ws`, the browser terminal page's files, refusals),
//! the page's files ([`assets`]), and RFC 6455 framing ([`frames`]). ClawTerm frames travel
//! unchanged inside binary messages: the server sends each batch of frames it writes as one
//! message; a client may split or join frames across messages as it likes (the payloads are
//! one byte stream). The shard (`shard/websocket.rs`) moves the bytes.

pub mod assets;
pub mod frames;
pub mod http;

/// What a shard needs to serve the WebSocket port.
#[derive(Debug)]
pub struct WsConfig {
    /// The page's files.
    pub assets: assets::Assets,
    /// Which pages may open a WebSocket.
    pub origins: http::OriginPolicy,
    /// Largest binary message accepted (close 1009 beyond).
    pub max_message: u64,
}
