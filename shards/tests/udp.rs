//! UDP: per-shard SO_REUSEPORT datagram sockets, the steering program, batched receive past
//! the per-event budget, on both backends.

mod common;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use shards::{BpfInsn, ConnId, Context, Handler, Runtime};

/// Echoes each datagram prefixed with the shard index; a datagram starting with `?` is
/// answered with the number of datagrams this shard has seen from that peer instead.
struct UdpEcho {
    counts: std::collections::HashMap<SocketAddr, u32>,
}

impl Handler for UdpEcho {
    type Msg = ();
    fn on_accept(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr) {}
    fn on_data(&mut self, _: &mut impl Context<()>, _: ConnId, _: &[u8]) {}
    fn on_closed(&mut self, _: &mut impl Context<()>, _: ConnId, _: Option<std::io::Error>) {}
    fn on_message(&mut self, _: &mut impl Context<()>, _: ()) {}
    fn on_adopt(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr, _: Vec<u8>, _: ()) {}
    fn on_datagram(&mut self, ctx: &mut impl Context<()>, from: SocketAddr, data: &[u8]) {
        if data.first() == Some(&b'?') {
            let n = self.counts.get(&from).copied().unwrap_or(0);
            let _ = ctx.send_datagram(from, &n.to_be_bytes());
            return;
        }
        *self.counts.entry(from).or_default() += 1;
        let mut out = vec![ctx.shard() as u8];
        out.extend_from_slice(data);
        ctx.send_datagram(from, &out).expect("send_datagram");
    }
}

fn start(mode: shards::IoMode, shards: usize, steering: Option<Vec<BpfInsn>>) -> Runtime<()> {
    let cfg = shards::Config {
        listen: None,
        udp: Some("127.0.0.1:0".parse().unwrap()),
        udp_steering: steering,
        ..common::config(mode, shards)
    };
    Runtime::start(cfg, |_| UdpEcho {
        counts: Default::default(),
    })
    .expect("runtime with UDP starts")
}

fn client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn roundtrip(s: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Vec<u8> {
    s.send_to(msg, to).unwrap();
    let mut buf = [0u8; 4096];
    let (n, from) = s.recv_from(&mut buf).expect("echo arrives");
    assert_eq!(from, to, "answer comes from the shared port");
    buf[..n].to_vec()
}

#[test]
fn udp_echo_on_every_shard() {
    for mode in common::modes() {
        let rt = start(mode, 2, None);
        eprintln!("udp echo: backend {}", rt.backend());
        let addr = rt.udp_local_addr().expect("bound");
        assert!(!rt.udp_steered());
        let mut shards_seen = HashSet::new();
        for c in 0..64u32 {
            let s = client();
            for m in 0..20u32 {
                let msg = format!("client {c} message {m}");
                let back = roundtrip(&s, addr, msg.as_bytes());
                assert_eq!(&back[1..], msg.as_bytes());
                shards_seen.insert(back[0]);
            }
        }
        // 64 different source ports hashed over 2 sockets: both are used.
        assert_eq!(
            shards_seen.len(),
            2,
            "{mode:?}: kernel spread {shards_seen:?}"
        );
        rt.shutdown();
        rt.join().unwrap();
    }
}

/// `ldb [0]; ret a`: the first payload byte names the shard.
fn first_byte_program() -> Vec<BpfInsn> {
    const BPF_LD_B_ABS: u16 = 0x30; // BPF_LD (0x00) | BPF_B (0x10) | BPF_ABS (0x20)
    const BPF_RET_A: u16 = 0x06 | 0x10; // BPF_RET | BPF_A
    vec![
        BpfInsn {
            code: BPF_LD_B_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        BpfInsn {
            code: BPF_RET_A,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ]
}

#[test]
fn steering_program_picks_the_shard() {
    for mode in common::modes() {
        let rt = start(mode, 3, Some(first_byte_program()));
        assert!(rt.udp_steered(), "the program attaches");
        let addr = rt.udp_local_addr().unwrap();
        for c in 0..30u8 {
            // A fresh source port each time: without steering these would hash anywhere.
            let s = client();
            let want = c % 3;
            let back = roundtrip(&s, addr, &[want, b'x', c]);
            assert_eq!(back[0], want, "{mode:?}: datagram for shard {want}");
            assert_eq!(&back[1..], &[want, b'x', c]);
        }
        // An index past the last socket falls back to the hash: still answered.
        let s = client();
        let back = roundtrip(&s, addr, &[200, 1, 2]);
        assert!(back[0] < 3);
        rt.shutdown();
        rt.join().unwrap();
    }
}

#[test]
fn bursts_past_the_receive_budget_are_all_delivered() {
    for mode in common::modes() {
        // One shard and steering to it, so every datagram of the burst is counted in one place.
        let rt = start(mode, 1, None);
        let addr = rt.udp_local_addr().unwrap();
        let s = client();
        // Room for every echo of the burst: they arrive faster than this thread reads.
        let big: libc::c_int = 4 << 20;
        // SAFETY: passes a live c_int and its size for a socket option on a live socket.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &big as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        const N: u32 = 700; // > 2 × the 256-datagram budget, well inside the socket buffers
        for i in 0..N {
            s.send_to(format!("burst {i:04} {}", "y".repeat(64)).as_bytes(), addr)
                .unwrap();
        }
        let mut echoed = 0;
        let mut buf = [0u8; 256];
        while echoed < N {
            let (n, _) = match s.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) => panic!("{mode:?}: echo {echoed} of {N} arrives: {e:?}"),
            };
            assert!(buf[1..n].starts_with(b"burst "));
            echoed += 1;
        }
        let count = roundtrip(&s, addr, b"?");
        assert_eq!(u32::from_be_bytes(count[..4].try_into().unwrap()), N);
        rt.shutdown();
        rt.join().unwrap();
    }
}

/// Tearing down the probe's ring queues task work for the thread that made it, which used to
/// interrupt that thread's next blocking call that has a timeout with a spurious EINTR.
#[test]
fn probing_io_uring_does_not_interrupt_the_caller() {
    let _ = shards::probe_uring();
    let s = client();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 8];
    for _ in 0..3 {
        let err = s.recv_from(&mut buf).expect_err("nothing is sent");
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err:?}");
    }
}
