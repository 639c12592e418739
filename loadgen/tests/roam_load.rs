//! ClawRoam under load (issue 15's tests): a real `redis-server` and three `clawtermd` nodes on
//! 127.0.0.1/.2/.3, each with its `claw-agent echo`; `loadgen roam` (this package's binary)
//! keeps sessions echoing while the first node is drained to the other two. Every echo must
//! come back exactly once, in order; every session must move; the drained node must end with
//! none, and no session may be served by two nodes.

use clawterm_testkit::client::{hex, TENANT, TOKEN};
use clawterm_testkit::cluster::{roam_command, secret_file, Node, Redis};
use clawterm_testkit::TempDir;
use std::collections::HashSet;
use std::time::Duration;

/// Each test runs a 3-node cluster with up to 2,000 sessions: on a 2-CPU machine they take turns
/// (in parallel their moves would be called off by the machine's own overload).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn cluster(dir: &TempDir, redis: &Redis) -> Vec<Node> {
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).unwrap();
    let secret = secret_file(dir.path(), "roam load test secret, 32 bytes!");
    let nodes: Vec<Node> = (1..=3)
        .map(|i| Node::start(i, &redis.url(), &tokens, &secret, &["echo"], &[]))
        .collect();
    let ok = clawterm_testkit::wait_until(Duration::from_secs(10), || {
        nodes.iter().all(|n| {
            n.admin("GET", "/v1/nodes")
                .1
                .matches("\"alive\":true")
                .count()
                >= 3
        })
    });
    assert!(ok, "the nodes never saw each other");
    nodes
}

/// The ids a node serves.
fn ids(n: &Node) -> HashSet<String> {
    let (_, body) = n.admin("GET", "/v1/sessions");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["sessions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn roam(node: &Node, extra: &[&str]) -> serde_json::Value {
    let out = roam_command(env!("CARGO_BIN_EXE_loadgen").as_ref(), node)
        .args(extra)
        .output()
        .expect("run loadgen roam");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "loadgen roam printed no JSON: {stdout}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            node.log()
        )
    });
    assert!(
        out.status.success(),
        "loadgen roam failed: {v:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    v
}

/// 1,000 live sessions (a quarter of them relayed: their clients do not follow ROAM) move
/// off node 1 while each keeps an echo in flight: every echo exactly once, in order.
#[test]
fn a_thousand_sessions_move_under_echo_traffic() {
    let _turn = one_at_a_time();
    let redis = Redis::start();
    let dir = TempDir::new("roam-load");
    let nodes = cluster(&dir, &redis);
    let v = roam(
        &nodes[0],
        &["--sessions", "1000", "--no-roam-share", "0.25"],
    );
    assert_eq!(v["moved"], 1000, "{v:#}");
    assert_eq!(v["broken_streams"], 0, "{v:#}");
    assert!(v["echoes"].as_u64().unwrap_or(0) >= 2000, "{v:#}");
    assert_eq!(
        v["clients_at_another_node"], 750,
        "the ROAM-capable clients followed: {v:#}"
    );
    assert!(ids(&nodes[0]).is_empty(), "node 1 still serves sessions");
    let (a, b) = (ids(&nodes[1]), ids(&nodes[2]));
    assert_eq!(a.len() + b.len(), 1000, "every session is served somewhere");
    assert!(a.is_disjoint(&b), "a session served by two nodes");
    assert!(
        !a.is_empty() && !b.is_empty(),
        "the drain spreads over the live nodes"
    );
}

/// A node with 2,000 sessions under traffic (5 echoes a second each) drains; it ends with none.
#[test]
fn a_node_with_two_thousand_sessions_drains_under_traffic() {
    let _turn = one_at_a_time();
    let redis = Redis::start();
    let dir = TempDir::new("roam-drain");
    let nodes = cluster(&dir, &redis);
    let v = roam(
        &nodes[0],
        &[
            "--sessions",
            "2000",
            "--rate",
            "5",
            "--to",
            "node2",
            "--settle",
            "3",
        ],
    );
    assert_eq!(v["moved"], 2000, "{v:#}");
    assert_eq!(v["broken_streams"], 0, "{v:#}");
    assert!(ids(&nodes[0]).is_empty(), "node 1 still serves sessions");
    assert_eq!(ids(&nodes[1]).len(), 2000);
}

