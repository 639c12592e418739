//! A simulated shard: a [`Context`] that records what a handler does instead of doing it, so
//! a [`Handler`](crate::Handler) is driven in tests without sockets, threads or a kernel (the
//! way quinn-proto's tests drive a connection pair).
//!
//! A test plays the runtime: it makes connections ([`SimCtx::accept`]), calls the handler's
//! callbacks with the `SimCtx`, reads what the handler sent ([`SimCtx::take_output`]), delivers
//! cross-shard messages and hand-offs ([`SimCtx::take_messages`], [`SimCtx::take_hand_offs`])
//! to another handler with its own `SimCtx`, and moves the clock ([`SimCtx::advance`]). Nothing
//! happens behind its back: a closed connection stays closed, a Unix connect stays pending until
//! the test reports its outcome with the handler's `on_connected`.

use crate::handler::{ConnId, Context};
use crate::Backend;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How a simulated connection ended, if it did.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub enum Ending {
    /// Open.
    Open,
    /// The handler closed it (queued output flushed first).
    Closed,
    /// The handler aborted it (queued output dropped).
    Aborted,
    /// The handler handed it to another shard.
    HandedOff,
    /// The test ended it (peer EOF or error reported with `on_closed`).
    Gone,
}

/// One simulated connection.
#[derive(Debug)]
pub struct SimConn {
    /// Bytes the handler sent and the test has not taken yet.
    pub out: Vec<u8>,
    /// Whether the handler wants to read it.
    pub reading: bool,
    /// How it ended, if it did.
    pub ending: Ending,
    /// The TCP peer (None for a Unix connection).
    pub peer: Option<SocketAddr>,
    /// What [`Context::unsent`] reports for it (the test sets it; 0 = all delivered).
    pub unsent: usize,
    /// What [`Context::is_backpressured`] reports for it (the test sets it).
    pub backpressured: bool,
    /// Input the peer sent while the handler did not read (the kernel would hold it); the test
    /// delivers it once reading is on again.
    pub held_input: Vec<u8>,
}

/// A shard's context in a simulation. See the module documentation.
pub struct SimCtx<M> {
    shard: usize,
    shards: usize,
    now: Instant,
    next: u32,
    conns: HashMap<ConnId, SimConn>,
    messages: Vec<(usize, M)>,
    hand_offs: Vec<(ConnId, usize, M)>,
    connects: Vec<(ConnId, PathBuf)>,
    wake: Option<Instant>,
    stopped: bool,
    exports: Vec<(ConnId, M)>,
    accept_stopped: bool,
    accept_paused: bool,
    adopted: Vec<ConnId>,
}

impl<M> SimCtx<M> {
    /// Shard `shard` of `shards`, its clock at `now`.
    pub fn new(shard: usize, shards: usize, now: Instant) -> SimCtx<M> {
        SimCtx {
            shard,
            shards,
            now,
            next: 0,
            conns: HashMap::new(),
            messages: Vec::new(),
            hand_offs: Vec::new(),
            connects: Vec::new(),
            wake: None,
            stopped: false,
            exports: Vec::new(),
            accept_stopped: false,
            accept_paused: false,
            adopted: Vec::new(),
        }
    }

    fn new_conn(&mut self, peer: Option<SocketAddr>) -> ConnId {
        self.next += 1;
        let id = ConnId {
            idx: self.next,
            gen: 1,
        };
        self.conns.insert(
            id,
            SimConn {
                out: Vec::new(),
                reading: true,
                ending: Ending::Open,
                peer,
                unsent: 0,
                backpressured: false,
                held_input: Vec::new(),
            },
        );
        id
    }

    /// A new TCP connection from `peer` (the test then calls the handler's `on_accept`, or
    /// `on_adopt` for a connection handed over from another shard).
    pub fn accept(&mut self, peer: SocketAddr) -> ConnId {
        self.new_conn(Some(peer))
    }

    /// Connections the handler exported (`Context::export`) since the last call.
    pub fn take_exports(&mut self) -> Vec<(ConnId, M)> {
        std::mem::take(&mut self.exports)
    }

