//! The io_uring backend: one thread owns a ring and drives it.
//!
//! Submitters (tokio tasks) hand an [`Op`] to the ring thread through a
//! channel and await a oneshot; they never block. The ring thread batches
//! every queued op into one `io_uring_enter`, and sleeps in the kernel until
//! a completion arrives or a submitter wakes it through an eventfd that has
//! a read always armed in the ring. A submitter writes the eventfd only when
//! the thread announced that it is going to sleep, so a busy ring costs no
//! extra syscall per op.
//!
//! Ownership: an op owns its buffer and an `Arc` of its file until its
//! completion is reaped, so neither can be freed or closed while the kernel
//! uses them, even if the awaiting task was cancelled.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use io_uring::{IoUring, opcode, squeue, types};
use tokio::sync::oneshot;
use tracing::{error, info};

use super::engine::OpKind;

/// Ring depth: the NBD window is 128 requests per connection, and a few
/// connections share the ring; ops beyond it wait in a backlog.
const RING_ENTRIES: u32 = 256;

const WAKE_KEY: u64 = u64::MAX;

pub(super) struct Op {
    pub file: Arc<File>,
    pub offset: u64,
    pub kind: OpKind,
    /// Bytes of a read or write already done (short transfers resubmit).
    pub done_bytes: usize,
    pub reply: oneshot::Sender<(io::Result<()>, OpKind)>,
}

pub struct Uring {
    tx: Option<mpsc::Sender<Op>>,
    wake: Arc<OwnedFd>,
    sleeping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Uring {
    /// Sets up the ring and starts its thread; fails where io_uring is not
    /// available (old kernel, seccomp), so the caller can fall back.
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: eventfd returns a new descriptor or -1; checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let sleeping = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let thread = {
            let (wake, sleeping) = (Arc::clone(&wake), Arc::clone(&sleeping));
            std::thread::Builder::new()
                .name("volumed-uring".into())
                .spawn(move || RingThread::new(ring, rx, wake, sleeping).run())?
        };
        info!(entries = RING_ENTRIES, "io_uring ready");
        Ok(Uring {
            tx: Some(tx),
            wake,
            sleeping,
            thread: Some(thread),
        })
    }

    pub(super) fn submit(&self, op: Op) {
        let Some(tx) = &self.tx else { return };
        if let Err(mpsc::SendError(op)) = tx.send(op) {
            let _ = op
                .reply
                .send((Err(io::Error::other("io_uring thread is gone")), op.kind));
            return;
        }
        if self.sleeping.swap(false, Ordering::SeqCst) {
            wake(&self.wake);
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Closing the channel and waking the thread lets it finish what is in
        // flight and exit.
        self.tx = None;
        wake(&self.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wake(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an eventfd we own.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
}

struct RingThread {
    ring: IoUring,
    rx: mpsc::Receiver<Op>,
    wake: Arc<OwnedFd>,
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    sleeping: Arc<AtomicBool>,
    /// Ops in the kernel, by slot; `free` lists empty slots.
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    in_flight: usize,
    backlog: VecDeque<Op>,
    closed: bool,
}

impl RingThread {
    fn new(
        ring: IoUring,
        rx: mpsc::Receiver<Op>,
        wake: Arc<OwnedFd>,
        sleeping: Arc<AtomicBool>,
    ) -> Self {
        RingThread {
            ring,
            rx,
            wake,
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            sleeping,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            backlog: VecDeque::new(),
            closed: false,
        }
    }

    fn run(mut self) {
        loop {
            self.take_new_ops();
            self.fill_queue();
            if self.closed && self.in_flight == 0 && self.backlog.is_empty() {
                return;
            }
            // Announce the sleep, then look once more: a submitter that sent
            // before seeing the flag is caught here, one that sent after
            // wakes us through the eventfd.
            self.sleeping.store(true, Ordering::SeqCst);
            let wait = match self.rx.try_recv() {
                Ok(op) => {
                    self.sleeping.store(false, Ordering::SeqCst);
                    self.backlog.push_back(op);
                    0
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.closed = true;
                    usize::from(self.in_flight > 0)
                }
                Err(mpsc::TryRecvError::Empty) => 1,
            };
            match self.ring.submit_and_wait(wait) {
                Ok(_) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::EINTR)
                        || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    error!(error = %e, "io_uring_enter failed; failing queued I/O");
                    self.fail_all(&e);
                    return;
                }
            }
            self.sleeping.store(false, Ordering::SeqCst);
            self.reap();
        }
    }

    fn take_new_ops(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(op) => self.backlog.push_back(op),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    fn fill_queue(&mut self) {
        if !self.wake_armed && !self.closed {
            let sqe = opcode::Read::new(
                types::Fd(self.wake.as_raw_fd()),
                self.wake_buf.as_mut_ptr(),
                8,
            )
            .build()
            .user_data(WAKE_KEY);
            // SAFETY: the buffer is owned by self and outlives the ring.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                self.wake_armed = true;
            }
        }
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
                return;
            }
            self.in_flight += 1;
        }
    }

    fn reap(&mut self) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (key, res) in done {
            if key == WAKE_KEY {
                self.wake_armed = false;
                continue;
            }
            let slot = key as usize;
            let Some(mut op) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            self.in_flight -= 1;
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                match &op.kind {
                    OpKind::Read(buf) | OpKind::Write(buf) => {
                        let n = res as usize;
                        if n == 0 && op.done_bytes < buf.len() {
                            Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "short transfer at end of file",
                            ))
                        } else if op.done_bytes + n < buf.len() {
                            // A short transfer: submit the rest.
                            op.done_bytes += n;
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
    }

    fn fail_all(&mut self, e: &io::Error) {
        let ops = self
            .slots
            .drain(..)
            .flatten()
            .chain(self.backlog.drain(..))
            .collect::<Vec<_>>();
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
            opcode::Write::new(fd, rest.as_ptr(), len)
                .offset(pos)
                .build()
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
