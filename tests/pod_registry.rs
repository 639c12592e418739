//! The node-wide pod registry against real directories and real AF_UNIX sockets
//! (POD-LINK §1).

use std::fs;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawterm::pods::{parse_pod_name, PodEvent, PodKey, Registry};

use clawterm_testkit as harness;

use harness::TempDir;

const GENEROUS: Duration = Duration::from_secs(1);

fn key(tenant: u32, agent: u32) -> PodKey {
    PodKey { tenant, agent }
}

/// Starts a registry whose events go to the returned channel.
fn start(dir: &Path) -> (Arc<Registry>, Receiver<PodEvent>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let registry = Registry::start(
        dir,
        Box::new(move |event| {
            let _ = tx.lock().map(|tx| tx.send(event));
        }),
    )
    .expect("start registry");
    (registry, rx)
}

fn next_event(rx: &Receiver<PodEvent>) -> PodEvent {
    rx.recv_timeout(GENEROUS).expect("no pod event within 1 s")
}

fn assert_no_event(rx: &Receiver<PodEvent>) {
    if let Ok(event) = rx.recv_timeout(Duration::from_millis(200)) {
        panic!("unexpected pod event {event:?}");
    }
}

/// Spins until `cond` holds; returns how long it took, or panics after 1 s.
fn wait_until(what: &str, cond: impl Fn() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if cond() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < GENEROUS, "{what}: not within 1 s");
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn sorted(mut keys: Vec<PodKey>) -> Vec<PodKey> {
    keys.sort_by_key(|k| (k.tenant, k.agent));
    keys
}

#[test]
fn parse_pod_name_accepts_canonical_names() {
    assert_eq!(parse_pod_name("0_0"), Some(key(0, 0)));
    assert_eq!(parse_pod_name("1_2"), Some(key(1, 2)));
    assert_eq!(parse_pod_name("10_20"), Some(key(10, 20)));
    assert_eq!(
        parse_pod_name("4294967295_4294967295"),
        Some(key(u32::MAX, u32::MAX))
    );
}

#[test]
fn parse_pod_name_rejects_everything_else() {
    for bad in [
        "",
        "_",
        "1",
        "1_",
        "_1",
        "01_1",
        "1_01",
        "00_0",
        "0_00",
        "a_b",
        "1_b",
        "1_2_3",
        "1__2",
        "+1_2",
        "1_+2",
        "-1_2",
        " 1_2",
        "1_2 ",
        "1.0_2",
        "4294967296_1",
        "1_4294967296",
        "99999999999999999999_1",
        "１_２",
        "1-2",
        "1_2.sock",
    ] {
        assert_eq!(parse_pod_name(bad), None, "{bad:?} must not be a pod name");
    }
}

#[test]
fn initial_scan_finds_sockets_and_ignores_the_rest() {
    let tmp = TempDir::new("scan");
    let dir = tmp.path();
    let _a = UnixListener::bind(dir.join("1_1")).expect("bind");
    let _b = UnixListener::bind(dir.join("0_0")).expect("bind");
    let _c = UnixListener::bind(dir.join("4294967295_7")).expect("bind");
    // Ignored: regular file with a pod name, sockets with bad names, a directory.
    fs::write(dir.join("2_2"), b"not a socket").expect("write");
    let _bad: Vec<UnixListener> = ["01_1", "1_", "a_b", "1_2_3", "4294967296_1"]
        .iter()
        .map(|n| UnixListener::bind(dir.join(n)).expect("bind bad name"))
        .collect();
    fs::create_dir(dir.join("3_3")).expect("mkdir");

    let (registry, rx) = start(dir);
    assert_eq!(
        sorted(registry.keys()),
        vec![key(0, 0), key(1, 1), key(4294967295, 7)]
    );
    assert_eq!(registry.len(), 3);
    assert!(registry.contains(key(1, 1)));
    assert!(!registry.contains(key(2, 2)));
    assert!(!registry.contains(key(3, 3)));
    assert!(!registry.contains(key(1, 2)));
    assert_eq!(registry.dir(), dir);
    // The initial scan reports nothing.
    assert_no_event(&rx);

    // Later arrivals that are not pod sockets are ignored too.
    fs::write(dir.join("5_5"), b"x").expect("write");
    fs::create_dir(dir.join("6_6")).expect("mkdir");
    let _bad2 = UnixListener::bind(dir.join("07_1")).expect("bind");
    assert_no_event(&rx);
    assert_eq!(registry.len(), 3);
    registry.stop();
}

