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

/// An op in flight: what the kernel reads or writes stays owned here.
struct Op {
    file: Arc<File>,
    offset: u64,
    kind: OpKind,
    /// Bytes of a read or write already done (short transfers resubmit).
    done_bytes: usize,
    reply: oneshot::Sender<OpResult>,
}

pub struct Uring {
    shared: Arc<Shared>,
}

struct Shared {
    ring: Mutex<Ring>,
}

struct Ring {
    ring: IoUring,
    /// Ops in the kernel, by slot; `free` lists empty slots.
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Ops waiting for room in the submission queue.
    backlog: VecDeque<Op>,
}

impl Uring {
    /// Sets up the ring and its reaper; must run inside the tokio runtime.
    /// Fails where io_uring is not available (old kernel, seccomp), so the
    /// caller can fall back.
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
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
        let shared = Arc::new(Shared {
            ring: Mutex::new(Ring {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
                backlog: VecDeque::new(),
            }),
        });
        tokio::spawn(reaper(Arc::downgrade(&shared), efd));
        info!(entries = RING_ENTRIES, "io_uring ready");
        Ok(Uring { shared })
    }

    /// Runs one op; returns its result and the op (with its buffer).
    pub async fn run(&self, file: Arc<File>, offset: u64, kind: OpKind) -> OpResult {
        let (tx, rx) = oneshot::channel();
        self.submit(Op {
            file,
            offset,
            kind,
            done_bytes: 0,
            reply: tx,
        });
        rx.await.unwrap_or_else(|_| {
            (
                Err(io::Error::other("io_uring op dropped")),
                OpKind::Sync { data_only: true },
            )
        })
    }

    fn submit(&self, op: Op) {
        let mut r = self.shared.ring.lock().unwrap_or_else(|e| e.into_inner());
        r.backlog.push_back(op);
        r.pump();
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
            let pushed = self.fill();
            // Also when nothing new was pushed: a short submit may have left
            // entries in the queue.
            if !self.ring.submission().is_empty() {
                loop {
                    match self.ring.submit() {
                        Ok(_) => break,
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                        // The completion queue is full: reap first.
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                        Err(e) => {
                            error!(error = %e, "io_uring_enter failed; failing queued I/O");
                            self.fail_all(&e);
                            return;
                        }
                    }
                }
            }
            let reaped = self.reap();
            if reaped == 0 && (pushed == 0 || self.backlog.is_empty()) {
                return;
            }
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
            let sqe = build_sqe(&mut self.slots, slot, op);
            // SAFETY: the op (buffer and file) stays in `slots` until its
            // completion is reaped.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                let op = self.slots[slot].take().expect("slot just filled");
                self.free.push(slot);
                self.backlog.push_front(op);
                break;
            }
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
                match &op.kind {
                    OpKind::Read(buf) | OpKind::Write(buf) => {
                        let got = res as usize;
                        if got == 0 && op.done_bytes < buf.len() {
                            Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "short transfer at end of file",
                            ))
                        } else if op.done_bytes + got < buf.len() {
                            // A short transfer: submit the rest.
                            op.done_bytes += got;
                            self.backlog.push_back(op);
                            continue;
                        } else {
                            Ok(())
                        }
                    }
                    _ => Ok(()),
                }
            };
            let _ = op.reply.send((result, op.kind));
        }
        n
    }

    fn fail_all(&mut self, e: &io::Error) {
        let ops = self
            .slots
            .drain(..)
            .flatten()
            .chain(self.backlog.drain(..))
            .collect::<Vec<_>>();
        self.free.clear();
        for op in ops {
            let _ = op
                .reply
                .send((Err(io::Error::new(e.kind(), e.to_string())), op.kind));
        }
    }
}

fn build_sqe(slots: &mut [Option<Op>], slot: usize, op: Op) -> squeue::Entry {
    let op = slots[slot].insert(op);
    let fd = types::Fd(op.file.as_raw_fd());
    let done = op.done_bytes;
    let pos = op.offset + done as u64;
    let sqe = match &mut op.kind {
        OpKind::Read(buf) => {
            let rest = &mut buf[done..];
            let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
            opcode::Read::new(fd, rest.as_mut_ptr(), len)
                .offset(pos)
                .build()
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
    };
    sqe.user_data(slot as u64)
}
