//! The io_uring backend, driven from the tokio workers themselves.
//!
//! A request task submits its op under a short lock: it pushes the SQE and
//! calls `io_uring_enter` without waiting. A read served by the page cache
//! completes inside that call, so its completion is reaped (and the task's
//! oneshot filled) before the task even awaits: no thread switch at all.
//! Every completion also signals an eventfd registered with the ring; a
//! reaper task watches it through tokio's reactor and reaps whatever the
//! kernel finished later (a buffered write on ext4, a read from disk, a
//! sync). No tokio task ever waits in the kernel.
//!
//! The eventfd is registered for all completions, not in async-only mode:
//! async-only signals only completions posted by io-wq workers, and a
//! buffered read that misses the page cache completes through task_work in
//! the submitting thread instead, unsignalled. Its completion then waited
//! for some other submission to be reaped; a snapshot reading one chunk at
//! a time hung on it.
//!
//! A first design gave the ring its own thread; a buffered 4 KiB write then
//! crossed four threads (tokio, ring, io-wq, ring, tokio) and took 89 µs at
//! QD1 against 57 µs for a thread pool (benches/nbd_vs_qemu.sh). Driving the
//! ring from the workers removes two of those crossings.
//!
//! Ownership: an op owns its buffer and an `Arc` of its file until its
//! completion is reaped, so neither can be freed or closed while the kernel
//! uses them, even if the awaiting task was cancelled.
//!
//! A failed `io_uring_enter` (other than EINTR or EBUSY) takes the ring
//! down for good. The kernel may still own every op whose SQE it consumed,
//! so those stay in their slots, slots are never renumbered, and their
//! completions are reaped as before. Only what the kernel never saw comes
//! back at once, with an error [`is_ring_down`] recognises: the backlog and
//! the SQEs left in the queue, which are safe to release because no later
//! enter passes a `to_submit` again. The engine runs those, and everything
//! after them, on its thread pool. Ring set-up requires IORING_FEAT_NODROP,
//! without which a completion finding the queue full is lost and its op
//! would hold its slot for ever.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};

use io_uring::{IoUring, opcode, squeue, types};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;
use tracing::{error, info};

use super::op::{OpKind, OpResult};

/// Ring depth: the NBD window is 128 requests per connection, and a few
/// connections share the ring; ops beyond it wait in a backlog.
const RING_ENTRIES: u32 = 256;

/// On an NBD thread's ring, reads at least this long go to an io-wq worker
/// at once instead of being copied out of the page cache inline. The
/// connection's thread then sends the replies before them while the copy
/// runs on the other core: 1 MiB reads at QD8 were bound by that one
/// thread (a copy in, a copy out to the socket, loopback delivery), at
/// 0.8 of nbdkit, whose threads spread the same work over both cores.
/// Shorter reads stay inline: their copy costs less than the hand-off.
pub const OFFLOAD_READ_MIN: usize = 512 << 10;

/// An op in flight: what the kernel reads or writes stays owned here.
struct Op {
    file: Arc<File>,
    offset: u64,
    kind: OpKind,
    /// Bytes of a read or write already done (short transfers resubmit).
    done_bytes: usize,
    reply: oneshot::Sender<OpResult>,
}

/// A handle on one ring; clones share it.
#[derive(Clone)]
pub struct Uring {
    shared: Arc<Shared>,
}

struct Shared {
    ring: Mutex<Ring>,
}

struct Ring {
    ring: IoUring,
    /// Ops pushed to the ring, by slot (the SQE's user data); `free` lists
    /// empty slots. An op stays in its slot until its completion is reaped:
    /// until then the kernel may be reading or writing its buffer.
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Slots whose SQEs are in the submission queue but not yet consumed by
    /// the kernel, in queue order (the kernel consumes from the front).
    queued: VecDeque<usize>,
    /// Ops waiting for room in the submission queue.
    backlog: VecDeque<Op>,
    /// Set when `io_uring_enter` failed for good. From then on nothing new
    /// goes in, and no enter ever again passes a `to_submit`, so SQEs the
    /// kernel did not consume are never read and their ops can be handed
    /// back; ops the kernel took stay in their slots until they complete.
    down: Option<String>,
    /// Enters made so far, and the one to fail: the `io-uring-enter-error`
    /// failpoint, or a unit test.
    enters: u64,
    /// Reads at least this long go straight to io-wq (NBD threads' rings).
    offload_reads: Option<usize>,
    inject: Option<Inject>,
}

