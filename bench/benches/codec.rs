//! Frame codec throughput on one core: decode (header parse + LEN check + CRC-16 verify) and
//! encode of DATA frames with 64-byte and 16 KiB payloads. Throughput is counted in wire bytes
//! (payload + 15 bytes of header and CRC). A CRC-only group shows how much of the decode cost is
//! the checksum.
//!
//! Run with `cargo bench --bench codec`.

use clawterm::proto::frame::{crc16, encode_with};
use clawterm::proto::{
    decode, encode_to_slice, encode_to_vec, Decoded, FrameType, MAX_PAYLOAD, OVERHEAD,
};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;

const SIZES: [(&str, usize); 2] = [("64B", 64), ("16KiB", 16 * 1024)];

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

fn frame(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(OVERHEAD + len);
    encode_to_vec(&mut v, 0x9a3f_0002, 42, FrameType::Data, 0, &payload(len));
    v
}

fn decode_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for (label, len) in SIZES {
        let wire = frame(len);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_with_input(BenchmarkId::new("data", label), &wire, |b, wire| {
            b.iter(|| match decode(black_box(wire), MAX_PAYLOAD) {
                Ok(Decoded::Frame(f, used)) => {
                    black_box(f.payload);
                    used
                }
                _ => unreachable!(),
            })
        });
    }
    g.finish();
}

/// A `len`-byte slice of `backing` placed half a page away (mod 4 KiB) from `dst`, where the
/// encoder will copy it. Without this the bench measures the allocator's luck: when source and
/// destination sit a few bytes apart mod 4 KiB, the CPU's 4K-aliasing stalls make the payload
/// `memcpy` as slow as the CRC (seen with perf: `encode_to_slice` at half the speed of
/// `encode_to_vec` for no reason in the code).
fn placed(backing: &[u8], len: usize, dst: *const u8) -> &[u8] {
    let dst = dst as usize + 13; // the payload starts after the header
    let off = (0..4096)
        .find(|off| dst.wrapping_sub(backing.as_ptr() as usize + off) % 4096 == 2048)
        .expect("some offset in a page works");
    &backing[off..off + len]
}

fn encode_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for (label, len) in SIZES {
        let backing = payload(len + 4096);
        g.throughput(Throughput::Bytes((OVERHEAD + len) as u64));
        let mut out = vec![0u8; OVERHEAD + len];
        let p = placed(&backing, len, out.as_ptr());
        g.bench_function(BenchmarkId::new("to_slice", label), |b| {
            b.iter(|| encode_to_slice(&mut out, 7, 42, FrameType::Data, 0, black_box(p)).unwrap())
        });
        let mut v = Vec::with_capacity(OVERHEAD + len);
        let p = placed(&backing, len, v.as_ptr());
        g.bench_function(BenchmarkId::new("to_vec", label), |b| {
            b.iter(|| {
                v.clear();
                encode_to_vec(&mut v, 7, 42, FrameType::Data, 0, black_box(p));
                black_box(v.len())
            })
        });
        g.bench_function(BenchmarkId::new("with", label), |b| {
            b.iter(|| {
                v.clear();
                encode_with(&mut v, 7, 42, FrameType::Data, 0, |o| {
                    o.extend_from_slice(black_box(p))
                });
                black_box(v.len())
            })
        });
    }
    g.finish();
}

fn crc_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc16");
    for (label, len) in SIZES {
        let bytes = payload(len + 13);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_with_input(BenchmarkId::new("slice16", label), &bytes, |b, bytes| {
            b.iter(|| crc16(black_box(bytes)))
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = decode_bench, encode_bench, crc_bench
}
criterion_main!(benches);
