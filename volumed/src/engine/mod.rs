//! The volume engine: the one owner of volume state on this host. It holds
//! every volume (its record, its files, its data path), the snapshots taken
//! from them, and the jobs that work on them, and answers every other
//! layer through the public functions of [`Engine`], all in this file.
//!
//! - `lifecycle`: the rules of create, attach, detach, modify, tag and
//!   delete, and what an import may do to the volumes it fills;
//! - `snapshots`: snapshots taken, uploaded, listed, deleted, compared,
//!   collected, exported;
//! - `registry`: the open volumes by name, and the lifecycle lock;
//! - `recovery`: what opening does after a crash; `dirs`: where volumes'
//!   files live and the trash they leave through;
//! - `restore`: setting up a volume created from a snapshot;
//! - `volume`: one volume and its data path; `record`: its catalog record
//!   and the record's one writer; `freeze`: a snapshot's hold on it;
//!   `chunk_map`: chunk states and the dirty set; `base`: a restored
//!   volume's snapshot and detach log;
//! - `jobs`: snapshot uploads, block uploads, hydration;
//! - `snapshot_catalog`, `snapshot_export`: the snapshots this host can
//!   see, and the read-only exports of them;
//! - `validate`, `volume_id`: the rules for request values, ids and tags;
//! - `error`: the engine's error.
//!
//! Architecture invariant: `impl Engine` is here only, and every function
//! in it hands the work to the part that owns it; no layer above reaches a
//! part but through these functions. The engine imports nothing above it:
//! no front-end, no presentation, no image code.

pub(crate) mod base;
pub mod chunk_map;
mod dirs;
pub(crate) mod encryption;
pub(crate) mod error;
mod export;
pub(crate) mod freeze;
pub(crate) mod image_bin;
pub(crate) mod jobs;
mod lifecycle;
mod record;
pub(crate) mod recovery;
pub(crate) mod registry;
pub(crate) mod restore;
pub(crate) mod snapshot_catalog;
pub(crate) mod snapshot_export;
pub(crate) mod snapshot_set;
mod snapshots;
pub(crate) mod validate;
mod volume;
pub(crate) mod volume_id;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use snapshot::cache::Fetcher;
use snapshot::{Manifest, ManifestHeader, ManifestReader, SnapshotId};
use volumed_api::{AttachVolume, CreateSnapshot, CreateVolume, ModifyVolume, VolumeName};

pub use error::{Error, Result};
pub use export::{Backend, Export};
pub use jobs::block_upload::{Block, UploadSpec};
pub use jobs::hydrate::{HydrationProgress, HydrationState};
pub use jobs::snapshot::{SnapshotDone, SnapshotOutcome};
pub use snapshot_catalog::SnapshotInfo;
pub use snapshot_export::{SnapshotExportLease, SnapshotImage};
pub use volume::{Extent, ReadPiece, Volume};
pub use volume_id::VolumeOptions;

use crate::catalog::{Catalog, JobId, SnapshotRecord, SnapshotSetRecord};
use crate::disk::IoEngine;
use encryption::Sealing;
use jobs::hydrate::Hydrator;
use jobs::snapshot::SnapshotJobs;
use lifecycle::Lifecycle;
use registry::Registry;
use snapshot_catalog::SnapshotCatalog;
use snapshot_export::SnapshotExports;
use snapshot_set::SnapshotSets;
use snapshots::Snapshots;

/// Fetches from the store and the chunk cache's state, for `vol status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    pub fetches: u64,
    pub fetched_bytes: u64,
    pub cache_bytes: u64,
    pub cache_hits: u64,
}

pub struct Engine {
    volumes: Lifecycle,
    snapshots: Snapshots,
}

