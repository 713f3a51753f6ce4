//! The volume engine: owns every volume of the host and applies the
//! lifecycle rules (create, attach, detach, modify, delete, shutdown). It
//! holds the parts below and is the only place that combines them:
//!
//! - `registry`: the open volumes by name, and the lifecycle lock;
//! - `recovery`: what opening does after a crash;
//! - `restore`: setting up a volume created from a snapshot;
//! - `volume`: one volume and its data path; `freeze`: a snapshot's hold on
//!   it; `chunk_map`: chunk states and the dirty set; `base`: a restored
//!   volume's snapshot and detach log;
//! - `jobs::snapshot`, `jobs::hydrate`, `jobs::import`, `jobs::export`:
//!   background work (the last two listed in `jobs::registry`);
//! - `snapshot_catalog`: the snapshots this host can see, and store-wide
//!   operations on them;
//! - `validate`: the rules for request values.
//!
//! Presentation (API views, NBD URIs) is not here: see `api::views`.
//!
//! Crash safety of the lifecycle: create writes data files before the
//! record; delete marks the record, removes the files, then the record.
//! `recovery` finishes or undoes whatever a crash interrupted.

pub(crate) mod aws_attrs;
pub(crate) mod base;
pub mod chunk_map;
mod export;
pub(crate) mod freeze;
mod images;
pub(crate) mod jobs;
pub(crate) mod recovery;
pub(crate) mod registry;
pub(crate) mod restore;
pub(crate) mod snapshot_catalog;
pub(crate) mod snapshot_export;
pub(crate) mod validate;
mod volume;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use snapshot::cache::Fetcher;
use snapshot::{ChunkGeometry, SnapshotId};
use tracing::{info, warn};
use volumed_api::{
    AttachVolume, CreateSnapshot, CreateVolume, DEFAULT_CHUNK_SIZE, ImportRequest, ModifyVolume,
    VolumeName, format_size,
};

pub use export::{Backend, Export};
pub use snapshot_export::{SnapshotExportLease, SnapshotImage};
pub use volume::{Extent, ReadPiece, Volume};

use crate::catalog::{AttachmentRecord, Catalog, SnapshotRecord, VolumeRecord, unix_now};
use crate::disk::{DataFile, IoEngine, sync_dir};
use crate::error::{Error, IoContext, Result};
use crate::failpoint;
pub use jobs::block_upload::{Block, UploadSpec};
use jobs::export::{ExportJobs, ExportSource, Sink};
use jobs::hydrate::Hydrator;
use jobs::import::ImportJobs;
use jobs::registry::{JobHandle, JobRegistry};
use jobs::snapshot::SnapshotJobs;
use jobs::work::WorkDirs;
use registry::Registry;
use snapshot_catalog::{SnapshotCatalog, SnapshotInfo};
use snapshot_export::SnapshotExports;

/// Where volumes' data directories live: one per volume, named by its id in
/// hex, never reused.
#[derive(Clone)]
pub struct VolumeDirs {
    root: PathBuf,
}

impl VolumeDirs {
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn volume(&self, id: u64) -> PathBuf {
        self.root.join(format!("{id:016x}"))
    }

    pub fn parse_id(name: &str) -> Option<u64> {
        (name.len() == 16)
            .then(|| u64::from_str_radix(name, 16).ok())
            .flatten()
    }
}

/// Fetches from the store and the chunk cache's state, for `vol status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    pub fetches: u64,
    pub fetched_bytes: u64,
    pub cache_bytes: u64,
    pub cache_hits: u64,
}

pub struct Engine {
    catalog: Arc<Catalog>,
    dirs: VolumeDirs,
    registry: Arc<Registry>,
    io: Arc<IoEngine>,
    repo: snapshot::Repo,
    /// Restored volumes' chunks, through the host's cache.
    fetcher: Arc<Fetcher>,
    /// Names this host's holds in the store.
    host_id: String,
    snapshot_jobs: Arc<SnapshotJobs>,
    hydrator: Arc<Hydrator>,
    snapshots: SnapshotCatalog,
    /// Imports and exports, and the registry listing them.
    imports: Arc<ImportJobs>,
    exports: Arc<ExportJobs>,
    snapshot_exports: Arc<SnapshotExports>,
}

