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

/// A snapshot's `pending/` marker in the store, refreshed every quarter of
/// the gc grace period while the snapshot runs, so gc anywhere keeps what
/// it may name however long it takes.
pub(crate) struct Marker {
    id: SnapshotId,
    last_ok: Arc<std::sync::Mutex<std::time::Instant>>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Marker {
    fn fresh(&self, grace: Duration) -> bool {
        self.last_ok
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            < grace / 2
    }

    async fn finish(self, repo: &snapshot::Repo) {
        self.refresher.abort();
        if let Err(e) = repo.end_pending(&self.id).await {
            // A stale marker only delays gc until it expires.
            warn!(snapshot = %self.id, error = %e, "could not remove the snapshot's marker");
        }
    }
}

/// Retries a store operation on transient errors, with backoff.
pub(crate) async fn with_retry<T, F, Fut>(
    what: &str,
    mut op: F,
) -> std::result::Result<T, RepoError>
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
        let result = match self.announce(&rec.id).await {
            Ok(marker) => {
                let r = self
                    .build_snapshot(&vol, &rec, &plan, progress.as_deref(), &marker)
                    .await;
                marker.finish(&self.repo).await;
                r
            }
            Err(e) => Err(e),
        };
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
        marker: &Marker,
    ) -> std::result::Result<Manifest, String> {
        let cancel = self.snapshot_cancel.clone();
        // The parent supplies every unchanged chunk; without a readable one
        // only a full snapshot is correct, and this one froze only changes.
        // It must still be in the store now: gc honours a snapshot deleted
        // after this moment for its grace period, not one deleted before.
        let parent = match (&plan.changed, &rec.parent) {
            (Changed::Chunks(_), Some(pid)) => {
                Some(self.parent_manifest(vol, pid).await.map_err(|e| {
                    vol.map().mark_all_dirty();
                    format!(
                        "parent snapshot {pid} unusable ({e}); the next snapshot will be a full one"
                    )
                })?)
            }
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
        // Chunks still Base at the instant hold their snapshot's bytes.
        entries.extend(plan.base_chunks.iter().copied());
        entries.sort_unstable_by_key(|(c, _)| *c);
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
            id: rec.id.parse::<SnapshotId>().map_err(|e| e.to_string())?,
            volume: rec.volume.clone(),
            size: plan.freeze.size,
            chunk_size: vol.chunk_size,
            parent: (rec.parent.as_deref().map(str::parse::<SnapshotId>))
                .transpose()
                .map_err(|e| e.to_string())?,
            created_at: rfc3339(rec.created_at),
            labels: rec.labels.clone(),
            changed_chunks,
            logical_bytes,
            uploaded_bytes: uploaded,
        });
        for (c, h) in entries {
            manifest.push(c, Some(h));
        }

        crate::failpoint::delay("snapshot-before-manifest").await;
        // Without a fresh marker a gc elsewhere may have judged chunks this
        // snapshot names unreferenced (see snapshot::gc).
        let grace = self.repo.gc_grace();
        if !marker.fresh(grace) {
            return Err(format!(
                "could not keep the snapshot's marker in the store fresh for {:?}; its changes go to the next snapshot",
                grace / 2
            ));
        }

        crate::failpoint::hit("snapshot-before-manifest");
        // Step 4: the commit point.
        with_retry("put manifest", || self.repo.put_manifest(&manifest))
            .await
            .map_err(|e| format!("write manifest: {e}"))?;
        crate::failpoint::hit("snapshot-after-manifest");
        Ok(manifest)
    }

    async fn announce(&self, id: &str) -> std::result::Result<Marker, String> {
        let sid = SnapshotId::parse(id).ok_or_else(|| format!("invalid snapshot id {id}"))?;
        let start = with_retry("announce snapshot", || self.repo.begin_pending(&sid))
            .await
            .map_err(|e| format!("announce the snapshot in the store: {e}"))?;
        let last_ok = Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
        let every = self.repo.gc_grace() / 4;
        let (repo, marker_id, ok) = (self.repo.clone(), sid.clone(), Arc::clone(&last_ok));
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match repo.refresh_pending(&marker_id, start).await {
                    Ok(()) => {
                        *ok.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now()
                    }
                    Err(e) => {
                        warn!(snapshot = %marker_id, error = %e, "could not refresh the snapshot's marker")
                    }
                }
            }
        });
        Ok(Marker {
            id: sid,
            last_ok,
            refresher,
        })
    }

    /// The parent's manifest: the copy kept from the last snapshot, else
    /// from the store.
    async fn parent_manifest(
        &self,
        vol: &Volume,
        id: &str,
    ) -> std::result::Result<Arc<Manifest>, RepoError> {
        let sid = SnapshotId::parse(id).ok_or_else(|| RepoError::MissingManifest(id.to_owned()))?;
        if let Some(m) = vol.parent_manifest().filter(|m| m.header.id == id) {
            if !with_retry("check parent", || self.repo.manifest_exists(&sid)).await? {
                return Err(RepoError::MissingManifest(id.to_owned()));
            }
            return Ok(m);
        }
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
                Some(id) => {
                    let _ = self.repo.end_pending(&id).await;
                    self.repo.get_manifest(&id).await.ok()
                }
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

    /// A snapshot by id: this host's record (with live progress while
    /// pending), else the manifest of a snapshot another host took.
    pub async fn snapshot(&self, id: &str) -> Result<volumed_api::Snapshot> {
        if let Some(rec) = self.catalog.snapshots()?.into_iter().find(|r| r.id == id) {
            return Ok(self.describe_snapshot(rec));
        }
        let sid = SnapshotId::parse(id).ok_or_else(|| Error::SnapshotNotFound(id.to_owned()))?;
        match self.header(&sid).await {
            Ok(h) => Ok(describe_header(h)),
            Err(RepoError::MissingManifest(_)) => Err(Error::SnapshotNotFound(id.to_owned())),
            Err(e) => Err(Error::Store(e.to_string())),
        }
    }

    /// A manifest's header, read once per id.
    async fn header(&self, id: &SnapshotId) -> std::result::Result<ManifestHeader, RepoError> {
        if let Some(h) = self
            .headers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id.as_str())
        {
            return Ok(h.clone());
        }
        let m = with_retry("get manifest", || self.repo.get_manifest(id)).await?;
        self.headers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), m.header.clone());
        Ok(m.header)
    }

    /// Every snapshot: this host's records, and every other snapshot in the
    /// store (taken by any host sharing it). A completed snapshot of ours
    /// whose manifest is gone was deleted elsewhere; its record goes too.
    /// If the store cannot be listed, this host's records are the answer.
    pub async fn snapshots(&self, volume: Option<&str>) -> Result<Vec<volumed_api::Snapshot>> {
        let mut recs = self.catalog.snapshots()?;
        let mut out = Vec::new();
        match with_retry("list snapshots", || self.repo.list_snapshots()).await {
            Ok(ids) => {
                let in_store: std::collections::HashSet<&str> =
                    ids.iter().map(SnapshotId::as_str).collect();
                let gone: Vec<String> = recs
                    .iter()
                    .filter(|r| {
                        r.state == SnapshotState::Completed && !in_store.contains(r.id.as_str())
                    })
                    .map(|r| r.id.clone())
                    .collect();
                for id in &gone {
                    info!(snapshot = %id, "snapshot deleted from the store elsewhere; dropping its record");
                    let _ = self.catalog.remove_snapshot(id);
                }
                recs.retain(|r| !gone.contains(&r.id));
                for id in &ids {
                    if recs.iter().any(|r| r.id == id.as_str()) {
                        continue;
                    }
                    match self.header(id).await {
                        Ok(h) => out.push((h.created_at.clone(), 0, describe_header(h))),
                        Err(e) => {
                            warn!(snapshot = %id, error = %e, "unreadable manifest left out of the list")
                        }
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot list the store; showing this host's snapshots only")
            }
        }
        for r in recs {
            let seq = r.seq;
            let d = self.describe_snapshot(r);
            out.push((d.created_at.clone(), seq, d));
        }
        out.retain(|(_, _, d)| volume.is_none_or(|v| d.volume == v));
        out.sort_by(|a, b| (&a.0, a.1, &a.2.id).cmp(&(&b.0, b.1, &b.2.id)));
        Ok(out.into_iter().map(|(_, _, d)| d).collect())
    }

    /// Deletes a snapshot from the store (through the trash, see
    /// snapshot::gc) and from this host's records. Its chunks stay until a
    /// gc finds them unreferenced. A volume whose next snapshot would have
    /// built on it takes a full one instead.
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let sid = SnapshotId::parse(id).ok_or_else(|| Error::SnapshotNotFound(id.to_owned()))?;
        if self
            .snapshot_jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
        {
            return Err(Error::SnapshotBusy(id.to_owned()));
        }
        let local = self.catalog.snapshots()?.into_iter().find(|r| r.id == id);
        match with_retry("delete snapshot", || self.repo.trash_manifest(&sid)).await {
            Ok(()) => {}
            Err(RepoError::MissingManifest(_)) if local.is_some() => {}
            Err(RepoError::MissingManifest(_)) => return Err(Error::SnapshotNotFound(id.into())),
            Err(e) => return Err(Error::Store(e.to_string())),
        }
        self.catalog.remove_snapshot(id)?;
        self.headers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let _guard = self.lifecycle.lock().await;
        for vol in self.list() {
            let mut rec = vol.record();
            if rec.last_snapshot.as_deref() == Some(id) {
                rec.last_snapshot = None;
                vol.map().mark_all_dirty();
                self.catalog.put_volume(&rec)?;
                vol.set_record(rec);
            }
        }
        info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    /// Reads every chunk of a snapshot and reports the missing or damaged.
    pub async fn verify_snapshot(&self, id: &str) -> Result<volumed_api::VerifyReport> {
        let sid = SnapshotId::parse(id).ok_or_else(|| Error::SnapshotNotFound(id.to_owned()))?;
        let r = match snapshot::verify::verify(&self.repo, &sid).await {
            Ok(r) => r,
            Err(RepoError::MissingManifest(_)) => return Err(Error::SnapshotNotFound(id.into())),
            Err(e) => return Err(Error::Store(e.to_string())),
        };
        let bad = |b: snapshot::verify::BadChunk| volumed_api::BadChunk {
            hash: b.hash.to_hex(),
            indices: b.indices,
            error: b.error,
        };
        if !r.is_ok() {
            warn!(snapshot = %id, missing = r.missing.len(), damaged = r.damaged.len(), "snapshot verification found problems");
        }
        Ok(volumed_api::VerifyReport {
            snapshot: r.snapshot.to_string(),
            ok: r.is_ok(),
            chunks: r.chunks,
            objects: r.objects,
            ok_objects: r.ok_objects,
            missing: r.missing.into_iter().map(bad).collect(),
            damaged: r.damaged.into_iter().map(bad).collect(),
        })
    }

    /// Collects garbage in the store; `grace` overrides the configured
    /// period for this run.
    pub async fn gc(&self, grace: Option<Duration>) -> Result<volumed_api::GcReport> {
        let grace = grace.unwrap_or(self.repo.gc_grace());
        let r = snapshot::gc::collect_observed(&self.repo, grace, &|deleted| {
            if deleted == 1 {
                crate::failpoint::hit("gc-mid-sweep");
            }
        })
        .await
        .map_err(|e| Error::Store(format!("gc stopped before deleting anything unsafe: {e}")))?;
        Ok(volumed_api::GcReport {
            grace_secs: grace.as_secs(),
            manifests: r.manifests,
            holds: r.holds,
            trash_honoured: r.trash_honoured,
            trash_expired: r.trash_expired,
            pending_snapshots: r.pending_snapshots,
            pending_expired: r.pending_expired,
            chunks_seen: r.chunks_seen,
            chunks_referenced: r.chunks_referenced,
            chunks_young: r.chunks_young,
            chunks_deleted: r.chunks_deleted,
            bytes_deleted: r.bytes_deleted,
        })
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

/// A snapshot known only from its manifest: another host took it, or this
/// host's record of it is gone. Only completed snapshots have manifests.
fn describe_header(h: ManifestHeader) -> volumed_api::Snapshot {
    volumed_api::Snapshot {
        id: h.id.into(),
        volume: h.volume,
        state: volumed_api::SnapshotState::Completed,
        size: h.size,
        chunk_size: h.chunk_size,
        parent: h.parent.map(String::from),
        created_at: h.created_at,
        completed_at: None,
        labels: h.labels,
        changed_chunks: h.changed_chunks,
        logical_bytes: h.logical_bytes,
        uploaded_bytes: h.uploaded_bytes,
        progress: 1.0,
        chunks_done: h.changed_chunks,
        chunks_total: h.changed_chunks,
        error: None,
    }
}
