//! Snapshots of live volumes: the job that turns a frozen volume into
//! chunk objects and a manifest in the store.
//!
//! Steps, and what a failure at each leaves behind:
//! 1. Freeze (`Volume::begin_snapshot`): the instant. Record `pending`.
//! 2. Read each changed chunk holding data (from disk, or the copy a write
//!    preserved), hash it, and upload it unless the store has it. A failure
//!    here leaves chunk objects no manifest names: garbage for gc, harmless.
//! 3. Build the manifest: changed chunks from step 2, unchanged ones from
//!    the parent's manifest.
//! 4. Write the manifest: the commit point. Before it, the snapshot does not
//!    exist; after it, it does, even if we crash before step 5.
//! 5. Record `completed` and make it the volume's parent for the next one.
//!
//! On any failure the snapshot ends `error` and its changed chunks go back
//! into the dirty set, so the next snapshot carries them. A snapshot found
//! `pending` at start is settled by looking for its manifest.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use snapshot::{Manifest, ManifestHeader, RepoError, SnapshotId};
use tokio::task::JoinSet;
use tracing::{info, warn};
use volumed_api::{CreateSnapshot, VolumeName};

use super::chunk_map::Changed;
use super::{Engine, Volume, rfc3339};
use crate::catalog::{SnapshotRecord, SnapshotState, unix_now};
use crate::error::{Error, Result};

/// Chunks read, hashed and uploaded at once: enough to keep both cores
/// hashing and compressing while uploads wait on the network.
const UPLOAD_CONCURRENCY: usize = 16;

/// Attempts for one store operation on top of the SDK's own retries, with
/// backoff, before the snapshot gives up and ends `error`.
const STORE_ATTEMPTS: u32 = 3;

/// Live progress of a pending snapshot.
#[derive(Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > 50 {
        return Err(Error::InvalidLabel(
            format!("{} labels", labels.len()),
            "at most 50 labels",
        ));
    }
    for (k, v) in labels {
        let key_ok = (1..=128).contains(&k.len())
            && k.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':')
            });
        if !key_ok {
            return Err(Error::InvalidLabel(
                k.clone(),
                "keys are 1 to 128 of A-Z a-z 0-9 . _ - / :",
            ));
        }
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(Error::InvalidLabel(
                k.clone(),
                "values are at most 256 printable characters",
            ));
        }
    }
    Ok(())
}

/// Retries a store operation on transient errors, with backoff.
async fn with_retry<T, F, Fut>(what: &str, mut op: F) -> std::result::Result<T, RepoError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, RepoError>>,
{
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if e.is_transient() && attempt < STORE_ATTEMPTS => {
                warn!(what, attempt, error = %e, "store operation failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            r => return r,
        }
    }
}

impl Engine {
    /// Takes a snapshot of `name` at this instant and uploads it in the
    /// background; returns the `pending` record at once.
    pub async fn create_snapshot(
        self: &Arc<Self>,
        name: &VolumeName,
        req: CreateSnapshot,
    ) -> Result<SnapshotRecord> {
        validate_labels(&req.labels)?;
        let vol = self.get(name)?;
        let id = SnapshotId::generate();
        {
            let mut jobs = self.snapshot_jobs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((other, _)) = jobs.iter().find(|(_, (v, _))| *v == vol.name) {
                return Err(Error::SnapshotInProgress(name.clone(), other.clone()));
            }
            jobs.insert(
                id.to_string(),
                (vol.name.clone(), Arc::new(Progress::default())),
            );
        }
        let plan = vol.begin_snapshot().await;
        let rec = SnapshotRecord {
            id: id.to_string(),
            volume: name.to_string(),
            state: SnapshotState::Pending,
            size: plan.freeze.size,
            chunk_size: vol.chunk_size,
            parent: vol.record().last_snapshot,
            created_at: unix_now(),
            labels: req.labels,
            changed_chunks: 0,
            logical_bytes: 0,
            uploaded_bytes: 0,
            chunks_total: plan.to_read.len() as u64,
            chunks_done: 0,
            error: None,
            completed_at: None,
            seq: self.catalog.next_id()?,
        };
        if let Err(e) = self.catalog.put_snapshot(&rec) {
            vol.end_snapshot();
            vol.map().restore_changed(&plan.changed);
            self.snapshot_jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(rec.id.as_str());
            return Err(e.into());
        }
        info!(volume = %name, snapshot = %rec.id, parent = ?rec.parent, to_read = plan.to_read.len(),
              all = matches!(plan.changed, Changed::All), "snapshot started");
        let engine = Arc::clone(self);
        let job_rec = rec.clone();
        self.snapshot_tasks
            .spawn(async move { engine.run_snapshot(vol, job_rec, plan).await });
        Ok(rec)
    }