impl Engine {
    /// Opens the catalog under `data_dir` and reopens every volume (see
    /// `recovery`); attached ones are exported again. Returns whether the
    /// previous run shut down cleanly.
    pub fn open(
        data_dir: &Path,
        io: Arc<IoEngine>,
        repo: snapshot::Repo,
        fetcher: Arc<Fetcher>,
    ) -> anyhow::Result<(Self, bool)> {
        use anyhow::Context;
        let catalog = Arc::new(Catalog::open(&data_dir.join("catalog")).context("open catalog")?);
        let clean = catalog.begin_run().context("record start")?;
        let host_id = catalog.host_id().context("read host id")?;
        let dirs = VolumeDirs {
            root: data_dir.join("volumes"),
        };
        std::fs::create_dir_all(dirs.root())
            .with_context(|| format!("create {}", dirs.root().display()))?;
        let registry = Arc::new(Registry::default());
        for vol in recovery::open_volumes(&catalog, &dirs, &io, &fetcher, clean)? {
            registry.insert(vol);
        }
        let snapshot_jobs = Arc::new(SnapshotJobs::new(Arc::clone(&catalog), repo.clone()));
        let job_registry = Arc::new(JobRegistry::open(Arc::clone(&catalog)).context("load jobs")?);
        // Emptied before `start_background` resumes any import.
        let work = WorkDirs::new(data_dir.join("jobs"));
        work.clear_stale();
        let imports = Arc::new(ImportJobs::new(
            Arc::clone(&catalog),
            Arc::clone(&registry),
            dirs.clone(),
            Arc::clone(&job_registry),
            Arc::clone(&snapshot_jobs),
            work,
        ));
        let snapshot_exports = Arc::new(SnapshotExports::new(
            Arc::clone(&catalog),
            repo.clone(),
            Arc::clone(&fetcher),
            host_id.clone(),
        ));
        let exports = Arc::new(ExportJobs::new(
            Arc::clone(&catalog),
            job_registry,
            Arc::clone(&snapshot_jobs),
            Arc::clone(&snapshot_exports),
            repo.clone(),
            Arc::clone(&fetcher),
        ));
        let engine = Engine {
            imports,
            exports,
            snapshot_jobs,
            hydrator: Arc::new(Hydrator::new(
                Arc::clone(&catalog),
                repo.clone(),
                Arc::clone(&registry),
                host_id.clone(),
            )),
            snapshots: SnapshotCatalog::new(Arc::clone(&catalog), repo.clone()),
            snapshot_exports,
            catalog,
            dirs,
            registry,
            io,
            repo,
            fetcher,
            host_id,
        };
        Ok((engine, clean))
    }

    /// Starts the background work a previous run left: hydration of
    /// restored volumes, release of stale holds, and settling snapshots it
    /// left pending (in the background, so an unreachable store does not
    /// delay start-up).
    pub fn start_background(&self) {
        self.hydrator.start_all();
        let jobs = Arc::clone(&self.snapshot_jobs);
        tokio::spawn(async move { jobs.settle_interrupted().await });
        let imports = Arc::clone(&self.imports);
        let registry = Arc::clone(&self.registry);
        tokio::spawn(async move {
            imports
                .settle_interrupted(|rec| {
                    let registry = Arc::clone(&registry);
                    async move { reopen_import(&registry, rec).await }
                })
                .await
        });
    }

