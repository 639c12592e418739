//! The session record: a session written and read back behaves exactly like the original —
//! the same RESUMED and replay, the same timers (aged by the time in between), the same next
//! frames — and damaged, truncated or foreign records are refused, never half-read.

use clawterm_core::podlink::Msg as PodMsg;
use clawterm_core::session::{
    RecordError, ResumeFrom, Session, SessionConfig, Sink, State, RECORD_VERSION,
};

#[derive(Default)]
struct Rec {
    client: Vec<u8>,
    pod: Vec<String>,
}

impl Sink for Rec {
    fn client(&mut self) -> &mut Vec<u8> {
        &mut self.client
    }
    fn pod(&mut self, _id: u32, msg: PodMsg<'_>) {
        self.pod.push(format!("{msg:?}"));
    }
}

const TOKEN: [u8; 16] = [7; 16];

/// A session with history: accepted, output in its ring, suspended, more output while away.
fn busy_session(cfg: &SessionConfig) -> Session {
    let mut s = Session::new(0x1234_5678, 7, 42, 0x03, TOKEN, 1_000);
    let mut rec = Rec::default();
    s.accept(0x03, "198.51.100.7:4000", 1_000, &mut rec);
    for i in 0..20u32 {
        let out = format!("line {i}\n");
        s.on_agent_data(out.as_bytes(), 1_000 + u64::from(i), cfg, &mut rec);
    }
    s.detach(1_100, cfg, &mut rec);
    s.on_agent_data(b"while away", 1_200, cfg, &mut rec);
    s
}

/// What a session answers a RESUME with, and what it tells the agent.
fn resume_output(s: &mut Session, from: ResumeFrom, now: u64, cfg: &SessionConfig) -> Rec {
    let mut rec = Rec::default();
    s.resume(from, now, cfg, &mut rec);
    rec
}

#[test]
fn a_read_back_session_resumes_exactly_like_the_original() {
    let cfg = SessionConfig::default();
    let mut a = busy_session(&cfg);
    let bytes = a.to_record(1_300, 50_000_000);
    let (b, used) = Session::from_record(&bytes, 1_000_000, 50_000_000).expect("record reads back");
    assert_eq!(used, bytes.len());
    assert_eq!(
        (b.id(), b.tenant(), b.agent(), b.state(), b.resume_token()),
        (
            a.id(),
            a.tenant(),
            a.agent(),
            State::Suspended,
            a.resume_token()
        )
    );
    assert_eq!(b.next_seq(), a.next_seq());
    assert_eq!(b.ring().len(), a.ring().len());
    assert_eq!(b.ring().payload_bytes(), a.ring().payload_bytes());
    assert_eq!(
        b.next_deadline(&cfg).map(|d| d - 1_000_000),
        a.next_deadline(&cfg).map(|d| d - 1_300),
        "the same time left on its timers"
    );
    for from in [ResumeFrom::LastSeq(5), ResumeFrom::LastSeq(0)] {
        let mut a2 = Session::from_record(&a.to_record(1_300, 50_000_000), 1_300, 50_000_000)
            .unwrap()
            .0;
        let mut b2 = Session::from_record(&bytes, 1_000_000, 50_000_000)
            .unwrap()
            .0;
        let ra = resume_output(&mut a2, from, 1_400, &cfg);
        let rb = resume_output(&mut b2, from, 1_000_100, &cfg);
        assert_eq!(
            ra.client, rb.client,
            "the same RESUMED and replay, byte for byte"
        );
        assert_eq!(ra.pod, rb.pod);
    }
    let ra = resume_output(&mut a, ResumeFrom::LastSeq(3), 1_400, &cfg);
    assert!(!ra.client.is_empty());
}

#[test]
fn timers_age_by_the_time_in_between() {
    let cfg = SessionConfig {
        ttl_ms: 60_000,
        ..SessionConfig::default()
    };
    let a = busy_session(&cfg);
    // Written at session time 1,300 (suspended at 1,100): the TTL is due 60,000 ms after that.
    let due_a = a
        .next_deadline(&cfg)
        .expect("a suspended session has a deadline");
    let bytes = a.to_record(1_300, 10_000_000);
    // Read back 5 s later by a process whose clock reads 1,000,000.
    let now_b = 1_000_000;
    let (b, _) = Session::from_record(&bytes, now_b, 10_005_000).unwrap();
    let due_b = b.next_deadline(&cfg).expect("still due");
    // a: due_a - 1,300 ms left when written; b: 5,000 ms less.
    assert_eq!(due_b - now_b, due_a - 1_300 - 5_000);
    // A reader clock younger than the ages it restores cannot go below 0: the timers then run
    // late by the difference (documented; the daemon's clocks start far enough along).
    let (c, _) = Session::from_record(&bytes, 100, 10_005_000).unwrap();
    assert_eq!(c.next_deadline(&cfg), Some(60_000));
}

#[test]
fn damaged_truncated_and_foreign_records_are_refused() {
    let cfg = SessionConfig::default();
    let bytes = busy_session(&cfg).to_record(1_300, 1);
    for cut in [0, 3, 9, 10, bytes.len() - 1] {
        assert!(
            matches!(
                Session::from_record(&bytes[..cut], 0, 1),
                Err(RecordError::Truncated)
            ),
            "cut at {cut}"
        );
    }
    let mut bad = bytes.clone();
    bad[40] ^= 1;
    assert_eq!(
        Session::from_record(&bad, 0, 1).err(),
        Some(RecordError::Crc)
    );
    let mut other = bytes.clone();
    other[5] = (RECORD_VERSION + 1) as u8;
    assert_eq!(
        Session::from_record(&other, 0, 1).err(),
        Some(RecordError::Version {
            found: RECORD_VERSION + 1
        })
    );
    assert_eq!(
        Session::from_record(b"HTTP/1.1 200 OK\r\n", 0, 1).err(),
        Some(RecordError::Magic)
    );
    // Two records back to back read one at a time.
    let mut two = bytes.clone();
    two.extend_from_slice(&bytes);
    let (_, used) = Session::from_record(&two, 0, 1).unwrap();
    assert_eq!(used, bytes.len());
    assert!(Session::from_record(&two[used..], 0, 1).is_ok());
}

/// Re-seals a record whose body was edited (length unchanged): a new CRC-32C.
fn reseal(bytes: &mut [u8]) {
    let n = bytes.len() - 4;
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_be_bytes());
}

/// Times at the edge of u64 (a hostile or damaged record behind a valid CRC) saturate instead
/// of overflowing (found by the `session_record` fuzz target).
#[test]
fn extreme_times_saturate() {
    let cfg = SessionConfig::default();
    let mut bytes = busy_session(&cfg).to_record(1_300, 1);
    // Body offset 48: wall_ms, then rx age, tx age, ack_check_in.
    for field in 0..4 {
        let at = 10 + 48 + 8 * field;
        let mut b = bytes.clone();
        b[at..at + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        reseal(&mut b);
        let (s, _) = Session::from_record(&b, u64::MAX - 5, u64::MAX).expect("reads");
        let _ = s.to_record(u64::MAX - 5, u64::MAX);
    }
    bytes[10 + 48 + 24..10 + 48 + 32].copy_from_slice(&u64::MAX.to_be_bytes());
    reseal(&mut bytes);
    assert!(Session::from_record(&bytes, 0, 0).is_ok());
}
