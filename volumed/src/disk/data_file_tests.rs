//! Tests of the segmented data files: sparse creation, I/O across a
//! segment boundary, punch and zero, grow and reserve, many ops on the
//! ring, and what the power-loss engine keeps.

use super::*;
use crate::disk::engine::{PUNCH_HOLE, ZERO_RANGE};
use crate::disk::{EngineChoice, IoEngine};

fn engines() -> Vec<Arc<IoEngine>> {
    vec![
        Arc::new(IoEngine::new(EngineChoice::Threads).unwrap()),
        Arc::new(IoEngine::new(EngineChoice::Uring).expect("io_uring works on this machine")),
    ]
}

#[tokio::test]
async fn huge_volume_is_sparse_and_reads_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 64u64 << 40;
    for (i, e) in engines().into_iter().enumerate() {
        let df = DataFile::create(&tmp.path().join(format!("v{i}")), size, e).unwrap();
        assert_eq!(df.segments.read().unwrap().len(), 8);
        assert!(df.allocated_bytes() < 1 << 20);
        assert!(df.allocated_ranges().unwrap().is_empty());
        assert!(
            df.read(size - 4096, 4096)
                .await
                .unwrap()
                .iter()
                .all(|b| *b == 0)
        );
    }
}

#[tokio::test]
async fn io_across_a_segment_boundary() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, e) in engines().into_iter().enumerate() {
        let dir = tmp.path().join(format!("v{i}"));
        let df = DataFile::create(&dir, SEGMENT_SIZE + (1 << 20), Arc::clone(&e)).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        df.write(SEGMENT_SIZE - 4096, data.clone()).await.unwrap();
        assert_eq!(df.read(SEGMENT_SIZE - 4096, 8192).await.unwrap(), data);
        let again = DataFile::open(&dir, SEGMENT_SIZE + (1 << 20), e).unwrap();
        assert_eq!(again.read(SEGMENT_SIZE, 4096).await.unwrap(), data[4096..]);
        let ranges = again.allocated_ranges().unwrap();
        assert_eq!(ranges.len(), 2, "{ranges:?}");
        assert!(ranges[0].0 <= SEGMENT_SIZE - 4096 && ranges[1].1 >= SEGMENT_SIZE + 4096);
    }
}

#[tokio::test]
async fn punch_and_zero_range() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, e) in engines().into_iter().enumerate() {
        let df = DataFile::create(&tmp.path().join(format!("v{i}")), 4 << 20, e).unwrap();
        df.write(0, vec![7u8; 4 << 20]).await.unwrap();
        df.fallocate(PUNCH_HOLE, 1 << 20, 1 << 20).await.unwrap();
        df.fallocate(ZERO_RANGE, 3 << 20, 4096).await.unwrap();
        let all = df.read(0, 4 << 20).await.unwrap();
        assert!(all[..1 << 20].iter().all(|b| *b == 7));
        assert!(all[1 << 20..2 << 20].iter().all(|b| *b == 0));
        assert!(all[3 << 20..(3 << 20) + 4096].iter().all(|b| *b == 0));
        assert_eq!(all[(3 << 20) + 4096], 7);
        let ranges = df.allocated_ranges().unwrap();
        assert_eq!(
            ranges[0],
            (0, 1 << 20),
            "the punched MiB is a hole: {ranges:?}"
        );
        df.will_need(0, 1 << 20).await.unwrap();
        df.sync(true).await.unwrap();
    }
}

#[tokio::test]
async fn grow_adds_segments_and_keeps_data() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Arc::new(IoEngine::new(EngineChoice::Auto).unwrap());
    let df = DataFile::create(&tmp.path().join("v"), 1 << 20, e).unwrap();
    df.write(0, b"hello".to_vec()).await.unwrap();
    df.grow(1 << 20, SEGMENT_SIZE * 2 + 512).unwrap();
    assert_eq!(df.segments.read().unwrap().len(), 3);
    df.write(SEGMENT_SIZE * 2, b"end".to_vec()).await.unwrap();
    assert_eq!(df.read(0, 5).await.unwrap(), b"hello");
    assert!(df.grow(SEGMENT_SIZE * 2 + 512, 4096).is_err());
}

