//! Snapshots as the engine offers them: taken from volumes (`jobs::snapshot`)
//! or sent block by block (`jobs::block_upload`), listed with the store's
//! (`snapshot_catalog`), deleted (or moved to the recycle bin, and
//! restored from it), protected, compared, verified, collected, and
//! exported read-only over NBD (`snapshot_export`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use snapshot::{Manifest, ManifestHeader, ManifestReader, SnapshotId};
use tracing::info;
use volumed_api::{CreateSnapshot, VolumeName};

use super::encryption::Sealing;
use super::error::{Error, Result};
use super::export::Export;
use super::jobs::block_upload::{Block, UploadSpec};
use super::jobs::snapshot::{SnapshotDone, SnapshotJobs};
use super::lifecycle::not_importing;
use super::registry::Registry;
use super::snapshot_catalog::{SnapshotCatalog, SnapshotInfo};
use super::snapshot_export::{SnapshotExportLease, SnapshotExports};
use super::snapshot_set::{self, SnapshotSets};
use super::{Volume, validate};
use crate::catalog::{Catalog, SnapshotRecord};

pub struct Snapshots {
    pub(super) catalog: Arc<Catalog>,
    pub(super) registry: Arc<Registry>,
    pub(super) jobs: Arc<SnapshotJobs>,
    pub(super) known: Arc<SnapshotCatalog>,
    /// Crash-consistent sets of snapshots, and their records' one writer.
    pub(super) sets: Arc<SnapshotSets>,
    pub(super) exports: Arc<SnapshotExports>,
    /// What encryption a snapshot and a copy get.
    pub(super) sealing: Arc<Sealing>,
}

impl Snapshots {
    /// Takes a snapshot of `name` at this instant and uploads it in the
    /// background; returns the `pending` record at once.
    pub async fn create(&self, name: &VolumeName, req: CreateSnapshot) -> Result<SnapshotRecord> {
        validate::labels(&req.labels)?;
        let vol = self.registry.get(name)?;
        not_importing(&vol)?;
        self.sealing.ensure_encryption(&self.catalog, &vol).await?;
        Ok(self.jobs.start(vol, req.labels).await?.0)
    }

    /// Copies snapshot `source` under a new id: under `key` when given (a
    /// full copy, every chunk sealed anew, unless it is the source's key),
    /// else sharing the source's chunks. Returns the copy's `pending`
    /// record; the copy runs in the background.
    pub async fn copy(
        &self,
        source: &SnapshotId,
        key: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<SnapshotRecord> {
        validate::labels(&labels)?;
        let h = self.header(source).await?;
        let target = self.sealing.copy_encryption(&h.encryption, key).await?;
        self.jobs.copies.start(&h, target, labels).await
    }

    /// Takes a snapshot of `vol` for a job (an import that asked for one, an
    /// export of a volume): the `pending` record and a handle that says how
    /// it ended. The job holds the volume already, importing or not.
    pub async fn of_volume(
        &self,
        vol: Arc<Volume>,
        labels: BTreeMap<String, String>,
    ) -> Result<(SnapshotRecord, SnapshotDone)> {
        self.jobs.start(vol, labels).await
    }

    pub async fn start_block_upload(&self, spec: UploadSpec) -> Result<SnapshotRecord> {
        self.jobs.uploads.start(spec).await
    }

    pub async fn put_upload_block(
        &self,
        id: &SnapshotId,
        index: u64,
        data: Vec<u8>,
        checksum: [u8; 32],
    ) -> Result<()> {
        self.jobs.uploads.put_block(id, index, data, checksum).await
    }

    pub async fn complete_block_upload(
        &self,
        id: &SnapshotId,
        check: impl FnOnce(&BTreeMap<u64, Block>) -> Result<()>,
    ) -> Result<SnapshotRecord> {
        self.jobs.uploads.complete(id, check).await
    }

    pub fn is_uploading(&self, id: &SnapshotId) -> bool {
        self.jobs.uploads.contains(id)
    }

    pub fn upload_chunk_count(&self, id: &SnapshotId) -> Option<u64> {
        self.jobs.uploads.chunk_count(id)
    }

    /// A snapshot by id, with live progress while this host uploads it.
    pub async fn get(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        // A failed set's member is on its way out: no longer shown.
        if self.sets.hidden(id) {
            return Err(Error::SnapshotNotFound(id.clone()));
        }
        Ok(self.with_progress(self.known.get(id).await?))
    }

    /// Every snapshot this host can see, optionally of one volume.
    pub async fn list(&self, volume: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let all = self.known.list(volume).await?;
        Ok(all
            .into_iter()
            .filter(|s| !self.sets.hidden(s.id()))
            .map(|s| self.with_progress(s))
            .collect())
    }

    fn with_progress(&self, s: SnapshotInfo) -> SnapshotInfo {
        match s {
            SnapshotInfo::Recorded { rec, .. } => {
                let live = self.jobs.progress(&rec.id);
                SnapshotInfo::Recorded { rec, live }
            }
            stored => stored,
        }
    }

    /// (done, total) chunks of `vol`'s snapshot in progress, if one runs.
    pub fn progress_of(&self, vol: &Volume) -> Option<(u64, u64)> {
        self.jobs.progress_of(vol)
    }

    /// Deletes a snapshot. A volume whose next snapshot would have built on
    /// it takes a full one instead. A protected snapshot is refused.
    pub async fn delete(&self, id: &SnapshotId) -> Result<()> {
        self.remove(id, None).await
    }

    /// Deletes a snapshot into the recycle bin until `expires` (seconds
    /// since the epoch): gone from every listing, its chunks kept, and
    /// restorable until then (see snapshot::bin). The AWS endpoint keeps
    /// its EC2 tags for a restore.
    pub async fn recycle(&self, id: &SnapshotId, expires: u64) -> Result<()> {
        self.remove(id, Some(expires)).await
    }

    async fn remove(&self, id: &SnapshotId, bin_until: Option<u64>) -> Result<()> {
        if self.jobs.is_running(id) {
            return Err(Error::SnapshotBusy(id.clone()));
        }
        if self.exports.is_exported(id) {
            return Err(Error::SnapshotAttached(id.clone()));
        }
        if self.known.is_protected(id).await? {
            return Err(Error::SnapshotProtected(id.clone()));
        }
        snapshot_set::forget_snapshot(&self.catalog, &self.known, &self.registry, id, bin_until)
            .await?;
        match bin_until {
            None => info!(snapshot = %id, "snapshot deleted"),
            Some(expires) => info!(snapshot = %id, expires, "snapshot moved to the recycle bin"),
        }
        Ok(())
    }

    /// Marks a completed snapshot protected (never deleted, never pruned)
    /// or not; the snapshot as it was asked about.
    pub async fn protect(&self, id: &SnapshotId, protected: bool) -> Result<SnapshotInfo> {
        let info = self.get(id).await?;
        if !info.completed() {
            return Err(Error::InvalidRequest(format!(
                "snapshot {id} is not completed; only a completed snapshot can be protected"
            )));
        }
        self.known.set_protected(id, protected).await?;
        info!(snapshot = %id, protected, "snapshot protection changed");
        Ok(info)
    }

    pub async fn is_protected(&self, id: &SnapshotId) -> Result<bool> {
        self.known.is_protected(id).await
    }

    /// Every protected snapshot in the store.
    pub async fn protected(&self) -> Result<BTreeSet<SnapshotId>> {
        self.known.protected().await
    }

    /// Every snapshot in the recycle bin, with its manifest's header.
    pub async fn binned(&self) -> Result<Vec<(snapshot::bin::BinEntry, ManifestHeader)>> {
        self.known.binned().await
    }

    /// Restores a snapshot from the recycle bin: `completed`, with its
    /// bytes, as it was deleted.
    pub async fn restore_binned(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        self.known.restore_binned(id).await?;
        info!(snapshot = %id, "snapshot restored from the recycle bin");
        self.get(id).await
    }

    /// Changed blocks between two snapshots of any volumes, by content.
    pub async fn diff(
        &self,
        from: Option<&SnapshotId>,
        to: &SnapshotId,
    ) -> Result<snapshot::diff::Diff> {
        self.known.diff(from, to).await
    }

    pub async fn verify(&self, id: &SnapshotId) -> Result<snapshot::verify::VerifyReport> {
        self.known.verify(id).await
    }

    pub async fn gc(&self, grace: Option<Duration>) -> Result<(Duration, snapshot::gc::GcReport)> {
        self.known.gc(grace).await
    }

    /// A completed snapshot's manifest.
    pub async fn manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        self.known.manifest(id).await
    }

