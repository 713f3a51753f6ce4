//! The threads NBD connections are served on: one per CPU, each a
//! current-thread tokio runtime with an io_uring ring of its own. A
//! connection is handed to one of them when it is accepted and stays there:
//! its requests are read, submitted to the ring, reaped and answered on that
//! one thread.
//!
//! Why: on the daemon's work-stealing runtime every completion or request
//! that made a task runnable could wake the other worker, which stole it;
//! 4 KiB requests at QD32 then cost about one context switch each, and
//! random reads ran at 0.8x nbdkit's thread per request. Served on one
//! thread with its own ring, the same job made 0.03 switches per request
//! and ran ahead of nbdkit (docs/performance.md, "One thread per
//! connection"). Connections are spread over the threads round robin, so
//! several clients still use every CPU.
//!
//! Everything else (control API, snapshots, imports) stays on the main
//! runtime and its shared ring.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::disk::IoEngine;

/// A connection's work, built on the thread that runs it (so its socket is
/// registered with that thread's reactor).
pub type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

pub struct IoThreads {
    queues: Vec<mpsc::UnboundedSender<Job>>,
    next: AtomicUsize,
}

impl IoThreads {
    /// Starts `n` threads (at least one); each binds a ring of its own
    /// from `io` when `io` uses io_uring.
    pub fn start(n: usize, io: &Arc<IoEngine>) -> anyhow::Result<Self> {
        let mut queues = Vec::new();
        for i in 0..n.max(1) {
            let (tx, rx) = mpsc::unbounded_channel::<Job>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start an NBD thread's runtime")?;
            let io = Arc::clone(io);
            std::thread::Builder::new()
                .name(format!("nbd-io-{i}"))
                .spawn(move || rt.block_on(run(i, rx, io)))
                .context("start an NBD thread")?;
            queues.push(tx);
        }
        info!(threads = queues.len(), "NBD threads ready");
        Ok(IoThreads {
            queues,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `job` on the next thread in turn. Hands it back if that thread
    /// is gone (it never ends while this is alive, so: a bug).
    pub fn spawn(&self, job: Job) -> Result<(), Job> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        self.queues[i].send(job).map_err(|e| e.0)
    }
}

/// One thread's loop: binds its ring, runs every job it is given, and once
/// the pool is dropped waits for the jobs still running.
async fn run(i: usize, mut rx: mpsc::UnboundedReceiver<Job>, io: Arc<IoEngine>) {
    if let Err(e) = io.bind_thread() {
        // The shared ring still serves this thread's connections.
        warn!(thread = i, error = %e, "NBD thread has no io_uring ring of its own");
    }
    let jobs = TaskTracker::new();
    while let Some(job) = rx.recv().await {
        jobs.spawn(job());
    }
    jobs.close();
    jobs.wait().await;
}