#[test]
fn new_socket_is_usable_quickly() {
    let tmp = TempDir::new("latency");
    let (registry, rx) = start(tmp.path());
    let mut latencies = Vec::new();
    let mut listeners = Vec::new();
    for agent in 0..20 {
        let k = key(7, agent);
        assert!(!registry.contains(k));
        let t0 = Instant::now();
        listeners.push(UnixListener::bind(tmp.path().join(format!("7_{agent}"))).expect("bind"));
        wait_until("new socket registered", || registry.contains(k));
        let latency = t0.elapsed();
        assert!(latency < GENEROUS, "creation → usable took {latency:?}");
        latencies.push(latency);
        assert_eq!(next_event(&rx), PodEvent::Added(k));
    }
    latencies.sort();
    println!(
        "pod registry creation → contains() latency over {} tries: median {:?}, min {:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[0],
        latencies[latencies.len() - 1]
    );
    assert_eq!(registry.len(), 20);
    registry.stop();
}

#[test]
fn removal_and_events_in_order() {
    let tmp = TempDir::new("remove");
    let (registry, rx) = start(tmp.path());
    let path = tmp.path().join("3_4");
    let k = key(3, 4);

    let listener = UnixListener::bind(&path).expect("bind");
    assert_eq!(next_event(&rx), PodEvent::Added(k));
    assert!(registry.contains(k));

    drop(listener); // closing does not remove the file: the pod is still "there"
    fs::remove_file(&path).expect("unlink");
    assert_eq!(next_event(&rx), PodEvent::Removed(k));
    // Gone at once: the snapshot is published before the event is delivered.
    assert!(!registry.contains(k));
    assert_eq!(registry.len(), 0);

    // Re-created: Added again; a socket replaced by another (rename over) is Removed then Added.
    let _l1 = UnixListener::bind(&path).expect("bind");
    assert_eq!(next_event(&rx), PodEvent::Added(k));
    let side = TempDir::new("remove-side");
    let _l2 = UnixListener::bind(side.path().join("new")).expect("bind");
    fs::rename(side.path().join("new"), &path).expect("rename over");
    assert_eq!(next_event(&rx), PodEvent::Removed(k));
    assert_eq!(next_event(&rx), PodEvent::Added(k));
    assert!(registry.contains(k));

    // Replaced by a regular file: Removed.
    fs::write(side.path().join("file"), b"x").expect("write");
    fs::rename(side.path().join("file"), &path).expect("rename file over");
    assert_eq!(next_event(&rx), PodEvent::Removed(k));
    assert!(!registry.contains(k));
    assert_no_event(&rx);
    registry.stop();
}

#[test]
fn rename_in_and_out() {
    let tmp = TempDir::new("rename");
    let side = TempDir::new("rename-side");
    let (registry, rx) = start(tmp.path());
    let k = key(12, 34);

    let _l = UnixListener::bind(side.path().join("staging")).expect("bind");
    fs::rename(side.path().join("staging"), tmp.path().join("12_34")).expect("rename in");
    assert_eq!(next_event(&rx), PodEvent::Added(k));
    assert!(registry.contains(k));

    fs::rename(tmp.path().join("12_34"), side.path().join("out")).expect("rename out");
    assert_eq!(next_event(&rx), PodEvent::Removed(k));
    assert!(!registry.contains(k));

    // Renamed within the directory: from a bad name to a pod name and back.
    let _l2 = UnixListener::bind(tmp.path().join("tmp.sock")).expect("bind");
    fs::rename(tmp.path().join("tmp.sock"), tmp.path().join("5_6")).expect("rename");
    assert_eq!(next_event(&rx), PodEvent::Added(key(5, 6)));
    fs::rename(tmp.path().join("5_6"), tmp.path().join("6_5")).expect("rename");
    assert_eq!(next_event(&rx), PodEvent::Removed(key(5, 6)));
    assert_eq!(next_event(&rx), PodEvent::Added(key(6, 5)));
    assert_eq!(registry.keys(), vec![key(6, 5)]);
    registry.stop();
}

#[test]
fn creates_missing_directory() {
    let tmp = TempDir::new("mkdir");
    let dir = tmp.path().join("nested").join("sockets");
    assert!(!dir.exists());
    let (registry, rx) = start(&dir);
    assert!(dir.is_dir());
    assert!(registry.is_empty());
    let _l = UnixListener::bind(dir.join("1_1")).expect("bind");
    assert_eq!(next_event(&rx), PodEvent::Added(key(1, 1)));
    registry.stop();
}

#[test]
fn stop_ends_the_thread_promptly() {
    let tmp = TempDir::new("stop");
    let _l = UnixListener::bind(tmp.path().join("1_1")).expect("bind");
    let (registry, rx) = start(tmp.path());
    std::thread::sleep(Duration::from_millis(50)); // let the thread block in poll
    let t0 = Instant::now();
    registry.stop();
    let took = t0.elapsed();
    assert!(took < GENEROUS, "stop took {took:?}");
    println!("pod registry stop() took {took:?}");
    // The callback (and so the thread's handle on it) is gone: the channel is disconnected.
    assert!(matches!(
        rx.recv_timeout(GENEROUS),
        Err(mpsc::RecvTimeoutError::Disconnected)
    ));
    // Stopping twice is fine; the last snapshot still answers.
    registry.stop();
    assert!(registry.contains(key(1, 1)));

    // Drop stops it too.
    let (registry, rx) = start(tmp.path());
    let t0 = Instant::now();
    drop(registry);
    assert!(t0.elapsed() < GENEROUS);
    assert!(matches!(
        rx.recv_timeout(GENEROUS),
        Err(mpsc::RecvTimeoutError::Disconnected)
    ));
}

