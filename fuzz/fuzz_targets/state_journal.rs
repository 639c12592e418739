//! Fuzzes the state journal (`clawterm::state::journal`): what a restarted clawtermd reads
//! from its state dir after a crash. The input is a journal file: a valid header (so the entry
//! parser is reached) followed by the input's bytes, each entry's CRC fixed up half the time
//! (so the fold behind the checksums — session records, output, counters — is exercised).
//! Checks: no panic and no hang; an error names an offset inside the file; sessions that fold
//! fold again to the same result from their own records (nothing half-applied).
#![no_main]

use clawterm::state::journal::{Entry, Fold, Header, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

const WALL: u64 = 1_700_000_000_000;
const NOW: u64 = 1 << 40;

fuzz_target!(|data: &[u8]| {
    let mut bytes = Header {
        shard: 0,
        shards: 1,
        generation: 1,
        wall_ms: WALL,
    }
    .encode()
    .to_vec();
    bytes.extend_from_slice(data);
    if data.first().is_some_and(|b| b & 1 == 1) {
        // Fix each entry's CRC in place, following the lengths as written.
        let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
        let mut off = HEADER_LEN;
        while off + 4 <= bytes.len() {
            let len = u32::from_be_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            if len < 9 || off + 4 + len > bytes.len() {
                break;
            }
            let body_end = off + len;
            let c = crc.checksum(&bytes[off + 4..body_end]);
            bytes[body_end..body_end + 4].copy_from_slice(&c.to_be_bytes());
            off += 4 + len;
        }
    }
    let mut fold = Fold::default();
    match fold.apply(&bytes, NOW, WALL, 1 << 20) {
        Ok(h) => {
            assert_eq!(h.generation, 1);
            // Every folded session, written back as a whole record and folded again, comes
            // out the same.
            let mut again = Header {
                shard: 0,
                shards: 1,
                generation: 2,
                wall_ms: WALL,
            }
            .encode()
            .to_vec();
            let mut ids: Vec<u32> = fold.sessions.keys().copied().collect();
            ids.sort_unstable();
            let mut records = Vec::new();
            for id in &ids {
                let r = fold.sessions[id].to_record(NOW, WALL);
                Entry::Record(*id, &r).append_to(&mut again);
                records.push(r);
            }
            let mut f2 = Fold::default();
            f2.apply(&again, NOW, WALL, 1 << 20).expect("its own records fold");
            for (id, r) in ids.iter().zip(&records) {
                assert_eq!(&f2.sessions[id].to_record(NOW, WALL), r, "session {id:#x}");
            }
        }
        Err(e) => {
            let s = e.to_string();
            assert!(!s.is_empty());
        }
    }
});
