//! Tests of the intent log on the power-loss engine: flushed small writes
//! come back through replay, checkpoints retire old batches, few writes or
//! a full log sync the segments, FLUSHes racing a large write; and replay's
//! reading of generations and torn batches.

use super::*;
use crate::disk::engine::PUNCH_HOLE;
use crate::disk::{DataFile, EngineChoice};

const MIB: u64 = 1 << 20;

fn powerloss() -> Arc<IoEngine> {
    Arc::new(IoEngine::new(EngineChoice::PowerlossSim).unwrap())
}

/// A new data file on the power-loss engine, in a directory that lives as
/// long as the returned guard.
fn fresh(
    size: u64,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Arc<IoEngine>,
    DataFile,
) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v");
    let e = powerloss();
    let df = DataFile::create(&dir, size, Arc::clone(&e)).unwrap();
    (tmp, dir, e, df)
}

async fn read(df: &DataFile, offset: u64, len: usize) -> Vec<u8> {
    df.read(offset, len).await.unwrap()
}

fn log_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(LOG_FILE)).unwrap().len()
}

#[tokio::test]
async fn a_flush_of_few_writes_syncs_the_segments() {
    let (_tmp, dir, e, df) = fresh(4 * MIB);
    for i in 0..MIN_RECORDS as u64 - 1 {
        df.write(i * MIB, vec![7u8; 4096]).await.unwrap();
    }
    df.sync(false).await.unwrap();
    assert_eq!(log_len(&dir), BLOCK, "only the generation's start");
    drop(df);
    let df = DataFile::open(&dir, 4 * MIB, e).unwrap();
    for i in 0..MIN_RECORDS as u64 - 1 {
        assert_eq!(read(&df, i * MIB, 4096).await, vec![7u8; 4096]);
    }
}

#[tokio::test]
async fn a_flushed_small_write_survives_power_loss_through_the_log() {
    let (_tmp, dir, e, df) = fresh(4 * MIB);
    df.write(0, vec![1u8; 4096]).await.unwrap();
    df.write(MIB + 512, vec![2u8; 8192]).await.unwrap();
    for i in 0..MIN_RECORDS as u64 {
        df.write(3 * MIB + i * 4096, vec![5u8; 4096]).await.unwrap();
    }
    df.sync(false).await.unwrap();
    // The segments were never synced: only the log holds these.
    assert!(log_len(&dir) > BLOCK, "the FLUSH went through the log");
    df.write(2 * MIB, vec![3u8; 4096]).await.unwrap();
    drop(df); // power cut

    let df = DataFile::open(&dir, 4 * MIB, Arc::clone(&e)).unwrap();
    assert_eq!(read(&df, 0, 4096).await, vec![1u8; 4096]);
    assert_eq!(read(&df, MIB + 512, 8192).await, vec![2u8; 8192]);
    assert_eq!(read(&df, 3 * MIB, 4096).await, vec![5u8; 4096]);
    assert_eq!(
        read(&df, 2 * MIB, 4096).await,
        vec![0u8; 4096],
        "never flushed"
    );
    drop(df); // again, right after the replay
    let df = DataFile::open(&dir, 4 * MIB, e).unwrap();
    assert_eq!(
        read(&df, 0, 4096).await,
        vec![1u8; 4096],
        "replay was synced"
    );
    assert_eq!(read(&df, MIB + 512, 8192).await, vec![2u8; 8192]);
}

#[tokio::test]
async fn a_checkpoint_retires_what_the_log_held() {
    let (_tmp, dir, e, df) = fresh(4 * MIB);
    for i in 0..MIN_RECORDS as u64 {
        df.write(i * 4096, vec![1u8; 4096]).await.unwrap();
    }
    df.write(MIB, vec![1u8; 4096]).await.unwrap();
    df.sync(false).await.unwrap();
    assert!(log_len(&dir) > BLOCK, "logged");
    // A write the log does not hold over the first, a trim over the
    // second: the next FLUSH syncs the segments, and the old batch must
    // never come back over them.
    df.write(0, vec![2u8; RECORD_MAX * 2]).await.unwrap();
    df.fallocate(PUNCH_HOLE, MIB, MIB).await.unwrap();
    df.sync(true).await.unwrap();
    drop(df);

    let df = DataFile::open(&dir, 4 * MIB, e).unwrap();
    assert_eq!(
        read(&df, 0, RECORD_MAX * 2).await,
        vec![2u8; RECORD_MAX * 2]
    );
    assert_eq!(read(&df, MIB, 4096).await, vec![0u8; 4096]);
}

