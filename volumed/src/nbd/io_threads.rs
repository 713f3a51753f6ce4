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

use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::disk::IoEngine;

/// A connection's work, built on the thread that runs it (so its socket is
/// registered with that thread's reactor).
pub type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("start an NBD thread's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("start an NBD thread")]
    Thread(#[source] std::io::Error),
}

pub struct IoThreads {
    queues: Vec<mpsc::UnboundedSender<Job>>,
    next: AtomicUsize,
}

impl IoThreads {
    /// Starts `n` threads (at least one); each binds a ring of its own
    /// from `io` when `io` uses io_uring.
    pub fn start(n: usize, io: &Arc<IoEngine>) -> Result<Self, StartError> {
        let mut queues = Vec::new();
        for i in 0..n.max(1) {
            let (tx, rx) = mpsc::unbounded_channel::<Job>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(StartError::Runtime)?;
            let io = Arc::clone(io);
            std::thread::Builder::new()
                .name(format!("nbd-io-{i}"))
                .spawn(move || rt.block_on(run(i, rx, io)))
                .map_err(StartError::Thread)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    use crate::disk::{EngineChoice, OpKind};

    /// Jobs go round robin to threads named `nbd-io-N`; each thread's I/O
    /// runs on a ring of its own; dropping the pool lets jobs still running
    /// finish.
    #[test]
    fn jobs_run_round_robin_on_their_threads_and_finish_after_drop() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let io = Arc::new(
            rt.block_on(async { IoEngine::new(EngineChoice::Uring) })
                .unwrap(),
        );
        let pool = IoThreads::start(2, &io).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(std::fs::File::create_new(dir.path().join("f")).unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        for i in 0..4u64 {
            let (io, file, seen, done) = (
                Arc::clone(&io),
                Arc::clone(&file),
                Arc::clone(&seen),
                done_tx.clone(),
            );
            let job: Job = Box::new(move || {
                Box::pin(async move {
                    // Still running when the pool is dropped below.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    assert!(IoEngine::thread_has_ring());
                    let data = vec![i as u8; 4096];
                    let (r, _) = io.run(file, i * 4096, OpKind::Write(data)).await;
                    r.unwrap();
                    let name = std::thread::current().name().unwrap_or("").to_owned();
                    seen.lock().unwrap().push((i, name));
                    done.send(()).unwrap();
                })
            });
            assert!(pool.spawn(job).is_ok());
        }
        assert!(!IoEngine::thread_has_ring());
        drop(pool);
        for _ in 0..4 {
            done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        let names: Vec<&str> = seen.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["nbd-io-0", "nbd-io-1", "nbd-io-0", "nbd-io-1"]);
        let bytes = std::fs::read(dir.path().join("f")).unwrap();
        for i in 0..4usize {
            assert!(
                bytes[i * 4096..(i + 1) * 4096]
                    .iter()
                    .all(|&b| b == i as u8)
            );
        }
    }
}
