//! The hand-off socket: [`wire`](super::wire) messages over a Unix stream socket, each with the
//! descriptors it names attached (SCM_RIGHTS) to the same `sendmsg`.
//!
//! Linux attaches passed descriptors to the bytes of the `sendmsg` that carried them and never
//! merges them into another sender's read, so every read here is a `recvmsg` that collects
//! whatever descriptors arrive and each message is read to its exact length: a message's
//! descriptors come with its own bytes.

use super::wire::{self, Msg};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Descriptors one `sendmsg` carries at most (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 250;

/// One end of the hand-off socket.
pub struct Channel {
    sock: UnixStream,
    /// Messages without descriptors, batched until the next flush.
    buf: Vec<u8>,
    /// Bytes received (for the hand-off's metrics).
    pub received: u64,
    /// Bytes sent.
    pub sent: u64,
}

impl Channel {
    /// Wraps a connected socket; reads wait at most `timeout`.
    pub fn new(sock: UnixStream, timeout: Duration) -> io::Result<Channel> {
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        Ok(Channel {
            sock,
            buf: Vec::new(),
            received: 0,
            sent: 0,
        })
    }

    /// Queues a message without descriptors (sent at the next [`Channel::flush`] or
    /// [`Channel::send_with_fds`], or once 1 MiB is waiting).
    pub fn queue(&mut self, m: &Msg<'_>) -> io::Result<()> {
        debug_assert_eq!(m.fds(), 0);
        m.encode(&mut self.buf);
        if self.buf.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends what is queued.
    pub fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.sock.write_all(&self.buf)?;
            self.sent += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Sends a message now, with its descriptors (after what is queued).
    pub fn send_with_fds(&mut self, m: &Msg<'_>, fds: &[impl AsFd]) -> io::Result<()> {
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
        self.flush()?;
        let mut bytes = Vec::new();
        m.encode(&mut bytes);
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        if !borrowed.is_empty() && !cmsg.push(SendAncillaryMessage::ScmRights(&borrowed)) {
            return Err(io::Error::other(
                "descriptors do not fit the control buffer",
            ));
        }
        // The descriptors go with the first sendmsg; the rest of a long message follows.
        let n = sendmsg(
            &self.sock,
            &[IoSlice::new(&bytes)],
            &mut cmsg,
            SendFlags::NOSIGNAL,
        )?;
        self.sock.write_all(&bytes[n..])?;
        self.sent += bytes.len() as u64;
        Ok(())
    }

    /// Sends a message without descriptors now.
    pub fn send(&mut self, m: &Msg<'_>) -> io::Result<()> {
        self.queue(m)?;
        self.flush()
    }

    /// Reads exactly `buf.len()` bytes, collecting the descriptors that come with them.
    fn read_exact_fds(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<()> {
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
                    fds.extend(received);
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

    /// Receives one message: its bytes (type and body; decode with [`wire::decode`]) and the
    /// descriptors that came with it.
    pub fn recv(&mut self) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let mut fds = Vec::new();
        let mut prefix = [0u8; 4];
        self.read_exact_fds(&mut prefix, &mut fds)?;
        let n =
            Msg::announced(prefix).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut body = vec![0u8; n];
        self.read_exact_fds(&mut body, &mut fds)?;
        self.received += 4 + n as u64;
        Ok((body, fds))
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

    /// Descriptors arrive with their own message, in order, across batched messages without
    /// any; the passed descriptor is the same socket.
    #[test]
    fn descriptors_travel_with_their_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = Channel::new(a, Duration::from_secs(5)).unwrap();
        let mut rx = Channel::new(b, Duration::from_secs(5)).unwrap();
        let (mut p1, p2) = UnixStream::pair().unwrap();
        tx.queue(&Msg::Done {
            sessions: 1,
            conns: 2,
            links: 3,
        })
        .unwrap();
        tx.send_with_fds(
            &Msg::Conn {
                shard: 0,
                sid: 9,
                peer: "p",
                unread: &[1; 100_000],
                unsent: b"",
            },
            &[p2.as_fd()],
        )
        .unwrap();
        tx.send(&Msg::Ready).unwrap();
        let (m, fds) = rx.recv().unwrap();
        assert!(matches!(decode(&m).unwrap(), Msg::Done { .. }));
        assert!(fds.is_empty());
        let (m, fds) = rx.recv().unwrap();
        assert!(
            matches!(decode(&m).unwrap(), Msg::Conn { sid: 9, unread, .. } if unread.len() == 100_000)
        );
        assert_eq!(fds.len(), 1);
        let (m, fds2) = rx.recv().unwrap();
        assert_eq!(decode(&m).unwrap(), Msg::Ready);
        assert!(fds2.is_empty());
        // The descriptor received is the other end of p1.
        let mut s = UnixStream::from(fds.into_iter().next().unwrap());
        drop(p2);
        p1.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
    }
}
