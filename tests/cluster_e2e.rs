//! ClawRoam end to end: real `redis-server`, real `clawtermd` nodes on 127.0.0.1/.2/.3, real
//! `claw-agent echo` pods, the real client library and `clawtermctl`.

use clawterm_client::{ClientError, Event, Session, Transport};
use clawterm_testkit::client::{hex, AGENT, TENANT, TOKEN};
use clawterm_testkit::cluster::{secret_file, Node, Redis};
use clawterm_testkit::session::fast_opts;
use clawterm_testkit::TempDir;
use std::time::{Duration, Instant};

struct Cluster {
    redis: Redis,
    nodes: Vec<Node>,
    dir: TempDir,
    tokens: std::path::PathBuf,
    secret: std::path::PathBuf,
}

impl Cluster {
    /// Redis and `n` nodes, each with an echo agent.
    fn start(n: u8) -> Cluster {
        let mut c = Cluster::empty();
        for i in 1..=n {
            c.add(i, &["echo"], &[]);
        }
        c.wait_nodes(n as usize);
        c
    }

    /// Redis, the tokens and the cluster secret; the nodes are the caller's.
    fn empty() -> Cluster {
        let redis = Redis::start();
        let dir = TempDir::new("cluster");
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).unwrap();
        let secret = secret_file(dir.path(), "a test cluster secret, 32 bytes.");
        Cluster {
            redis,
            nodes: Vec::new(),
            dir,
            tokens,
            secret,
        }
    }

    fn add(&mut self, i: u8, agent: &[&str], extra: &[&str]) {
        let node = Node::start(
            i,
            &self.redis.url(),
            &self.tokens,
            &self.secret,
            agent,
            extra,
        );
        self.nodes.push(node);
    }

    /// Until every node's table shows `n` live nodes (the refresher runs every second).
    fn wait_nodes(&self, n: usize) {
        let ok = clawterm_testkit::wait_until(Duration::from_secs(10), || {
            self.nodes.iter().all(|node| {
                let (_, body) = node.admin("GET", "/v1/nodes");
                body.matches("\"alive\":true").count() >= n
            })
        });
        assert!(
            ok,
            "nodes never saw each other: {}",
            self.nodes[0].admin("GET", "/v1/nodes").1
        );
    }

    fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }
}

fn session_at(endpoint: &str) -> Session {
    Session::connect_with(
        endpoint,
        TENANT,
        AGENT,
        TOKEN,
        fast_opts(Transport::Plaintext),
    )
    .unwrap_or_else(|e| panic!("connect to {endpoint}: {e}"))
}

/// One echo round trip of `line` on `s`, collecting into `got` until `want` is all there.
fn echo(s: &mut Session, line: &[u8], got: &mut Vec<u8>, want: &mut Vec<u8>) {
    s.send(line).unwrap();
    want.extend_from_slice(line);
    let deadline = Instant::now() + Duration::from_secs(15);
    while got.len() < want.len() {
        assert!(
            Instant::now() < deadline,
            "echo of {:?} never came back on session {:08x} (now at {})",
            String::from_utf8_lossy(line),
            s.session_id(),
            s.endpoint()
        );
        match s.recv(Duration::from_millis(100)) {
            Ok(Some(Event::Data(d))) => got.extend_from_slice(&d),
            Ok(_) => {}
            Err(e) => panic!("session {:08x} failed: {e}", s.session_id()),
        }
    }
    assert_eq!(
        got,
        want,
        "session {:08x}: not exactly once, in order",
        s.session_id()
    );
}

fn id_hex(s: &Session) -> String {
    format!("{:08x}", s.session_id())
}

