//! The shard's timers: one wheel for session deadlines, handshake deadlines, pod grace periods
//! and retries, QUIC timers and the metrics refresh; the runtime is asked to wake the shard at
//! the earliest.

use super::{ConnState, Key, ShardHandler, ShardMsg, NO_WAKE, STATS_EVERY_MS};
use shards::Context;
use std::time::Duration;
use tracing::debug;

impl ShardHandler {
    pub(super) fn on_timers(&mut self, ctx: &mut impl Context<ShardMsg>) {
        let now = self.now(ctx);
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.poll(now, &mut fired);
        for (deadline, key) in fired.drain(..) {
            match key {
                Key::Handshake(conn) => {
                    if self
                        .clients
                        .conns
                        .get(&conn)
                        .is_some_and(|c| c.state == ConnState::Handshake)
                    {
                        debug!(?conn, "handshake timeout");
                        self.drop_conn(ctx, conn, false);
                        self.clients.abort(ctx, conn);
                    }
                }
                Key::Grace(pod) => self.grace_expired(ctx, pod),
                Key::Roam(sid) => self.on_roam_timer(ctx, sid),
                Key::Quic(ch, gen) => {
                    if let Some(q) = self.clients.quic.as_mut() {
                        q.on_timeout(ch, gen, ctx.now());
                    }
                }
                Key::Stats => {
                    if let Some(q) = self.clients.quic.as_mut() {
                        let timeout = Duration::from_millis(self.shared.cfg.handshake_ms);
                        q.sweep(ctx.now(), timeout);
                    }
                    self.publish_gauges();
                    self.limiter.sweep(now);
                    self.roam_sweep(now);
                    self.wheel.insert(now + STATS_EVERY_MS, Key::Stats);
                }
                // Reconnects only a link still waiting with no attempt in flight.
                Key::Retry(pod) => self.pod_added(ctx, pod),
                Key::Session(sid) => {
                    let cfg = &self.shared.cfg.session;
                    let Some(s) = self.table.get_mut(sid) else {
                        continue;
                    };
                    if s.armed != deadline {
                        continue; // re-armed since; stale entry
                    }
                    s.armed = 0;
                    if self.roam.frozen(sid) {
                        continue; // moving: its timers wait (re-armed if the move is off)
                    }
                    let conn = self.attached.get(&sid).copied();
                    if s.delivery_check().is_some_and(|d| d <= now) {
                        let delivered = conn.is_some_and(|c| self.clients.delivered(ctx, c));
                        let Some(s) = self.table.get_mut(sid) else {
                            continue;
                        };
                        if s.on_delivery(delivered, now, cfg, &mut self.scratch) {
                            debug!(
                                session = sid,
                                "client does not acknowledge; paced by its send backlog"
                            );
                        }
                    }
                    let Some(s) = self.table.get_mut(sid) else {
                        continue;
                    };
                    let flow = s.on_timer(now, cfg, &mut self.scratch);
                    let key = (s.tenant(), s.agent());
                    self.flush(ctx, conn, key);
                    self.apply_flow(ctx, sid, conn, flow);
                }
            }
        }
        self.fired = fired;
        self.next_wake = NO_WAKE;
        if let Some(d) = self.wheel.next_deadline() {
            self.schedule(ctx, d.max(now));
        }
    }

    pub(super) fn schedule(&mut self, ctx: &mut impl Context<ShardMsg>, deadline: u64) {
        if deadline < self.next_wake {
            self.next_wake = deadline;
            ctx.wake_at(self.clock.instant(deadline));
        }
    }

    /// Files the session's next timer if it is earlier than the one already filed.
    pub(super) fn arm(&mut self, ctx: &mut impl Context<ShardMsg>, sid: u32) {
        let cfg = &self.shared.cfg.session;
        let Some(s) = self.table.get_mut(sid) else {
            return;
        };
        let Some(d) = s.next_deadline(cfg) else {
            return;
        };
        if s.armed == 0 || d < s.armed {
            s.armed = d;
            self.wheel.insert(d, Key::Session(sid));
            self.schedule(ctx, d);
        }
    }
}
