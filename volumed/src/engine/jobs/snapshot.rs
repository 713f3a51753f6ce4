//! Snapshots of live volumes: the job that turns a frozen volume into
//! chunk objects and a manifest in the store.
//!
//! Steps, and what a failure at each leaves behind:
//! 1. Freeze (`Volume::begin_snapshot`): the instant. Record `pending`.
//! 2. Read each changed chunk holding data (from disk, or the copy a write
//!    preserved), hash it, and upload it unless the store has it. A failure
//!    here leaves chunk objects no manifest names: garbage for gc, harmless.
//! 3. Build the manifest: changed chunks from step 2, unchanged ones from
//!    the parent's manifest. Format 2 (see `snapshot::writer`): a page of
//!    the parent with no changed chunk is named again, unread; only pages
//!    with changes are written.
//! 4. Write the manifest: the commit point. Before it, the snapshot does not
//!    exist; after it, it does, even if we crash before step 5.
//! 5. Record `completed` and make it the volume's parent for the next one.
//!
//! On any failure the snapshot ends `error` and the freeze guard puts its
//! changed chunks back into the dirty set, so the next snapshot carries
//! them. A snapshot found `pending` at start is settled by looking for its
//! manifest.
//!
//! Store operations retry transient errors inside the store wrapper
//! (`snapshot::store::retry`); what reaches this job is final.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use snapshot::{
    ChunkHash, ManifestHeader, ManifestReader, ManifestRoot, PendingSnapshot, Repo, RepoError,
    SnapshotId, StoredManifest,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::block_upload::BlockUploads;
use super::copy::CopyJobs;
pub use super::snapshot_outcome::{SnapshotDone, SnapshotError, SnapshotOutcome};
use crate::catalog::{Catalog, SnapshotRecord, SnapshotSource, SnapshotState, unix_now};
use crate::engine::Volume;
use crate::engine::chunk_map::Changed;
use crate::engine::error::{Error, Result};
use crate::engine::freeze::FreezeGuard;

/// Chunks read, hashed and uploaded at once: enough to keep both cores
/// hashing and compressing while uploads wait on the network.
const UPLOAD_CONCURRENCY: usize = 16;

/// Live progress of a pending snapshot, in chunks.
#[derive(Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

struct Running {
    /// The volume's id: a volume deleted and created again under the same
    /// name is another volume, free to take its own snapshot.
    volume_id: u64,
    progress: Arc<Progress>,
    /// Set once the job writes its final record: a client that saw it may
    /// ask for the next snapshot before the slot is free, and waits for it
    /// rather than being refused.
    ending: Arc<std::sync::atomic::AtomicBool>,
    /// Woken when the slot is given back.
    ended: Arc<tokio::sync::Notify>,
}

/// A volume's snapshot slot, claimed under the snapshot's id before its
/// freeze: given back on drop unless the snapshot was launched (its job
/// then gives it back when it ends).
pub struct Slot {
    jobs: Arc<SnapshotJobs>,
    pub id: SnapshotId,
    progress: Arc<Progress>,
    launched: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.launched {
            self.jobs.running().remove(&self.id);
        }
    }
}

/// The snapshots this host is taking: of volumes (one per volume at a
/// time), and uploaded block by block by clients.
pub struct SnapshotJobs {
    catalog: Arc<Catalog>,
    repo: Repo,
    pub uploads: Arc<BlockUploads>,
    pub copies: Arc<CopyJobs>,
    running: Mutex<HashMap<SnapshotId, Running>>,
    tasks: TaskTracker,
    /// Fired at shutdown: jobs stop and end `error`.
    cancel: CancellationToken,
}