    /// Connections the handler adopted (`Context::adopt_fd`) since the last call, in order.
    pub fn take_adopted(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.adopted)
    }

    /// Start paused, like a runtime started with [`crate::Inherited::paused`].
    pub fn pause_accepting(&mut self) {
        self.accept_paused = true;
    }

    /// Whether accepting is paused (until `Context::start_accepting`).
    pub fn accept_paused(&self) -> bool {
        self.accept_paused
    }

    /// Whether the handler stopped accepting (`Context::stop_accepting`).
    pub fn accept_stopped(&self) -> bool {
        self.accept_stopped
    }

    /// The connection's record (None for ids this shard never had).
    pub fn conn(&self, id: ConnId) -> Option<&SimConn> {
        self.conns.get(&id)
    }

    /// The connection's record, to set what the runtime would report (`unsent`,
    /// `backpressured`).
    pub fn conn_mut(&mut self, id: ConnId) -> Option<&mut SimConn> {
        self.conns.get_mut(&id)
    }

    /// Takes the bytes the handler sent on `id` since the last call.
    pub fn take_output(&mut self, id: ConnId) -> Vec<u8> {
        self.conns
            .get_mut(&id)
            .map(|c| std::mem::take(&mut c.out))
            .unwrap_or_default()
    }

    /// Whether `id` is open (not closed, aborted, handed off or gone).
    pub fn is_open(&self, id: ConnId) -> bool {
        self.conns
            .get(&id)
            .is_some_and(|c| c.ending == Ending::Open)
    }

    /// How `id` ended (None for unknown ids).
    pub fn ending(&self, id: ConnId) -> Option<Ending> {
        self.conns.get(&id).map(|c| c.ending)
    }

    /// Whether the handler reads `id`.
    pub fn is_reading(&self, id: ConnId) -> bool {
        self.conns.get(&id).is_some_and(|c| c.reading)
    }

    /// The test ends `id` from the peer's side (then calls the handler's `on_closed`).
    pub fn peer_gone(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.ending = Ending::Gone;
        }
    }

    /// Takes the messages posted to shards since the last call, as (shard, message).
    pub fn take_messages(&mut self) -> Vec<(usize, M)> {
        std::mem::take(&mut self.messages)
    }

    /// Takes the hand-offs since the last call, as (connection, shard, message).
    pub fn take_hand_offs(&mut self) -> Vec<(ConnId, usize, M)> {
        std::mem::take(&mut self.hand_offs)
    }

    /// Takes the Unix connects started since the last call, as (connection, path); the test
    /// answers each with the handler's `on_connected`.
    pub fn take_connects(&mut self) -> Vec<(ConnId, PathBuf)> {
        std::mem::take(&mut self.connects)
    }

    /// Takes the requested wake-up if it is due at `self.now()` (the test then calls the
    /// handler's `on_tick`).
    pub fn take_due_wake(&mut self) -> Option<Instant> {
        match self.wake {
            Some(w) if w <= self.now => {
                self.wake = None;
                Some(w)
            }
            _ => None,
        }
    }

    /// Moves the clock forward.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// Whether the handler asked the runtime to stop.
    pub fn stopped(&self) -> bool {
        self.stopped
    }
}