/// Sessions move under traffic — one by `clawtermctl roam`, the rest by a drain running while
/// every session keeps echoing — and every byte comes back exactly once, in order; the
/// clients follow ROAM on their own; the drained node ends with none.
#[test]
fn sessions_move_under_traffic_and_clients_follow() {
    let c = Cluster::start(3);
    let n = 12;
    let mut sessions: Vec<(Session, Vec<u8>, Vec<u8>)> = (0..n)
        .map(|_| (session_at(&c.node(1).endpoint()), Vec::new(), Vec::new()))
        .collect();
    for (i, (s, got, want)) in sessions.iter_mut().enumerate() {
        echo(s, format!("s{i} first\n").as_bytes(), got, want);
    }
    assert_eq!(c.node(1).session_count(), n);
    let (code, out, err) = c.node(1).ctl(&["sessions"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id_hex(&sessions[0].0)), "{out}");
    assert!(out.contains("yes"), "echo sessions are movable: {out}");

    // One session, by hand.
    let moved = id_hex(&sessions[0].0);
    let (code, out, err) = c.node(1).ctl(&["roam", &moved, "--to", "node2"]);
    assert_eq!(code, 0, "roam failed: {out} {err}\n{}", c.node(1).log());
    assert!(out.contains("moved to node2"), "{out}");
    {
        let (s, got, want) = &mut sessions[0];
        echo(s, b"after the move\n", got, want);
        assert_eq!(
            s.endpoint(),
            c.node(2).endpoint(),
            "the client followed ROAM"
        );
    }
    assert_eq!(c.node(2).session_count(), 1);

    // The rest, by a drain, while every session echoes.
    let admin = c.node(1).admin;
    let drain = std::thread::spawn(move || {
        let out = std::process::Command::new(clawterm_testkit::bin("clawtermctl"))
            .args(["--admin", &admin.to_string(), "drain", "--to", "node3"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    });
    let mut round = 0;
    while !drain.is_finished() && round < 200 {
        for (i, (s, got, want)) in sessions.iter_mut().enumerate() {
            echo(s, format!("s{i} r{round}\n").as_bytes(), got, want);
        }
        round += 1;
    }
    let (code, out, err) = drain.join().unwrap();
    assert_eq!(code, Some(0), "drain: {out} {err}\n{}", c.node(1).log());
    assert!(
        out.contains(&format!("{} of {} sessions moved", n - 1, n - 1)),
        "{out}"
    );
    for (i, (s, got, want)) in sessions.iter_mut().enumerate() {
        echo(s, format!("s{i} last\n").as_bytes(), got, want);
    }
    assert_eq!(
        c.node(1).session_count(),
        0,
        "the drained node still holds sessions"
    );
    assert_eq!(c.node(3).session_count(), n - 1);
    assert!(
        c.node(1)
            .metric("clawterm_roams_total{result=\"completed\"}")
            >= n as f64
    );
    for (s, _, _) in &sessions[1..] {
        assert_eq!(s.endpoint(), c.node(3).endpoint());
    }
}

/// A RESUME that reaches a node that does not hold the session is answered with ROAM; the
/// client follows it and gets exact replay. Without the token it is NO_SUCH_SESSION.
#[test]
fn resume_at_the_wrong_node_is_redirected_with_exact_replay() {
    let c = Cluster::start(2);
    let mut s = session_at(&c.node(1).endpoint());
    let (mut got, mut want) = (Vec::new(), Vec::new());
    echo(&mut s, b"hello\n", &mut got, &mut want);
    // Output the client has not read yet is in the ring when it leaves.
    s.send(b"unread\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut creds = s.detach();
    creds.endpoint = c.node(2).endpoint();
    // A forged RESUME (right id, wrong token) at the wrong node learns nothing.
    let mut forged = creds.clone();
    forged.resume_token = [0x55; 16];
    let mut opts = fast_opts(Transport::Plaintext);
    opts.auto_reconnect = false;
    let e = Session::resume_with(&forged, opts).unwrap_err();
    assert!(matches!(e, ClientError::NoSuchSession), "{e:?}");
    let mut s = Session::resume_with(&creds, fast_opts(Transport::Plaintext)).unwrap();
    let mut replay = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while replay.len() < b"unread\n".len() {
        assert!(Instant::now() < deadline, "no replay: {replay:?}");
        if let Ok(Some(Event::Data(d))) = s.recv(Duration::from_millis(100)) {
            replay.extend_from_slice(&d);
        }
    }
    assert_eq!(replay, b"unread\n");
    assert_eq!(
        s.endpoint(),
        c.node(1).endpoint(),
        "redirected to the holder"
    );
    assert!(c.node(2).metric("clawterm_roam_redirects_total") >= 1.0);
}

/// Moves that cannot complete are called off and the session goes on where it was, nothing
/// lost: a target without the agent, a dead target, a keeper outage. While the keeper is
/// down, new sessions are still made and used; once it is back, moves work again.
#[test]
fn failed_moves_are_called_off_and_the_session_goes_on() {
    let mut c = Cluster::start(2);
    c.add(3, &[], &[]); // a node without the agent pod
    c.wait_nodes(3);
    let mut s = session_at(&c.node(1).endpoint());
    let (mut got, mut want) = (Vec::new(), Vec::new());
    echo(&mut s, b"one\n", &mut got, &mut want);
    let id = id_hex(&s);

    let (code, _, err) = c.node(1).ctl(&["roam", &id, "--to", "node3"]);
    assert_eq!(code, 1, "a target without the agent must refuse");
    assert!(err.contains("no agent pod"), "{err}");
    echo(&mut s, b"two\n", &mut got, &mut want);

    // The keeper goes away: the move is called off; sessions (old and new) go on.
    c.redis.kill();
    let (code, _, err) = c.node(1).ctl(&["roam", &id, "--to", "node2"]);
    assert_eq!(code, 1, "a move without the keeper must be called off");
    assert!(
        err.contains("keeper") || err.contains("called_off"),
        "{err}"
    );
    echo(&mut s, b"three\n", &mut got, &mut want);
    let mut s2 = session_at(&c.node(1).endpoint());
    let (mut got2, mut want2) = (Vec::new(), Vec::new());
    echo(
        &mut s2,
        b"made while the keeper is down\n",
        &mut got2,
        &mut want2,
    );
    assert_eq!(
        s2.session_id() >> 24,
        s.session_id() >> 24,
        "ids keep the node's ordinal"
    );

    // Back (empty: no persistence): nodes register again and moves work.
    c.redis.restart();
    c.wait_nodes(3);
    let (code, out, err) = c.node(1).ctl(&["roam", &id, "--to", "node2"]);
    assert_eq!(code, 0, "{out} {err}\n{}", c.node(1).log());
    echo(&mut s, b"four\n", &mut got, &mut want);
    assert_eq!(s.endpoint(), c.node(2).endpoint());

    // A dead target: called off, the session stays.
    let id2 = id_hex(&s2);
    let mut dead = c.nodes.remove(1);
    let _ = dead.child.kill();
    let _ = dead.child.wait();
    let (code, _, err) = c.node(1).ctl(&["roam", &id2, "--to", "node2"]);
    assert_eq!(code, 1, "{err}");
    echo(&mut s2, b"still here\n", &mut got2, &mut want2);
    assert_eq!(s2.endpoint(), c.node(1).endpoint());
}

/// The peer port refuses what is not a node of this cluster: garbage, and a node with
/// another secret (its moves are called off); the good links are unaffected.
#[test]
fn hostile_peers_are_refused() {
    let mut c = Cluster::start(2);
    let peer = std::net::SocketAddr::new(c.node(1).ip.into(), c.node(1).peer_port);
    let mut raw = std::net::TcpStream::connect(peer).unwrap();
    use std::io::{Read, Write};
    raw.write_all(b"GET / HTTP/1.1\r\n\r\nMIGRATE everything please")
        .unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // At most a TLS alert, then the connection is closed (within the 10 s timeout).
    let mut buf = [0u8; 256];
    let mut answered = 0;
    loop {
        match raw.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answered += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the peer port kept a garbage connection open: {e}"),
        }
        assert!(answered < 256, "the peer port answered garbage at length");
    }
    // A node that does not know the secret joins the directory but cannot link.
    let other_dir = c.dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = secret_file(&other_dir, "some other secret, 32 bytes long");
    let node = clawterm_testkit::cluster::Node::start(
        3,
        &c.redis.url(),
        &c.tokens,
        &other,
        &["echo"],
        &[],
    );
    c.nodes.push(node);
    c.wait_nodes(3);
    let mut s = session_at(&c.node(1).endpoint());
    let (mut got, mut want) = (Vec::new(), Vec::new());
    echo(&mut s, b"x\n", &mut got, &mut want);
    let (code, _, err) = c.node(1).ctl(&["roam", &id_hex(&s), "--to", "node3"]);
    assert_eq!(code, 1, "a move to a node with another secret must fail");
    assert!(!err.is_empty());
    echo(&mut s, b"y\n", &mut got, &mut want);
    let (code, out, err) = c.node(1).ctl(&["roam", &id_hex(&s), "--to", "node2"]);
    assert_eq!(code, 0, "{out} {err}");
    echo(&mut s, b"z\n", &mut got, &mut want);
}

/// The example agent with real per-session state (a conversation log) moves with its session:
/// after the move the numbering goes on and `history` shows the lines typed before it.
#[test]
fn an_agents_state_moves_with_its_session() {
    let mut c = Cluster::empty();
    let exe = clawterm_testkit::bin("clawtermd")
        .parent()
        .unwrap()
        .join("examples/journal_agent");
    assert!(
        exe.exists(),
        "build the example first: cargo build --examples ({})",
        exe.display()
    );
    let mut agents = Vec::new();
    for i in 1..=2 {
        c.add(i, &[], &[]);
        let mut a = std::process::Command::new(&exe)
            .arg(c.node(i as usize).dir.sock())
            .args([TENANT.to_string(), AGENT.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        clawterm_testkit::wait_agent_listening(&mut a);
        agents.push(clawterm_testkit::Proc(a));
    }
    c.wait_nodes(2);
    let nodes = &c.nodes;
    let mut s = session_at(&nodes[0].endpoint());
    let read_until = |s: &mut Session, what: &str| {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(&got).contains(what) {
            assert!(
                Instant::now() < deadline,
                "no {what:?} in {:?}",
                String::from_utf8_lossy(&got)
            );
            if let Ok(Some(Event::Data(d))) = s.recv(Duration::from_millis(100)) {
                got.extend_from_slice(&d);
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    s.send(b"plan the trip\n").unwrap();
    read_until(&mut s, "#1: plan the trip");
    s.send(b"book the train\n").unwrap();
    read_until(&mut s, "#2: book the train");
    let (code, out, err) = nodes[0].ctl(&["roam", &id_hex(&s), "--to", "node2"]);
    assert_eq!(code, 0, "{out} {err}\n{}", nodes[0].log());
    s.send(b"pack\n").unwrap();
    let after = read_until(&mut s, "#3: pack");
    assert!(after.contains("journal of 2 lines moved here"), "{after}");
    s.send(b"history\n").unwrap();
    let h = read_until(&mut s, "(3 lines)");
    assert!(
        h.contains("1 plan the trip") && h.contains("2 book the train"),
        "{h}"
    );
    assert_eq!(s.endpoint(), nodes[1].endpoint());
}

/// A client that does not follow ROAM keeps its connection when its session moves: the node
/// it is connected to relays it to the new holder, exactly once, in order. A RESUME of such a
/// client at a node that does not hold its session is relayed too, with exact replay.
#[test]
fn clients_without_roam_are_relayed() {
    let c = Cluster::start(2);
    let mut opts = fast_opts(Transport::Plaintext);
    opts.follow_roam = false;
    let mut s =
        Session::connect_with(&c.node(1).endpoint(), TENANT, AGENT, TOKEN, opts.clone()).unwrap();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    echo(&mut s, b"before\n", &mut got, &mut want);
    let (code, out, err) = c.node(1).ctl(&["roam", &id_hex(&s), "--to", "node2"]);
    assert_eq!(code, 0, "{out} {err}\n{}", c.node(1).log());
    for i in 0..50 {
        echo(
            &mut s,
            format!("relayed {i}\n").as_bytes(),
            &mut got,
            &mut want,
        );
    }
    assert_eq!(
        s.endpoint(),
        c.node(1).endpoint(),
        "the client stayed where it was"
    );
    assert_eq!(c.node(2).session_count(), 1);
    assert_eq!(c.node(1).session_count(), 0);
    assert!(c.node(1).metric("clawterm_relays_total") >= 1.0);

    // The connection drops; the client resumes where it connects (node 1): relayed, with the
    // output it had not read replayed.
    s.send(b"unread\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let creds = s.detach();
    let mut s = Session::resume_with(&creds, opts).unwrap();
    let mut replay = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while replay.len() < b"unread\n".len() {
        assert!(Instant::now() < deadline, "no replay: {replay:?}");
        if let Ok(Some(Event::Data(d))) = s.recv(Duration::from_millis(100)) {
            replay.extend_from_slice(&d);
        }
    }
    assert_eq!(replay, b"unread\n");
    let (mut got, mut want) = (Vec::new(), Vec::new());
    echo(&mut s, b"after the resume\n", &mut got, &mut want);
    assert_eq!(s.endpoint(), c.node(1).endpoint());
}

/// A peer that knows the secret cannot replay an old hand-over or slip in a forged record:
/// the node refuses (REFUSE) and its sessions are untouched.
#[test]
fn replayed_and_forged_hand_overs_are_refused() {
    use clawterm::cluster::peer::{PeerAuth, PeerMsg, Peers};
    let c = Cluster::start(2);
    let mut s = session_at(&c.node(1).endpoint());
    let (mut got, mut want) = (Vec::new(), Vec::new());
    echo(&mut s, b"one\n", &mut got, &mut want);
    let sid = s.session_id();
    let (code, out, err) = c.node(1).ctl(&["roam", &id_hex(&s), "--to", "node2"]);
    assert_eq!(code, 0, "{out} {err}");
    echo(&mut s, b"two\n", &mut got, &mut want);

    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let secret = std::fs::read(&c.secret).unwrap();
    let intruder = Peers::start(
        "127.0.0.9:0".parse().unwrap(),
        "intruder".into(),
        PeerAuth::from_secret(secret.trim_ascii()).unwrap(),
        std::sync::Arc::new(move |_from: &str, m: PeerMsg| {
            let _ = tx.lock().unwrap().send(m);
        }),
    )
    .unwrap();
    let node1 = std::net::SocketAddr::new(c.node(1).ip.into(), c.node(1).peer_port);
    let refused = |msg: PeerMsg| -> String {
        assert!(intruder.send("node1", node1, msg));
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(PeerMsg::Refuse { reason, .. }) => return reason,
                Ok(_) => continue,
                Err(_) => panic!("no REFUSE; node log:\n{}", c.node(1).log()),
            }
        }
    };
    // The hand-over node 1 made, replayed to it at the same epoch.
    let why = refused(PeerMsg::Migrate {
        sid,
        epoch: 2,
        from: "intruder".into(),
        record: Vec::new(),
        state: Vec::new(),
        caps_hint: 0,
    });
    assert!(why.contains("replayed"), "{why}");
    // A forged record at a newer epoch.
    let why = refused(PeerMsg::Migrate {
        sid,
        epoch: 9,
        from: "intruder".into(),
        record: b"CTSR definitely not a session".to_vec(),
        state: Vec::new(),
        caps_hint: 0,
    });
    assert!(why.contains("unreadable"), "{why}");
    intruder.shutdown();
    echo(&mut s, b"three\n", &mut got, &mut want);
    assert_eq!(c.node(1).session_count(), 0);
    assert_eq!(c.node(2).session_count(), 1);
}

/// Over TLS, a client that follows ROAM to another node keeps checking the certificate against
/// the name it first connected to (the nodes share a certificate for it; the new node's address
/// is not in it).
#[test]
fn roam_over_tls_keeps_the_server_name() {
    use clawterm_client::TlsTrust;
    let mut c = Cluster::empty();
    // A certificate for localhost and 127.0.0.1 only, shared by both nodes.
    let (cert, key, _) = clawterm::server::tls::self_signed(c.dir.path()).unwrap();
    for i in 1..=2 {
        let node = Node::start_tls(
            i,
            &c.redis.url(),
            &c.tokens,
            &c.secret,
            &["echo"],
            (&cert, &key),
        );
        c.nodes.push(node);
    }
    c.wait_nodes(2);
    let nodes = &c.nodes;
    let trust = TlsTrust {
        ca: Some(cert.clone()),
        pin: None,
        server_name: None,
    };
    let mut s = Session::connect_with(
        &nodes[0].endpoint(),
        TENANT,
        AGENT,
        TOKEN,
        fast_opts(Transport::Tls(trust)),
    )
    .unwrap();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    echo(&mut s, b"over tls\n", &mut got, &mut want);
    let (code, out, err) = nodes[0].ctl(&["roam", &id_hex(&s), "--to", "node2"]);
    assert_eq!(code, 0, "{out} {err}");
    echo(&mut s, b"still over tls\n", &mut got, &mut want);
    assert_eq!(s.endpoint(), nodes[1].endpoint());
    assert!(s.tls_info().is_some(), "still TLS after the move");
}