/// `loadgen roam` with `fault` injected shortly after the drain starts; its JSON (it may fail:
/// moves are called off).
fn roam_with_fault(
    node: &Node,
    extra: &[&str],
    after_moves: f64,
    fault: impl FnOnce(),
) -> serde_json::Value {
    let child = roam_command(env!("CARGO_BIN_EXE_loadgen").as_ref(), node)
        .args(["--token", &hex(&TOKEN), "--warmup", "1.5", "--settle", "3"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run loadgen roam");
    // Once the drain has moved `after_moves` sessions (or started: 0).
    let metric = if after_moves > 0.0 {
        "clawterm_roams_total{result=\"completed\"}"
    } else {
        "clawterm_roams_total{result=\"started\"}"
    };
    let ok = clawterm_testkit::wait_until(Duration::from_secs(30), || {
        node.metric(metric) >= after_moves.max(1.0)
    });
    assert!(ok, "the drain never started");
    fault();
    let out = child.wait_with_output().expect("loadgen roam");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "loadgen roam printed no JSON: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// After the moves settled: every session is served by exactly one node.
fn served_once(nodes: &[Node], total: usize) {
    let ok = clawterm_testkit::wait_until(Duration::from_secs(30), || {
        !nodes[0]
            .admin("GET", "/v1/sessions")
            .1
            .contains("\"roaming\"")
    });
    assert!(ok, "moves never settled");
    let sets: Vec<HashSet<String>> = nodes.iter().map(ids).collect();
    let mut all = HashSet::new();
    for s in &sets {
        for id in s {
            assert!(
                all.insert(id.clone()),
                "session {id} is served by two nodes"
            );
        }
    }
    assert_eq!(all.len(), total, "sessions lost: {sets:?}");
}

/// Faults in the middle of a drain: the keeper killed, the keeper frozen (its answers lost:
/// flips of unknown outcome), the target frozen (cut off from its peers, then back with its
/// old view). Moves that cannot complete are called off; never is a session served by two
/// nodes, never is an echo lost, doubled or reordered.
#[test]
fn faults_during_a_drain_lose_nothing_and_never_split_a_session() {
    let _turn = one_at_a_time();
    // The keeper dies.
    {
        let mut redis = Redis::start();
        let dir = TempDir::new("roam-fault-kill");
        let nodes = cluster(&dir, &redis);
        let rp = std::sync::Mutex::new(&mut redis);
        let v = roam_with_fault(
            &nodes[0],
            &["--sessions", "1000", "--to", "node2"],
            100.0,
            // Some moves are done by then, others in flight, others not started. It comes back
            // (empty) 2 s later, during the drain: moves whose flip answer was lost have waited,
            // frozen, for it, and are settled by what it says (no record: called off).
            || {
                let mut r = rp.lock().unwrap();
                r.kill();
                std::thread::sleep(Duration::from_secs(2));
                r.restart();
            },
        );
        eprintln!("keeper killed: {v}");
        let failed = v["failed_moves"].as_u64().unwrap_or(0);
        assert!(failed > 0, "the keeper died after the drain: {v:#}");
        assert!(failed < 1000, "the keeper died before the drain: {v:#}");
        assert_eq!(v["broken_streams"], 0, "keeper killed: {v:#}");
        assert_eq!(v["errors"], 0, "keeper killed: {v:#}");
        served_once(&nodes, 1000);
    }
    // The keeper hangs (answers lost), and comes back.
    {
        let redis = Redis::start();
        let dir = TempDir::new("roam-fault-freeze");
        let nodes = cluster(&dir, &redis);
        let v = roam_with_fault(
            &nodes[0],
            &["--sessions", "60", "--to", "node2"],
            0.0,
            || {
                redis.freeze();
                std::thread::sleep(Duration::from_secs(3));
                redis.thaw();
            },
        );
        eprintln!("keeper frozen: {v}");
        assert_eq!(v["broken_streams"], 0, "keeper frozen: {v:#}");
        assert_eq!(v["errors"], 0, "keeper frozen: {v:#}");
        served_once(&nodes, 60);
    }
    // The target is cut off mid-drain, then comes back.
    {
        let redis = Redis::start();
        let dir = TempDir::new("roam-fault-target");
        let nodes = cluster(&dir, &redis);
        let v = roam_with_fault(
            &nodes[0],
            &["--sessions", "1000", "--to", "node2"],
            100.0,
            || {
                // Longer than the 5 s a target has to get ready: the moves in flight to it are
                // called off, and it comes back with warm copies it must not serve.
                nodes[1].freeze();
                std::thread::sleep(Duration::from_secs(7));
                nodes[1].thaw();
            },
        );
        eprintln!("target frozen: {v}");
        assert!(v["failed_moves"].as_u64().unwrap_or(0) > 0, "{v:#}");
        assert_eq!(v["broken_streams"], 0, "target frozen: {v:#}");
        assert_eq!(v["errors"], 0, "target frozen: {v:#}");
        served_once(&nodes, 1000);
    }
}

/// A node cut off from the network (a network namespace whose link goes down: from Redis and
/// from its peers at once, its process running on) in the middle of a drain, for longer than a
/// move may take, then back with the view it had: its moves are called off or fenced, its
/// sessions never served twice, no echo lost or doubled. Needs root and iproute2 (CI has both);
/// elsewhere it says why and passes vacuously only if namespaces cannot be created.
#[test]
fn a_node_cut_off_mid_drain_is_fenced_and_loses_nothing() {
    let _turn = one_at_a_time();
    use clawterm_testkit::cluster::Netns;
    let Some(ns) = Netns::create(7) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to create network namespaces (root, iproute2)"
        );
        eprintln!("skipped: cannot create a network namespace here (root and iproute2 needed)");
        return;
    };
    let dir = TempDir::new("roam-netns");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).unwrap();
    let secret = secret_file(dir.path(), "roam netns test secret, 32 bytes");
    let redis = Redis::start_on(ns.host);
    // node1 inside the namespace (the one cut off), node2 outside.
    let n1 = Node::start_at(
        1,
        ns.inside,
        Some(&ns.name),
        &redis.url(),
        &tokens,
        &secret,
        &["echo"],
    );
    let n2 = Node::start_at(2, ns.host, None, &redis.url(), &tokens, &secret, &["echo"]);
    let ok = clawterm_testkit::wait_until(Duration::from_secs(10), || {
        n2.admin("GET", "/v1/nodes")
            .1
            .matches("\"alive\":true")
            .count()
            >= 2
            && n1
                .admin("GET", "/v1/nodes")
                .1
                .matches("\"alive\":true")
                .count()
                >= 2
    });
    assert!(ok, "the nodes never saw each other");
    // loadgen runs beside node1, in its namespace (the drain is asked on loopback).
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_loadgen").as_ref());
    cmd.args(["roam", "--target", &n1.endpoint()])
        .args(["--admin", &n1.admin_local().to_string()])
        .args(["--tenant", &TENANT.to_string(), "--agent", "1"])
        .args(["--token", &hex(&TOKEN)])
        .args([
            "--sessions",
            "600",
            "--to",
            "node2",
            "--warmup",
            "1.5",
            "--settle",
            "6",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("loadgen in the namespace");
    let ok = clawterm_testkit::wait_until(Duration::from_secs(30), || {
        n1.metric("clawterm_roams_total{result=\"completed\"}") >= 50.0
    });
    assert!(ok, "the drain never started");
    ns.cut();
    std::thread::sleep(Duration::from_secs(8));
    ns.restore();
    let out = child.wait_with_output().expect("loadgen roam");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "loadgen printed no JSON: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("cut off: {v}");
    assert!(
        v["failed_moves"].as_u64().unwrap_or(0) > 0,
        "nothing was cut: {v:#}"
    );
    assert_eq!(v["broken_streams"], 0, "{v:#}");
    assert_eq!(v["errors"], 0, "{v:#}");
    served_once(&[n1, n2], 600);
}