impl<M> Context<M> for SimCtx<M> {
    fn shard(&self) -> usize {
        self.shard
    }
    fn shards(&self) -> usize {
        self.shards
    }
    fn now(&self) -> Instant {
        self.now
    }
    fn backend(&self) -> Backend {
        Backend::Epoll
    }
    fn send(&mut self, conn: ConnId, bytes: &[u8]) -> usize {
        match self.conns.get_mut(&conn) {
            Some(c) if c.ending == Ending::Open => {
                c.out.extend_from_slice(bytes);
                c.out.len()
            }
            _ => 0,
        }
    }
    fn unsent(&self, conn: ConnId) -> Option<usize> {
        self.conns
            .get(&conn)
            .filter(|c| c.ending == Ending::Open)
            .map(|c| c.unsent)
    }
    fn is_backpressured(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.backpressured)
    }
    fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.ending == Ending::Open {
                c.ending = Ending::Closed;
            }
        }
    }
    fn abort(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.ending == Ending::Open {
                c.ending = Ending::Aborted;
                c.out.clear();
            }
        }
    }
    fn set_reading(&mut self, conn: ConnId, on: bool) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.reading = on;
        }
    }
    fn connect_unix(&mut self, path: &Path) -> io::Result<ConnId> {
        let id = self.new_conn(None);
        self.connects.push((id, path.to_path_buf()));
        Ok(id)
    }
    fn send_to_shard(&mut self, shard: usize, msg: M) {
        self.messages.push((shard, msg));
    }
    fn hand_off(&mut self, conn: ConnId, shard: usize, msg: M) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.ending = Ending::HandedOff;
        }
        self.hand_offs.push((conn, shard, msg));
    }
    fn export(&mut self, conn: ConnId, msg: M) -> bool {
        match self.conns.get_mut(&conn) {
            Some(c) if c.ending == Ending::Open => {
                c.ending = Ending::HandedOff;
                self.exports.push((conn, msg));
                true
            }
            _ => false,
        }
    }
    fn adopt_fd(&mut self, _fd: std::os::fd::OwnedFd, out: &[u8]) -> ConnId {
        let id = self.new_conn(None);
        if let Some(c) = self.conns.get_mut(&id) {
            c.out.extend_from_slice(out);
        }
        self.adopted.push(id);
        id
    }
    fn stop_accepting(&mut self) {
        self.accept_stopped = true;
    }
    fn start_accepting(&mut self) {
        self.accept_paused = false;
    }
    fn wake_at(&mut self, deadline: Instant) {
        self.wake = Some(match self.wake {
            Some(d) if d <= deadline => d,
            _ => deadline,
        });
    }
    fn stop(&mut self) {
        self.stopped = true;
    }
    fn peer_addr(&self, conn: ConnId) -> Option<SocketAddr> {
        self.conns.get(&conn).and_then(|c| c.peer)
    }
    fn conn_count(&self) -> usize {
        self.conns
            .values()
            .filter(|c| c.ending == Ending::Open)
            .count()
    }
    fn send_datagram(&mut self, _to: SocketAddr, _data: &[u8]) -> io::Result<()> {
        // A simulated shard has no UDP socket, as a runtime without `Config::udp`.
        Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "the simulated shard has no UDP socket",
        ))
    }
    fn udp_dropped(&self) -> u64 {
        0
    }
    fn udp_local_addr(&self) -> Option<SocketAddr> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The simulated context records what a handler does and keeps closed connections closed.
    #[test]
    fn records_actions_and_keeps_endings() {
        let t0 = Instant::now();
        let mut ctx: SimCtx<u8> = SimCtx::new(0, 2, t0);
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let a = ctx.accept(peer);
        assert_eq!(ctx.send(a, b"hi"), 2);
        assert_eq!(ctx.peer_addr(a), Some(peer));
        assert_eq!(ctx.take_output(a), b"hi");
        ctx.set_reading(a, false);
        assert!(!ctx.is_reading(a));
        ctx.close(a);
        assert_eq!(ctx.send(a, b"late"), 0);
        assert!(ctx.take_output(a).is_empty());
        assert_eq!(ctx.ending(a), Some(Ending::Closed));
        ctx.abort(a);
        assert_eq!(ctx.ending(a), Some(Ending::Closed), "an ending is final");

        let p = ctx.connect_unix(Path::new("/x/7_42")).unwrap();
        assert_eq!(ctx.take_connects(), vec![(p, PathBuf::from("/x/7_42"))]);

        ctx.send_to_shard(1, 9);
        assert_eq!(ctx.take_messages(), vec![(1, 9)]);
        let b = ctx.accept(peer);
        ctx.hand_off(b, 1, 3);
        assert!(!ctx.is_open(b));
        assert_eq!(ctx.take_hand_offs().len(), 1);

        ctx.wake_at(t0 + Duration::from_millis(50));
        ctx.wake_at(t0 + Duration::from_millis(80));
        assert_eq!(ctx.take_due_wake(), None, "not due yet");
        ctx.advance(Duration::from_millis(60));
        assert_eq!(ctx.take_due_wake(), Some(t0 + Duration::from_millis(50)));
        assert_eq!(ctx.conn_count(), 1, "only the Unix conn is open");
        ctx.stop();
        assert!(ctx.stopped());
    }
}
