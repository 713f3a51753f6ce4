//! The io_uring engine on real files: many ops beyond the ring depth, EOF,
//! bad descriptors, a failed `io_uring_enter` under 64 in flight, an NBD
//! thread's ring sending long reads to io-wq, and syncs on the caller.

use std::os::unix::fs::FileExt;

use tokio::task::JoinSet;

use super::*;
use crate::disk::engine::{PUNCH_HOLE, ZERO_RANGE};
use crate::disk::op::ReadBuf;

const BLOCK: usize = 4096;
/// More ops at once than the ring has entries, so some wait in the
/// backlog and go in as completions free slots.
const OPS: usize = RING_ENTRIES as usize * 2 + 17;

fn pattern(i: usize) -> Vec<u8> {
    (0..BLOCK).map(|b| (i * 31 + b) as u8).collect()
}

fn file_of(dir: &tempfile::TempDir, name: &str, len: u64) -> Arc<File> {
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join(name))
        .unwrap();
    f.set_len(len).unwrap();
    Arc::new(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_ops_of_every_kind_complete() {
    let ring = Arc::new(Uring::new().expect("io_uring works on this machine"));
    let dir = tempfile::tempdir().unwrap();
    let file = file_of(&dir, "data", (OPS * BLOCK) as u64);

    // Writes, each of its own block, with syncs of both kinds among them.
    let mut set = JoinSet::new();
    for i in 0..OPS {
        let (rg, f) = (Arc::clone(&ring), Arc::clone(&file));
        set.spawn(async move {
            let off = (i * BLOCK) as u64;
            let (r, kind) = rg.run(f, off, OpKind::Write(pattern(i))).await;
            r.unwrap();
            match kind {
                OpKind::Write(buf) => {
                    assert_eq!(buf, pattern(i), "write {i} gave back its buffer")
                }
                other => panic!("write {i} came back as {other:?}"),
            }
        });
        if i % 16 == 0 {
            let (rg, f) = (Arc::clone(&ring), Arc::clone(&file));
            set.spawn(async move {
                let data_only = i % 32 == 0;
                let (r, kind) = rg.run(f, 0, OpKind::Sync { data_only }).await;
                r.unwrap();
                assert!(matches!(kind, OpKind::Sync { data_only: d } if d == data_only));
            });
        }
    }
    while let Some(t) = set.join_next().await {
        t.unwrap();
    }

    // Reads of every block but the ones being punched or zeroed.
    let cleared = |i: usize| i % 10 == 3 || i % 10 == 7;
    for i in 0..OPS {
        let (rg, f) = (Arc::clone(&ring), Arc::clone(&file));
        let off = (i * BLOCK) as u64;
        if cleared(i) {
            let mode = if i % 10 == 3 { PUNCH_HOLE } else { ZERO_RANGE };
            let len = BLOCK as u64;
            set.spawn(async move {
                let (r, kind) = rg.run(f, off, OpKind::Fallocate { mode, len }).await;
                r.unwrap();
                assert!(
                    matches!(kind, OpKind::Fallocate { mode: m, len: l } if m == mode && l == len)
                );
            });
        } else {
            set.spawn(async move {
                let (r, kind) = rg.run(f, off, OpKind::Read(vec![0xee; BLOCK].into())).await;
                r.unwrap();
                match kind {
                    OpKind::Read(buf) => assert_eq!(buf, pattern(i), "read {i}"),
                    other => panic!("read {i} came back as {other:?}"),
                }
            });
        }
    }
    while let Some(t) = set.join_next().await {
        t.unwrap();
    }

    // The file as the kernel has it, read around the ring.
    let mut all = vec![0u8; OPS * BLOCK];
    file.read_exact_at(&mut all, 0).unwrap();
    for (i, block) in all.chunks(BLOCK).enumerate() {
        if cleared(i) {
            assert!(block.iter().all(|b| *b == 0), "block {i} cleared");
        } else {
            assert_eq!(block, pattern(i), "block {i}");
        }
    }
    let (r, _) = ring
        .run(Arc::clone(&file), 0, OpKind::WillNeed { len: 1 << 20 })
        .await;
    r.unwrap();
}

#[tokio::test]
async fn a_read_past_the_end_of_file_is_unexpected_eof() {
    let ring = Uring::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = file_of(&dir, "short", 0);
    file.write_all_at(&[5u8; 100], BLOCK as u64).unwrap();

    // Straddling the end: the 100 bytes there arrive, then the rest of
    // the buffer cannot be filled.
    let (r, kind) = ring
        .run(
            Arc::clone(&file),
            BLOCK as u64,
            OpKind::Read(vec![0; BLOCK].into()),
        )
        .await;
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    let OpKind::Read(buf) = kind else {
        panic!("not a read")
    };
    assert_eq!(buf.len(), BLOCK);
    assert!(buf[..100].iter().all(|b| *b == 5) && buf[100..].iter().all(|b| *b == 0));

    // Wholly past the end.
    let (r, kind) = ring
        .run(file, 1 << 20, OpKind::Read(vec![9; 512].into()))
        .await;
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    assert!(matches!(kind, OpKind::Read(b) if b == vec![9; 512]));
}

#[tokio::test]
async fn an_uninitialised_buffer_is_filled_or_handed_back_as_zeros() {
    let ring = Uring::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = file_of(&dir, "uninit", 0);
    file.write_all_at(&pattern(3), 0).unwrap();
    file.write_all_at(&[5u8; 100], BLOCK as u64).unwrap();

    let (r, kind) = ring
        .run(Arc::clone(&file), 0, OpKind::Read(ReadBuf::uninit(BLOCK)))
        .await;
    r.unwrap();
    let OpKind::Read(buf) = kind else {
        panic!("not a read")
    };
    assert_eq!(buf.into_vec(), pattern(3));

    // The first 100 bytes arrive, then end of file: only those count as
    // written, and the caller sees zeros after them, never stale memory.
    let (r, kind) = ring
        .run(file, BLOCK as u64, OpKind::Read(ReadBuf::uninit(BLOCK)))
        .await;
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    let OpKind::Read(buf) = kind else {
        panic!("not a read")
    };
    assert_eq!(buf.len(), 100);
    let bytes = buf.into_vec();
    assert!(bytes[..100].iter().all(|b| *b == 5) && bytes[100..].iter().all(|b| *b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_on_a_bad_descriptor_fails_alone() {
    let ring = Arc::new(Uring::new().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let good = file_of(&dir, "good", (64 * BLOCK) as u64);
    // A descriptor opened read-only: writing or allocating through it is
    // EBADF, the errno of a descriptor not open for that.
    let read_only = Arc::new(File::open(dir.path().join("good")).unwrap());

    let mut set = JoinSet::new();
    for i in 0..64 {
        let ring = Arc::clone(&ring);
        let (good, bad) = (Arc::clone(&good), Arc::clone(&read_only));
        set.spawn(async move {
            let off = (i * BLOCK) as u64;
            if i % 8 == 0 {
                let (r, kind) = ring.run(bad, off, OpKind::Write(pattern(i))).await;
                assert_eq!(
                    r.unwrap_err().raw_os_error(),
                    Some(libc::EBADF),
                    "write {i}"
                );
                assert!(matches!(kind, OpKind::Write(b) if b == pattern(i)));
            } else if i % 8 == 4 {
                let kind = OpKind::Fallocate {
                    mode: PUNCH_HOLE,
                    len: BLOCK as u64,
                };
                let (r, _) = ring.run(bad, off, kind).await;
                assert_eq!(
                    r.unwrap_err().raw_os_error(),
                    Some(libc::EBADF),
                    "fallocate {i}"
                );
            } else {
                let (r, _) = ring
                    .run(Arc::clone(&good), off, OpKind::Write(pattern(i)))
                    .await;
                r.unwrap();
                let (r, kind) = ring
                    .run(good, off, OpKind::Read(vec![0; BLOCK].into()))
                    .await;
                r.unwrap();
                assert!(
                    matches!(kind, OpKind::Read(b) if b == pattern(i)),
                    "read {i}"
                );
            }
        });
    }
    while let Some(t) = set.join_next().await {
        t.unwrap();
    }
    // The ring is still good after the failures.
    let (r, _) = ring.run(good, 0, OpKind::Sync { data_only: false }).await;
    r.unwrap();
}
/// Hands `ops` to the ring in one go, as one enter, and returns their
/// replies in order.
fn submit_batch(
    ring: &Uring,
    ops: Vec<(Arc<File>, u64, OpKind)>,
) -> Vec<oneshot::Receiver<OpResult>> {
    let mut r = ring.shared.ring.lock().unwrap();
    let mut rxs = Vec::new();
    for (file, offset, kind) in ops {
        let (tx, rx) = oneshot::channel();
        r.backlog.push_back(Op {
            file,
            offset,
            kind,
            done_bytes: 0,
            reply: tx,
        });
        rxs.push(rx);
    }
    r.pump();
    rxs
}

/// 64 reads in the kernel, then an enter fails on 64 writes: the reads
/// end with their own data, the writes come back unrun with their own
/// buffers, nothing after is submitted, and no result goes to another op.
async fn enter_failure_under_64_in_flight(after_consuming: bool) {
    const N: usize = 64;
    let ring = Uring::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = file_of(&dir, "data", (3 * N * BLOCK) as u64);
    for i in 0..N {
        file.write_all_at(&pattern(i), (i * BLOCK) as u64).unwrap();
    }
    ring.shared.ring.lock().unwrap().inject = Some(Inject {
        at: 2,
        after_consuming,
    });
    let reads = submit_batch(
        &ring,
        (0..N)
            .map(|i| {
                let kind = OpKind::Read(vec![0xee; BLOCK].into());
                (Arc::clone(&file), (i * BLOCK) as u64, kind)
            })
            .collect(),
    );
    let writes = submit_batch(
        &ring,
        (N..2 * N)
            .map(|i| {
                (
                    Arc::clone(&file),
                    (i * BLOCK) as u64,
                    OpKind::Write(pattern(i)),
                )
            })
            .collect(),
    );
    assert!(ring.shared.ring.lock().unwrap().down.is_some());
    // After the failure: refused at once, never submitted.
    let late = submit_batch(
        &ring,
        (2 * N..3 * N)
            .map(|i| {
                (
                    Arc::clone(&file),
                    (i * BLOCK) as u64,
                    OpKind::Write(pattern(i)),
                )
            })
            .collect(),
    );

    for (i, rx) in reads.into_iter().enumerate() {
        let (r, kind) = rx.await.unwrap();
        r.unwrap_or_else(|e| panic!("read {i} was in the kernel: {e}"));
        assert!(
            matches!(kind, OpKind::Read(b) if b == pattern(i)),
            "read {i}"
        );
    }
    let mut ok = 0;
    for (j, rx) in writes.into_iter().chain(late).enumerate() {
        let i = N + j;
        let (r, kind) = rx.await.unwrap();
        assert!(
            matches!(&kind, OpKind::Write(b) if *b == pattern(i)),
            "write {i} got its own buffer back"
        );
        let mut on_disk = vec![0u8; BLOCK];
        file.read_exact_at(&mut on_disk, (i * BLOCK) as u64)
            .unwrap();
        match r {
            Ok(()) => {
                ok += 1;
                assert_eq!(on_disk, pattern(i), "write {i} reported done");
            }
            Err(e) => {
                assert!(is_ring_down(&e), "write {i}: {e}");
                assert!(on_disk.iter().all(|b| *b == 0), "write {i} never ran");
            }
        }
    }
    // Consumed before the error: the kernel ran them all; else none.
    assert_eq!(ok, if after_consuming { N } else { 0 });
    let r = ring.shared.ring.lock().unwrap();
    assert!(r.slots.iter().all(Option::is_none), "every slot reaped");
    assert!(r.queued.is_empty() && r.backlog.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_enter_fails_only_what_the_kernel_never_saw() {
    enter_failure_under_64_in_flight(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_enter_after_consuming_keeps_every_op_in_its_slot() {
    enter_failure_under_64_in_flight(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_runs_on_threads_once_the_ring_is_down() {
    use crate::disk::IoEngine;
    const N: usize = 64;
    let ring = Uring::new().unwrap();
    ring.shared.ring.lock().unwrap().inject = Some(Inject {
        at: 5,
        after_consuming: false,
    });
    let engine = Arc::new(IoEngine::Uring(ring));
    let dir = tempfile::tempdir().unwrap();
    let file = file_of(&dir, "data", (N * BLOCK) as u64);
    let mut set = JoinSet::new();
    for i in 0..N {
        let (e, f) = (Arc::clone(&engine), Arc::clone(&file));
        set.spawn(async move {
            let off = (i * BLOCK) as u64;
            let (r, _) = e.run(Arc::clone(&f), off, OpKind::Write(pattern(i))).await;
            r.unwrap();
            let (r, kind) = e.run(f, off, OpKind::Read(vec![0; BLOCK].into())).await;
            r.unwrap();
            assert!(matches!(kind, OpKind::Read(b) if b == pattern(i)), "{i}");
        });
    }
    while let Some(t) = set.join_next().await {
        t.unwrap();
    }
    let IoEngine::Uring(u) = &*engine else {
        unreachable!()
    };
    assert!(
        u.shared.ring.lock().unwrap().down.is_some(),
        "the failure was hit"
    );
}

/// An NBD thread's ring sends long reads to io-wq: they come back whole and
/// right, short ones beside them too, up to the end of the file.
#[tokio::test]
async fn long_reads_sent_to_io_wq_come_back_whole() {
    let ring = Uring::for_nbd_thread().expect("io_uring works on this machine");
    let dir = tempfile::tempdir().unwrap();
    let len = 3 * OFFLOAD_READ_MIN;
    let file = file_of(&dir, "data", len as u64);
    let bytes: Vec<u8> = (0..len).map(|i| (i % 249) as u8).collect();
    file.write_all_at(&bytes, 0).unwrap();
    for (off, n) in [
        (0, OFFLOAD_READ_MIN * 2),
        (4096, BLOCK),
        (OFFLOAD_READ_MIN, OFFLOAD_READ_MIN * 2),
    ] {
        let (r, kind) = ring
            .run(
                Arc::clone(&file),
                off as u64,
                OpKind::Read(ReadBuf::uninit(n)),
            )
            .await;
        r.unwrap();
        let OpKind::Read(buf) = kind else {
            panic!("a read came back as another op")
        };
        let got = buf.into_vec();
        assert!(got == bytes[off..off + n], "read at {off}+{n}");
    }
}

/// A sync the caller waits for runs on a bound thread (an NBD thread),
/// done in its first poll; elsewhere it goes to the ring like any other.
#[tokio::test]
async fn a_sync_on_the_caller_blocks_only_a_bound_thread() {
    use crate::disk::{IoEngine, SyncOn};
    use futures_util::FutureExt;
    let engine = IoEngine::Uring(Uring::new().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let file = file_of(&dir, "data", BLOCK as u64);
    file.write_all_at(&pattern(1), 0).unwrap();
    // Not bound: the ring's, completed when awaited.
    let on_ring = engine.sync(Arc::clone(&file), true, SyncOn::Caller);
    on_ring.await.unwrap();
    engine.bind_thread().unwrap();
    let here = engine.sync(Arc::clone(&file), true, SyncOn::Caller);
    assert!(
        matches!(here.now_or_never(), Some(Ok(()))),
        "done in its first poll"
    );
    file.write_all_at(&pattern(2), 0).unwrap();
    engine.sync(file, false, SyncOn::Ring).await.unwrap();
}
