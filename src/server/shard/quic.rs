//! QUIC on a shard: datagrams into this shard's endpoint, and what the endpoint reports
//! (streams opened, data, closed, writable) turned into client events; its timers filed in the
//! shard's wheel. The endpoint's work is settled once per event-loop turn
//! ([`ShardHandler::quic_settle`] from the runtime's `on_turn_end`), and once more at shutdown.

use super::super::metrics::ShardMetrics;
use super::super::quic::QEvent;
use super::{Client, Key, ShardHandler, ShardMsg};
use shards::Context;
use std::net::SocketAddr;
use tracing::debug;

impl ShardHandler {
    /// A datagram for this shard's QUIC endpoint.
    pub(super) fn quic_datagram(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        from: SocketAddr,
        data: &[u8],
    ) {
        let (Some(q), Some(tls)) = (self.clients.quic.as_mut(), self.shared.tls.as_ref()) else {
            return;
        };
        let now = ctx.now();
        let now_ms = self.clock.ms(now);
        let limiter = &mut self.limiter;
        let tls = tls.current();
        q.handle_datagram(
            now,
            from,
            data,
            &tls,
            |peer| limiter.allow_connection(peer.ip(), now_ms),
            &mut |to, bytes| {
                let _ = ctx.send_datagram(to, bytes);
            },
        );
    }

    /// Handles what the QUIC endpoint reported, then sends what it has to send and files its
    /// timers. Called at the end of every callback that may have touched a QUIC stream.
    pub(super) fn quic_settle(&mut self, ctx: &mut impl Context<ShardMsg>) {
        loop {
            let Some(q) = self.clients.quic.as_mut() else {
                return;
            };
            if !q.has_work() {
                return;
            }
            let mut events = std::mem::take(&mut self.qevents);
            q.take_events(&mut events);
            for ev in events.drain(..) {
                self.on_quic_event(ctx, ev);
            }
            self.qevents = events;
            let Some(q) = self.clients.quic.as_mut() else {
                return;
            };
            let mut timers = Vec::new();
            q.flush(
                ctx.now(),
                &mut |to, bytes| {
                    let _ = ctx.send_datagram(to, bytes);
                },
                &mut |ch, gen, at| timers.push((ch, gen, at)),
            );
            for (ch, gen, at) in timers {
                // Round up: the wheel has 1 ms slots and firing early only re-files.
                let d = self.clock.ms(at) + 1;
                self.wheel.insert(d, Key::Quic(ch, gen));
                self.schedule(ctx, d);
            }
        }
    }

    pub(super) fn on_quic_event(&mut self, ctx: &mut impl Context<ShardMsg>, ev: QEvent) {
        match ev {
            QEvent::Opened(key, peer) => {
                let conn = Client::Quic(key);
                if self.admit(ctx, conn, true) {
                    let now_us = self.clock.us(ctx.now());
                    self.client_opened(ctx, conn, peer, None, now_us, false);
                }
            }
            QEvent::Data(key, bytes) => {
                if let Some(&owner) = self.clients.relays.get(&key) {
                    ctx.send_to_shard(
                        owner,
                        ShardMsg::RelayIn {
                            from: self.index,
                            key,
                            bytes: bytes.to_vec(),
                        },
                    );
                } else {
                    self.on_client_bytes(ctx, Client::Quic(key), &bytes);
                }
            }
            QEvent::Closed(key) => {
                if let Some(owner) = self.clients.relays.remove(&key) {
                    ctx.send_to_shard(
                        owner,
                        ShardMsg::RelayGone {
                            from: self.index,
                            key,
                        },
                    );
                } else {
                    debug!(?key, "QUIC stream closed by the client");
                    self.conn_lost(ctx, Client::Quic(key), false);
                }
            }
            QEvent::Writable(key) => {
                if !self.clients.relays.contains_key(&key) {
                    self.client_writable(ctx, Client::Quic(key));
                }
            }
        }
    }

    /// A datagram on this shard's UDP socket: into the endpoint, or to the shard its
    /// connection id names (no steering program: the kernel hashed it here).
    pub(super) fn datagram_in(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        from: SocketAddr,
        data: &[u8],
    ) {
        let Some(q) = self.clients.quic.as_ref() else {
            return;
        };
        if let Some(owner) = q.foreign_shard(data) {
            ShardMetrics::inc(&self.m().quic_forwarded, 1);
            ctx.send_to_shard(
                owner,
                ShardMsg::Datagram {
                    from,
                    bytes: data.to_vec(),
                },
            );
            return;
        }
        self.quic_datagram(ctx, from, data);
    }
}
