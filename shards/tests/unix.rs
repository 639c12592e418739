//! connect_unix: exchange data with a UnixListener; a missing path gives on_connected(Err).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use shards::{ConnId, Context, Handler, Runtime};

#[derive(Debug)]
enum Report {
    Connected(Result<(), std::io::ErrorKind>),
    Data(Vec<u8>),
    Closed(Option<std::io::ErrorKind>),
    PeerAddr(Option<SocketAddr>),
}

struct UnixClient {
    tx: mpsc::Sender<Report>,
    conn: Option<ConnId>,
}

impl Handler for UnixClient {
    type Msg = PathBuf;
    fn on_accept(&mut self, _: &mut impl Context<PathBuf>, _: ConnId, _: SocketAddr) {}
    fn on_message(&mut self, ctx: &mut impl Context<PathBuf>, path: PathBuf) {
        let id = ctx.connect_unix(&path).expect("socket creation");
        self.conn = Some(id);
    }
    fn on_connected(
        &mut self,
        ctx: &mut impl Context<PathBuf>,
        conn: ConnId,
        res: std::io::Result<()>,
    ) {
        assert_eq!(Some(conn), self.conn);
        let ok = res.is_ok();
        self.tx
            .send(Report::Connected(res.map_err(|e| e.kind())))
            .unwrap();
        if ok {
            self.tx.send(Report::PeerAddr(ctx.peer_addr(conn))).unwrap();
            ctx.send(conn, b"ping");
        } else {
            // The conn is already gone.
            assert_eq!(ctx.send(conn, b"x"), 0);
        }
    }
    fn on_data(&mut self, _: &mut impl Context<PathBuf>, _: ConnId, data: &[u8]) {
        self.tx.send(Report::Data(data.to_vec())).unwrap();
    }
    fn on_closed(&mut self, _: &mut impl Context<PathBuf>, _: ConnId, err: Option<std::io::Error>) {
        self.tx.send(Report::Closed(err.map(|e| e.kind()))).unwrap();
    }
    fn on_adopt(
        &mut self,
        _: &mut impl Context<PathBuf>,
        _: ConnId,
        _: SocketAddr,
        _: Vec<u8>,
        _: PathBuf,
    ) {
    }
}

#[test]
fn connect_unix_roundtrip_and_missing_path() {
    for mode in common::modes() {
        let dir = std::env::temp_dir().join(format!("shards-unix-{}-{mode:?}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ping");
            s.write_all(b"pong").unwrap();
            // Dropping closes: the shard sees EOF.
        });

        let (tx, rx) = mpsc::channel();
        let mut cfg = common::config(mode, 1);
        cfg.listen = None;
        let rt = Runtime::start(cfg, move |_| UnixClient {
            tx: tx.clone(),
            conn: None,
        })
        .unwrap();
        let remote = rt.remote();
        assert!(remote.send(0, path.clone()));
        let t = Duration::from_secs(10);
        assert!(matches!(
            rx.recv_timeout(t).unwrap(),
            Report::Connected(Ok(()))
        ));
        assert!(matches!(
            rx.recv_timeout(t).unwrap(),
            Report::PeerAddr(None)
        ));
        let mut got = Vec::new();
        loop {
            match rx.recv_timeout(t).unwrap() {
                Report::Data(d) => got.extend(d),
                Report::Closed(e) => {
                    assert_eq!(e, None);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, b"pong");
        server.join().unwrap();

        remote.send(0, dir.join("missing"));
        match rx.recv_timeout(t).unwrap() {
            Report::Connected(Err(kind)) => assert_eq!(kind, std::io::ErrorKind::NotFound),
            other => panic!("unexpected {other:?}"),
        }
        rt.shutdown();
        rt.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
