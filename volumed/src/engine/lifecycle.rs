//! The lifecycle rules of volumes: create, attach, detach, modify, tag,
//! delete, and what an import job may do to the volumes it fills (create
//! them `importing`, grow them, make them available, remove them). Each
//! change is checked under the registry's lifecycle lock and written
//! through the volume's one record writer, `Volume::update_record`.
//!
//! Crash safety: create writes data files before the record; delete marks
//! the record, moves the files into the trash, then removes the record.
//! `recovery` finishes or undoes whatever a crash interrupted. File
//! creation and removal run on the blocking pool, never on a runtime
//! worker; the trash is emptied outside the lock.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use snapshot::cache::Fetcher;
use snapshot::{ChunkGeometry, Repo};
use tracing::{info, warn};
use volumed_api::{
    AttachVolume, CreateVolume, DEFAULT_CHUNK_SIZE, ModifyVolume, VolumeName, format_size,
    validate_tags,
};

use super::dirs::VolumeDirs;
use super::encryption::Sealing;
use super::error::{Error, IoContext, Result, blocking};
use super::jobs::hydrate::Hydrator;
use super::registry::Registry;
use super::volume_id::{VolumeOptions, derived_volume_id, retag};
use super::{Volume, recovery, restore, validate};
use crate::catalog::{AttachmentRecord, Catalog, JobId, VolumeRecord, unix_now};
use crate::disk::{DataFile, IoEngine, SectorCipher};
use crate::failpoint;

pub struct Lifecycle {
    pub(super) catalog: Arc<Catalog>,
    pub(super) dirs: VolumeDirs,
    pub(super) registry: Arc<Registry>,
    pub(super) io: Arc<IoEngine>,
    pub(super) repo: Repo,
    /// Restored volumes' chunks, through the host's cache.
    pub(super) fetcher: Arc<Fetcher>,
    /// Names this host's holds in the store.
    pub(super) host_id: String,
    pub(super) hydrator: Arc<Hydrator>,
    /// What encryption a new volume gets.
    pub(super) sealing: Arc<Sealing>,
}

/// A volume being imported takes no lifecycle change but the import's own.
pub(super) fn not_importing(vol: &Volume) -> Result<()> {
    match vol.record().importing {
        Some(job) => Err(Error::VolumeImporting(vol.name.clone(), job)),
        None => Ok(()),
    }
}

impl Lifecycle {
    /// The volumes' part of shutdown: ends every session after its
    /// in-flight requests (the attachments stay recorded), makes all data
    /// durable, saves each volume's dirty set, and records a clean shutdown.
    pub(super) async fn shutdown(&self) -> Result<()> {
        let _guard = self.registry.lock().await;
        for vol in self.registry.list() {
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
            let v = Arc::clone(&vol);
            blocking(
                || format!("save the dirty set of volume '{}'", vol.name),
                move || {
                    let path = v.data().dir().join(recovery::DIRTY_FILE);
                    v.map().save_dirty(&path)
                },
            )
            .await?;
        }
        self.catalog.mark_clean_shutdown().await?;
        Ok(())
    }

