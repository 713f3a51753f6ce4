//! What encryption adds to a chunk, per 512 KiB chunk, against the plain
//! path: writing (keyed blake3 + zstd + AES-256-GCM seal vs blake3 + zstd)
//! and reading (open + decode vs decode), on data that compresses (half
//! text) and data that does not (random: stored raw, where the cipher's
//! share is largest). `--compress off` writes are the raw rows.

use std::collections::BTreeMap;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use snapshot::codec;
use snapshot::crypt::seal::{self, Kind};
use snapshot::crypt::{DomainId, DomainKeys, domain::DataKey};

const LEN: usize = 512 << 10;

fn data(random: bool) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut v = Vec::with_capacity(LEN);
    while v.len() < LEN {
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x as u8);
        }
        if !random {
            v.extend(b"volumed block storage ".iter().cycle().take(4096));
        }
    }
    v.truncate(LEN);
    v
}

fn sealed(d: &DomainKeys, data: &[u8], level: i32) -> codec::Encoded {
    let mut e = codec::encode_named(data, level, d.naming(), seal::frame_len(32), seal::TAG_LEN);
    let (generation, key) = d.newest();
    seal::seal_in_place(&mut e.bytes, Kind::Chunk, &d.id, generation, &e.hash.0, key).unwrap();
    e
}

fn opened(d: &DomainKeys, obj: Bytes, name: &snapshot::ChunkHash) -> Bytes {
    let f = seal::frame(&obj).unwrap();
    let plain = seal::open(obj, &f, d.seal_key(f.generation).unwrap()).unwrap();
    codec::decode_shared_named(plain, name, d.naming()).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut keys = BTreeMap::new();
    keys.insert(0, DataKey::random());
    let d = DomainKeys::new(DomainId::random(), "bench".into(), &keys).unwrap();
    for (kind, random) in [("mixed", false), ("random", true)] {
        let input = data(random);
        let mut g = c.benchmark_group(format!("write-{kind}"));
        g.throughput(Throughput::Bytes(LEN as u64));
        for (level, label) in [
            (codec::DEFAULT_LEVEL, "zstd3"),
            (codec::NO_COMPRESSION, "raw"),
        ] {
            g.bench_with_input(BenchmarkId::new("plain", label), &input, |b, i| {
                b.iter(|| {
                    codec::encode_named(black_box(i), level, &snapshot::hash::Naming::Plain, 0, 0)
                })
            });
            g.bench_with_input(BenchmarkId::new("sealed", label), &input, |b, i| {
                b.iter(|| sealed(&d, black_box(i), level))
            });
        }
        g.finish();

        let mut g = c.benchmark_group(format!("read-{kind}"));
        g.throughput(Throughput::Bytes(LEN as u64));
        let plain = codec::encode(&input, codec::DEFAULT_LEVEL);
        g.bench_function("plain", |b| {
            b.iter(|| {
                codec::decode_shared(Bytes::from(black_box(plain.bytes.clone())), &plain.hash)
                    .unwrap()
            })
        });
        let s = sealed(&d, &input, codec::DEFAULT_LEVEL);
        g.bench_function("sealed", |b| {
            b.iter(|| opened(&d, Bytes::from(black_box(s.bytes.clone())), &s.hash))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