/// An injected `io_uring_enter` failure: on the `at`-th enter, either
/// before the kernel saw anything or after it consumed every SQE.
#[derive(Debug, Clone, Copy)]
struct Inject {
    at: u64,
    after_consuming: bool,
}

/// The error an op comes back with when the ring stopped before the kernel
/// ever saw it: the op did not run, so it may be run another way.
#[derive(Debug)]
struct RingDown(String);

impl std::fmt::Display for RingDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "io_uring is down, op not submitted: cause={}", self.0)
    }
}

impl std::error::Error for RingDown {}

/// Whether `e` says the op never reached the kernel because the ring is
/// down (so running it elsewhere cannot run it twice).
pub fn is_ring_down(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<RingDown>())
}

/// `IORING_ENTER_GETEVENTS`; the crate keeps its constants private.
const ENTER_GETEVENTS: u32 = 1;

impl Uring {
    /// Sets up the ring and its reaper; must run inside the tokio runtime.
    /// Fails where io_uring is not available (old kernel, seccomp), so the
    /// caller can fall back.
    pub fn new() -> io::Result<Self> {
        Self::with_offload(None)
    }

    /// A ring for one NBD thread: as [`Uring::new`], and reads of at least
    /// [`OFFLOAD_READ_MIN`] bytes go to io-wq.
    pub fn for_nbd_thread() -> io::Result<Self> {
        Self::with_offload(Some(OFFLOAD_READ_MIN))
    }

    fn with_offload(offload_reads: Option<usize>) -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // Without NODROP a completion that finds the completion queue full
        // is dropped, and its op would sit in its slot for ever (more ops
        // than the queue has entries can be in flight).
        if !ring.params().is_feature_nodrop() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks IORING_FEAT_NODROP (kernel older than 5.5)",
            ));
        }
        // SAFETY: eventfd returns a new descriptor or -1; checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open
        // and the same for the AsyncFd's whole life.
        let efd = unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE) }
            .map_err(|e| {
                io::Error::other(format!("register the io_uring eventfd with tokio: {e}"))
            })?;
        let inject = crate::failpoint::value("io-uring-enter-error").map(|at| Inject {
            at,
            after_consuming: false,
        });
        let shared = Arc::new(Shared {
            ring: Mutex::new(Ring {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
                queued: VecDeque::new(),
                backlog: VecDeque::new(),
                down: None,
                enters: 0,
                inject,
                offload_reads,
            }),
        });
        tokio::spawn(reaper(Arc::downgrade(&shared), efd));
        info!(entries = RING_ENTRIES, "io_uring ready");
        Ok(Uring { shared })
    }

    /// Runs one op; returns its result and the op (with its buffer). An
    /// error for which [`is_ring_down`] holds means the op never ran.
    pub async fn run(&self, file: Arc<File>, offset: u64, kind: OpKind) -> OpResult {
        let (tx, rx) = oneshot::channel();
        self.submit_new(file, offset, kind, tx);
        rx.await.unwrap_or_else(|_| {
            (
                Err(io::Error::other("io_uring op dropped")),
                OpKind::Sync { data_only: true },
            )
        })
    }

    /// Submits one op and does not wait for it: for hints whose result
    /// nobody needs (the ring holds the file until the op completes).
    pub fn start(&self, file: Arc<File>, offset: u64, kind: OpKind) {
        self.submit_new(file, offset, kind, oneshot::channel().0);
    }

    fn submit_new(
        &self,
        file: Arc<File>,
        offset: u64,
        kind: OpKind,
        reply: oneshot::Sender<OpResult>,
    ) {
        self.submit(Op {
            file,
            offset,
            kind,
            done_bytes: 0,
            reply,
        });
    }

    fn submit(&self, op: Op) {
        let mut r = self.shared.ring.lock().unwrap_or_else(|e| e.into_inner());
        // On a ring that is down, `pump` hands it straight back.
        r.backlog.push_back(op);
        r.pump();
    }
}

