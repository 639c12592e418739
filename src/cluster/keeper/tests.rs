//! The keeper against a real `redis-server` (started on a free port by the test harness).

use super::*;
use clawterm_testkit::cluster::Redis;

fn cfg(redis: &Redis, node: &str, prefix: &str) -> KeeperConfig {
    KeeperConfig {
        url: redis.url(),
        node: NodeInfo {
            id: node.into(),
            client_addr: "127.0.0.1:7220".into(),
            peer_addr: "127.0.0.1:7223".into(),
            shards: 2,
        },
        heartbeat: Duration::from_millis(200),
        prefix: prefix.into(),
        cached_ordinal: None,
    }
}

fn claim(k: &Keeper, sid: u32, from: u64, to: &str, epoch: u64) -> Result<Claim, KeeperError> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    k.claim(
        sid,
        from,
        to,
        epoch,
        Duration::from_secs(1),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv_timeout(Duration::from_secs(5))
        .expect("claim answered")
}

fn lookup(k: &Keeper, sid: u32) -> Result<Option<Entry>, KeeperError> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    k.lookup(
        sid,
        Duration::from_secs(1),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv_timeout(Duration::from_secs(5))
        .expect("lookup answered")
}

#[test]
fn passwords_never_reach_the_logs() {
    assert_eq!(redact("redis://:s3cret@h:6379/0"), "redis://:***@h:6379/0");
    assert_eq!(redact("redis://u:s3cret@h/0"), "redis://u:***@h/0");
    assert_eq!(redact("redis://h:6379/0"), "redis://h:6379/0");
    let e = Keeper::start(
        KeeperConfig {
            url: "redis://:s3cret@127.0.0.1:1/0".into(),
            node: NodeInfo {
                id: "x".into(),
                client_addr: String::new(),
                peer_addr: String::new(),
                shards: 1,
            },
            heartbeat: Duration::from_secs(1),
            prefix: "t0".into(),
            cached_ordinal: None,
        },
        Duration::from_millis(200),
    )
    .err()
    .expect("nothing listens on port 1");
    assert!(!e.to_string().contains("s3cret"), "{e}");
}

#[test]
fn token_hash_is_domain_separated_and_stable() {
    let a = token_hash(&[1; 16]);
    assert_eq!(a, token_hash(&[1; 16]));
    assert_ne!(a, token_hash(&[2; 16]));
    let plain = ring::digest::digest(&ring::digest::SHA256, &[1; 16]);
    assert_ne!(&a[..], plain.as_ref());
}

/// Ordinals are stable per node id and distinct between ids; the directory follows creation,
/// the compare-and-set flip and ending; a stale ender deletes nothing; nodes are listed.
#[test]
fn directory_ordinals_flip_and_nodes() {
    let redis = Redis::start();
    let a = Keeper::start(cfg(&redis, "a", "t1"), Duration::from_secs(2)).unwrap();
    let b = Keeper::start(cfg(&redis, "b", "t1"), Duration::from_secs(2)).unwrap();
    assert_ne!(a.ordinal(), b.ordinal());
    let oa = a.ordinal();
    a.shutdown();
    let a = Keeper::start(cfg(&redis, "a", "t1"), Duration::from_secs(2)).unwrap();
    assert_eq!(a.ordinal(), oa, "an ordinal is the node id's for good");

    a.created(7, 1, 2, 6, token_hash(&[9; 16]));
    let e = lookup(&a, 7).unwrap().expect("record");
    assert_eq!(
        (e.node.as_str(), e.epoch, e.tenant, e.agent, e.caps),
        ("a", 1, 1, 2, 6)
    );
    assert_eq!(e.token_hash, token_hash(&[9; 16]));

    assert_eq!(
        claim(&a, 7, 2, "b", 3).unwrap(),
        Claim::Stale {
            node: "a".into(),
            epoch: 1
        }
    );
    assert_eq!(claim(&a, 7, 1, "b", 2).unwrap(), Claim::Done);
    let e = lookup(&b, 7).unwrap().unwrap();
    assert_eq!((e.node.as_str(), e.epoch), ("b", 2));
    // The old holder flipping again loses; ending it from there deletes nothing.
    assert!(matches!(
        claim(&a, 7, 1, "c", 2).unwrap(),
        Claim::Stale { .. }
    ));
    a.ended(7);
    assert!(lookup(&a, 7).unwrap().is_some(), "a stale ender deleted it");
    b.ended(7);
    // b's write is b's keeper thread's (asynchronous): a sees it once it landed.
    assert!(clawterm_testkit::wait_until(Duration::from_secs(3), || {
        lookup(&a, 7).unwrap().is_none()
    }));
    assert_eq!(claim(&a, 8, 1, "b", 2).unwrap(), Claim::Missing);
    // Adopted: only ever to a newer epoch.
    b.adopted(9, 4, 1, 1, 6, [0; 32]);
    assert!(clawterm_testkit::wait_until(Duration::from_secs(3), || {
        lookup(&a, 9).unwrap().is_some()
    }));
    a.adopted(9, 3, 1, 1, 6, [0; 32]);
    assert_eq!(lookup(&a, 9).unwrap().unwrap().node, "b");

    let nodes = a.nodes(Duration::from_secs(2)).unwrap();
    let ids: Vec<_> = nodes.iter().map(|n| (n.id.as_str(), n.alive)).collect();
    assert_eq!(ids, vec![("a", true), ("b", true)]);
    b.shutdown();
    let nodes = a.nodes(Duration::from_secs(2)).unwrap();
    assert!(nodes.iter().any(|n| n.id == "b" && !n.alive), "{nodes:?}");
    a.shutdown();
}

/// Redis goes away: the keeper says so, requests fail fast, writes queue and reach Redis
/// once it is back; a node with a remembered ordinal starts while it is away, one without
/// does not.
#[test]
fn outage_is_survived_and_writes_are_replayed() {
    let mut redis = Redis::start();
    let k = Keeper::start(cfg(&redis, "n", "t2"), Duration::from_secs(2)).unwrap();
    assert!(k.is_up());
    redis.kill();
    let t = Instant::now();
    let r = claim(&k, 1, 1, "x", 2);
    assert!(
        matches!(
            r,
            Err(KeeperError::Unavailable(_)) | Err(KeeperError::Ambiguous(_))
        ),
        "{r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(clawterm_testkit::wait_until(Duration::from_secs(3), || !k.is_up()));
    k.created(5, 1, 1, 6, [1; 32]);
    let mut c = cfg(&redis, "m", "t2");
    c.cached_ordinal = Some(7);
    let cached = Keeper::start(c, Duration::from_millis(300)).unwrap();
    assert_eq!(cached.ordinal(), 7);
    assert!(!cached.is_up());
    let e = Keeper::start(cfg(&redis, "new", "t2"), Duration::from_millis(300));
    assert!(matches!(e, Err(KeeperError::Unavailable(_))));

    redis.restart();
    assert!(clawterm_testkit::wait_until(
        Duration::from_secs(10),
        || k.is_up()
    ));
    let ok = clawterm_testkit::wait_until(Duration::from_secs(5), || {
        matches!(lookup(&k, 5), Ok(Some(_)))
    });
    assert!(ok, "the write queued while Redis was away never arrived");
    cached.shutdown();
    k.shutdown();
}