#[test]
fn callback_can_be_set_later_and_replaced() {
    let tmp = TempDir::new("late-cb");
    let registry = Registry::start_without_callback(tmp.path()).expect("start");

    // No callback: changes still update the registry.
    let _a = UnixListener::bind(tmp.path().join("1_1")).expect("bind");
    wait_until("registered without callback", || {
        registry.contains(key(1, 1))
    });

    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    registry.set_on_event(Box::new(move |e| {
        let _ = tx.lock().map(|tx| tx.send(("first", e)));
    }));
    let _b = UnixListener::bind(tmp.path().join("2_2")).expect("bind");
    assert_eq!(
        rx.recv_timeout(GENEROUS).expect("event"),
        ("first", PodEvent::Added(key(2, 2)))
    );

    let (tx2, rx2) = mpsc::channel();
    let tx2 = std::sync::Mutex::new(tx2);
    registry.set_on_event(Box::new(move |e| {
        let _ = tx2.lock().map(|tx| tx.send(("second", e)));
    }));
    fs::remove_file(tmp.path().join("2_2")).expect("unlink");
    assert_eq!(
        rx2.recv_timeout(GENEROUS).expect("event"),
        ("second", PodEvent::Removed(key(2, 2)))
    );
    // The first callback was dropped when replaced.
    assert!(matches!(
        rx.recv_timeout(Duration::from_millis(200)),
        Err(mpsc::RecvTimeoutError::Disconnected)
    ));

    // A panicking callback does not kill the watcher.
    registry.set_on_event(Box::new(|_| {
        panic!("callback panic (expected in this test)")
    }));
    let _c = UnixListener::bind(tmp.path().join("3_3")).expect("bind");
    wait_until("registered despite panicking callback", || {
        registry.contains(key(3, 3))
    });
    let _d = UnixListener::bind(tmp.path().join("4_4")).expect("bind");
    wait_until("watcher alive after callback panic", || {
        registry.contains(key(4, 4))
    });
    registry.stop();
}

#[test]
fn directory_moved_away_drops_every_pod() {
    let tmp = TempDir::new("dirgone");
    let dir = tmp.path().join("sockets");
    fs::create_dir(&dir).expect("mkdir");
    let _a = UnixListener::bind(dir.join("1_1")).expect("bind");
    let _b = UnixListener::bind(dir.join("1_2")).expect("bind");
    let (registry, rx) = start(&dir);
    assert_eq!(registry.len(), 2);

    fs::rename(&dir, tmp.path().join("moved")).expect("move dir");
    let mut removed = vec![next_event(&rx), next_event(&rx)];
    removed.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        removed,
        vec![PodEvent::Removed(key(1, 1)), PodEvent::Removed(key(1, 2))]
    );
    assert!(registry.is_empty());
    // Events in the moved directory are no longer followed.
    let _c = UnixListener::bind(tmp.path().join("moved").join("9_9")).expect("bind");
    assert_no_event(&rx);
    assert!(registry.is_empty());
    let t0 = Instant::now();
    registry.stop();
    assert!(t0.elapsed() < GENEROUS);
}

#[test]
fn burst_of_pods_all_registered_then_all_removed() {
    let tmp = TempDir::new("burst");
    let (registry, rx) = start(tmp.path());
    let listeners: Vec<UnixListener> = (0..500)
        .map(|i| {
            UnixListener::bind(tmp.path().join(format!("{}_{}", i / 10, i % 10))).expect("bind")
        })
        .collect();
    wait_until("all 500 registered", || registry.len() == 500);
    for i in 0..500 {
        fs::remove_file(tmp.path().join(format!("{}_{}", i / 10, i % 10))).expect("unlink");
    }
    wait_until("all 500 removed", || registry.is_empty());
    drop(listeners);
    // Callbacks run just after the snapshot is published: collect rather than peek.
    let events: Vec<PodEvent> = (0..1000).map(|_| next_event(&rx)).collect();
    assert_no_event(&rx);
    assert_eq!(events.len(), 1000);
    for (i, event) in events[..500].iter().enumerate() {
        assert_eq!(*event, PodEvent::Added(key(i as u32 / 10, i as u32 % 10)));
    }
    for (i, event) in events[500..].iter().enumerate() {
        assert_eq!(*event, PodEvent::Removed(key(i as u32 / 10, i as u32 % 10)));
    }
    registry.stop();
}
