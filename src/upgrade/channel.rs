//! The hand-off socket: [`wire`](super::wire) messages over a Unix stream socket, with the
//! descriptors they name passed by SCM_RIGHTS.
//!
//! Messages that carry descriptors are batched: up to [`MAX_FDS`] descriptors go in one
//! `sendmsg` together with the messages naming them, so a hand-over of thousands of
//! connections costs tens of system calls, not thousands. Linux attaches passed descriptors to
//! the first bytes of the `sendmsg` that carried them, and never delivers them with another
//! sender's bytes; the receiver reads with `recvmsg` only and keeps the descriptors in arrival
//! order, and each message takes its own ([`Channel::take_fds`]): they always arrive with or
//! before the message that names them.

use super::wire::{self, Msg};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Descriptors one `sendmsg` carries at most (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 250;

/// Messages waiting to be sent past this many bytes go out.
const BATCH_BYTES: usize = 1 << 20;

/// One end of the hand-off socket.
pub struct Channel {
    sock: UnixStream,
    /// Messages waiting to go out in one `sendmsg`, and the descriptors they carry (new
    /// descriptors of the caller's: sent, then closed here).
    batch: Vec<u8>,
    batch_fds: Vec<OwnedFd>,
    /// Descriptors received that no message has taken yet.
    fds: VecDeque<OwnedFd>,
    /// Bytes received (for the hand-off's metrics).
    pub received: u64,
    /// Bytes sent.
    pub sent: u64,
}

impl Channel {
    /// Wraps a connected socket; reads and writes wait at most `timeout`.
    pub fn new(sock: UnixStream, timeout: Duration) -> io::Result<Channel> {
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        Ok(Channel {
            sock,
            batch: Vec::new(),
            batch_fds: Vec::new(),
            fds: VecDeque::new(),
            received: 0,
            sent: 0,
        })
    }

    /// Queues a message and the descriptors it names (sent at the next [`Channel::flush`], or
    /// once a batch is full).
    pub fn queue_with_fds(&mut self, m: &Msg<'_>, fds: &[impl AsFd]) -> io::Result<()> {
        if fds.len() != m.fds() || fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} descriptors for a message that carries {}",
                    fds.len(),
                    m.fds()
                ),
            ));
        }
        if self.batch_fds.len() + fds.len() > MAX_FDS {
            self.flush()?;
        }
        m.encode(&mut self.batch);
        for f in fds {
            self.batch_fds.push(f.as_fd().try_clone_to_owned()?);
        }
        if self.batch.len() >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Queues a message without descriptors.
    pub fn queue(&mut self, m: &Msg<'_>) -> io::Result<()> {
        self.queue_with_fds(m, &[] as &[OwnedFd])
    }

    /// Sends what is queued: one `sendmsg` with the batch's descriptors (the rest of a long
    /// batch follows as plain writes).
    pub fn flush(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.batch);
        let fds = std::mem::take(&mut self.batch_fds);
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        if !borrowed.is_empty() && !cmsg.push(SendAncillaryMessage::ScmRights(&borrowed)) {
            return Err(io::Error::other(
                "descriptors do not fit the control buffer",
            ));
        }
        let n = loop {
            match sendmsg(
                &self.sock,
                &[IoSlice::new(&bytes)],
                &mut cmsg,
                SendFlags::NOSIGNAL,
            ) {
                Ok(n) => break n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        self.sock.write_all(&bytes[n..])?;
        self.sent += bytes.len() as u64;
        Ok(())
    }

    /// Sends a message now, with its descriptors (after what is queued).
    pub fn send_with_fds(&mut self, m: &Msg<'_>, fds: &[impl AsFd]) -> io::Result<()> {
        self.queue_with_fds(m, fds)?;
        self.flush()
    }

    /// Sends a message without descriptors now (after what is queued).
    pub fn send(&mut self, m: &Msg<'_>) -> io::Result<()> {
        self.queue(m)?;
        self.flush()
    }

    /// Reads exactly `buf.len()` bytes, keeping the descriptors that come with them.
    fn read_exact_fds(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut got = 0;
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        while got < buf.len() {
            let mut cmsg = RecvAncillaryBuffer::new(&mut space);
            let r = recvmsg(
                &self.sock,
                &mut [IoSliceMut::new(&mut buf[got..])],
                &mut cmsg,
                RecvFlags::CMSG_CLOEXEC,
            );
            let r = match r {
                Ok(r) => r,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for m in cmsg.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = m {
                    self.fds.extend(received);
                }
            }
            if r.bytes == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the other clawtermd closed the hand-off socket",
                ));
            }
            got += r.bytes;
        }
        Ok(())
    }

    /// Receives one message: its bytes (type and body; decode with [`wire::decode`]). The
    /// descriptors it names are then taken with [`Channel::take_fds`].
    pub fn recv(&mut self) -> io::Result<Vec<u8>> {
        let mut prefix = [0u8; 4];
        self.read_exact_fds(&mut prefix)?;
        let n =
            Msg::announced(prefix).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut body = vec![0u8; n];
        self.read_exact_fds(&mut body)?;
        self.received += 4 + n as u64;
        Ok(body)
    }

    /// The next `n` descriptors received, in the order they were sent: those of the message
    /// just received. Fewer than `n` waiting is an error (they arrive with or before the
    /// message that names them).
    pub fn take_fds(&mut self, n: usize) -> io::Result<Vec<OwnedFd>> {
        if self.fds.len() < n {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a message names {n} descriptors; {} arrived",
                    self.fds.len()
                ),
            ));
        }
        Ok(self.fds.drain(..n).collect())
    }

    /// Descriptors received that no message has taken.
    pub fn spare_fds(&self) -> usize {
        self.fds.len()
    }
}