impl SnapshotJobs {
    pub fn new(catalog: Arc<Catalog>, repo: Repo) -> Self {
        SnapshotJobs {
            uploads: Arc::new(BlockUploads::new(Arc::clone(&catalog), repo.clone())),
            copies: Arc::new(CopyJobs::new(Arc::clone(&catalog), repo.clone())),
            catalog,
            repo,
            running: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<SnapshotId, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a snapshot of `vol` at this instant and uploads it in the
    /// background; returns the `pending` record at once, and the handle
    /// that says how it ended.
    pub async fn start(
        self: &Arc<Self>,
        vol: Arc<Volume>,
        labels: BTreeMap<String, String>,
    ) -> Result<(SnapshotRecord, SnapshotDone)> {
        let slot = self.reserve(&vol).await?;
        let guard = vol.begin_snapshot().await;
        self.launch(slot, vol, guard, labels, unix_now()).await
    }

    /// Claims `vol`'s one snapshot slot under a fresh id, before its
    /// freeze; the slot is given back when the [`Slot`] drops unlaunched.
    /// A snapshot of the volume that is only writing its final record is
    /// waited for; one still uploading refuses.
    pub async fn reserve(self: &Arc<Self>, vol: &Volume) -> Result<Slot> {
        if let Some(reason) = vol.failure() {
            return Err(Error::VolumeFailed(vol.name.clone(), reason.to_owned()));
        }
        let id = SnapshotId::generate();
        let progress = Arc::new(Progress::default());
        loop {
            let ended = {
                let mut running = self.running();
                match running.iter().find(|(_, r)| r.volume_id == vol.id) {
                    Some((_, r)) if r.ending.load(Ordering::Acquire) => Arc::clone(&r.ended),
                    Some((other, _)) => {
                        return Err(Error::SnapshotInProgress(vol.name.clone(), other.clone()));
                    }
                    None => {
                        running.insert(
                            id.clone(),
                            Running {
                                volume_id: vol.id,
                                progress: Arc::clone(&progress),
                                ending: Default::default(),
                                ended: Default::default(),
                            },
                        );
                        break;
                    }
                }
            };
            let wait = ended.notified();
            tokio::pin!(wait);
            // Registered before the check below, so the wake-up that gives
            // the slot back cannot be missed.
            wait.as_mut().enable();
            let still = self
                .running()
                .values()
                .any(|r| r.volume_id == vol.id && Arc::ptr_eq(&r.ended, &ended));
            if still {
                wait.await;
            }
        }
        Ok(Slot {
            jobs: Arc::clone(self),
            id,
            progress,
            launched: false,
        })
    }

    /// Records the snapshot `guard` froze `pending` (taken at `created_at`)
    /// and starts its upload. The handle says how it ended, once its
    /// record says so.
    pub async fn launch(
        self: &Arc<Self>,
        mut slot: Slot,
        vol: Arc<Volume>,
        guard: FreezeGuard,
        labels: BTreeMap<String, String>,
        created_at: u64,
    ) -> Result<(SnapshotRecord, SnapshotDone)> {
        let id = slot.id.clone();
        let progress = Arc::clone(&slot.progress);
        let plan = guard.plan();
        let to_read = plan.to_read.len() as u64;
        progress.total.store(to_read, Ordering::Relaxed);
        let rec = SnapshotRecord {
            id: id.clone(),
            volume: vol.name.to_string(),
            state: SnapshotState::Pending,
            size: guard.geometry().size(),
            chunk_size: vol.chunk_size,
            parent: vol.record().last_snapshot,
            created_at,
            labels,
            changed_chunks: 0,
            logical_bytes: 0,
            uploaded_bytes: 0,
            chunks_total: to_read,
            chunks_done: 0,
            error: None,
            completed_at: None,
            seq: 0,
            source: SnapshotSource::Volume,
            encryption: vol.record().encryption,
        };
        // On an error the guard drops (its changes go back) and so does
        // the slot (the volume may snapshot again).
        let rec = self.catalog.record_new_snapshot(rec).await?;
        slot.launched = true;
        info!(volume = %vol.name, snapshot = %rec.id, parent = ?rec.parent, to_read,
              all = matches!(guard.plan().changed, Changed::All), "snapshot started");
        let (done, ended) = tokio::sync::watch::channel(None);
        let job = SnapshotJob {
            jobs: Arc::clone(self),
            vol,
            rec: rec.clone(),
            guard,
            progress,
            done,
            started: std::time::Instant::now(),
        };
        self.tasks.spawn(job.run());
        Ok((rec, SnapshotDone(ended)))
    }

    /// `(done, total)` chunks of a snapshot still running.
    pub fn progress(&self, id: &SnapshotId) -> Option<(u64, u64)> {
        let own = self.running().get(id).map(|r| {
            (
                r.progress.done.load(Ordering::Relaxed),
                r.progress.total.load(Ordering::Relaxed),
            )
        });
        own.or_else(|| self.copies.progress(id))
    }

    /// (done, total) chunks of the snapshot of `vol` in progress, if any.
    pub fn progress_of(&self, vol: &Volume) -> Option<(u64, u64)> {
        self.running()
            .values()
            .find(|r| r.volume_id == vol.id)
            .map(|r| {
                (
                    r.progress.done.load(Ordering::Relaxed),
                    r.progress.total.load(Ordering::Relaxed),
                )
            })
    }

    /// Whether snapshot `id` is being written here, from a volume or
    /// from uploaded blocks.
    pub fn is_running(&self, id: &SnapshotId) -> bool {
        self.running().contains_key(id) || self.uploads.contains(id) || self.copies.contains(id)
    }

    /// Whether the jobs are being stopped for a shutdown.
    pub fn stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Stops every job; each ends `error` and puts its changes back into
    /// the dirty set before this returns.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.uploads.shutdown().await;
        self.copies.shutdown().await;
    }

    /// Settles snapshots a previous run left `pending`: completed if their
    /// manifest reached the store, else `error`.
    pub async fn settle_interrupted(&self) {
        let Ok(records) = self.catalog.snapshots() else {
            return;
        };
        for mut rec in records
            .into_iter()
            .filter(|r| r.state == SnapshotState::Pending)
        {
            let _ = self.repo.end_pending(&rec.id).await;
            match self.repo.get_stored(&rec.id).await {
                Ok(m) => complete_record(&mut rec, m.header()),
                Err(_) => {
                    rec.state = SnapshotState::Error;
                    rec.error = Some(match rec.source {
                        SnapshotSource::Volume => "interrupted by a daemon restart".into(),
                        SnapshotSource::Blocks => "interrupted by a daemon restart: blocks sent \
                            before it are not kept; start the snapshot again"
                            .into(),
                        SnapshotSource::Copy => {
                            "interrupted by a daemon restart; copy again".into()
                        }
                    });
                }
            }
            info!(snapshot = %rec.id, state = ?rec.state, "settled a snapshot interrupted by a restart");
            let _ = self.catalog.put_snapshot(&rec).await;
        }
    }
}

/// A record's figures from the manifest that completed it.
pub(super) fn complete_record(rec: &mut SnapshotRecord, h: &ManifestHeader) {
    rec.state = SnapshotState::Completed;
    rec.changed_chunks = h.changed_chunks;
    rec.logical_bytes = h.logical_bytes;
    rec.uploaded_bytes = h.uploaded_bytes;
    rec.chunks_done = rec.chunks_total;
    rec.completed_at = Some(unix_now());
}

/// One snapshot in progress: owns the freeze for as long as it runs.
struct SnapshotJob {
    jobs: Arc<SnapshotJobs>,
    vol: Arc<Volume>,
    rec: SnapshotRecord,
    guard: FreezeGuard,
    progress: Arc<Progress>,
    /// Fired with how it ended.
    done: tokio::sync::watch::Sender<Option<SnapshotOutcome>>,
    /// For the log line that ends it: the job's own duration, finer than
    /// the records' whole seconds or a client's poll.
    started: std::time::Instant,
}

impl SnapshotJob {
    async fn run(self) {
        let jobs = Arc::clone(&self.jobs);
        let result = match jobs.repo.begin_snapshot(&self.rec.id).await {
            Ok(pending) => {
                let r = self.build(&pending).await;
                pending.end().await;
                r
            }
            Err(e) => Err(SnapshotError::Announce(e)),
        };
        let SnapshotJob {
            vol,
            mut rec,
            guard,
            progress,
            done,
            started,
            ..
        } = self;
        if let Some(r) = jobs.running().get(&rec.id) {
            r.ending.store(true, Ordering::Release);
        }
        let outcome = match result {
            Ok(m) => {
                guard.commit();
                complete_record(&mut rec, &m.header);
                if let Err(e) = jobs.catalog.put_snapshot(&rec).await {
                    // The manifest is in the store, so the snapshot exists;
                    // the next start settles the record from it.
                    warn!(snapshot = %rec.id, error = %volumed_api::error_chain(&e), "snapshot completed but its record could not be saved");
                }
                // The next snapshot's parent, through the record's owner:
                // refused if the volume was deleted (or reopened) while
                // this job ran, whose record is no longer this job's.
                let parent = vol
                    .update_record(&jobs.catalog, |r| {
                        r.last_snapshot = Some(rec.id.clone());
                        Ok(())
                    })
                    .await;
                match parent {
                    Ok(()) => vol.set_parent_manifest(Arc::new(ManifestReader::new(
                        jobs.repo.clone(),
                        StoredManifest::V2(m),
                    ))),
                    Err(Error::VolumeNotFound(_)) => {
                        info!(volume = %rec.volume, snapshot = %rec.id,
                              "the volume was deleted while its snapshot ran; the snapshot stands");
                    }
                    Err(e) => {
                        // The next snapshot is then a full one, never a
                        // wrong incremental.
                        vol.map().mark_all_dirty();
                        warn!(snapshot = %rec.id, error = %volumed_api::error_chain(&e), "snapshot completed but its volume's record could not name it");
                    }
                }
                info!(volume = %rec.volume, snapshot = %rec.id, changed = rec.changed_chunks,
                      uploaded = rec.uploaded_bytes, elapsed_ms = started.elapsed().as_millis() as u64,
                      "snapshot completed");
                SnapshotOutcome::Completed
            }
            Err(e) => {
                if matches!(e, SnapshotError::Parent { .. }) {
                    vol.map().mark_all_dirty();
                }
                // Puts the changes back for the next snapshot.
                drop(guard);
                let text = e.record_text();
                rec.state = SnapshotState::Error;
                rec.error = Some(text.clone());
                rec.chunks_done = progress.done.load(Ordering::Relaxed);
                let _ = jobs.catalog.put_snapshot(&rec).await;
                warn!(volume = %rec.volume, snapshot = %rec.id, error = %text, "snapshot failed; its changes go to the next one");
                SnapshotOutcome::Failed(text)
            }
        };
        let ended = jobs.running().remove(&rec.id).map(|r| r.ended);
        if let Some(n) = ended {
            n.notify_waiters();
        }
        // After it stops running: whoever waits may read or export it now.
        done.send_replace(Some(outcome));
    }

