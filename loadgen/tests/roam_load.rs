//! ClawRoam under load (issue 15's tests): a real `redis-server` and three `clawtermd` nodes on
//! 127.0.0.1/.2/.3, each with its `claw-agent echo`; `loadgen roam` (this package's binary)
//! keeps sessions echoing while the first node is drained to the other two. Every echo must
//! come back exactly once, in order; every session must move; the drained node must end with
//! none, and no session may be served by two nodes.

use clawterm_testkit::client::{hex, AGENT, TENANT, TOKEN};
use clawterm_testkit::cluster::{secret_file, Node, Redis};
use clawterm_testkit::TempDir;
use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

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
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "roam",
            "--target",
            &node.endpoint(),
            "--admin",
            &node.admin.to_string(),
        ])
        .args([
            "--tenant",
            &TENANT.to_string(),
            "--agent",
            &AGENT.to_string(),
        ])
        .args(["--token", &hex(&TOKEN)])
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