impl Engine {
    /// Opens the volumes `catalog` records under `data_dir` (see
    /// `recovery`); attached ones are exported again. Returns whether the
    /// previous run shut down cleanly.
    pub async fn open(
        data_dir: &Path,
        catalog: Arc<Catalog>,
        io: Arc<IoEngine>,
        repo: snapshot::Repo,
        fetcher: Arc<Fetcher>,
    ) -> Result<(Self, bool)> {
        let (clean, host_id, dirs, vols) =
            recovery::open(&catalog, data_dir, &io, &fetcher).await?;
        let registry = Arc::new(Registry::default());
        for vol in vols {
            registry.insert(vol);
        }
        let jobs = Arc::new(SnapshotJobs::new(Arc::clone(&catalog), repo.clone()));
        let known = Arc::new(SnapshotCatalog::new(Arc::clone(&catalog), repo.clone()));
        let sets = Arc::new(
            SnapshotSets::open(
                Arc::clone(&catalog),
                Arc::clone(&jobs),
                Arc::clone(&known),
                Arc::clone(&registry),
            )
            .await?,
        );
        let exports = Arc::new(SnapshotExports::new(
            Arc::clone(&catalog),
            repo.clone(),
            Arc::clone(&fetcher),
            host_id.clone(),
        ));
        let hydrator = Arc::new(Hydrator::new(
            Arc::clone(&catalog),
            repo.clone(),
            Arc::clone(&registry),
            host_id.clone(),
        ));
        let sealing = Arc::new(Sealing::new(repo.clone()));
        let engine = Engine {
            snapshots: Snapshots {
                catalog: Arc::clone(&catalog),
                registry: Arc::clone(&registry),
                jobs,
                known,
                sets,
                exports,
                sealing: Arc::clone(&sealing),
            },
            volumes: Lifecycle {
                catalog,
                dirs,
                registry,
                io,
                repo,
                fetcher,
                host_id,
                hydrator,
                sealing,
            },
        };
        Ok((engine, clean))
    }

    /// Starts the background work a previous run left: hydration of
    /// restored volumes, release of stale holds, and settling snapshots it
    /// left pending (in the background, so an unreachable store does not
    /// delay start-up).
    pub fn start_background(&self) {
        self.volumes.hydrator.start_all();
        let jobs = Arc::clone(&self.snapshots.jobs);
        let sets = Arc::clone(&self.snapshots.sets);
        tokio::spawn(async move {
            jobs.settle_interrupted().await;
            // Only now is each member of an interrupted set settled.
            sets.discard_failed().await;
        });
    }

    /// Shutdown: ends every session after its in-flight requests (the
    /// attachments stay recorded), makes all data durable, saves each
    /// volume's dirty set, and records a clean shutdown. Jobs above the
    /// engine (imports, exports) are stopped first by their owner.
    pub async fn shutdown(&self) -> Result<()> {
        // Snapshot jobs first: each puts its changes back into the dirty
        // set, which the volumes' shutdown saves.
        self.snapshots.jobs.shutdown().await;
        self.snapshots.sets.shutdown().await;
        self.volumes.hydrator.shutdown().await;
        self.snapshots.exports.close_sessions().await;
        self.volumes.shutdown().await
    }

