//! The I/O engine behind every data file: io_uring when the kernel offers
//! it, else a pool of threads doing the same calls synchronously. Both take
//! owned buffers and give them back, so the volume code is the same for both.
//!
//! With io_uring, a thread may have a ring of its own (`bind_thread`): the
//! NBD threads do, so a connection's I/O is submitted, completed and reaped
//! on the thread that serves it. Every other thread shares the engine's ring.
//!
//! A sync may instead wait on the thread that asks for it ([`SyncOn::Caller`]),
//! which an NBD session chooses when nothing else could be held up.

use std::cell::{Cell, OnceCell};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tracing::warn;

use super::op::{OpKind, OpResult};
use super::powerloss::PowerlossSim;
use super::uring::{Uring, is_ring_down};

/// Buffered writes up to this size are done inline on a thread with a ring
/// of its own (the NBD threads) instead of through the ring. ext4 has no
/// non-blocking buffered write, so io_uring hands every one to an io-wq
/// worker and back: two thread switches and a wake-up per write, about
/// half the CPU of a 4 KiB write; the copy into the page cache itself
/// takes a few microseconds. Larger writes (fills, imports) stay on the
/// ring so a connection is not held up by a long copy.
pub const INLINE_WRITE_MAX: usize = 64 << 10;

pub enum IoEngine {
    Uring(Uring),
    Threads,
    /// Test-only: unsynced changes live in memory (see `powerloss`).
    PowerlossSim(Arc<PowerlossSim>),
}

thread_local! {
    /// This thread's own ring, if `bind_thread` gave it one.
    static THREAD_RING: OnceCell<Uring> = const { OnceCell::new() };
    /// Whether `bind_thread` ran here: a thread that serves its own
    /// connections and may block for one of them.
    static BOUND: Cell<bool> = const { Cell::new(false) };
}

/// Where a sync waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncOn {
    /// On the ring (an io-wq worker, since no filesystem syncs without
    /// blocking): the thread goes on with its other work meanwhile.
    Ring,
    /// On the calling thread, blocking it, if it is a bound thread (an NBD
    /// thread); elsewhere as `Ring`. For a session whose client waits for
    /// this reply and nothing else: it saves the hand-off to io-wq and the
    /// wake-up back, about a quarter of a FLUSH at QD1
    /// (docs/performance.md, "A lone FLUSH on its thread").
    Caller,
}

/// Which engine to use; `Auto` tries io_uring and falls back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    Auto,
    Uring,
    Threads,
    /// Test-only: a thread pool that keeps every change since a file's last
    /// sync in memory, so `kill -9` loses it as a power cut would. Never in
    /// production.
    #[value(name = "powerloss-sim")]
    PowerlossSim,
}