    async fn run_snapshot(
        self: Arc<Self>,
        vol: Arc<Volume>,
        mut rec: SnapshotRecord,
        plan: super::volume::SnapshotPlan,
    ) {
        let progress = self.progress(&rec.id);
        if let Some(p) = &progress {
            p.total.store(plan.to_read.len() as u64, Ordering::Relaxed);
        }
        let result = self
            .build_snapshot(&vol, &rec, &plan, progress.as_deref())
            .await;
        vol.end_snapshot();
        match result {
            Ok(m) => {
                rec.state = SnapshotState::Completed;
                rec.changed_chunks = m.header.changed_chunks;
                rec.logical_bytes = m.header.logical_bytes;
                rec.uploaded_bytes = m.header.uploaded_bytes;
                rec.chunks_done = rec.chunks_total;
                rec.completed_at = Some(unix_now());
                let mut vrec = vol.record();
                vrec.last_snapshot = Some(rec.id.clone());
                let saved = self
                    .catalog
                    .put_snapshot(&rec)
                    .and_then(|_| self.catalog.put_volume(&vrec));
                if let Err(e) = saved {
                    // The manifest is in the store, so the snapshot exists;
                    // the next start settles the record from it.
                    warn!(snapshot = %rec.id, error = %e, "snapshot completed but its record could not be saved");
                } else {
                    vol.set_record(vrec);
                    vol.set_parent_manifest(Arc::new(m));
                }
                info!(volume = %rec.volume, snapshot = %rec.id, changed = rec.changed_chunks,
                      uploaded = rec.uploaded_bytes, "snapshot completed");
            }
            Err(e) => {
                vol.map().restore_changed(&plan.changed);
                rec.state = SnapshotState::Error;
                rec.error = Some(e.clone());
                if let Some(p) = &progress {
                    rec.chunks_done = p.done.load(Ordering::Relaxed);
                }
                let _ = self.catalog.put_snapshot(&rec);
                warn!(volume = %rec.volume, snapshot = %rec.id, error = %e, "snapshot failed; its changes go to the next one");
            }
        }
        self.snapshot_jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(rec.id.as_str());
    }

