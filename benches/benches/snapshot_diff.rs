//! `vol snapshot diff` on two 1 TiB volumes' manifests: 2 Mi chunks of
//! 512 KiB, fully written, 1 % of the chunks different; and the same
//! volumes decoded from their encoded manifests, as the daemon reads them.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use snapshot::{ChunkHash, Manifest, ManifestHeader, SnapshotId};

const CHUNK: u64 = 512 << 10;
const CHUNKS: u64 = 2 << 20;

fn manifest(id: &str, changed_every: Option<u64>) -> Manifest {
    let mut m = Manifest::new(ManifestHeader {
        id: SnapshotId::parse(id).expect("a valid id"),
        volume: "bench".into(),
        size: CHUNKS * CHUNK,
        chunk_size: CHUNK,
        parent: None,
        created_at: "2026-12-01T00:00:00Z".into(),
        labels: Default::default(),
        changed_chunks: 0,
        logical_bytes: 0,
        uploaded_bytes: 0,
        encryption: None,
    });
    for i in 0..CHUNKS {
        // A handful of distinct objects, as a synthetic volume would name.
        let changed = changed_every.is_some_and(|n| i % n == 0);
        let seed = (i % 7) as u8 + if changed { 100 } else { 0 };
        m.push(i, Some(ChunkHash::of(&[seed])));
    }
    m
}

fn bench(c: &mut Criterion) {
    let a = manifest("snap-a", None);
    let b = manifest("snap-b", Some(100));
    let mut g = c.benchmark_group("diff_1tib");
    g.sample_size(10);
    g.bench_function("compare", |bch| {
        bch.iter(|| snapshot::diff::diff(Some(black_box(&a)), black_box(&b)).expect("same chunks"))
    });
    let (ea, eb) = (a.encode(), b.encode());
    g.bench_function("decode_and_compare", |bch| {
        bch.iter(|| {
            let a = Manifest::decode(black_box(&ea)).expect("decodes");
            let b = Manifest::decode(black_box(&eb)).expect("decodes");
            snapshot::diff::diff(Some(&a), &b).expect("same chunks")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
