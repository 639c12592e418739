//! Flow control at the shard: a client that does not acknowledge is paced by its send backlog
//! (PROTOCOL.md §7.16), and a pod's PAUSE/CONTINUE of a session's input starts and stops
//! reading its client (POD-LINK.md §4).

use super::{Client, Conn, ConnState, ShardHandler, ShardMsg};
use shards::Context;

impl ShardHandler {
    /// An unacknowledged connection's send backlog paces its agent (§7.16).
    pub(super) fn check_backlog(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        sid: u32,
        conn: Client,
        key: (u32, u32),
    ) {
        if !self.table.get(sid).is_some_and(|s| s.unacknowledged()) {
            return;
        }
        let Some(b) = self.clients.backlogged(ctx, conn) else {
            return;
        };
        if let Some(s) = self.table.get_mut(sid) {
            s.on_send_backlog(b, &mut self.scratch);
            self.flush(ctx, None, key);
        }
    }

    /// A client's send queue drained below its low watermark.
    pub(super) fn client_writable(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client) {
        if let Some(Conn {
            state: ConnState::Bound(sid),
            ..
        }) = self.clients.conns.get(&conn)
        {
            let sid = *sid;
            if self.attached.get(&sid) == Some(&conn) {
                if let Some(key) = self.table.get(sid).map(|s| (s.tenant(), s.agent())) {
                    self.check_backlog(ctx, sid, conn, key);
                }
            }
        }
    }

    /// Starts or stops reading a client for its pod's input flow control. Reading restarts
    /// only when neither the pod (PAUSE) nor the link's backlog holds it, and input that waited
    /// in the connection's buffer meanwhile is processed first.
    pub(super) fn set_client_reading(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        key: (u32, u32),
        on: bool,
    ) {
        if !on {
            self.clients.set_reading(ctx, conn, false);
            return;
        }
        if self.links.get(key).is_some_and(|l| l.holds_reader(&conn)) {
            return; // the link's backlog still holds it; `on_writable` of the link restarts it
        }
        self.clients.set_reading(ctx, conn, true);
        let buf = self
            .clients
            .conns
            .get_mut(&conn)
            .map(|c| std::mem::take(&mut c.inbuf))
            .unwrap_or_default();
        if !buf.is_empty() {
            self.on_plaintext(ctx, conn, &buf);
        }
    }
}