/// FLUSHes racing a large write, then one after it: the write is durable.
/// (Whether a racing FLUSH lands inside the write's window is up to the
/// scheduler, so this checks the outcome, not that interleaving; the order
/// that makes it hold is `DataFile::write_raw` marking the log only once
/// the bytes are in.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_write_racing_flushes_is_durable_after_the_next_one() {
    for round in 0..8u8 {
        let (_tmp, dir, e, df) = fresh(4 * MIB);
        let df = Arc::new(df);
        let big = vec![round | 1; 16 * RECORD_MAX];
        let writer = Arc::clone(&df);
        let w = tokio::spawn(async move { writer.write(0, big).await });
        while !w.is_finished() {
            df.sync(false).await.unwrap();
        }
        w.await.unwrap().unwrap();
        df.sync(false).await.unwrap();
        drop(df);

        let df = DataFile::open(&dir, 4 * MIB, e).unwrap();
        let got = read(&df, 0, 16 * RECORD_MAX).await;
        assert!(got.iter().all(|b| *b == round | 1), "round {round}");
    }
}

#[tokio::test]
async fn writes_past_the_capacity_make_the_next_flush_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v");
    let e = powerloss();
    let size = 2 * CAPACITY;
    let df = DataFile::create(&dir, size, Arc::clone(&e)).unwrap();
    let n = size / RECORD_MAX as u64;
    for i in 0..n {
        df.write(i * RECORD_MAX as u64, vec![i as u8 | 1; RECORD_MAX])
            .await
            .unwrap();
    }
    assert!(
        df.log.lock().await.len() as u64 <= CAPACITY,
        "memory stays bounded"
    );
    df.sync(false).await.unwrap();
    drop(df);

    let df = DataFile::open(&dir, size, e).unwrap();
    for i in [0, n / 2, n - 1] {
        let got = read(&df, i * RECORD_MAX as u64, RECORD_MAX).await;
        assert_eq!(got, vec![i as u8 | 1; RECORD_MAX], "write {i}");
    }
}

/// A batch written by hand: generation, sequence, records.
type Batch<'a> = (u64, u64, &'a [(u64, &'a [u8])]);

fn write_batches(file: &File, at: u64, batches: &[Batch]) -> u64 {
    let mut pos = at;
    for (g, s, recs) in batches {
        let mut records = Pending::default();
        for (off, data) in recs.iter() {
            records.push(*off, data);
        }
        let b = records.into_batch(*g, *s);
        file.write_all_at(&b, pos).unwrap();
        pos += b.len() as u64;
    }
    pos
}

#[test]
fn replay_follows_one_generation_and_stops_at_a_torn_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(LOG_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let a: &[u8] = &[7u8; 100];
    let b: &[u8] = &[8u8; 5000];
    let end = write_batches(
        &file,
        0,
        &[(9, 0, &[]), (9, 1, &[(0, a), (4096, b)]), (9, 2, &[(0, b)])],
    );
    let got = read_generation(&file).unwrap();
    assert_eq!(
        got,
        vec![(0, a.to_vec()), (4096, b.to_vec()), (0, b.to_vec())]
    );

    // A torn last batch: its checksum fails, the batches before it stand.
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, end - 4096 - 100).unwrap();
    file.write_all_at(&[last[0] ^ 1], end - 4096 - 100).unwrap();
    assert_eq!(read_generation(&file).unwrap().len(), 2);

    // A new generation over the old one: the old batch that lies just
    // where the new generation's next one would be is not replayed.
    let old = read_generation(&file).unwrap();
    assert_eq!(old.len(), 2);
    write_batches(&file, 0, &[(10, 0, &[]), (10, 1, &[(0, a), (4096, b)])]);
    file.write_all_at(&Pending::default().into_batch(9, 2), 3 * BLOCK)
        .unwrap();
    assert_eq!(
        read_generation(&file).unwrap(),
        vec![(0, a.to_vec()), (4096, b.to_vec())]
    );

    // Out of sequence or garbage at the start: nothing.
    write_batches(&file, 0, &[(11, 1, &[(0, a)])]);
    assert!(read_generation(&file).unwrap().is_empty());
    file.write_all_at(&[0xff; 64], 0).unwrap();
    assert!(read_generation(&file).unwrap().is_empty());
}

/// A record past the size the volume opens with (a grow that never became
/// durable) is skipped, not written past the volume's end.
#[tokio::test]
async fn replay_skips_records_past_the_volume() {
    let (_tmp, dir, e, df) = fresh(4 * MIB);
    for i in 0..MIN_RECORDS as u64 {
        df.write(i * MIB + 4096, vec![6u8; 4096]).await.unwrap();
    }
    df.sync(false).await.unwrap();
    drop(df);

    let df = DataFile::open(&dir, 2 * MIB, Arc::clone(&e)).unwrap();
    assert_eq!(read(&df, 4096, 4096).await, vec![6u8; 4096]);
    assert_eq!(read(&df, MIB + 4096, 4096).await, vec![6u8; 4096]);
    drop(df);
    let seg = std::fs::read(dir.join("seg-00000")).unwrap();
    assert_eq!(seg.len() as u64, 4 * MIB, "no file grew");
    assert!(seg[(3 * MIB) as usize..].iter().all(|b| *b == 0), "skipped");
}
