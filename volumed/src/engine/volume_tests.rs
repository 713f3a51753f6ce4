//! `Volume` against a plain `Vec<u8>`: random reads, writes, trims, zeroes,
//! snapshots with writes racing their uploads, and restarts; and
//! copy-before-write under concurrent writers.

use std::sync::Arc;

use proptest::prelude::*;
use snapshot::ChunkGeometry;
use volumed_api::VolumeName;

use super::chunk_map::{Changed, ChunkMap};
use super::{Volume, recovery};
use crate::catalog::VolumeRecord;
use crate::disk::{DataFile, EngineChoice, IoEngine};

const CS: u64 = 64 << 10;
const CHUNKS: u64 = 8;
const SIZE: u64 = CS * CHUNKS;

fn io() -> Arc<IoEngine> {
    Arc::new(IoEngine::new(EngineChoice::Auto).unwrap())
}

fn record() -> VolumeRecord {
    VolumeRecord::new(
        1,
        VolumeName::parse("model").unwrap(),
        SIZE,
        CS,
        false,
        None,
    )
}

fn geometry() -> ChunkGeometry {
    ChunkGeometry::new(SIZE, CS).unwrap()
}

/// The volume's data directory inside a test's temp dir.
fn vol_dir(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("vol")
}

fn create(dir: &std::path::Path, io: &Arc<IoEngine>) -> Arc<Volume> {
    let data = DataFile::create(&vol_dir(dir), SIZE, Arc::clone(io)).unwrap();
    Volume::new(record(), geometry(), data, ChunkMap::new(geometry()), None)
}

async fn read_all(vol: &Volume, off: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for p in vol.read(off, len).await.unwrap() {
        match p {
            super::ReadPiece::Data(d) => out.extend_from_slice(&d),
            super::ReadPiece::Zero(n) => out.resize(out.len() + n as usize, 0),
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        byte: u8,
    },
    Zero {
        off: u64,
        len: u64,
        no_hole: bool,
    },
    Read {
        off: u64,
        len: u64,
    },
    Flush,
    /// Freeze, write `racing` during the upload, then commit or fail.
    Snapshot {
        racing: Vec<(u64, u64, u8)>,
        fail: bool,
    },
    Restart,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    // Sector-aligned like every NBD client, crossing chunk boundaries.
    (0..SIZE / 512, 1u64..(3 * CS / 512)).prop_map(|(o, l)| {
        let off = o * 512;
        (off, (l * 512).min(SIZE - off))
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>()).prop_map(|((off, len), byte)| Op::Write { off, len, byte: byte | 1 }),
        2 => (range(), any::<bool>()).prop_map(|((off, len), no_hole)| Op::Zero { off, len, no_hole }),
        2 => range().prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        2 => (proptest::collection::vec((range(), any::<u8>()), 0..4), any::<bool>()).prop_map(
            |(w, fail)| Op::Snapshot {
                racing: w.into_iter().map(|((o, l), b)| (o, l, b | 1)).collect(),
                fail,
            }
        ),
        1 => Just(Op::Restart),
    ]
}

fn chunk(model: &[u8], c: u64) -> &[u8] {
    &model[(c * CS) as usize..((c + 1) * CS) as usize]
}

async fn run_model(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let io = io();
    let mut vol = create(dir.path(), &io);
    let mut model = vec![0u8; SIZE as usize];
    // The content of the last committed snapshot, if any.
    let mut parent: Option<Vec<u8>> = None;
    for op in ops {
        match op {
            Op::Write { off, len, byte } => {
                vol.write(off, vec![byte; len as usize], None)
                    .await
                    .unwrap();
                model[off as usize..(off + len) as usize].fill(byte);
            }
            Op::Zero { off, len, no_hole } => {
                vol.write_zeroes(off, len, no_hole, None).await.unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Read { off, len } => {
                let got = read_all(&vol, off, len).await;
                assert_eq!(
                    got,
                    &model[off as usize..(off + len) as usize],
                    "read {off}+{len}"
                );
            }
            Op::Flush => vol.flush().await.unwrap(),
            Op::Snapshot { racing, fail } => {
                let guard = vol.begin_snapshot().await;
                let at_instant = model.clone();
                for (off, len, byte) in racing {
                    vol.write(off, vec![byte; len as usize], None)
                        .await
                        .unwrap();
                    model[off as usize..(off + len) as usize].fill(byte);
                }
                let plan = guard.plan();
                let reader = guard.reader();
                for c in 0..CHUNKS {
                    let changed = match &plan.changed {
                        Changed::All => true,
                        Changed::Chunks(v) => v.contains(&c),
                    };
                    let want = chunk(&at_instant, c);
                    if plan.to_read.contains(&c) {
                        assert_eq!(reader.take(c).await.unwrap(), want, "frozen chunk {c}");
                    } else if changed {
                        assert!(
                            want.iter().all(|b| *b == 0),
                            "chunk {c} changed, not read, not zero"
                        );
                    } else {
                        let p = parent.as_deref().unwrap_or(&[0u8; SIZE as usize][..]);
                        assert_eq!(
                            chunk(p, c),
                            want,
                            "unchanged chunk {c} differs from the parent"
                        );
                    }
                }
                if fail {
                    drop(guard);
                } else {
                    guard.commit();
                    parent = Some(at_instant);
                }
            }
            Op::Restart => {
                vol.flush().await.unwrap();
                let rec = vol.record();
                drop(vol);
                // Unclean: nothing proves which chunks changed, so the next
                // snapshot reads all; the content must survive exactly.
                vol = recovery::open_volume(
                    &rec,
                    &vol_dir(dir.path()),
                    &io,
                    &fetcher(dir.path()),
                    false,
                )
                .unwrap();
                let got = read_all(&vol, 0, SIZE).await;
                assert_eq!(got, model, "content after restart");
            }
        }
    }
    let got = read_all(&vol, 0, SIZE).await;
    assert_eq!(got, model);
}

fn fetcher(dir: &std::path::Path) -> Arc<snapshot::cache::Fetcher> {
    let store = snapshot::store::LocalStore::open(&dir.join("store")).unwrap();
    Arc::new(snapshot::cache::Fetcher::new(
        snapshot::Repo::new(Arc::new(store), 1),
        None,
    ))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn volume_matches_a_plain_buffer(ops in proptest::collection::vec(op(), 1..40)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run_model(ops));
    }
}

/// Writers hammer every frozen chunk while the uploader takes them: each
/// chunk comes back exactly as it was at the instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_before_write_under_concurrent_writes() {
    // A race shows in some rounds only: run many.
    for _ in 0..30 {
        copy_before_write_round().await;
    }
}