    pub fn io_engine_name(&self) -> &'static str {
        self.io.name()
    }

    pub fn get(&self, name: &VolumeName) -> Result<Arc<Volume>> {
        self.registry.get(name)
    }

    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.registry.list()
    }

    /// The export named `name`, for the NBD server: an exported snapshot
    /// by id, else an attached volume.
    pub fn export(&self, name: &str) -> Option<Export> {
        if let Some(id) = SnapshotId::parse(name)
            && let Some(e) = self.snapshot_exports.export(&id)
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
        names.extend(self.snapshot_exports.names().into_iter().map(String::from));
        names
    }

    /// The NBD Unix socket, for the URIs of snapshot export leases.
    pub fn set_nbd_socket(&self, path: PathBuf) {
        self.snapshot_exports.set_nbd_socket(path);
    }

    /// Exports the snapshots `vol snapshot attach` left exported (after a
    /// restart) and releases the holds of exports that ended.
    pub async fn reopen_snapshot_exports(&self) {
        self.snapshot_exports.reopen().await;
    }

    /// When snapshot `id` was exported by `vol snapshot attach`, if it is.
    pub fn snapshot_attached_at(&self, id: &SnapshotId) -> Option<u64> {
        self.snapshot_exports.attached_at(id)
    }

    /// Exports snapshot `id` read-only over NBD under its id, on this host,
    /// until [`Engine::detach_snapshot`]; it survives restarts.
    pub async fn attach_snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        let m = self.exportable_manifest(id).await?;
        self.snapshot_exports.attach(m).await?;
        self.snapshot(id).await
    }

    pub async fn detach_snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        let header = self.snapshot_exports.detach(id).await?;
        match self.snapshot(id).await {
            // Deleted by another host while exported here: what was served.
            Err(Error::SnapshotNotFound(_)) => Ok(SnapshotInfo::Stored(header)),
            other => other,
        }
    }

    /// Exports snapshot `id` over the NBD Unix socket for as long as the
    /// lease lives, for the daemon's own readers (image export).
    pub async fn lease_snapshot_export(&self, id: &SnapshotId) -> Result<SnapshotExportLease> {
        let m = self.exportable_manifest(id).await?;
        self.snapshot_exports.lease(m).await
    }

    async fn exportable_manifest(&self, id: &SnapshotId) -> Result<Arc<snapshot::ManifestReader>> {
        if self.snapshot_jobs.is_running(id) {
            return Err(Error::SnapshotBusy(id.to_string()));
        }
        Ok(Arc::new(self.snapshots.reader(id).await?))
    }

    /// The changed blocks from snapshot `from` to the snapshot `export`
    /// serves, for a dirty-bitmap context; `None` when the export is a
    /// volume, `from` is unknown, or it cannot be compared.
    pub async fn changed_since(
        &self,
        export: &Export,
        from: &str,
    ) -> Option<Arc<snapshot::diff::Diff>> {
        let image = export.backend.snapshot()?;
        let from = SnapshotId::parse(from)?;
        let m = match self.snapshots.reader(&from).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(snapshot = %image.id, from = %from, error = %e, "no dirty bitmap");
                return None;
            }
        };
        match image.changed_from(&m).await {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::debug!(snapshot = %image.id, from = %from, error = %e, "no dirty bitmap");
                None
            }
        }
    }

    /// The snapshots a snapshot export can be compared with, for
    /// NBD_OPT_LIST_META_CONTEXT: the completed snapshots of its volume
    /// with its chunk size, itself excluded.
    pub async fn changed_candidates(&self, export: &Export) -> Vec<String> {
        let Some(image) = export.backend.snapshot() else {
            return Vec::new();
        };
        let h = image.manifest.header();
        match self.snapshots.list(Some(&h.volume)).await {
            Ok(list) => list
                .iter()
                .filter(|s| s.completed() && s.chunk_size() == h.chunk_size && *s.id() != h.id)
                .map(|s| s.id().to_string())
                .collect(),
            Err(e) => {
                tracing::debug!(snapshot = %h.id, error = %e, "cannot list dirty bitmaps");
                Vec::new()
            }
        }
    }

    /// (done, total) chunks of `vol`'s snapshot in progress, if one runs.
    pub fn snapshot_progress(&self, vol: &Volume) -> Option<(u64, u64)> {
        self.snapshot_jobs.progress_of(vol)
    }

    /// A restored volume's hydration; `None` for other volumes.
    pub fn hydration(&self, vol: &Volume) -> Option<jobs::hydrate::HydrationProgress> {
        jobs::hydrate::HydrationProgress::of(vol, self.hydrator.status(vol))
    }

    pub fn fetch_stats(&self) -> FetchStats {
        use std::sync::atomic::Ordering::Relaxed;
        let f = &self.fetcher;
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

    pub async fn create(&self, req: CreateVolume) -> Result<Arc<Volume>> {
        self.create_with(req, aws_attrs::VolumeAttrs::default(), None)
            .await
    }

    /// `create` with the attributes the AWS endpoint and `vol create --tag`
    /// add (tags, EC2 volume type), and for an import job's volume when
    /// `importing` names the job: recorded `importing` from the start, so
    /// it is never `available` half filled.
    pub async fn create_with(
        &self,
        req: CreateVolume,
        attrs: aws_attrs::VolumeAttrs,
        importing: Option<String>,
    ) -> Result<Arc<Volume>> {
        attrs.validate()?;
        let source = match &req.from_snapshot {
            Some(raw) => {
                let id =
                    SnapshotId::parse(raw).ok_or_else(|| Error::SnapshotNotFound(raw.clone()))?;
                Some(restore::source_manifest(&self.repo, &id).await?)
            }
            None => None,
        };
        let chunk_size = match (&source, req.chunk_size) {
            (Some(m), Some(c)) if c != m.header().chunk_size => {
                return Err(Error::InvalidSize(format!(
                    "snapshot {} has chunks of {}; a volume created from it has the same, not {}",
                    m.header().id,
                    format_size(m.header().chunk_size),
                    format_size(c)
                )));
            }
            (Some(m), _) => m.header().chunk_size,
            (None, c) => c.unwrap_or(DEFAULT_CHUNK_SIZE),
        };
        validate::chunk_size(chunk_size)?;
        let size = match (req.size, &source) {
            (Some(s), Some(m)) if s < m.header().size => {
                return Err(Error::InvalidSize(format!(
                    "size {} is smaller than snapshot {} ({})",
                    format_size(s),
                    m.header().id,
                    format_size(m.header().size)
                )));
            }
            (Some(s), _) => s,
            (None, Some(m)) => m.header().size,
            (None, None) => {
                return Err(Error::InvalidSize(
                    "size is required unless the volume is created from a snapshot".into(),
                ));
            }
        };
        validate::size(size)?;
        let geometry =
            ChunkGeometry::new(size, chunk_size).map_err(|e| Error::InvalidSize(e.to_string()))?;
        let _guard = self.registry.lock().await;
        if self.get(&req.name).is_ok() {
            return Err(Error::VolumeExists(req.name));
        }
        let id = self.catalog.next_id()?;
        let mut rec = VolumeRecord::new(
            id,
            req.name.clone(),
            size,
            chunk_size,
            req.ephemeral,
            source.as_ref().map(|m| m.header().id.clone()),
        );
        rec.last_snapshot = rec.source_snapshot.clone();
        rec.hydrate = source.is_some() && req.hydrate.unwrap_or(true);
        rec.importing = importing;
        attrs.apply(&mut rec);
        let dir = self.dirs.volume(id);
        let data = DataFile::create(&dir, size, Arc::clone(&self.io))
            .ctx(|| format!("create data files in {}", dir.display()))?;
        let base = match &source {
            Some(m) => {
                let hold = restore::hold_name(&self.host_id, id);
                match restore::prepare_base(&self.repo, &self.fetcher, &hold, &dir, m).await {
                    Ok(b) => Some(b),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        failpoint::hit("create-after-files");
        if let Err(e) = self.catalog.create_volume(&rec) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        info!(volume = %rec.name, size = rec.size, chunk_size, ephemeral = rec.ephemeral,
              source = ?rec.source_snapshot, "volume created");
        // From the base's copy, which is exact for a small manifest.
        let map = restore::initial_map(geometry, base.as_ref().map(|b| &*b.manifest));
        let vol = Volume::new(rec, geometry, data, map, base);
        if let Some(m) = source {
            vol.set_parent_manifest(m);
        }
        self.registry.insert(Arc::clone(&vol));
        self.hydrator.adopt(Arc::clone(&vol));
        Ok(vol)
    }

    pub async fn attach(&self, name: &VolumeName, req: AttachVolume) -> Result<Arc<Volume>> {
        self.attach_with(name, req, None).await
    }

    /// `attach`, recording the device name the attacher gave (EC2's).
    pub async fn attach_with(
        &self,
        name: &VolumeName,
        req: AttachVolume,
        device: Option<String>,
    ) -> Result<Arc<Volume>> {
        if let Some(i) = &req.instance {
            validate::instance(i)?;
        }
        let _guard = self.registry.lock().await;
        let mut vol = self.get(name)?;
        not_importing(&vol)?;
        if vol.record().attachment.is_none() && vol.failure().is_some() {
            // Left failed by a detach whose reopen failed: try again.
            let rec = vol.record();
            vol = self.reopen(&vol, &rec)?;
        }
        let attached = vol
            .update_record(&self.catalog, |rec| {
                if let Some(att) = &rec.attachment {
                    // Attaching again for the same instance is a no-op, so
                    // a hypervisor retrying after a timeout gets the same
                    // answer.
                    if att.instance == req.instance {
                        return Ok(false);
                    }
                    let holder = att.instance.clone().unwrap_or_else(|| "(none)".into());
                    return Err(Error::AttachedElsewhere(name.clone(), holder));
                }
                rec.attachment = Some(AttachmentRecord {
                    instance: req.instance,
                    attached_at: unix_now(),
                    device,
                    delete_on_termination: false,
                });
                Ok(true)
            })
            .await?;
        if attached {
            vol.open_export();
            info!(volume = %name, "volume attached");
        }
        Ok(vol)
    }

    /// Ends the export (disconnecting its clients after their in-flight
    /// requests), makes the data durable, and records the volume available.
    /// An ephemeral volume is deleted. Returns whether it was deleted.
    pub async fn detach(&self, name: &VolumeName) -> Result<(Arc<Volume>, bool)> {
        let _guard = self.registry.lock().await;
        let vol = self.get(name)?;
        let rec = vol.record();
        if rec.attachment.is_none() {
            return Err(Error::VolumeNotAttached(name.clone()));
        }
        if let Some(export) = vol.take_export() {
            export.close().await;
        }
        let failed = vol.failure().is_some();
        if !failed {
            vol.flush().await.ctx(|| format!("flush volume '{name}'"))?;
        }
        if rec.ephemeral {
            self.delete_locked(&vol).await?;
            info!(volume = %name, "ephemeral volume detached and deleted");
            return Ok((vol, true));
        }
        vol.update_record(&self.catalog, |r| {
            r.attachment = None;
            Ok(())
        })
        .await?;
        info!(volume = %name, "volume detached");
        if failed {
            // Detached either way; a reopen that fails leaves it failed,
            // and attach tries again.
            match self.reopen(&vol, &vol.record()) {
                Ok(v) => return Ok((v, false)),
                Err(e) => {
                    warn!(volume = %name, error = %e, "could not reopen the failed volume");
                }
            }
        }
        Ok((vol, false))
    }

    /// Replaces a failed, detached volume with one opened afresh from its
    /// files, as after an unclean stop: the map rebuilt from the files'
    /// allocation, a base reopened from its log, every chunk dirty (nothing
    /// proves what the failure lost). The old one keeps refusing requests.
    fn reopen(&self, old: &Arc<Volume>, rec: &VolumeRecord) -> Result<Arc<Volume>> {
        let dir = self.dirs.volume(rec.id);
        let vol = recovery::open_volume(rec, &dir, &self.io, &self.fetcher, false)
            .ctx(|| format!("reopen volume '{}' from {}", rec.name, dir.display()))?;
        if let Some(m) = old.parent_manifest() {
            vol.set_parent_manifest(m);
        }
        self.hydrator.stop(old);
        // From here the new object owns the record; the old one, which
        // jobs may still hold, can no longer write it.
        old.retire_record();
        self.registry.insert(Arc::clone(&vol));
        self.hydrator.adopt(Arc::clone(&vol));
        info!(volume = %rec.name, reason = old.failure().unwrap_or_default(),
              "failed volume reopened from its files; every chunk counts as changed");
        Ok(vol)
    }

    pub async fn modify(&self, name: &VolumeName, req: ModifyVolume) -> Result<Arc<Volume>> {
        let _guard = self.registry.lock().await;
        let vol = self.get(name)?;
        not_importing(&vol)?;
        let current = vol.size();
        if let Some(size) = req.size {
            validate::size(size)?;
            if size < current {
                return Err(Error::InvalidSize(format!(
                    "volume '{name}' cannot shrink from {} to {}",
                    format_size(current),
                    format_size(size)
                )));
            }
            if size > current {
                // Files grow before the record does: a crash in between leaves
                // longer files than the record, which open() tolerates.
                vol.grow(size).ctx(|| format!("grow volume '{name}'"))?;
            }
        }
        vol.update_record(&self.catalog, |rec| {
            if let Some(size) = req.size {
                rec.size = rec.size.max(size);
            }
            if let Some(e) = req.ephemeral {
                rec.ephemeral = e;
            }
            Ok(())
        })
        .await?;
        info!(volume = %name, size = vol.size(), "volume modified");
        Ok(vol)
    }

    pub async fn delete(&self, name: &VolumeName) -> Result<()> {
        let _guard = self.registry.lock().await;
        let vol = self.get(name)?;
        not_importing(&vol)?;
        if vol.record().attachment.is_some() {
            return Err(Error::VolumeAttached(name.clone()));
        }
        self.delete_locked(&vol).await?;
        info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// Deletes `vol` under the lifecycle lock. Its hydration stops; a
    /// snapshot job of it runs on to completion from the open files (as EBS
    /// completes the snapshot of a deleted volume), but the record is no
    /// longer its volume's to write, so the job leaves it alone.
    async fn delete_locked(&self, vol: &Arc<Volume>) -> Result<()> {
        self.hydrator.stop(vol);
        vol.update_record(&self.catalog, |r| {
            r.deleting = true;
            Ok(())
        })
        .await?;
        let rec = vol.record();
        failpoint::hit("delete-after-mark");
        self.registry.remove(vol);
        remove_files_and_record(&self.catalog, &self.dirs, &rec)?;
        if rec.source_snapshot.is_some() && !rec.hydrated {
            // Best effort: a hold left behind is released at the next start.
            let name = restore::hold_name(&self.host_id, rec.id);
            if let Err(e) = self.repo.release_hold(&name).await {
                warn!(volume = %rec.name, hold = %name, error = %e, "could not release the store hold");
            }
        }
        Ok(())
    }

    /// Takes a snapshot of `name` at this instant and uploads it in the
    /// background; returns the `pending` record at once.
    pub async fn create_snapshot(
        &self,
        name: &VolumeName,
        req: CreateSnapshot,
    ) -> Result<SnapshotRecord> {
        validate::labels(&req.labels)?;
        let vol = self.get(name)?;
        not_importing(&vol)?;
        self.snapshot_jobs.start(vol, req.labels).await
    }

    /// Starts a snapshot a client sends block by block (the EBS direct
    /// APIs): see `jobs::block_upload`.
    pub async fn start_block_upload(&self, spec: UploadSpec) -> Result<SnapshotRecord> {
        self.snapshot_jobs.uploads.start(spec).await
    }

    /// Stores block `index` of upload `id`, with the client's checksum.
    pub async fn put_upload_block(
        &self,
        id: &SnapshotId,
        index: u64,
        data: Vec<u8>,
        checksum: [u8; 32],
    ) -> Result<()> {
        self.snapshot_jobs
            .uploads
            .put_block(id, index, data, checksum)
            .await
    }

    /// Completes upload `id` once `check` accepts the blocks received.
    pub async fn complete_block_upload(
        &self,
        id: &SnapshotId,
        check: impl FnOnce(&std::collections::BTreeMap<u64, Block>) -> Result<()>,
    ) -> Result<SnapshotRecord> {
        self.snapshot_jobs.uploads.complete(id, check).await
    }

    /// Whether snapshot `id` is being uploaded block by block here.
    pub fn is_uploading(&self, id: &SnapshotId) -> bool {
        self.snapshot_jobs.uploads.contains(id)
    }

    /// The chunks of upload `id`, while it is being uploaded.
    pub fn upload_chunk_count(&self, id: &SnapshotId) -> Option<u64> {
        self.snapshot_jobs.uploads.chunk_count(id)
    }

    /// A snapshot by id, with live progress while this host uploads it.
    pub async fn snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        Ok(self.with_progress(self.snapshots.get(id).await?))
    }

    /// Every snapshot this host can see, optionally of one volume.
    pub async fn snapshots(&self, volume: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let all = self.snapshots.list(volume).await?;
        Ok(all.into_iter().map(|s| self.with_progress(s)).collect())
    }

    fn with_progress(&self, s: SnapshotInfo) -> SnapshotInfo {
        match s {
            SnapshotInfo::Recorded { rec, .. } => {
                let live = self.snapshot_jobs.progress(&rec.id);
                SnapshotInfo::Recorded { rec, live }
            }
            stored => stored,
        }
    }

    /// Deletes a snapshot. A volume whose next snapshot would have built on
    /// it takes a full one instead.
    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        if self.snapshot_jobs.is_running(id) {
            return Err(Error::SnapshotBusy(id.to_string()));
        }
        if self.snapshot_exports.is_exported(id) {
            return Err(Error::SnapshotAttached(id.to_string()));
        }
        self.snapshots.delete(id).await?;
        self.catalog.remove_aws_snapshot(id.as_str())?;
        let _guard = self.registry.lock().await;
        for vol in self.list() {
            // A volume deleted meanwhile owns no record to change.
            let changed = vol
                .update_record(&self.catalog, |rec| {
                    if rec.last_snapshot.as_ref() != Some(id) {
                        return Ok(());
                    }
                    // Before the record says "no parent": the next snapshot
                    // must then be a full one.
                    vol.map().mark_all_dirty();
                    rec.last_snapshot = None;
                    Ok(())
                })
                .await;
            match changed {
                Ok(()) | Err(Error::VolumeNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    /// Changed blocks between two snapshots of any volumes, by content.
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

    /// Shutdown: ends every session after its in-flight requests (the
    /// attachments stay recorded), makes all data durable, saves each
    /// volume's dirty set, and records a clean shutdown.
    pub async fn shutdown(&self) -> Result<()> {
        // Imports stop first (a file import resumes from its checkpoint),
        // then snapshot jobs: each puts its changes back into the dirty
        // set, which is saved below.
        self.imports.jobs.stop().await;
        self.snapshot_jobs.shutdown().await;
        self.hydrator.shutdown().await;
        self.snapshot_exports.close_sessions().await;
        let _guard = self.registry.lock().await;
        for vol in self.list() {
            if let Some(export) = vol.export() {
                export.close().await;
            }
            if let Some(reason) = vol.failure() {
                // Nothing to make durable that can be trusted; without a
                // saved dirty set the next start reads the whole volume.
                warn!(volume = %vol.name, reason, "failed volume not flushed at shutdown");
                continue;
            }
            vol.flush()
                .await
                .ctx(|| format!("flush volume '{}'", vol.name))?;
            // Read back only after a clean shutdown (see `recovery`), so
            // the next snapshot reads what changed, not the whole volume.
            let path = vol.data().dir().join(recovery::DIRTY_FILE);
            vol.map()
                .save_dirty(&path)
                .ctx(|| format!("save the dirty set of volume '{}'", vol.name))?;
        }
        self.catalog.mark_clean_shutdown()?;
        Ok(())
    }
}

/// A volume being imported takes no lifecycle change but the import's own.
fn not_importing(vol: &Volume) -> Result<()> {
    match vol.record().importing {
        Some(job) => Err(Error::VolumeImporting(vol.name.clone(), job)),
        None => Ok(()),
    }
}

/// `NAME`, `NAME-1`, ... for the disks of one import.
fn import_names(name: &VolumeName, n: usize) -> Result<Vec<VolumeName>> {
    (0..n)
        .map(|i| {
            if i == 0 {
                return Ok(name.clone());
            }
            let raw = format!("{name}-{i}");
            VolumeName::parse(&raw).map_err(|reason| Error::InvalidName { name: raw, reason })
        })
        .collect()
}

/// What a file import resumed after a restart reads and writes: its image
/// inspected again, and its volumes, still `importing` for it.
async fn reopen_import(
    registry: &Registry,
    rec: crate::catalog::JobRecord,
) -> std::result::Result<(Vec<crate::image::inspect::Disk>, Vec<Arc<Volume>>), String> {
    let req = rec.import.ok_or("the job has no import request")?;
    let format = req
        .format
        .as_deref()
        .and_then(crate::image::ImageFormat::parse);
    let disks = crate::image::inspect::open(std::path::Path::new(&req.source), format)
        .await
        .map_err(|e| e.to_string())?;
    if disks.len() != rec.volumes.len() {
        return Err("the image's disks changed".into());
    }
    let mut vols = Vec::new();
    for (d, name) in disks.iter().zip(&rec.volumes) {
        let v = registry.get(name).map_err(|e| e.to_string())?;
        if v.record().importing.as_deref() != Some(rec.id.as_str())
            || v.size() != d.size.next_multiple_of(512)
        {
            return Err(format!("volume '{name}' no longer matches the image"));
        }
        vols.push(v);
    }
    Ok((disks, vols))
}

/// Removes a volume's files, then its record: the second half of a delete.
pub(crate) fn remove_files_and_record(
    catalog: &Catalog,
    dirs: &VolumeDirs,
    rec: &VolumeRecord,
) -> Result<()> {
    let dir = dirs.volume(rec.id);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("remove {}", dir.display()), e)),
    }
    failpoint::hit("delete-after-files");
    sync_dir(dirs.root()).ctx(|| format!("sync {}", dirs.root().display()))?;
    catalog.remove_volume(rec)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod volume_tests;