    pub fn io_engine_name(&self) -> &'static str {
        self.volumes.io.name()
    }

    pub fn fetch_stats(&self) -> FetchStats {
        use std::sync::atomic::Ordering::Relaxed;
        let f = &self.volumes.fetcher;
        let (cache_bytes, cache_hits) = f
            .cache()
            .map_or((0, 0), |c| (c.used_bytes(), c.stats.hits.load(Relaxed)));
        FetchStats {
            fetches: f.fetches.load(Relaxed),
            fetched_bytes: f.fetched_bytes.load(Relaxed),
            cache_bytes,
            cache_hits,
        }
    }

    /// A restored volume's hydration; `None` for other volumes.
    pub fn hydration(&self, vol: &Volume) -> Option<HydrationProgress> {
        HydrationProgress::of(vol, self.volumes.hydrator.status(vol))
    }

    // Volumes: `lifecycle`.

    pub fn get(&self, name: &VolumeName) -> Result<Arc<Volume>> {
        self.volumes.get(name)
    }

    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.volumes.list()
    }

    pub async fn create(&self, req: CreateVolume) -> Result<Arc<Volume>> {
        self.volumes
            .create(req, VolumeOptions::default(), None)
            .await
    }

    /// `create` with an EC2-style id and tags.
    pub async fn create_with(&self, req: CreateVolume, opts: VolumeOptions) -> Result<Arc<Volume>> {
        self.volumes.create(req, opts, None).await
    }

    pub async fn attach(&self, name: &VolumeName, req: AttachVolume) -> Result<Arc<Volume>> {
        self.volumes.attach(name, req).await
    }

    /// Returns the volume and whether it was deleted (an ephemeral one).
    pub async fn detach(&self, name: &VolumeName) -> Result<(Arc<Volume>, bool)> {
        self.volumes.detach(name).await
    }

    pub async fn modify(&self, name: &VolumeName, req: ModifyVolume) -> Result<Arc<Volume>> {
        self.volumes.modify(name, req).await
    }

    pub async fn delete(&self, name: &VolumeName) -> Result<()> {
        self.volumes.delete(name).await
    }

    /// Sets the tags in `set` and removes the keys in `remove` (a key whose
    /// value is given is removed only while it has that value, as EC2's
    /// DeleteTags).
    pub async fn tag_volume(
        &self,
        name: &VolumeName,
        set: &BTreeMap<String, String>,
        remove: &[(String, Option<String>)],
    ) -> Result<Arc<Volume>> {
        self.volumes.tag(name, set, remove).await
    }

    /// A volume's EC2-style id.
    pub fn volume_id(&self, rec: &crate::catalog::VolumeRecord) -> String {
        self.volumes.volume_id(rec)
    }

    /// The volume with this EC2-style id.
    pub fn find_volume_id(&self, volume_id: &str) -> Option<Arc<Volume>> {
        self.volumes.find_volume_id(volume_id)
    }

    // What an import job may do to the volumes it fills.

    /// Creates a volume recorded `importing` for job `job`: no lifecycle
    /// change but the job's own reaches it until [`Engine::finish_import`].
    pub async fn create_importing(&self, req: CreateVolume, job: &JobId) -> Result<Arc<Volume>> {
        self.volumes.create_importing(req, job).await
    }

    /// Grows a volume job `job` fills from a stream.
    pub async fn grow_importing(
        &self,
        vol: &Arc<Volume>,
        job: &JobId,
        size: u64,
        reserve: Option<u64>,
    ) -> Result<()> {
        self.volumes.grow_importing(vol, job, size, reserve).await
    }

    /// Makes the (flushed) volumes job `job` filled available.
    pub async fn finish_import(&self, job: &JobId, vols: &[Arc<Volume>]) -> Result<()> {
        self.volumes.finish_import(job, vols).await
    }

    /// Removes the volumes among `names` job `job` still fills.
    pub async fn remove_importing(&self, job: &JobId, names: &[VolumeName]) {
        self.volumes.remove_importing(job, names).await
    }

    // Exports over NBD: what the NBD server asks.

    /// The export named `name`: an exported snapshot by id, else an
    /// attached volume.
    pub fn export(&self, name: &str) -> Option<Export> {
        if let Some(id) = SnapshotId::parse(name)
            && let Some(e) = self.snapshots.exports.export(&id)
        {
            return Some(e);
        }
        let name = VolumeName::parse(name).ok()?;
        self.get(&name).ok()?.export()
    }

    /// Names of the exports, for NBD_OPT_LIST: attached volumes, then
    /// exported snapshots.
    pub fn export_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .list()
            .into_iter()
            .filter(|v| v.export().is_some())
            .map(|v| v.name.as_str().to_owned())
            .collect();
        names.extend(self.snapshots.exports.names().into_iter().map(String::from));
        names
    }

    /// Exports the snapshots `vol snapshot attach` left exported (after a
    /// restart) and releases the holds of exports that ended.
    pub async fn reopen_snapshot_exports(&self) {
        self.snapshots.exports.reopen().await;
    }

    /// The changed blocks from snapshot `from` to the snapshot `export`
    /// serves, for a dirty-bitmap context.
    pub async fn changed_since(
        &self,
        export: &Export,
        from: &str,
    ) -> Option<Arc<snapshot::diff::Diff>> {
        self.snapshots.changed_since(export, from).await
    }

    /// The snapshots a snapshot export can be compared with.
    pub async fn changed_candidates(&self, export: &Export) -> Vec<String> {
        self.snapshots.changed_candidates(export).await
    }

    // Snapshots: `snapshots`.

    /// Takes a snapshot of `name` at this instant and uploads it in the
    /// background; returns the `pending` record at once.
    pub async fn create_snapshot(
        &self,
        name: &VolumeName,
        req: CreateSnapshot,
    ) -> Result<SnapshotRecord> {
        self.snapshots.create(name, req).await
    }

    /// Copies snapshot `source` under a new id (see `Snapshots::copy`).
    pub async fn copy_snapshot(
        &self,
        source: &SnapshotId,
        key: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<SnapshotRecord> {
        self.snapshots.copy(source, key, labels).await
    }

    // Snapshot sets: `snapshot_set`.

    /// One crash-consistent snapshot of each of `names` (see the module
    /// comment): returns the set and its members' `pending` records.
    pub async fn create_snapshot_set(
        &self,
        name: &str,
        names: &[VolumeName],
        labels: BTreeMap<String, String>,
    ) -> Result<(SnapshotSetRecord, Vec<SnapshotRecord>)> {
        validate::labels(&labels)?;
        let vols = names
            .iter()
            .map(|n| self.get(n))
            .collect::<Result<Vec<_>>>()?;
        self.snapshots.sets.create(name, vols, labels).await
    }

    pub fn snapshot_set(&self, id: &str) -> Result<SnapshotSetRecord> {
        self.snapshots.sets.get(id)
    }

    pub fn snapshot_sets(&self) -> Result<Vec<SnapshotSetRecord>> {
        self.snapshots.sets.list()
    }

    /// The set snapshot `id` was taken in, if any.
    pub fn snapshot_set_of(&self, id: &SnapshotId) -> Option<String> {
        self.snapshots.sets.set_of(id)
    }

    /// How long a set's barrier may wait for the writes in flight.
    pub fn set_barrier_timeout(&self, d: Duration) {
        self.snapshots.sets.set_barrier_timeout(d);
    }

    // Encryption: `encryption`.

    /// Gives the engine the key service (the daemon does, at start).
    pub fn set_encryption(
        &self,
        keys: Arc<crate::keys::KeyService>,
        scope: crate::keys::DomainScope,
    ) {
        self.volumes.sealing.set_encryption(keys, scope);
    }

    pub fn keys(&self) -> Result<&Arc<crate::keys::KeyService>> {
        self.volumes.sealing.keys()
    }

    pub fn store_encrypted(&self) -> bool {
        self.volumes.sealing.store_encrypted()
    }

    /// The encryption of a snapshot made from nothing (an EBS direct
    /// upload without a parent): as a new volume's.
    pub async fn new_encryption(
        &self,
        encrypted: Option<bool>,
        key: Option<&str>,
    ) -> Result<Option<snapshot::Encryption>> {
        self.volumes.sealing.new_encryption(encrypted, key).await
    }

    /// Rotates key `reference` and rewraps its data keys in the store.
    pub async fn rotate_key(
        &self,
        reference: &str,
    ) -> Result<(crate::keys::KeyInfo, snapshot::crypt::RotateReport)> {
        self.volumes.sealing.rotate_key(reference).await
    }

    /// A snapshot of `vol` for a job, and the handle that says how it ended.
    pub async fn snapshot_for_job(
        &self,
        vol: Arc<Volume>,
        labels: BTreeMap<String, String>,
    ) -> Result<(SnapshotRecord, SnapshotDone)> {
        self.snapshots.of_volume(vol, labels).await
    }

    /// (done, total) chunks of `vol`'s snapshot in progress, if one runs.
    pub fn snapshot_progress(&self, vol: &Volume) -> Option<(u64, u64)> {
        self.snapshots.progress_of(vol)
    }

    /// A snapshot by id, with live progress while this host uploads it.
    pub async fn snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        self.snapshots.get(id).await
    }

    /// Every snapshot this host can see, optionally of one volume.
    pub async fn snapshots(&self, volume: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        self.snapshots.list(volume).await
    }

    /// Deletes a snapshot. A protected snapshot is refused.
    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.snapshots.delete(id).await
    }

    /// Deletes a snapshot into the recycle bin until `expires` (seconds
    /// since the epoch), restorable until then. A protected snapshot is
    /// refused.
    pub async fn recycle_snapshot(&self, id: &SnapshotId, expires: u64) -> Result<()> {
        self.snapshots.recycle(id, expires).await
    }

    /// Marks a snapshot protected (never deleted, never pruned) or not.
    pub async fn protect_snapshot(&self, id: &SnapshotId, protected: bool) -> Result<SnapshotInfo> {
        self.snapshots.protect(id, protected).await
    }

    pub async fn snapshot_protected(&self, id: &SnapshotId) -> Result<bool> {
        self.snapshots.is_protected(id).await
    }

    /// Every protected snapshot in the store.
    pub async fn protected_snapshots(&self) -> Result<std::collections::BTreeSet<SnapshotId>> {
        self.snapshots.protected().await
    }

    /// Every snapshot in the recycle bin, with its manifest's header.
    pub async fn binned_snapshots(&self) -> Result<Vec<(snapshot::bin::BinEntry, ManifestHeader)>> {
        self.snapshots.binned().await
    }

    /// The store's entries of images in the recycle bin (`machines/`'s).
    pub fn image_bin(&self) -> image_bin::ImageBin<'_> {
        image_bin::ImageBin::new(&self.snapshots.known)
    }

    /// Restores a snapshot from the recycle bin, as it was deleted.
    pub async fn restore_binned_snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        self.snapshots.restore_binned(id).await
    }

    /// This host's id, as it names its holds and claims in the store.
    pub fn host_id(&self) -> &str {
        &self.volumes.host_id
    }

    pub async fn diff_snapshots(
        &self,
        from: Option<&SnapshotId>,
        to: &SnapshotId,
    ) -> Result<snapshot::diff::Diff> {
        self.snapshots.diff(from, to).await
    }

    pub async fn verify_snapshot(&self, id: &SnapshotId) -> Result<snapshot::verify::VerifyReport> {
        self.snapshots.verify(id).await
    }

    pub async fn gc(&self, grace: Option<Duration>) -> Result<(Duration, snapshot::gc::GcReport)> {
        self.snapshots.gc(grace).await
    }

    /// A completed snapshot's manifest.
    pub async fn manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        self.snapshots.manifest(id).await
    }

    /// A completed snapshot's header.
    pub async fn snapshot_header(&self, id: &SnapshotId) -> Result<ManifestHeader> {
        self.snapshots.header(id).await
    }

    /// A completed snapshot's manifest, read lazily.
    pub async fn manifest_reader(&self, id: &SnapshotId) -> Result<ManifestReader> {
        self.snapshots.reader(id).await
    }

    /// When snapshot `id` was exported by `vol snapshot attach`, if it is.
    pub fn snapshot_attached_at(&self, id: &SnapshotId) -> Option<u64> {
        self.snapshots.attached_at(id)
    }

    /// Exports snapshot `id` read-only over NBD until detached; it survives
    /// restarts.
    pub async fn attach_snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        self.snapshots.attach(id).await
    }

    pub async fn detach_snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        self.snapshots.detach(id).await
    }

    /// Exports snapshot `id` for as long as the lease lives.
    pub async fn lease_snapshot_export(&self, id: &SnapshotId) -> Result<SnapshotExportLease> {
        self.snapshots.lease(id).await
    }

    /// Starts a snapshot a client sends block by block (the EBS direct
    /// APIs): see `jobs::block_upload`.
    pub async fn start_block_upload(&self, spec: UploadSpec) -> Result<SnapshotRecord> {
        self.snapshots.start_block_upload(spec).await
    }

    /// Stores block `index` of upload `id`, with the client's checksum.
    pub async fn put_upload_block(
        &self,
        id: &SnapshotId,
        index: u64,
        data: Vec<u8>,
        checksum: [u8; 32],
    ) -> Result<()> {
        self.snapshots
            .put_upload_block(id, index, data, checksum)
            .await
    }

    /// Completes upload `id` once `check` accepts the blocks received.
    pub async fn complete_block_upload(
        &self,
        id: &SnapshotId,
        check: impl FnOnce(&BTreeMap<u64, Block>) -> Result<()>,
    ) -> Result<SnapshotRecord> {
        self.snapshots.complete_block_upload(id, check).await
    }

    /// Whether snapshot `id` is being uploaded block by block here.
    pub fn is_uploading(&self, id: &SnapshotId) -> bool {
        self.snapshots.is_uploading(id)
    }

    /// The chunks of upload `id`, while it is being uploaded.
    pub fn upload_chunk_count(&self, id: &SnapshotId) -> Option<u64> {
        self.snapshots.upload_chunk_count(id)
    }

    pub fn repo(&self) -> &snapshot::Repo {
        &self.volumes.repo
    }

    /// Chunks through the host's cache, each verified against its hash.
    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.volumes.fetcher
    }
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod volume_tests;
