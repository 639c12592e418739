//! Fuzzes the session record (`Session::from_record`), the bytes a session moves in between
//! processes and nodes. The input is taken as a record, whole or with its CRC fixed up (so the
//! parser behind the checksum is reached too). Checks:
//! * no panic, and never more bytes used than given;
//! * a record that reads back writes back to exactly the same bytes (same clocks), and reads
//!   again to the same session: nothing is half-read or silently changed.
#![no_main]

use clawterm::session::Session;
use libfuzzer_sys::fuzz_target;

const WALL: u64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    // Half the time, make the CRC right so the body parser is exercised.
    if data.first().is_some_and(|b| b & 1 == 1) && bytes.len() >= 14 {
        bytes[..4].copy_from_slice(b"CTSR");
        bytes[4..6].copy_from_slice(&1u16.to_be_bytes());
        let body = (bytes.len() - 14) as u32;
        bytes[6..10].copy_from_slice(&body.to_be_bytes());
        let n = bytes.len() - 4;
        let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_be_bytes());
    }
    // The writer's wall clock is in the record; read it back at that same wall time and at a
    // session clock far enough along that no time saturates.
    let wall = if bytes.len() >= 10 + 56 {
        u64::from_be_bytes(bytes[10 + 48..10 + 56].try_into().unwrap_or([0; 8]))
    } else {
        WALL
    };
    let now = 1u64 << 62;
    if let Ok((s, used)) = Session::from_record(&bytes, now, wall) {
        assert!(used <= bytes.len());
        let again = s.to_record(now, wall);
        let (s2, used2) = Session::from_record(&again, now, wall).expect("its own record reads");
        assert_eq!(used2, again.len());
        assert_eq!(s2.to_record(now, wall), again, "read-write is stable");
        assert_eq!(again.len(), used, "same length as what was read");
    }
});