    /// Steps 2 to 4.
    async fn build(
        &self,
        pending: &PendingSnapshot,
    ) -> std::result::Result<ManifestRoot, SnapshotError> {
        let plan = self.guard.plan();
        let geometry = self.guard.geometry();
        // Chunks and pages are sealed in the volume's domain, if any.
        let repo = &self
            .jobs
            .repo
            .sealed_as(self.rec.encryption.as_ref())
            .map_err(SnapshotError::Manifest)?;
        // The parent supplies every unchanged chunk; without a readable one
        // only a full snapshot is correct, and this one froze only changes.
        // It must still be in the store now: gc honours a snapshot deleted
        // after this moment for its grace period, not one deleted before.
        let parent = match (&plan.changed, &self.rec.parent) {
            (Changed::Chunks(_), Some(pid)) => Some(
                parent_manifest(repo, &self.vol, pid)
                    .await
                    .map_err(|source| SnapshotError::Parent {
                        id: pid.clone(),
                        source,
                    })?,
            ),
            _ => None,
        };

        let (hashed, uploaded) = self.upload_changed(repo).await?;
        let based = self.base_hashes(&plan.base_chunks).await?;

        let rec = &self.rec;
        let header = ManifestHeader {
            id: rec.id.clone(),
            volume: rec.volume.clone(),
            size: geometry.size(),
            chunk_size: geometry.chunk_size(),
            parent: rec.parent.clone(),
            created_at: crate::catalog::rfc3339(rec.created_at),
            labels: rec.labels.clone(),
            changed_chunks: plan.changed_chunks(),
            logical_bytes: 0,
            uploaded_bytes: uploaded,
            encryption: self.rec.encryption.clone(),
        };
        // Step 3: changed chunks from above and chunks still Base at the
        // instant with their snapshot's hashes; the parent's pages for the
        // rest.
        let manifest = match (&parent, &plan.changed) {
            (Some(parent), Changed::Chunks(changed)) => {
                let changes: Vec<(u64, Option<ChunkHash>)> = changed
                    .iter()
                    .filter(|c| geometry.contains(**c))
                    .map(|&c| (c, find(&hashed, c).or_else(|| find(&based, c))))
                    .collect();
                snapshot::writer::write_incremental(repo, header, parent, &changes)
                    .await
                    .map_err(|e| match e {
                        // The parent's pages are read only now: one that is
                        // gone or damaged makes the parent unusable, so the
                        // next snapshot is a full one rather than fail again.
                        RepoError::MissingPage(_) | RepoError::CorruptPage { .. } => {
                            SnapshotError::Parent {
                                id: parent.header().id.clone(),
                                source: e,
                            }
                        }
                        e => SnapshotError::Manifest(e),
                    })?
                    .root
            }
            _ => {
                let mut entries = hashed;
                entries.extend(based);
                entries.sort_unstable_by_key(|(c, _)| *c);
                let mut header = header;
                header.logical_bytes = entries.iter().map(|(c, _)| geometry.len(*c)).sum();
                let (mut root, pages) = snapshot::writer::write_entries(repo, header, &entries)
                    .await
                    .map_err(SnapshotError::Manifest)?;
                root.header.uploaded_bytes += pages;
                root
            }
        };

        crate::failpoint::delay("snapshot-before-manifest").await;
        // A write or sync that failed since the instant may have lost
        // bytes a copy-before-write or a read here depended on.
        if let Some(reason) = self.vol.failure() {
            return Err(SnapshotError::VolumeFailed(reason.to_owned()));
        }

        crate::failpoint::hit("snapshot-before-manifest");
        // Step 4: the commit point, refused once the marker may be stale.
        pending.commit(&manifest).await?;
        crate::failpoint::hit("snapshot-after-manifest");
        Ok(manifest)
    }