/// Decodes received bytes, as an I/O error when they are not a message.
pub fn decode(bytes: &[u8]) -> io::Result<Msg<'_>> {
    wire::decode(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Descriptors batched with their messages (more than fit one `sendmsg`, and batches with
    /// messages without any between them) are taken by the messages that name them, in order;
    /// a passed descriptor is the same socket.
    #[test]
    fn descriptors_go_with_the_messages_that_name_them() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = Channel::new(a, Duration::from_secs(5)).unwrap();
        let mut rx = Channel::new(b, Duration::from_secs(5)).unwrap();
        let n = 600; // three batches
        let mut ours = Vec::new();
        let t = std::thread::spawn(move || {
            let mut keep = Vec::new();
            tx.queue(&Msg::Done {
                sessions: 1,
                conns: 2,
                links: 3,
            })
            .unwrap();
            for i in 0..n {
                let (p1, p2) = UnixStream::pair().unwrap();
                let unread = vec![i as u8; if i == 7 { 100_000 } else { 3 }];
                tx.queue_with_fds(
                    &Msg::Conn {
                        shard: 0,
                        sid: i,
                        peer: "p",
                        unread: &unread,
                        unsent: b"",
                    },
                    &[p2.as_fd()],
                )
                .unwrap();
                if i % 100 == 0 {
                    tx.queue(&Msg::Ready).unwrap();
                }
                keep.push(p1);
            }
            tx.flush().unwrap();
            keep
        });
        let m = rx.recv().unwrap();
        assert!(matches!(decode(&m).unwrap(), Msg::Done { .. }));
        assert_eq!(rx.take_fds(0).unwrap().len(), 0);
        for i in 0..n {
            let m = rx.recv().unwrap();
            match decode(&m).unwrap() {
                Msg::Conn { sid, unread, .. } => {
                    assert_eq!(sid, i);
                    assert_eq!(unread[0], i as u8);
                }
                other => panic!("{other:?}"),
            }
            let fd = rx.take_fds(1).unwrap().pop().unwrap();
            ours.push(UnixStream::from(fd));
            if i % 100 == 0 {
                assert_eq!(decode(&rx.recv().unwrap()).unwrap(), Msg::Ready);
            }
        }
        assert_eq!(rx.spare_fds(), 0);
        let mut keep = t.join().unwrap();
        // Each received descriptor is the other end of the sender's pair, in order.
        for (i, (mine, theirs)) in ours.iter_mut().zip(keep.iter_mut()).enumerate() {
            theirs.write_all(&[(i % 251) as u8]).unwrap();
            let mut got = [0u8; 1];
            mine.read_exact(&mut got).unwrap();
            assert_eq!(got[0], (i % 251) as u8);
        }
        assert!(rx.take_fds(1).is_err(), "no descriptor is left over");
    }
}
