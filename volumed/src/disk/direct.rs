//! O_DIRECT next to the page cache, for writes nobody is about to read
//! back (hydration's fetched chunks; see `DataFile::write_direct`): a second
//! descriptor per segment, opened on first use, and the page-cache checks
//! that keep the two kinds of write coherent.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A data file's O_DIRECT descriptors, by segment.
#[derive(Default)]
pub(super) struct Direct {
    files: Mutex<Vec<Option<Arc<File>>>>,
    /// Set when the filesystem or kernel refused: buffered writes from then.
    refused: AtomicBool,
}

impl Direct {
    pub(super) fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// O_DIRECT is off for this data file from now on; said once.
    pub(super) fn refuse(&self, dir: &Path, e: &io::Error) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            tracing::info!(dir = %dir.display(), error = %e,
                "O_DIRECT refused; hydration writes go through the page cache");
        }
    }

    /// Segment `idx` (at `path`) opened O_DIRECT, opening it the first time.
    pub(super) fn file(&self, path: &Path, idx: usize) -> io::Result<Arc<File>> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if files.len() <= idx {
            files.resize(idx + 1, None);
        }
        if let Some(f) = &files[idx] {
            return Ok(Arc::clone(f));
        }
        let f = Arc::new(
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)?,
        );
        files[idx] = Some(Arc::clone(&f));
        Ok(f)
    }
}

/// The largest page-cache folio is 2 MiB (a PMD), naturally aligned: the
/// folios that can overlap `[pos, pos + len)` lie in this range.
pub(super) fn folio_neighbourhood(pos: u64, len: u64) -> (u64, u64) {
    const MAX_FOLIO: u64 = 2 << 20;
    let start = pos / MAX_FOLIO * MAX_FOLIO;
    let end = (pos + len).next_multiple_of(MAX_FOLIO);
    (start, end - start)
}

/// Pages of `f` in `[off, off + len)` held in the page cache, by
/// cachestat(2) (Linux 6.5). An older kernel answers ENOSYS, which turns
/// O_DIRECT off: without the check it would not be safe.
pub(super) fn cached_pages(f: &File, off: u64, len: u64) -> io::Result<u64> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // cachestat has number 451 on every architecture.
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off, len };
    let mut stat = Stat::default();
    // SAFETY: both structs match the kernel's layout and outlive the call,
    // which only writes `stat`.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if rc == 0 {
        Ok(stat.nr_cache)
    } else {
        Err(io::Error::last_os_error())
    }
}
