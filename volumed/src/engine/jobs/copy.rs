//! Snapshot copies (`vol snapshot copy`, EC2 CopySnapshot): the copy's
//! marker announced and its record `pending` at once, the copy itself (see
//! `snapshot::copy`: metadata only in the source's domain, every chunk
//! sealed anew in another) in the background, then the record `completed`
//! or `error`. Each copy's record has this job as its one writer; a
//! restart ends a copy in progress `error` (see `SnapshotJobs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use snapshot::copy::{CopyProgress, copy};
use snapshot::{Encryption, ManifestHeader, Repo, SnapshotId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::snapshot::complete_record;
use crate::catalog::{Catalog, SnapshotRecord, SnapshotSource, SnapshotState, rfc3339, unix_now};
use crate::engine::error::{Error, Result};

/// The copies this host is making.
pub struct CopyJobs {
    catalog: Arc<Catalog>,
    repo: Repo,
    running: Mutex<HashMap<SnapshotId, Arc<CopyProgress>>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl CopyJobs {
    pub fn new(catalog: Arc<Catalog>, repo: Repo) -> Self {
        CopyJobs {
            catalog,
            repo,
            running: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<SnapshotId, Arc<CopyProgress>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn contains(&self, id: &SnapshotId) -> bool {
        self.running().contains_key(id)
    }

    /// `(done, total)` distinct chunks of a copy in progress.
    pub fn progress(&self, id: &SnapshotId) -> Option<(u64, u64)> {
        self.running().get(id).map(|p| {
            (
                p.done.load(Ordering::Relaxed),
                p.total.load(Ordering::Relaxed),
            )
        })
    }

    /// Starts copying snapshot `source` (whose header is `h`) sealed as
    /// `target` says; returns the copy's `pending` record.
    pub async fn start(
        self: &Arc<Self>,
        h: &ManifestHeader,
        target: Option<Encryption>,
        labels: BTreeMap<String, String>,
    ) -> Result<SnapshotRecord> {
        let id = SnapshotId::generate();
        let pending = self
            .repo
            .begin_snapshot(&id)
            .await
            .map_err(|e| Error::store(format!("start copy {id}"), e))?;
        let mut all = h.labels.clone();
        all.extend(labels);
        let rec = SnapshotRecord {
            id: id.clone(),
            volume: h.volume.clone(),
            state: SnapshotState::Pending,
            size: h.size,
            chunk_size: h.chunk_size,
            parent: None,
            created_at: unix_now(),
            labels: all,
            changed_chunks: 0,
            logical_bytes: 0,
            uploaded_bytes: 0,
            chunks_total: 0,
            chunks_done: 0,
            error: None,
            completed_at: None,
            seq: 0,
            source: SnapshotSource::Copy,
            encryption: target.clone(),
        };
        let rec = match self.catalog.record_new_snapshot(rec).await {
            Ok(rec) => rec,
            Err(e) => {
                pending.end().await;
                return Err(e.into());
            }
        };
        let progress = Arc::new(CopyProgress::default());
        self.running().insert(id.clone(), Arc::clone(&progress));
        info!(snapshot = %id, source = %h.id, full = h.encryption != target, "snapshot copy started");
        let (me, source, started) = (Arc::clone(self), h.id.clone(), rec.clone());
        self.tasks.spawn(async move {
            let copied = tokio::select! {
                r = copy(&me.repo, &pending, &source, target, rfc3339(started.created_at), &progress) => {
                    r.map_err(|e| e.to_string())
                }
                _ = me.cancel.cancelled() => Err("volumed was shut down during the copy".into()),
            };
            pending.end().await;
            me.finish(started, copied, &progress).await;
        });
        Ok(rec)
    }

    async fn finish(
        &self,
        mut rec: SnapshotRecord,
        copied: std::result::Result<snapshot::copy::Copied, String>,
        progress: &CopyProgress,
    ) {
        rec.chunks_total = progress.total.load(Ordering::Relaxed);
        match copied {
            Ok(c) => {
                complete_record(&mut rec, &c.root.header);
                info!(snapshot = %rec.id, full = c.full, uploaded = rec.uploaded_bytes, "snapshot copy completed");
            }
            Err(e) => {
                rec.state = SnapshotState::Error;
                rec.chunks_done = progress.done.load(Ordering::Relaxed);
                warn!(snapshot = %rec.id, error = %e, "snapshot copy failed");
                rec.error = Some(e);
            }
        }
        if let Err(e) = self.catalog.put_snapshot(&rec).await {
            // A completed copy's manifest is in the store: the next start
            // settles the record from it.
            warn!(snapshot = %rec.id, error = %e, "could not record the end of a snapshot copy");
        }
        self.running().remove(&rec.id);
    }

    /// Stops every copy; each ends `error`.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}
