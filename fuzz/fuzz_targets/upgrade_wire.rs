//! Fuzzes the live-upgrade hand-off format (`clawterm::upgrade::wire`): what one clawtermd
//! reads from another on the upgrade socket. Checks: no panic; the length prefix is bounded;
//! a message that decodes encodes back to the same bytes and decodes again to itself.
#![no_main]

use clawterm::upgrade::wire::{decode, Msg, MAX_MESSAGE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        if let Ok(n) = Msg::announced(data[..4].try_into().unwrap()) {
            assert!(n > 0 && n <= MAX_MESSAGE);
        }
    }
    if let Ok(m) = decode(data) {
        let mut out = Vec::new();
        m.encode(&mut out);
        let back = decode(&out[4..]).expect("its own encoding decodes");
        assert_eq!(back, m);
        // A HELLO of another version keeps only its version; everything else is exact.
        if !matches!(m, Msg::Hello { version, .. } if version != clawterm::upgrade::wire::VERSION)
        {
            assert_eq!(&out[4..], data, "decode/encode is exact");
        }
    }
});
