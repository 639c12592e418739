//! The shard's part in the WebSocket port (`--ws-port`): a connection accepted there first
//! sends an HTTP request (the upgrade at `/ws`, or a file of the browser terminal page), then,
//! upgraded, ClawTerm frames inside binary messages. The bytes go TCP → TLS (when the server
//! has a certificate) → HTTP / WebSocket (`server::ws`, sans-IO) → the same frame loop as
//! every other connection; what the shard writes is wrapped in one binary message per batch
//! (`Clients::send`). The request counts as the handshake: its deadline (--handshake-timeout)
//! and the pending-handshake limit bound a slow or silent client.

use super::clients::{WsConn, WsPhase};
use super::{Client, ShardHandler, ShardMsg};
use crate::server::metrics::ShardMetrics;
use crate::server::ws::frames::{self, WsState};
use crate::server::ws::http::{self, Route};
use shards::{ConnId, Context};
use std::net::SocketAddr;
use tracing::debug;

impl ShardHandler {
    /// A connection accepted on the WebSocket port.
    pub(super) fn ws_accept(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: ConnId,
        peer: SocketAddr,
    ) {
        if self.shared.ws.is_none() {
            ctx.abort(conn);
            return;
        }
        let client = Client::Tcp(conn);
        // Nothing can be said before the request (and the TLS handshake): over a limit, the
        // connection is only aborted.
        if !self.admit(ctx, client, false) {
            return;
        }
        let accepted_us = self.clock.us(ctx.now());
        if !self.limiter.allow_connection(peer.ip(), accepted_us / 1000) {
            ctx.abort(conn);
            return;
        }
        let Some(tls) = self.start_tls(ctx, conn) else {
            return;
        };
        self.client_opened(ctx, client, peer, tls, accepted_us, false);
        if let Some(c) = self.clients.conns.get_mut(&client) {
            c.ws = Some(WsConn::new());
        }
        ShardMetrics::inc(&self.m().ws_accepted, 1);
    }

    /// Plaintext bytes of a WebSocket-port connection (decrypted if TLS): its request, then
    /// its frames.
    pub(super) fn on_ws_bytes(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        data: &[u8],
    ) {
        let Some(ws) = self
            .clients
            .conns
            .get_mut(&conn)
            .and_then(|c| c.ws.as_mut())
        else {
            return;
        };
        let (head, cut) = match &mut ws.phase {
            WsPhase::Open(_) => return self.ws_frames(ctx, conn, data),
            WsPhase::Done => return,
            WsPhase::Http(head) => {
                // Never more than a head's worth is kept (431 beyond); what this read holds
                // past that can only be the WebSocket's, once the head is complete.
                let room = (http::MAX_HEAD + 1).saturating_sub(head.len());
                let cut = data.len().min(room);
                head.extend_from_slice(&data[..cut]);
                (std::mem::take(head), cut)
            }
        };
        let shared = self.shared.clone();
        let Some(cfg) = shared.ws.as_ref() else {
            return;
        };
        match http::route(&head, &cfg.origins, &cfg.assets) {
            Ok(None) => {
                // Incomplete: keep it (data past the room was cut, so this is a head under
                // the limit; a longer one is refused by `route`).
                if let Some(WsPhase::Http(h)) = self.ws_phase(conn) {
                    *h = head;
                }
            }
            Err(refusal) => {
                debug!(
                    ?conn,
                    status = refusal.status,
                    reason = refusal.reason,
                    "WebSocket port: request refused"
                );
                ShardMetrics::inc(&self.m().ws_refused, 1);
                self.ws_answer(ctx, conn, &http::refusal_response(refusal));
            }
            Ok(Some((
                Route::Asset {
                    asset,
                    head: only_head,
                },
                _,
            ))) => {
                self.ws_answer(ctx, conn, &http::asset_response(asset, only_head));
            }
            Ok(Some((Route::Upgrade { key, subprotocol }, used))) => {
                self.clients
                    .send_raw(ctx, conn, &http::upgrade_response(&key, subprotocol));
                if let Some(p) = self.ws_phase(conn) {
                    *p = WsPhase::Open(frames::WsIn::new(cfg.max_message));
                }
                ShardMetrics::inc(&self.m().ws_upgraded, 1);
                // What followed the head (a client that did not wait for the 101) is the
                // WebSocket's.
                if used < head.len() {
                    self.ws_frames(ctx, conn, &head[used..]);
                }
                if cut < data.len() && self.clients.conns.contains_key(&conn) {
                    self.ws_frames(ctx, conn, &data[cut..]);
                }
            }
        }
    }

    fn ws_phase(&mut self, conn: Client) -> Option<&mut WsPhase> {
        self.clients
            .conns
            .get_mut(&conn)
            .and_then(|c| c.ws.as_mut())
            .map(|w| &mut w.phase)
    }

    /// An HTTP answer that ends the connection (a page file, a refusal).
    fn ws_answer(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client, response: &[u8]) {
        self.clients.send_raw(ctx, conn, response);
        if let Some(p) = self.ws_phase(conn) {
            *p = WsPhase::Done;
        }
        self.drop_conn(ctx, conn, true);
    }

    /// WebSocket frames from the client: the binary payload goes to the frame loop, control
    /// frames are answered, a close or a broken rule ends the connection (its session, if it
    /// has one, is suspended, as on any lost connection).
    fn ws_frames(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client, data: &[u8]) {
        let mut payload = std::mem::take(&mut self.ws_payload);
        let mut replies = std::mem::take(&mut self.ws_replies);
        payload.clear();
        replies.clear();
        let st = match self.ws_phase(conn) {
            Some(WsPhase::Open(ws)) => ws.feed(data, &mut payload, &mut replies),
            _ => WsState::Open,
        };
        if !replies.is_empty() {
            self.clients.send_raw(ctx, conn, &replies);
        }
        if !payload.is_empty() {
            self.on_plaintext(ctx, conn, &payload);
        }
        self.ws_payload = payload;
        self.ws_replies = replies;
        match st {
            WsState::Open => {}
            WsState::PeerClosed(code) => {
                debug!(?conn, ?code, "WebSocket closed by the client");
                self.ws_end(ctx, conn);
            }
            WsState::Failed(c) => {
                debug!(
                    ?conn,
                    code = c.code,
                    reason = c.reason,
                    "WebSocket closed: the client broke a rule"
                );
                ShardMetrics::inc(&self.m().ws_refused, 1);
                self.ws_end(ctx, conn);
            }
        }
    }

    /// The WebSocket has ended (its close frame is queued): the connection goes, after what
    /// is queued.
    fn ws_end(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client) {
        if let Some(p) = self.ws_phase(conn) {
            *p = WsPhase::Done;
        }
        self.conn_lost(ctx, conn, true);
    }

    /// Before the server closes an upgraded connection: a close frame (1000), so that the
    /// browser sees a clean close with a reason rather than a dropped connection.
    pub(super) fn ws_goodbye(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client) {
        if let Some(p @ WsPhase::Open(_)) = self.ws_phase(conn) {
            *p = WsPhase::Done;
            let mut out = Vec::with_capacity(8);
            frames::close(&mut out, 1000, "");
            self.clients.send_raw(ctx, conn, &out);
        }
    }
}
