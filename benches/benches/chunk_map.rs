//! The chunk-state map is touched by every READ (split into runs) and every
//! WRITE (mark chunks written); both must cost nanoseconds, not a lock.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use volumed::engine::chunk_map::ChunkMap;

fn bench(c: &mut Criterion) {
    // A 1 TiB volume with 512 KiB chunks, half written in a checkerboard.
    let map =
        ChunkMap::new(snapshot::ChunkGeometry::new(1 << 40, 512 << 10).expect("a power of two"));
    for chunk in (0..(1u64 << 21)).step_by(2) {
        map.mark_written(chunk << 19, 1);
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % ((1 << 40) - (1 << 20))
    };
    c.bench_function("chunk_map/mark_written_4k", |b| {
        b.iter(|| map.mark_written(black_box(next() & !4095), 4096))
    });
    c.bench_function("chunk_map/runs_4k", |b| {
        b.iter(|| map.runs(black_box(next() & !4095), 4096))
    });
    c.bench_function("chunk_map/runs_1m_across_2_chunks", |b| {
        b.iter(|| map.runs(black_box(next() & !4095), 1 << 20))
    });
    c.bench_function("chunk_map/runs_32m_64_chunks", |b| {
        b.iter(|| map.runs(black_box(0), 32 << 20))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
