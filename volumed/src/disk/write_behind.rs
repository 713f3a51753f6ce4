//! Which large writes start their own writeback.
//!
//! A buffered write of [`WRITE_BEHIND_MIN`] or more starts its writeback once
//! it is in the page cache (`OpKind::WriteBack`), without waiting for it.
//! Large writes stream (fills, copies, imports): without this, none of their
//! data goes to disk before the dirty threshold (gigabytes here) or the
//! FLUSH at the end, which then writes it all while the client waits. With
//! it, the disk works while the copy goes on, as PostgreSQL's
//! `*_flush_after` does (docs/performance.md, "Write-behind for large
//! writes").
//!
//! A write that only covers ranges already written since the file's last
//! sync does not: the data it replaces was already on its way, and a guest
//! rewriting the same region before a FLUSH is better served by the page
//! cache coalescing the rewrites than by writing each one (the writeback
//! then costs CPU inside the job and buys nothing; docs/performance.md,
//! "Write-behind skips rewrites"). Small writes are left to the page cache
//! altogether and are not recorded: a lock per 4 KiB write would cost more
//! than it tells.

use std::collections::HashSet;
use std::sync::Mutex;

/// The smallest write that starts its own writeback.
pub const WRITE_BEHIND_MIN: usize = 128 << 10;

/// The unit the record keeps: a write marks every window it touches.
const WINDOW: u64 = WRITE_BEHIND_MIN as u64;

/// Windows recorded at most (128 GiB written between two syncs); past it
/// the record starts over, which at worst writes back a rewrite early.
const MAX_WINDOWS: usize = 1 << 20;

/// The windows of one data file written by large writes since its last sync.
#[derive(Default)]
pub struct WriteBehind {
    written: Mutex<HashSet<u64>>,
}

impl WriteBehind {
    /// Records a completed write of `len` bytes at `offset` (file offsets
    /// of the volume); true if it should start its writeback: it is large
    /// and writes at least one window nothing wrote since the last sync.
    pub fn on_write(&self, offset: u64, len: usize) -> bool {
        if len < WRITE_BEHIND_MIN {
            return false;
        }
        let first = offset / WINDOW;
        let last = (offset + len as u64 - 1) / WINDOW;
        let mut w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() + (last - first + 1) as usize > MAX_WINDOWS {
            w.clear();
        }
        let mut fresh = false;
        for i in first..=last {
            fresh |= w.insert(i);
        }
        fresh
    }