#[tokio::test]
async fn reserve_extends_ahead_and_never_shrinks() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Arc::new(IoEngine::new(EngineChoice::Auto).unwrap());
    let df = DataFile::create(&tmp.path().join("v"), 4096, e).unwrap();
    let len = |df: &DataFile| df.segments.read().unwrap()[0].metadata().unwrap().len();
    df.reserve(1 << 30).unwrap();
    assert_eq!(len(&df), 1 << 30);
    // A grow inside the reservation changes no file.
    df.grow(4096, 1 << 20).unwrap();
    assert_eq!(len(&df), 1 << 30);
    df.reserve(8192).unwrap();
    assert_eq!(len(&df), 1 << 30);
    // Only existing segments are extended; nothing is allocated.
    df.reserve(SEGMENT_SIZE * 2).unwrap();
    assert_eq!(df.segments.read().unwrap().len(), 1);
    assert_eq!(df.allocated_bytes(), 0);
}

#[tokio::test]
async fn many_concurrent_ops_on_the_ring() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Arc::new(IoEngine::new(EngineChoice::Uring).unwrap());
    let df = Arc::new(DataFile::create(&tmp.path().join("v"), 64 << 20, e).unwrap());
    let mut tasks = Vec::new();
    for i in 0..1000u64 {
        let df = Arc::clone(&df);
        tasks.push(tokio::spawn(async move {
            let block = vec![(i % 251) as u8; 4096];
            df.write(i * 4096, block.clone()).await.unwrap();
            assert_eq!(df.read(i * 4096, 4096).await.unwrap(), block);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The power-loss engine loses what was never synced when the data file
/// goes away (the daemon killed), keeps what was, and an fdatasync does
/// not make a punch durable while an fsync does.
#[tokio::test]
async fn powerloss_sim_loses_exactly_the_unsynced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v");
    let e = Arc::new(IoEngine::new(EngineChoice::PowerlossSim).unwrap());
    let df = DataFile::create(&dir, 4 << 20, Arc::clone(&e)).unwrap();
    df.write(0, vec![1u8; 1 << 20]).await.unwrap();
    df.write(2 << 20, vec![2u8; 1 << 20]).await.unwrap();
    df.sync(false).await.unwrap();
    df.write(1 << 20, vec![3u8; 1 << 20]).await.unwrap();
    df.fallocate(PUNCH_HOLE, 2 << 20, 1 << 20).await.unwrap();
    df.sync(false).await.unwrap(); // fdatasync: the punch stays pending
    df.write(3 << 20, vec![4u8; 4096]).await.unwrap();
    let all = df.read(0, 4 << 20).await.unwrap();
    assert!(all[..1 << 20].iter().all(|b| *b == 1));
    assert!(all[1 << 20..2 << 20].iter().all(|b| *b == 3));
    assert!(all[2 << 20..3 << 20].iter().all(|b| *b == 0), "punched");
    assert!(all[3 << 20..(3 << 20) + 4096].iter().all(|b| *b == 4));
    drop(df); // kill -9: nothing more is synced

    let df = DataFile::open(&dir, 4 << 20, Arc::clone(&e)).unwrap();
    let all = df.read(0, 4 << 20).await.unwrap();
    assert!(all[..1 << 20].iter().all(|b| *b == 1), "synced");
    assert!(all[1 << 20..2 << 20].iter().all(|b| *b == 3), "fdatasynced");
    assert!(
        all[2 << 20..3 << 20].iter().all(|b| *b == 2),
        "the punch was never fsynced"
    );
    assert!(all[3 << 20..].iter().all(|b| *b == 0), "never synced");
    assert_eq!(df.allocated_ranges().unwrap(), vec![(0, 3 << 20)]);

    df.fallocate(PUNCH_HOLE, 2 << 20, 1 << 20).await.unwrap();
    df.sync_blocking().unwrap(); // fsync
    drop(df);
    let df = DataFile::open(&dir, 4 << 20, e).unwrap();
    assert!(
        df.read(2 << 20, 1 << 20)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0)
    );
    assert_eq!(df.allocated_ranges().unwrap(), vec![(0, 2 << 20)]);
}
