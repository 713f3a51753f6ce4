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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use tokio::task::JoinSet;

    use super::*;
    use crate::disk::engine::{PUNCH_HOLE, ZERO_RANGE};

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
                    assert!(matches!(kind, OpKind::Fallocate { mode: m, len: l } if m == mode && l == len));
                });
            } else {
                set.spawn(async move {
                    let (r, kind) = rg.run(f, off, OpKind::Read(vec![0xee; BLOCK])).await;
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
                OpKind::Read(vec![0; BLOCK]),
            )
            .await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let OpKind::Read(buf) = kind else {
            panic!("not a read")
        };
        assert_eq!(buf.len(), BLOCK);
        assert!(buf[..100].iter().all(|b| *b == 5) && buf[100..].iter().all(|b| *b == 0));

        // Wholly past the end.
        let (r, kind) = ring.run(file, 1 << 20, OpKind::Read(vec![9; 512])).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert!(matches!(kind, OpKind::Read(b) if b == vec![9; 512]));
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
                    let (r, kind) = ring.run(good, off, OpKind::Read(vec![0; BLOCK])).await;
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
}