impl Op {
    fn ring_down(self, cause: &str) {
        let _ = self
            .reply
            .send((Err(io::Error::other(RingDown(cause.to_owned()))), self.kind));
    }
}

/// Reaps completions the kernel finished asynchronously. Holds only a weak
/// reference, so dropping the engine ends it.
async fn reaper(shared: Weak<Shared>, efd: AsyncFd<OwnedFd>) {
    loop {
        let Ok(mut guard) = efd.readable().await else {
            return;
        };
        let mut counter = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer from our own eventfd.
        let _ = unsafe { libc::read(efd.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
        guard.clear_ready();
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.ring.lock().unwrap_or_else(|e| e.into_inner()).pump();
    }
}

impl Ring {
    /// Moves backlog into the submission queue, enters the kernel without
    /// waiting, and reaps whatever completed; repeats while progress is made
    /// (a reaped short transfer goes back to the backlog).
    fn pump(&mut self) {
        loop {
            let pushed = if self.down.is_none() { self.fill() } else { 0 };
            // Also when nothing new was pushed: a short submit may have left
            // entries in the queue.
            if self.down.is_none() && !self.ring.submission().is_empty() {
                loop {
                    let r = self.enter();
                    // Whatever the answer, the queue's head says what the
                    // kernel took.
                    self.note_consumed();
                    match r {
                        Ok(_) => break,
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                        // The completion queue is full: reap first.
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                        Err(e) => {
                            self.go_down(&e);
                            break;
                        }
                    }
                }
            }
            if let Some(cause) = self.down.clone() {
                for op in std::mem::take(&mut self.backlog) {
                    op.ring_down(&cause);
                }
            }
            self.flush_overflow();
            let reaped = self.reap();
            if reaped == 0 && (pushed == 0 || self.backlog.is_empty()) {
                return;
            }
        }
    }

    /// `io_uring_enter` submitting the queue, or the injected failure.
    fn enter(&mut self) -> io::Result<usize> {
        self.enters += 1;
        match self.inject {
            Some(i) if i.at == self.enters => {
                if i.after_consuming {
                    self.ring.submit()?;
                }
                Err(io::Error::from_raw_os_error(libc::EFAULT))
            }
            _ => self.ring.submit(),
        }
    }

    /// Forgets the queued slots the kernel has consumed: their ops are the
    /// kernel's now, until their completions.
    fn note_consumed(&mut self) {
        let left = self.ring.submission().len();
        while self.queued.len() > left {
            self.queued.pop_front();
        }
    }

    /// Stops submitting after an enter failed. Hands back only what the
    /// kernel never saw: the backlog, and the SQEs still queued, which no
    /// later enter will submit. Ops in the kernel stay in their slots, and
    /// their slots are not reused, until their completions are reaped.
    fn go_down(&mut self, e: &io::Error) {
        let cause = e.to_string();
        error!(
            error = %e,
            in_kernel = self.slots.iter().flatten().count().saturating_sub(self.queued.len()),
            not_submitted = self.queued.len() + self.backlog.len(),
            "io_uring_enter failed; the ring takes no more I/O (ops it never submitted go to the thread pool)"
        );
        for slot in std::mem::take(&mut self.queued) {
            if let Some(op) = self.slots.get_mut(slot).and_then(Option::take) {
                op.ring_down(&cause);
            }
        }
        for op in std::mem::take(&mut self.backlog) {
            op.ring_down(&cause);
        }
        self.down = Some(cause);
    }

    /// Completions that found the completion queue full wait in the kernel
    /// (NODROP) until an enter with GETEVENTS moves them over. Submits
    /// nothing, so it is safe on a ring that is down.
    fn flush_overflow(&mut self) {
        if !self.ring.submission().cq_overflow() {
            return;
        }
        // SAFETY: to_submit 0 and no argument: the kernel reads no SQE and
        // no memory of ours; it only moves completions into the queue.
        let r = unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(0, 0, ENTER_GETEVENTS, None)
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "io_uring overflow flush failed");
        }
    }

    fn fill(&mut self) -> usize {
        let mut pushed = 0;
        while let Some(op) = self.backlog.pop_front() {
            let slot = match self.free.pop() {
                Some(s) => s,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            };
            let sqe = build_sqe(&mut self.slots, slot, op, self.offload_reads);
            // SAFETY: the op (buffer and file) stays in `slots` until its
            // completion is reaped, or, if the ring goes down before the
            // kernel consumed this SQE, until it is certain no enter will
            // ever submit it.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                let op = self.slots[slot].take().expect("slot just filled");
                self.free.push(slot);
                self.backlog.push_front(op);
                break;
            }
            self.queued.push_back(slot);
            pushed += 1;
        }
        pushed
    }

    fn reap(&mut self) -> usize {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let n = done.len();
        for (key, res) in done {
            let slot = key as usize;
            let Some(mut op) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                match op.kind.transfer_len() {
                    Some(want) => {
                        let got = res as usize;
                        if let OpKind::Read(buf) = &mut op.kind {
                            // SAFETY: the kernel wrote `got` bytes after the
                            // `done_bytes` it was given (`build_sqe`).
                            unsafe { buf.written_to(op.done_bytes + got) }
                        }
                        if got == 0 && op.done_bytes < want {
                            Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "short transfer at end of file",
                            ))
                        } else if op.done_bytes + got < want {
                            // A short transfer: submit the rest. If the ring
                            // is down, `pump` hands the op back and the whole
                            // of it is redone elsewhere (positional I/O, so
                            // that is harmless).
                            op.done_bytes += got;
                            self.backlog.push_back(op);
                            continue;
                        } else {
                            Ok(())
                        }
                    }
                    None => Ok(()),
                }
            };
            let _ = op.reply.send((result, op.kind));
        }
        n
    }
}

