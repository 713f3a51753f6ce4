//! The per-chunk cost of a snapshot: blake3 of the chunk, and encoding it
//! (hash + zstd) at several levels, for the chunk sizes a volume can have.
//! The data is half random, half repetitive: neither best nor worst case.

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use snapshot::codec;

fn mixed(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        // 4 KiB of noise, then 4 KiB of text.
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x as u8);
        }
        v.extend(b"volumed block storage ".iter().cycle().take(4096));
    }
    v.truncate(len);
    v
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("blake3");
    for size in [64usize << 10, 512 << 10, 4 << 20] {
        let data = mixed(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size >> 10), &data, |b, d| {
            b.iter(|| snapshot::ChunkHash::of(black_box(d)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("encode");
    for size in [64usize << 10, 512 << 10, 4 << 20] {
        let data = mixed(size);
        g.throughput(Throughput::Bytes(size as u64));
        for level in [1, 3, 9] {
            g.bench_with_input(
                BenchmarkId::new(format!("level{level}"), size >> 10),
                &data,
                |b, d| b.iter(|| codec::encode(black_box(d), level)),
            );
        }
    }
    g.finish();

    let data = mixed(512 << 10);
    let enc = codec::encode(&data, 3);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("512", |b| {
        b.iter(|| codec::decode(black_box(&enc.bytes), &enc.hash).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