    pub fn get(&self, name: &VolumeName) -> Result<Arc<Volume>> {
        self.registry.get(name)
    }

    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.registry.list()
    }

    /// A volume's EC2-style id.
    pub fn volume_id(&self, rec: &VolumeRecord) -> String {
        rec.volume_id
            .clone()
            .unwrap_or_else(|| derived_volume_id(&self.host_id, rec.id))
    }

    /// The volume with this EC2-style id.
    pub fn find_volume_id(&self, volume_id: &str) -> Option<Arc<Volume>> {
        self.list()
            .into_iter()
            .find(|v| self.volume_id(&v.record()) == volume_id)
    }

    /// Creates a volume, recorded `importing` for job `importing` when one
    /// is named: then it is never `available` half filled.
    pub async fn create(
        &self,
        req: CreateVolume,
        opts: VolumeOptions,
        importing: Option<JobId>,
    ) -> Result<Arc<Volume>> {
        opts.validate()?;
        let source = match &req.from_snapshot {
            Some(raw) => {
                let id = Error::snapshot_id(raw)?;
                Some(restore::source_manifest(&self.repo, &id).await?)
            }
            None => None,
        };
        let encryption = self
            .sealing
            .volume_encryption(req.encrypted, req.key.as_deref(), source.as_deref())
            .await?;
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
        rec.volume_id = Some(opts.volume_id_for(rec.name.as_str()));
        rec.tags = opts.tags;
        // Scratch data on an encrypted host is shredded with the key when
        // the daemon ends; a restored volume is not (its bytes must equal
        // its snapshot's across a restart).
        rec.memory_key = rec.ephemeral && encryption.is_some() && source.is_none();
        rec.encryption = encryption;
        let dir = self.dirs.volume(id);
        let data = {
            let (d, io) = (dir.clone(), Arc::clone(&self.io));
            let memory_key = rec.memory_key;
            blocking(
                || format!("create data files in {}", dir.display()),
                move || {
                    let f = DataFile::create(&d, size, io)?;
                    Ok(if memory_key {
                        f.with_cipher(SectorCipher::random())
                    } else {
                        f
                    })
                },
            )
            .await?
        };
        let base = match &source {
            Some(m) => {
                let hold = restore::hold_name(&self.host_id, id);
                match restore::prepare_base(&self.repo, &self.fetcher, &hold, &dir, m).await {
                    Ok(b) => Some(b),
                    Err(e) => {
                        remove_dir(dir).await;
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        failpoint::hit("create-after-files");
        if let Err(e) = self.catalog.create_volume(&rec).await {
            remove_dir(dir).await;
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
        if let Some(i) = &req.instance {
            validate::instance(i)?;
        }
        let _guard = self.registry.lock().await;
        let mut vol = self.get(name)?;
        not_importing(&vol)?;
        if vol.record().attachment.is_none() && vol.failure().is_some() {
            // Left failed by a detach whose reopen failed: try again.
            let rec = vol.record();
            vol = self.reopen(&vol, &rec).await?;
        }
        let id = self.catalog.next_id()?;
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
                    id: Some(id),
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
        let guard = self.registry.lock().await;
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
            let trashed = self.delete_locked(&vol).await?;
            drop(guard);
            empty(trashed).await;
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
            match self.reopen(&vol, &vol.record()).await {
                Ok(v) => return Ok((v, false)),
                Err(e) => {
                    warn!(volume = %name, error = %volumed_api::error_chain(&e), "could not reopen the failed volume");
                }
            }
        }
        Ok((vol, false))
    }

    /// Replaces a failed, detached volume with one opened afresh from its
    /// files, as after an unclean stop: the map rebuilt from the files'
    /// allocation, a base reopened from its log, every chunk dirty (nothing
    /// proves what the failure lost). The old one keeps refusing requests.
    async fn reopen(&self, old: &Arc<Volume>, rec: &VolumeRecord) -> Result<Arc<Volume>> {
        let dir = self.dirs.volume(rec.id);
        // Opening reads the files' allocation: off the runtime's workers.
        let (r, d, io, f) = (
            rec.clone(),
            dir.clone(),
            Arc::clone(&self.io),
            Arc::clone(&self.fetcher),
        );
        let vol = blocking(
            || format!("reopen volume '{}' from {}", rec.name, dir.display()),
            move || recovery::open_volume(&r, &d, &io, &f, false),
        )
        .await?;
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
                let v = Arc::clone(&vol);
                blocking(|| format!("grow volume '{name}'"), move || v.grow(size)).await?;
            }
        }
        vol.update_record(&self.catalog, |rec| {
            if let Some(size) = req.size {
                rec.size = rec.size.max(size);
            }
            if let Some(e) = req.ephemeral {
                if rec.memory_key && !e {
                    return Err(Error::InvalidRequest(format!(
                        "volume '{name}' keeps its data under a key held only in memory, lost when volumed stops; it stays ephemeral"
                    )));
                }
                rec.ephemeral = e;
            }
            Ok(())
        })
        .await?;
        info!(volume = %name, size = vol.size(), "volume modified");
        Ok(vol)
    }

    /// Sets the tags in `set` and removes the keys in `remove` (see
    /// `retag`). Checks the result before changing anything.
    pub async fn tag(
        &self,
        name: &VolumeName,
        set: &BTreeMap<String, String>,
        remove: &[(String, Option<String>)],
    ) -> Result<Arc<Volume>> {
        validate_tags(set).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let _guard = self.registry.lock().await;
        let vol = self.get(name)?;
        vol.update_record(&self.catalog, |rec| {
            rec.tags = retag(&rec.tags, set, remove)?;
            Ok(())
        })
        .await?;
        info!(volume = %name, "volume tags changed");
        Ok(vol)
    }

    pub async fn delete(&self, name: &VolumeName) -> Result<()> {
        let trashed = {
            let _guard = self.registry.lock().await;
            let vol = self.get(name)?;
            not_importing(&vol)?;
            if vol.record().attachment.is_some() {
                return Err(Error::VolumeAttached(name.clone()));
            }
            self.delete_locked(&vol).await?
        };
        empty(trashed).await;
        info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// Deletes `vol` under the lifecycle lock; returns where its files went
    /// in the trash, for the caller to empty once the lock is released.
    /// Its hydration stops; a snapshot job of it runs on to completion from
    /// the open files (as EBS completes the snapshot of a deleted volume),
    /// but the record is no longer its volume's to write, so the job leaves
    /// it alone.
    async fn delete_locked(&self, vol: &Arc<Volume>) -> Result<Option<PathBuf>> {
        self.hydrator.stop(vol);
        vol.update_record(&self.catalog, |r| {
            r.deleting = true;
            Ok(())
        })
        .await?;
        let rec = vol.record();
        failpoint::hit("delete-after-mark");
        self.registry.remove(vol);
        let trashed = discard(&self.catalog, &self.dirs, &rec).await?;
        if rec.source_snapshot.is_some() && !rec.hydrated {
            // Best effort: a hold left behind is released at the next start.
            let name = restore::hold_name(&self.host_id, rec.id);
            if let Err(e) = self.repo.release_hold(&name).await {
                warn!(volume = %rec.name, hold = %name, error = %volumed_api::error_chain(&e), "could not release the store hold");
            }
        }
        Ok(trashed)
    }

    /// Creates a volume job `job` fills: see [`Lifecycle::create`].
    pub async fn create_importing(&self, req: CreateVolume, job: &JobId) -> Result<Arc<Volume>> {
        self.create(req, VolumeOptions::default(), Some(job.clone()))
            .await
    }

    /// Grows `vol`, which job `job` fills from a stream, to `size`, its
    /// files first extended to `reserve` when that is larger than they are
    /// (see `DataFile::reserve`). The record takes the size when the import
    /// ends.
    pub async fn grow_importing(
        &self,
        vol: &Arc<Volume>,
        job: &JobId,
        size: u64,
        reserve: Option<u64>,
    ) -> Result<()> {
        if vol.record().importing.as_ref() != Some(job) {
            return Err(Error::InvalidRequest(format!(
                "volume '{}' is not being imported by {job}",
                vol.name
            )));
        }
        let v = Arc::clone(vol);
        blocking(
            || format!("grow volume '{}'", vol.name),
            move || {
                if let Some(r) = reserve {
                    v.reserve(r)?;
                }
                if size > v.size() {
                    v.grow(size)
                } else {
                    Ok(())
                }
            },
        )
        .await
    }

    /// Makes the volumes job `job` filled (and flushed) available, at their
    /// final size.
    pub async fn finish_import(&self, job: &JobId, vols: &[Arc<Volume>]) -> Result<()> {
        let _guard = self.registry.lock().await;
        for v in vols {
            v.update_record(&self.catalog, |rec| {
                if rec.importing.as_ref() != Some(job) {
                    return Err(Error::InvalidRequest(format!(
                        "volume '{}' is not being imported by {job}",
                        rec.name
                    )));
                }
                rec.importing = None;
                rec.size = v.size();
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// Removes the volumes among `names` that job `job` still fills (a
    /// failed, cancelled or rolled-back import); a volume that changed
    /// hands since is left alone. Failures are logged: start-up finishes
    /// what was marked.
    pub async fn remove_importing(&self, job: &JobId, names: &[VolumeName]) {
        let mut trashed = Vec::new();
        {
            let _guard = self.registry.lock().await;
            for name in names {
                let Ok(vol) = self.get(name) else {
                    continue;
                };
                // Only a volume this job still fills: marked `deleting`
                // through its owner, which refuses if it changed hands.
                let marked = vol
                    .update_record(&self.catalog, |r| {
                        if r.importing.as_ref() != Some(job) {
                            return Ok(false);
                        }
                        r.deleting = true;
                        Ok(true)
                    })
                    .await;
                match marked {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        warn!(volume = %name, error = %volumed_api::error_chain(&e), "could not mark the imported volume deleted");
                        continue;
                    }
                }
                self.hydrator.stop(&vol);
                self.registry.remove(&vol);
                match discard(&self.catalog, &self.dirs, &vol.record()).await {
                    Ok(t) => trashed.push(t),
                    Err(e) => {
                        warn!(volume = %name, error = %volumed_api::error_chain(&e), "could not remove the imported volume; start-up finishes it");
                    }
                }
            }
        }
        for t in trashed {
            empty(t).await;
        }
    }
}

/// The second half of a delete, its record already marked `deleting`: the
/// files go into the trash, then the record goes. Returns the trash entry.
pub(super) async fn discard(
    catalog: &Catalog,
    dirs: &VolumeDirs,
    rec: &VolumeRecord,
) -> Result<Option<PathBuf>> {
    let (d, id) = (dirs.clone(), rec.id);
    let trashed = blocking(
        || format!("remove {}", dirs.volume(id).display()),
        move || d.discard(id),
    )
    .await?;
    failpoint::hit("delete-after-files");
    catalog.remove_volume(rec).await?;
    Ok(trashed)
}

/// Removes a trash entry, off the runtime.
async fn empty(trashed: Option<PathBuf>) {
    if let Some(path) = trashed {
        let _ = tokio::task::spawn_blocking(move || VolumeDirs::remove_discarded(&path)).await;
    }
}

/// Removes the directory of a volume whose creation failed.
async fn remove_dir(dir: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
}