    /// A sync of the file is starting: what was written before it is on its
    /// way to the disk, so the next write anywhere is fresh again.
    pub fn on_sync(&self) {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::engine::PUNCH_HOLE;
    use crate::disk::{DataFile, EngineChoice, IoEngine};
    use proptest::prelude::*;
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn a_small_write_never_starts_writeback() {
        let wb = WriteBehind::default();
        assert!(!wb.on_write(0, WRITE_BEHIND_MIN - 4096));
        assert!(
            !wb.on_write(0, WRITE_BEHIND_MIN - 4096),
            "nor the second time"
        );
        assert!(wb.on_write(0, WRITE_BEHIND_MIN), "and is not recorded");
    }

    #[test]
    fn a_rewrite_before_a_sync_does_not_and_after_one_does() {
        let wb = WriteBehind::default();
        assert!(wb.on_write(1 << 20, 1 << 20));
        assert!(!wb.on_write(1 << 20, 1 << 20), "the same range again");
        assert!(!wb.on_write(1 << 20, 256 << 10), "inside it");
        assert!(wb.on_write(2 << 20, 1 << 20), "the next range is new");
        assert!(
            wb.on_write((2 << 20) + (512 << 10), 1 << 20),
            "half old, half new: new"
        );
        wb.on_sync();
        assert!(wb.on_write(1 << 20, 1 << 20), "after a sync");
    }

    #[test]
    fn a_write_across_windows_marks_each() {
        let wb = WriteBehind::default();
        // 64 KiB into window 0, through window 2.
        assert!(wb.on_write(64 << 10, 256 << 10));
        for w in 0..3 {
            assert!(!wb.on_write(w * WINDOW, WRITE_BEHIND_MIN), "window {w}");
        }
        assert!(wb.on_write(3 * WINDOW, WRITE_BEHIND_MIN));
    }

    #[test]
    fn the_record_is_bounded() {
        let wb = WriteBehind::default();
        let big = MAX_WINDOWS as u64 * WINDOW;
        for i in 0..(MAX_WINDOWS as u64 / 8 + 1) {
            wb.on_write(i * (1 << 20), 1 << 20);
        }
        assert!(wb.written.lock().unwrap().len() <= MAX_WINDOWS);
        assert!(wb.on_write(big + (8 << 20), 1 << 20));
    }

    /// Bytes of `file` in `[start, start + len)` written to the page cache
    /// but not yet given disk blocks (FIEMAP's DELALLOC flag on ext4 and
    /// XFS): data no writeback has reached.
    fn delalloc_bytes(file: &File, start: u64, len: u64) -> u64 {
        const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
        const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
        const EXTENTS: usize = 64;
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Extent {
            logical: u64,
            physical: u64,
            length: u64,
            reserved64: [u64; 2],
            flags: u32,
            reserved: [u32; 3],
        }
        #[repr(C)]
        struct Fiemap {
            start: u64,
            length: u64,
            flags: u32,
            mapped: u32,
            count: u32,
            reserved: u32,
            extents: [Extent; EXTENTS],
        }
        let mut m = Fiemap {
            start,
            length: len,
            flags: 0,
            mapped: 0,
            count: EXTENTS as u32,
            reserved: 0,
            extents: [Extent::default(); EXTENTS],
        };
        // SAFETY: FS_IOC_FIEMAP fills the struct we own, room for EXTENTS.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut m) };
        assert_eq!(rc, 0, "FIEMAP: {}", std::io::Error::last_os_error());
        m.extents[..m.mapped as usize]
            .iter()
            .filter(|e| e.flags & FIEMAP_EXTENT_DELALLOC != 0)
            .map(|e| {
                let end = (e.logical + e.length).min(start + len);
                end.saturating_sub(e.logical.max(start))
            })
            .sum()
    }

    /// Waits up to 10 s for `[start, start + len)` to have no delayed
    /// allocation left: a writeback reached it.
    async fn written_back(file: &File, start: u64, len: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while delalloc_bytes(file, start, len) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Through a data file, on both engines: a large write starts its
    /// writeback at once; a small one, and a large rewrite of a range
    /// written since the last sync, stay in the page cache until a sync,
    /// the flusher or memory pressure takes them; after a sync the same
    /// rewrite starts its writeback again. (The small write is also the
    /// control: it shows the filesystem delays allocation, so what changed
    /// a large write's state is its writeback. A punched range reads as a
    /// hole again, so a rewrite over it shows as delayed allocation.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_writes_start_their_writeback_small_ones_and_rewrites_do_not() {
        const MIB: u64 = 1 << 20;
        let tmp = tempfile::tempdir().unwrap();
        for (name, choice) in [
            ("io_uring", EngineChoice::Uring),
            ("threads", EngineChoice::Threads),
        ] {
            let dir = tmp.path().join(name);
            let engine = Arc::new(IoEngine::new(choice).unwrap());
            let df = DataFile::create(&dir, 8 * MIB, engine).unwrap();
            let seg = File::open(dir.join("seg-00000")).unwrap();
            let small_len = WRITE_BEHIND_MIN - 4096;
            df.write(6 * MIB, vec![7; small_len]).await.unwrap();
            assert_eq!(
                delalloc_bytes(&seg, 6 * MIB, MIB),
                small_len as u64,
                "{name}: the test directory's filesystem must delay allocation (ext4, XFS)"
            );
            df.write(0, vec![9; MIB as usize]).await.unwrap();
            assert!(written_back(&seg, 0, MIB).await, "{name}: a large write");

            df.fallocate(PUNCH_HOLE, 0, MIB).await.unwrap();
            df.write(0, vec![8; MIB as usize]).await.unwrap();
            // A fresh write after the rewrite: once its writeback is done,
            // the rewrite's would have been too, had it been started.
            df.write(2 * MIB, vec![6; MIB as usize]).await.unwrap();
            assert!(
                written_back(&seg, 2 * MIB, MIB).await,
                "{name}: a fresh write"
            );
            assert_eq!(
                delalloc_bytes(&seg, 0, MIB),
                MIB,
                "{name}: a rewrite before any sync is left to the page cache"
            );
            assert_eq!(
                delalloc_bytes(&seg, 6 * MIB, MIB),
                small_len as u64,
                "{name}: so is a small write"
            );

            df.sync(false).await.unwrap();
            df.fallocate(PUNCH_HOLE, 0, MIB).await.unwrap();
            df.write(0, vec![5; MIB as usize]).await.unwrap();
            assert!(
                written_back(&seg, 0, MIB).await,
                "{name}: the same rewrite after a sync"
            );
            let back = df.read(0, MIB as usize).await.unwrap();
            assert!(back.iter().all(|b| *b == 5), "{name}: the data reads back");
        }
    }

    proptest! {
        /// Against a model: a large write starts writeback exactly when some
        /// 128 KiB window it touches was not written since the last sync.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec(
            prop_oneof![
                (0u64..64, 1usize..6).prop_map(|(w, n)| Some(((w * 32) << 10, n * (96 << 10)))),
                Just(None),
            ], 1..64))
        {
            let wb = WriteBehind::default();
            let mut model = HashSet::new();
            for op in ops {
                match op {
                    None => { wb.on_sync(); model.clear(); }
                    Some((off, len)) => {
                        let want = len >= WRITE_BEHIND_MIN && {
                            let ws: Vec<u64> = (off / WINDOW..=(off + len as u64 - 1) / WINDOW).collect();
                            let fresh = ws.iter().any(|w| !model.contains(w));
                            model.extend(ws);
                            fresh
                        };
                        prop_assert_eq!(wb.on_write(off, len), want);
                    }
                }
            }
        }
    }
}