    /// The base snapshot's hashes of chunks still `Base` at the instant
    /// (zero ones left out), ascending; reads the base's pages in order.
    async fn base_hashes(
        &self,
        chunks: &[u64],
    ) -> std::result::Result<Vec<(u64, ChunkHash)>, SnapshotError> {
        let Some(base) = self.vol.base() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for &c in chunks {
            match base.hash(c).await {
                Ok(Some(h)) => out.push((c, h)),
                Ok(None) => {}
                Err(source) => return Err(SnapshotError::Base { chunk: c, source }),
            }
        }
        Ok(out)
    }

    /// Step 2, [`UPLOAD_CONCURRENCY`] chunks at a time: the hashes of the
    /// changed chunks that are not all zeros, ascending, and the bytes
    /// added to the store.
    async fn upload_changed(
        &self,
        repo: &Repo,
    ) -> std::result::Result<(Vec<(u64, ChunkHash)>, u64), SnapshotError> {
        let to_read = &self.guard.plan().to_read;
        let mut hashed = Vec::with_capacity(to_read.len());
        let mut uploaded = 0u64;
        let mut set = JoinSet::new();
        let mut next = to_read.iter();
        loop {
            while set.len() < UPLOAD_CONCURRENCY {
                let Some(&c) = next.next() else { break };
                let (reader, repo) = (self.guard.reader(), repo.clone());
                set.spawn(async move {
                    crate::failpoint::delay("snapshot-chunk-upload").await;
                    let data = reader
                        .take(c)
                        .await
                        .map_err(|source| SnapshotError::Read { chunk: c, source })?;
                    if data.iter().all(|b| *b == 0) {
                        return Ok((c, None, 0));
                    }
                    let put = repo
                        .put_chunk(data)
                        .await
                        .map_err(|source| SnapshotError::Upload { chunk: c, source })?;
                    Ok::<_, SnapshotError>((c, Some(put.hash), put.uploaded))
                });
            }
            let joined = tokio::select! {
                _ = self.jobs.cancel.cancelled() => return Err(SnapshotError::ShuttingDown),
                j = set.join_next() => j,
            };
            let Some(joined) = joined else { break };
            let (c, hash, up) = joined??;
            if let Some(h) = hash {
                hashed.push((c, h));
            }
            uploaded += up;
            self.progress.done.fetch_add(1, Ordering::Relaxed);
        }
        hashed.sort_unstable_by_key(|(c, _)| *c);
        Ok((hashed, uploaded))
    }
}

/// The hash `entries` (ascending) give chunk `c`.
fn find(entries: &[(u64, ChunkHash)], c: u64) -> Option<ChunkHash> {
    entries
        .binary_search_by_key(&c, |(i, _)| *i)
        .ok()
        .map(|p| entries[p].1)
}

/// The parent's manifest: the reader kept from the last snapshot, else
/// opened from the store.
async fn parent_manifest(
    repo: &Repo,
    vol: &Volume,
    id: &SnapshotId,
) -> std::result::Result<Arc<ManifestReader>, RepoError> {
    if let Some(m) = vol.parent_manifest().filter(|m| m.header().id == *id) {
        if !repo.manifest_exists(id).await? {
            return Err(RepoError::MissingManifest(id.to_string()));
        }
        return Ok(m);
    }
    let m = Arc::new(repo.open_manifest(id).await?);
    vol.set_parent_manifest(Arc::clone(&m));
    Ok(m)
}