impl IoEngine {
    pub fn new(choice: EngineChoice) -> io::Result<Self> {
        match choice {
            EngineChoice::Threads => Ok(IoEngine::Threads),
            EngineChoice::PowerlossSim => {
                // Info, not warn: the crash tests fail on warnings they do
                // not expect, and they choose this engine on purpose.
                tracing::info!(
                    "powerloss-sim I/O engine: for tests only, unsynced writes are held in memory"
                );
                Ok(IoEngine::PowerlossSim(Arc::default()))
            }
            EngineChoice::Uring => Ok(IoEngine::Uring(Uring::new()?)),
            EngineChoice::Auto => match Uring::new() {
                Ok(u) => Ok(IoEngine::Uring(u)),
                Err(e) => {
                    warn!(error = %e, "io_uring unavailable; using the thread-pool I/O engine");
                    Ok(IoEngine::Threads)
                }
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            IoEngine::Uring(_) => "io_uring",
            IoEngine::Threads => "threadpool",
            IoEngine::PowerlossSim(_) => "powerloss-sim",
        }
    }

    /// Gives the calling thread a ring of its own, if this engine uses
    /// io_uring; must run inside the thread's tokio runtime, which reaps it.
    /// Ops that thread starts use it from then on.
    pub fn bind_thread(&self) -> io::Result<()> {
        BOUND.with(|b| b.set(true));
        if let IoEngine::Uring(_) = self {
            let ring = Uring::for_nbd_thread()?;
            THREAD_RING.with(|r| {
                let _ = r.set(ring);
            });
        }
        Ok(())
    }

    /// Whether the calling thread has a ring of its own.
    #[cfg(test)]
    pub fn thread_has_ring() -> bool {
        THREAD_RING.with(|r| r.get().is_some())
    }

    /// A data file opened `file`; the power-loss model counts its holders.
    pub fn hold(&self, file: &File) {
        if let IoEngine::PowerlossSim(s) = self {
            s.hold(file);
        }
    }

    /// A data file let `file` go; under the power-loss model its last holder
    /// loses what it never synced.
    pub fn release(&self, file: &File) {
        if let IoEngine::PowerlossSim(s) = self {
            s.release(file);
        }
    }

    /// fsync (`data_only`: fdatasync), waiting where `on` says.
    pub async fn sync(&self, file: Arc<File>, data_only: bool, on: SyncOn) -> io::Result<()> {
        let kind = OpKind::Sync { data_only };
        if on == SyncOn::Caller && BOUND.with(Cell::get) {
            return self.run_blocking(&file, 0, kind);
        }
        self.run(file, 0, kind).await.0
    }

    /// fsync, blocking, for the control path.
    pub fn sync_blocking(&self, file: &File) -> io::Result<()> {
        self.run_blocking(file, 0, OpKind::Sync { data_only: false })
    }

    /// fallocate, blocking, for repairs while a volume is being opened.
    pub fn fallocate_blocking(
        &self,
        file: &File,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.run_blocking(file, offset, OpKind::Fallocate { mode, len })
    }

    fn run_blocking(&self, file: &File, offset: u64, kind: OpKind) -> io::Result<()> {
        match self {
            IoEngine::PowerlossSim(s) => s.run_blocking(file, offset, kind).0,
            IoEngine::Uring(_) | IoEngine::Threads => run_sync(file, offset, kind).0,
        }
    }

    /// Runs one op; returns its result and the op (with its buffer).
    pub async fn run(&self, file: Arc<File>, offset: u64, kind: OpKind) -> OpResult {
        match self {
            IoEngine::Uring(shared) => {
                let own = THREAD_RING.with(|r| r.get().cloned());
                if own.is_some()
                    && let OpKind::Write(buf) = &kind
                    && buf.len() <= INLINE_WRITE_MAX
                {
                    // On a thread of its own (an NBD thread), a small
                    // buffered write runs to completion here: see
                    // INLINE_WRITE_MAX.
                    let r = file.write_all_at(buf, offset);
                    return (r, kind);
                }
                let ring = own.as_ref().unwrap_or(shared);
                let (r, kind) = ring.run(Arc::clone(&file), offset, kind).await;
                match r {
                    // The ring stopped before the kernel saw this op: it
                    // never ran, so running it here runs it once.
                    Err(e) if is_ring_down(&e) => run_on_thread(file, offset, kind).await,
                    r => (r, kind),
                }
            }
            IoEngine::Threads => run_on_thread(file, offset, kind).await,
            IoEngine::PowerlossSim(s) => {
                let s = Arc::clone(s);
                tokio::task::spawn_blocking(move || s.run_blocking(&file, offset, kind))
                    .await
                    .unwrap_or_else(|e| {
                        (
                            Err(io::Error::other(format!("I/O task failed: {e}"))),
                            OpKind::Sync { data_only: true },
                        )
                    })
            }
        }
    }

    /// Starts writing back `len` bytes of `file` at `offset` from the page
    /// cache (`OpKind::WriteBack`) and does not wait: a hint, whose error,
    /// if any, shows again at the next sync. Who asks is `WriteBehind`'s.
    pub fn write_back(&self, file: Arc<File>, offset: u64, len: u64) {
        let kind = OpKind::WriteBack { len };
        match self {
            IoEngine::Uring(shared) => {
                let own = THREAD_RING.with(|r| r.get().cloned());
                own.as_ref().unwrap_or(shared).start(file, offset, kind);
            }
            IoEngine::Threads => {
                tokio::task::spawn_blocking(move || run_sync(&file, offset, kind));
            }
            // Nothing reaches the file before a sync in this model.
            IoEngine::PowerlossSim(_) => {}
        }
    }
}

async fn run_on_thread(file: Arc<File>, offset: u64, kind: OpKind) -> OpResult {
    tokio::task::spawn_blocking(move || run_sync(&file, offset, kind))
        .await
        .unwrap_or_else(|e| {
            (
                Err(io::Error::other(format!("I/O task failed: {e}"))),
                OpKind::Sync { data_only: true },
            )
        })
}

fn run_sync(file: &File, offset: u64, mut kind: OpKind) -> OpResult {
    let r = match &mut kind {
        OpKind::Read(buf) => file.read_exact_at(buf.whole_mut(), offset),
        OpKind::Write(buf) => file.write_all_at(buf, offset),
        OpKind::WriteBack { len } => write_back(file, offset, *len),
        OpKind::Sync { data_only: true } => file.sync_data(),
        OpKind::Sync { data_only: false } => file.sync_all(),
        OpKind::Fallocate { mode, len } => fallocate(file, *mode, offset, *len),
        OpKind::WillNeed { len } => {
            // SAFETY: fadvise on a descriptor we hold open; no memory effects.
            let rc = unsafe {
                libc::posix_fadvise(
                    file.as_raw_fd(),
                    offset as libc::off_t,
                    *len as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(rc))
            }
        }
    };
    (r, kind)
}

/// sync_file_range(SYNC_FILE_RANGE_WRITE): see `OpKind::WriteBack`.
fn write_back(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: sync_file_range on a descriptor we hold open; no memory effects.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a descriptor we hold open; no memory effects.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Punch a hole: the range reads as zeros and frees its blocks.
pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// Zero the range but keep it allocated (NBD's NO_HOLE).
pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