    /// A completed snapshot's header (its manifest's root alone).
    pub async fn header(&self, id: &SnapshotId) -> Result<ManifestHeader> {
        Ok(self.known.reader(id).await?.header().clone())
    }

    /// A completed snapshot's manifest, read lazily (pages on demand).
    pub async fn reader(&self, id: &SnapshotId) -> Result<ManifestReader> {
        self.known.reader(id).await
    }

    /// When snapshot `id` was exported by `vol snapshot attach`, if it is.
    pub fn attached_at(&self, id: &SnapshotId) -> Option<u64> {
        self.exports.attached_at(id)
    }

    /// Exports snapshot `id` read-only over NBD under its id, on this host,
    /// until [`Snapshots::detach`]; it survives restarts.
    pub async fn attach(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        let m = self.exportable_manifest(id).await?;
        self.exports.attach(m).await?;
        self.get(id).await
    }

    pub async fn detach(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        let header = self.exports.detach(id).await?;
        match self.get(id).await {
            // Deleted by another host while exported here: what was served.
            Err(Error::SnapshotNotFound(_)) => Ok(SnapshotInfo::Stored(header)),
            other => other,
        }
    }

    /// Exports snapshot `id` over NBD for as long as the lease lives, for
    /// the daemon's own readers (image export).
    pub async fn lease(&self, id: &SnapshotId) -> Result<SnapshotExportLease> {
        let m = self.exportable_manifest(id).await?;
        self.exports.lease(m).await
    }

    async fn exportable_manifest(&self, id: &SnapshotId) -> Result<Arc<ManifestReader>> {
        if self.jobs.is_running(id) {
            return Err(Error::SnapshotBusy(id.clone()));
        }
        Ok(Arc::new(self.known.reader(id).await?))
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
        let m = match self.known.reader(&from).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(snapshot = %image.id, from = %from, error = %volumed_api::error_chain(&e), "no dirty bitmap");
                return None;
            }
        };
        match image.changed_from(&m).await {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::debug!(snapshot = %image.id, from = %from, error = %volumed_api::error_chain(&e), "no dirty bitmap");
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
        match self.known.list(Some(&h.volume)).await {
            Ok(list) => list
                .iter()
                .filter(|s| s.completed() && s.chunk_size() == h.chunk_size && *s.id() != h.id)
                .map(|s| s.id().to_string())
                .collect(),
            Err(e) => {
                tracing::debug!(snapshot = %h.id, error = %volumed_api::error_chain(&e), "cannot list dirty bitmaps");
                Vec::new()
            }
        }
    }
}