fn build_sqe(
    slots: &mut [Option<Op>],
    slot: usize,
    op: Op,
    offload_reads: Option<usize>,
) -> squeue::Entry {
    let op = slots[slot].insert(op);
    let fd = types::Fd(op.file.as_raw_fd());
    let done = op.done_bytes;
    let pos = op.offset + done as u64;
    let sqe = match &mut op.kind {
        OpKind::Read(buf) => {
            let (ptr, len) = buf.rest_ptr(done);
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            let sqe = opcode::Read::new(fd, ptr, len).offset(pos).build();
            match offload_reads {
                Some(min) if len as usize >= min => sqe.flags(squeue::Flags::ASYNC),
                _ => sqe,
            }
        }
        OpKind::Write(buf) => {
            let rest = &buf[done..];
            let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
            // ext4 cannot do a buffered write without blocking, so the
            // kernel's inline attempt always fails; go straight to io-wq.
            opcode::Write::new(fd, rest.as_ptr(), len)
                .offset(pos)
                .build()
                .flags(squeue::Flags::ASYNC)
        }
        OpKind::Sync { data_only } => {
            let flags = if *data_only {
                types::FsyncFlags::DATASYNC
            } else {
                types::FsyncFlags::empty()
            };
            opcode::Fsync::new(fd).flags(flags).build()
        }
        OpKind::Fallocate { mode, len } => opcode::Fallocate::new(fd, *len)
            .offset(pos)
            .mode(*mode)
            .build(),
        OpKind::WillNeed { len } => {
            let len = libc::off_t::try_from(*len).unwrap_or(libc::off_t::MAX);
            opcode::Fadvise::new(fd, len, libc::POSIX_FADV_WILLNEED)
                .offset(pos)
                .build()
        }
        OpKind::WriteBack { len } => {
            let len = u32::try_from(*len).unwrap_or(u32::MAX);
            opcode::SyncFileRange::new(fd, len)
                .offset(pos)
                .flags(libc::SYNC_FILE_RANGE_WRITE)
                .build()
        }
    };
    sqe.user_data(slot as u64)
}

#[cfg(test)]
#[path = "uring_tests.rs"]
mod tests;