    fn progress(&self, id: &str) -> Option<Arc<Progress>> {
        self.snapshot_jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|(_, p)| Arc::clone(p))
    }

    /// Steps 2 to 4. The error is the message recorded with the snapshot.
    async fn build_snapshot(
        &self,
        vol: &Arc<Volume>,
        rec: &SnapshotRecord,
        plan: &super::volume::SnapshotPlan,
        progress: Option<&Progress>,
    ) -> std::result::Result<Manifest, String> {
        let cancel = self.snapshot_cancel.clone();
        // The parent supplies every unchanged chunk; without a readable one
        // only a full snapshot is correct, and this one froze only changes.
        let parent = match (&plan.changed, &rec.parent) {
            (Changed::Chunks(_), Some(pid)) => Some(self.parent_manifest(vol, pid).await.map_err(|e| {
                vol.map().mark_all_dirty();
                format!("parent snapshot {pid} unreadable ({e}); the next snapshot will be a full one")
            })?),
            _ => None,
        };

        // Step 2, UPLOAD_CONCURRENCY chunks at a time.
        let mut hashed: Vec<(u64, snapshot::ChunkHash)> = Vec::with_capacity(plan.to_read.len());
        let mut uploaded = 0u64;
        let mut set = JoinSet::new();
        let mut next = plan.to_read.iter();
        loop {
            while set.len() < UPLOAD_CONCURRENCY {
                let Some(&c) = next.next() else { break };
                let (vol, freeze, repo) =
                    (Arc::clone(vol), Arc::clone(&plan.freeze), self.repo.clone());
                set.spawn(async move {
                    let data = vol
                        .take_frozen_chunk(&freeze, c)
                        .await
                        .map_err(|e| format!("read chunk {c}: {e}"))?;
                    if data.iter().all(|b| *b == 0) {
                        return Ok::<_, String>((c, None, 0));
                    }
                    let put = with_retry("put chunk", || repo.put_chunk(data.clone()))
                        .await
                        .map_err(|e| format!("upload chunk {c}: {e}"))?;
                    Ok((c, Some(put.hash), put.uploaded))
                });
            }
            let joined = tokio::select! {
                _ = cancel.cancelled() => return Err("volumed is shutting down".into()),
                j = set.join_next() => j,
            };
            let Some(joined) = joined else { break };
            let (c, hash, up) = joined.map_err(|e| format!("snapshot task failed: {e}"))??;
            if let Some(h) = hash {
                hashed.push((c, h));
            }
            uploaded += up;
            if let Some(p) = progress {
                p.done.fetch_add(1, Ordering::Relaxed);
            }
        }
        hashed.sort_unstable_by_key(|(c, _)| *c);

        // Step 3: unchanged chunks from the parent, changed ones from above.
        let chunk_count = plan.freeze.size.div_ceil(vol.chunk_size);
        let changed_chunks = match &plan.changed {
            Changed::All => plan.to_read.len() as u64,
            Changed::Chunks(c) => c.len() as u64,
        };
        let mut entries: Vec<(u64, snapshot::ChunkHash)> = hashed;
        if let (Some(parent), Changed::Chunks(changed)) = (&parent, &plan.changed) {
            entries.extend(
                parent
                    .hashed()
                    .iter()
                    .filter(|(i, _)| *i < chunk_count && changed.binary_search(i).is_err())
                    .copied(),
            );
            entries.sort_unstable_by_key(|(c, _)| *c);
        }
        let logical_bytes: u64 = entries
            .iter()
            .map(|(c, _)| vol.chunk_size.min(plan.freeze.size - c * vol.chunk_size))
            .sum();
        let mut manifest = Manifest::new(ManifestHeader {
            id: rec.id.clone(),
            volume: rec.volume.clone(),
            size: plan.freeze.size,
            chunk_size: vol.chunk_size,
            parent: rec.parent.clone(),
            created_at: rfc3339(rec.created_at),
            labels: rec.labels.clone(),
            changed_chunks,
            logical_bytes,
            uploaded_bytes: uploaded,
        });
        for (c, h) in entries {
            manifest.push(c, Some(h));
        }

        // Step 4: the commit point.
        with_retry("put manifest", || self.repo.put_manifest(&manifest))
            .await
            .map_err(|e| format!("write manifest: {e}"))?;
        Ok(manifest)
    }

    /// The parent's manifest: the copy kept from the last snapshot, else
    /// from the store.
    async fn parent_manifest(
        &self,
        vol: &Volume,
        id: &str,
    ) -> std::result::Result<Arc<Manifest>, RepoError> {
        if let Some(m) = vol.parent_manifest().filter(|m| m.header.id == id) {
            return Ok(m);
        }
        let sid = SnapshotId::parse(id).ok_or_else(|| RepoError::MissingManifest(id.to_owned()))?;
        let m = Arc::new(with_retry("get manifest", || self.repo.get_manifest(&sid)).await?);
        vol.set_parent_manifest(Arc::clone(&m));
        Ok(m)
    }

    /// Settles snapshots a previous run left `pending`: completed if their
    /// manifest reached the store, else `error`.
    pub async fn settle_interrupted_snapshots(&self) {
        let Ok(records) = self.catalog.snapshots() else {
            return;
        };
        for mut rec in records
            .into_iter()
            .filter(|r| r.state == SnapshotState::Pending)
        {
            let exists = match SnapshotId::parse(&rec.id) {
                Some(id) => self.repo.get_manifest(&id).await.ok(),
                None => None,
            };
            match exists {
                Some(m) => {
                    rec.state = SnapshotState::Completed;
                    rec.changed_chunks = m.header.changed_chunks;
                    rec.logical_bytes = m.header.logical_bytes;
                    rec.uploaded_bytes = m.header.uploaded_bytes;
                    rec.chunks_done = rec.chunks_total;
                    rec.completed_at = Some(unix_now());
                }
                None => {
                    rec.state = SnapshotState::Error;
                    rec.error = Some("interrupted by a daemon restart".into());
                }
            }
            info!(snapshot = %rec.id, state = ?rec.state, "settled a snapshot interrupted by a restart");
            let _ = self.catalog.put_snapshot(&rec);
        }
    }

    /// A snapshot this host took, with live progress while pending.
    pub fn snapshot(&self, id: &str) -> Result<volumed_api::Snapshot> {
        let rec = self
            .catalog
            .snapshots()?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| Error::SnapshotNotFound(id.to_owned()))?;
        Ok(self.describe_snapshot(rec))
    }

    pub fn snapshots(&self, volume: Option<&str>) -> Result<Vec<volumed_api::Snapshot>> {
        let mut recs: Vec<SnapshotRecord> = self
            .catalog
            .snapshots()?
            .into_iter()
            .filter(|r| volume.is_none_or(|v| r.volume == v))
            .collect();
        recs.sort_by_key(|r| (r.created_at, r.seq));
        Ok(recs
            .into_iter()
            .map(|r| self.describe_snapshot(r))
            .collect())
    }

    fn describe_snapshot(&self, rec: SnapshotRecord) -> volumed_api::Snapshot {
        let (done, total) = match (rec.state, self.progress(&rec.id)) {
            (SnapshotState::Pending, Some(p)) => (
                p.done.load(Ordering::Relaxed),
                p.total.load(Ordering::Relaxed),
            ),
            _ => (rec.chunks_done, rec.chunks_total),
        };
        let progress = match rec.state {
            SnapshotState::Completed => 1.0,
            _ if total == 0 => 0.0,
            _ => done as f64 / total as f64,
        };
        volumed_api::Snapshot {
            id: rec.id,
            volume: rec.volume,
            state: match rec.state {
                SnapshotState::Pending => volumed_api::SnapshotState::Pending,
                SnapshotState::Completed => volumed_api::SnapshotState::Completed,
                SnapshotState::Error => volumed_api::SnapshotState::Error,
            },
            size: rec.size,
            chunk_size: rec.chunk_size,
            parent: rec.parent,
            created_at: rfc3339(rec.created_at),
            completed_at: rec.completed_at.map(rfc3339),
            labels: rec.labels,
            changed_chunks: rec.changed_chunks,
            logical_bytes: rec.logical_bytes,
            uploaded_bytes: rec.uploaded_bytes,
            progress,
            chunks_done: done,
            chunks_total: total,
            error: rec.error,
        }
    }
}