async fn copy_before_write_round() {
    let dir = tempfile::tempdir().unwrap();
    // The thread engine: reads really overlap the writes racing them.
    let threads = Arc::new(IoEngine::new(EngineChoice::Threads).unwrap());
    let vol = create(dir.path(), &threads);
    for c in 0..CHUNKS {
        vol.write(c * CS, vec![c as u8 + 1; CS as usize], None)
            .await
            .unwrap();
    }
    let guard = vol.begin_snapshot().await;
    assert_eq!(guard.plan().to_read, (0..CHUNKS).collect::<Vec<_>>());
    let mut writers = Vec::new();
    // Several writers on the same chunk at once: the second must wait
    // while the first preserves the chunk's old bytes.
    for w in 0..8u64 {
        let vol = Arc::clone(&vol);
        writers.push(tokio::spawn(async move {
            for round in 0..16u64 {
                let c = (round + w / 4) % CHUNKS;
                vol.write(c * CS + 512 * w, vec![0xEE; 4096], None)
                    .await
                    .unwrap();
            }
        }));
    }
    let reader = guard.reader();
    let mut takers = Vec::new();
    for c in (0..CHUNKS).rev() {
        let reader = reader.clone();
        takers.push(tokio::spawn(
            async move { (c, reader.take(c).await.unwrap()) },
        ));
    }
    for t in takers {
        let (c, bytes) = t.await.unwrap();
        assert!(
            bytes.iter().all(|b| *b == c as u8 + 1),
            "chunk {c} is not its frozen content"
        );
    }
    for w in writers {
        w.await.unwrap();
    }
    // Every chunk was taken once: nothing is left preserved, and a second
    // take is an error rather than a stale copy.
    assert!(reader.take(0).await.is_err());
    guard.commit();
    // The writes landed, and the dirty set has exactly the chunks written
    // after the instant.
    let after = read_all(&vol, 0, CS).await;
    assert_eq!(&after[..4096], &[0xEE; 4096][..]);
    match vol.map().take_changed() {
        Changed::Chunks(c) => assert_eq!(c, (0..CHUNKS).collect::<Vec<_>>()),
        Changed::All => panic!("a fresh volume is not all dirty"),
    }
}

/// A failed snapshot puts its changes back: the next one sees them.
#[tokio::test]
async fn dropped_freeze_restores_the_dirty_set() {
    let dir = tempfile::tempdir().unwrap();
    let vol = create(dir.path(), &io());
    vol.write(3 * CS, vec![7; 512], None).await.unwrap();
    let guard = vol.begin_snapshot().await;
    assert_eq!(guard.plan().to_read, vec![3]);
    vol.write(5 * CS, vec![9; 512], None).await.unwrap();
    drop(guard);
    match vol.map().take_changed() {
        Changed::Chunks(c) => assert_eq!(c, vec![3, 5]),
        Changed::All => panic!("not all dirty"),
    }
}
