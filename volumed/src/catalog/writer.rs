//! The catalog's one writer: a thread that takes every change in turn,
//! applies a batch of them, then flushes sled once for the whole batch
//! (group commit across volumes), and only then answers each. So a caller
//! whose change was answered has it on disk, as before, and a lifecycle
//! call never syncs on a runtime worker.
//!
//! A volume record changes by compare-and-swap against the record its
//! writer holds; with one thread applying every change, the comparison and
//! the swap see the same catalog.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::mpsc;

use tokio::sync::oneshot;
use volumed_api::VolumeName;

use super::{CatalogError, Result, Trees, VolumeRecord, decode, sled_err};

/// Changes applied before one flush, at most: a bound on how long the
/// first of them waits.
const MAX_BATCH: usize = 256;

/// The trees a change may touch.
#[derive(Debug, Clone, Copy)]
pub(super) enum Tree {
    Snapshots,
    SnapshotExports,
    Jobs,
    Meta,
    AwsSnapshots,
    AwsVolumes,
    Policies,
    PolicyRuns,
    BinRules,
    SnapshotSets,
    Images,
    Instances,
    VolumeModifications,
}

pub(super) enum Op {
    /// Replaces the volume record `name` (absent: `None`) only while it is
    /// `expected`.
    SwapVolume {
        name: VolumeName,
        expected: Option<Box<VolumeRecord>>,
        new: Option<Box<VolumeRecord>>,
    },
    Put {
        tree: Tree,
        key: String,
        value: Vec<u8>,
    },
    Remove {
        tree: Tree,
        key: String,
    },
}

struct Request {
    op: Op,
    done: oneshot::Sender<Result<()>>,
}

/// The sending side, held by the catalog.
pub(super) struct Writer {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub(super) fn start(db: sled::Db, trees: Trees) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("catalog-writer".into())
            .spawn(move || run(&db, &trees, &rx))?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub(super) fn submit(&self, op: Op) -> Pending {
        let (done, rx) = oneshot::channel();
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(Request { op, done }).is_ok());
        Pending {
            rx: sent.then_some(rx),
        }
    }
}

impl Drop for Writer {
    /// Ends the thread after the changes queued, so the database (and its
    /// file lock) is closed when the catalog is.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A change handed to the writer: `.await` it, or [`Pending::wait`] off
/// the runtime. Answered once the change is flushed (or refused).
#[must_use = "a catalog change is durable only once its answer is awaited"]
pub struct Pending {
    rx: Option<oneshot::Receiver<Result<()>>>,
}

impl Pending {
    /// Blocks until the change is answered: for start-up work and tests,
    /// never on a runtime worker (it panics there).
    pub fn wait(self) -> Result<()> {
        self.rx
            .ok_or(CatalogError::WriterGone)?
            .blocking_recv()
            .map_err(|_| CatalogError::WriterGone)?
    }
}

impl IntoFuture for Pending {
    type Output = Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            self.rx
                .ok_or(CatalogError::WriterGone)?
                .await
                .map_err(|_| CatalogError::WriterGone)?
        })
    }
}

fn run(db: &sled::Db, trees: &Trees, rx: &mpsc::Receiver<Request>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let results: Vec<Result<()>> = batch.iter().map(|r| apply(trees, &r.op)).collect();
        let flushed = if results.iter().any(Result::is_ok) {
            db.flush().map(|_| ())
        } else {
            Ok(())
        };
        for (req, res) in batch.into_iter().zip(results) {
            let res = match (res, &flushed) {
                (Ok(()), Err(e)) => Err(CatalogError::Sled {
                    op: "flush",
                    source: e.clone(),
                }),
                (r, _) => r,
            };
            let _ = req.done.send(res);
        }
    }
}

fn tree(trees: &Trees, t: Tree) -> &sled::Tree {
    match t {
        Tree::Snapshots => &trees.snapshots,
        Tree::SnapshotExports => &trees.snapshot_exports,
        Tree::Jobs => &trees.jobs,
        Tree::Meta => &trees.meta,
        Tree::AwsSnapshots => &trees.aws_snapshots,
        Tree::AwsVolumes => &trees.aws_volumes,
        Tree::Policies => &trees.policies,
        Tree::PolicyRuns => &trees.policy_runs,
        Tree::BinRules => &trees.bin_rules,
        Tree::SnapshotSets => &trees.snapshot_sets,
        Tree::Images => &trees.images,
        Tree::Instances => &trees.instances,
        Tree::VolumeModifications => &trees.volume_modifications,
    }
}

fn apply(trees: &Trees, op: &Op) -> Result<()> {
    match op {
        Op::SwapVolume {
            name,
            expected,
            new,
        } => swap_volume(&trees.volumes, name, expected.as_deref(), new.as_deref()),
        Op::Put {
            tree: t,
            key,
            value,
        } => tree(trees, *t)
            .insert(key.as_str(), value.as_slice())
            .map(|_| ())
            .map_err(sled_err("write")),
        Op::Remove { tree: t, key } => tree(trees, *t)
            .remove(key.as_str())
            .map(|_| ())
            .map_err(sled_err("remove")),
    }
}

/// Compares by decoded record, not by bytes: a record written by an older
/// volumed lacks fields this one would serialize.
fn swap_volume(
    volumes: &sled::Tree,
    name: &VolumeName,
    expected: Option<&VolumeRecord>,
    new: Option<&VolumeRecord>,
) -> Result<()> {
    let stale = |found: Option<u64>| CatalogError::StaleVolume {
        name: name.clone(),
        expected: expected.map(|r| r.id),
        found,
    };
    let raw = volumes
        .get(name.as_str())
        .map_err(sled_err("read volume"))?;
    let current: Option<VolumeRecord> = raw
        .as_ref()
        .map(|v| decode(name.as_str().as_bytes(), v))
        .transpose()?;
    if current.as_ref() != expected {
        return Err(stale(current.map(|r| r.id)));
    }
    let value = new.map(|r| serde_json::to_vec(r).expect("a VolumeRecord always serializes"));
    volumes
        .compare_and_swap(name.as_str(), raw, value)
        .map_err(sled_err("write volume"))?
        // The writer is the only one: nothing can change it in between.
        .map_err(|e| {
            stale(
                e.current
                    .and_then(|v| serde_json::from_slice::<VolumeRecord>(&v).ok())
                    .map(|r| r.id),
            )
        })
}
