//! The volume engine: owns every volume of the host, applies the lifecycle
//! rules (create, attach, detach, modify, delete), and recovers after a crash.
//!
//! Lifecycle changes are serialized by one async mutex: they are rare, and
//! each must see the state the previous one left in the catalog. The data
//! path never takes that mutex.
//!
//! Crash safety of the lifecycle, step by step:
//! - create: data files first, then the catalog record. A crash in between
//!   leaves a data directory no record names; start-up removes it.
//! - delete (and an ephemeral volume's detach): the record is marked
//!   `deleting` first, then the files go, then the record. Start-up finishes
//!   any delete it finds marked.

pub mod base;
pub mod chunk_map;
mod hydrate;
mod snapshots;
mod volume;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::sync::Mutex;
use tracing::{info, warn};
use volumed_api::{
    AttachVolume, CreateVolume, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MAX_INSTANCE_LEN,
    MAX_VOLUME_SIZE, MIN_CHUNK_SIZE, ModifyVolume, SIZE_ALIGNMENT, VolumeName, VolumeState,
    format_size,
};

pub use volume::{Export, Extent, ReadPiece, Volume};

use crate::catalog::{AttachmentRecord, Catalog, VolumeRecord, unix_now};
use crate::disk::{DataFile, IoEngine, sync_dir};
use crate::error::{Error, IoContext, Result};
use crate::failpoint;
use chunk_map::ChunkMap;

/// Where clients reach the exports, for the URIs the API reports.
#[derive(Debug, Clone)]
pub struct NbdEndpoints {
    pub tcp: SocketAddr,
    pub unix: PathBuf,
    /// TLS is required on TCP, so its URI is `nbds://`.
    pub tls: bool,
}

pub struct Engine {
    catalog: Catalog,
    volumes_dir: PathBuf,
    endpoints: NbdEndpoints,
    volumes: RwLock<HashMap<VolumeName, Arc<Volume>>>,
    lifecycle: Mutex<()>,
    io: Arc<IoEngine>,
    repo: snapshot::Repo,
    /// Snapshots in progress: id -> (volume, progress). One per volume.
    snapshot_jobs: std::sync::Mutex<HashMap<String, (VolumeName, Arc<snapshots::Progress>)>>,
    snapshot_tasks: tokio_util::task::TaskTracker,
    /// Fired at shutdown: snapshot jobs stop and end `error`.
    snapshot_cancel: tokio_util::sync::CancellationToken,
    /// Restored volumes' chunks, through the host's cache.
    fetcher: Arc<snapshot::cache::Fetcher>,
    /// Names this host's holds in the store.
    host_id: String,
    /// Background hydration: a token per volume id, children of
    /// `background_cancel`, which shutdown fires.
    hydrations: std::sync::Mutex<HashMap<u64, tokio_util::sync::CancellationToken>>,
    background: tokio_util::task::TaskTracker,
    background_cancel: tokio_util::sync::CancellationToken,
    /// Headers of manifests read from the store: they never change.
    headers: std::sync::Mutex<HashMap<String, snapshot::ManifestHeader>>,
}

/// Where a volume's dirty set is saved at a clean shutdown.
const DIRTY_FILE: &str = "dirty";

impl Engine {
    /// Opens the catalog under `data_dir`, finishes interrupted deletes,
    /// removes orphaned data files, and reopens every volume; attached ones
    /// are exported again so hypervisors can reconnect.
    pub fn open(
        data_dir: &Path,
        endpoints: NbdEndpoints,
        io: Arc<IoEngine>,
        repo: snapshot::Repo,
        fetcher: Arc<snapshot::cache::Fetcher>,
    ) -> anyhow::Result<(Self, bool)> {
        use anyhow::Context;
        let catalog = Catalog::open(&data_dir.join("catalog")).context("open catalog")?;
        let clean = catalog.begin_run().context("record start")?;
        let host_id = catalog.host_id().context("read host id")?;
        let volumes_dir = data_dir.join("volumes");
        std::fs::create_dir_all(&volumes_dir)
            .with_context(|| format!("create {}", volumes_dir.display()))?;

        let engine = Engine {
            catalog,
            volumes_dir,
            endpoints,
            volumes: RwLock::new(HashMap::new()),
            lifecycle: Mutex::new(()),
            io,
            repo,
            snapshot_jobs: std::sync::Mutex::new(HashMap::new()),
            snapshot_tasks: tokio_util::task::TaskTracker::new(),
            snapshot_cancel: tokio_util::sync::CancellationToken::new(),
            fetcher,
            host_id,
            hydrations: std::sync::Mutex::new(HashMap::new()),
            background: tokio_util::task::TaskTracker::new(),
            background_cancel: tokio_util::sync::CancellationToken::new(),
            headers: std::sync::Mutex::new(HashMap::new()),
        };
        let mut live_ids = Vec::new();
        for rec in engine.catalog.volumes().context("load volumes")? {
            if rec.deleting {
                info!(volume = %rec.name, "finishing a delete interrupted by a crash");
                engine
                    .remove_files_and_record(&rec)
                    .context("finish interrupted delete")?;
                continue;
            }
            let dir = engine.volume_dir(rec.id);
            // Counted live even if it fails to open: its files must never be
            // taken for orphans.
            live_ids.push(rec.id);
            // A volume whose files are gone is reported and left out; the
            // other volumes of the host still come up.
            let opened = DataFile::open(&dir, rec.size, Arc::clone(&engine.io))
                .and_then(|data| Ok((engine.rebuild_map(&rec, &data, clean)?, data)))
                .and_then(|(map, data)| {
                    let base = engine.open_base(&rec, &map, &data)?;
                    Ok((map, data, base))
                });
            let (map, data, base) = match opened {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(volume = %rec.name, dir = %dir.display(), error = %e,
                        "cannot open volume data files; volume left out");
                    continue;
                }
            };
            let attached = rec.attachment.is_some();
            let source_is_parent =
                rec.source_snapshot.is_some() && rec.source_snapshot == rec.last_snapshot;
            let vol = Volume::new(rec, data, map, base);
            if source_is_parent && let Some(b) = vol.base() {
                vol.set_parent_manifest(Arc::clone(&b.manifest));
            }
            if attached {
                vol.open_export();
            }
            engine
                .volumes
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(vol.name.clone(), vol);
        }
        engine
            .remove_orphans(&live_ids)
            .context("remove orphaned data files")?;
        Ok((engine, clean))
    }

    /// The chunk map from the data files' allocation, which is exactly what
    /// the last sync made durable; the dirty set from the clean shutdown's
    /// save, or every `Local` chunk when that cannot be trusted.
    fn rebuild_map(
        &self,
        rec: &VolumeRecord,
        data: &DataFile,
        clean: bool,
    ) -> std::io::Result<ChunkMap> {
        let map = ChunkMap::new(rec.size, rec.chunk_size);
        map.load_allocation(&data.allocated_ranges()?);
        let dirty_path = data.dir().join(DIRTY_FILE);
        let loaded = if clean {
            map.load_dirty(&dirty_path)
        } else {
            Err(std::io::ErrorKind::NotFound.into())
        };
        if let Err(e) = loaded {
            if clean && e.kind() != std::io::ErrorKind::NotFound {
                warn!(volume = %rec.name, error = %e, "dirty set unreadable");
            }
            // Nothing proves which chunks changed: the next snapshot reads
            // every chunk (for a volume never snapshotted, that is the same).
            map.mark_all_dirty();
        }
        info!(volume = %rec.name, local_chunks = map.local_chunks(), dirty_chunks = map.dirty_chunks().len(), all_dirty = map.all_dirty(),
              "volume opened");
        Ok(map)
    }

    /// A restored volume's base: its snapshot's manifest (kept beside the
    /// data files) and the log of chunks that left it. Chunks neither logged
    /// nor beyond the volume are `Base`; bytes the data file holds for them
    /// came from a fetch that never became durable, and are punched away.
    fn open_base(
        &self,
        rec: &VolumeRecord,
        map: &ChunkMap,
        data: &DataFile,
    ) -> std::io::Result<Option<Arc<base::BaseImage>>> {
        if rec.source_snapshot.is_none() || rec.hydrated {
            return Ok(None);
        }
        let dir = data.dir();
        let bytes = std::fs::read(dir.join(base::MANIFEST_FILE))?;
        let manifest = snapshot::Manifest::decode(&bytes).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", dir.join(base::MANIFEST_FILE).display()),
            )
        })?;
        let (log, detached) = base::DetachLog::open(&dir.join(base::DETACHED_FILE))?;
        let chunks = rec.size.div_ceil(rec.chunk_size);
        let mut stray = 0u64;
        for (i, _) in manifest.hashed() {
            if *i < chunks && !detached.contains(i) && map.set_base(*i) {
                data.punch_blocking(
                    i * rec.chunk_size,
                    rec.chunk_size.min(rec.size - i * rec.chunk_size),
                )?;
                stray += 1;
            }
        }
        if stray > 0 {
            data.sync_blocking()?;
            warn!(volume = %rec.name, chunks = stray, "dropped fetched chunks that were never made durable");
        }
        info!(volume = %rec.name, snapshot = %manifest.header.id, base_chunks = map.base_chunks(), "restored volume opened");
        Ok(Some(Arc::new(base::BaseImage::new(
            Arc::new(manifest),
            Arc::clone(&self.fetcher),
            log,
        ))))
    }

    pub fn io_engine_name(&self) -> &'static str {
        self.io.name()
    }

    fn volume_dir(&self, id: u64) -> PathBuf {
        self.volumes_dir.join(format!("{id:016x}"))
    }

    /// Removes data directories no catalog record names: left by a crash
    /// between creating the files and recording the volume.
    fn remove_orphans(&self, live: &[u64]) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.volumes_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let id = name.to_str().and_then(|s| u64::from_str_radix(s, 16).ok());
            if id.is_some_and(|id| live.contains(&id)) {
                continue;
            }
            warn!(path = %entry.path().display(), "removing orphaned volume data");
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)?
            } else {
                std::fs::remove_file(&path)?
            }
        }
        sync_dir(&self.volumes_dir)
    }

    pub fn get(&self, name: &VolumeName) -> Result<Arc<Volume>> {
        self.volumes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Error::VolumeNotFound(name.clone()))
    }

    pub fn list(&self) -> Vec<Arc<Volume>> {
        let mut v: Vec<_> = self
            .volumes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The export of an attached volume, for the NBD server.
    pub fn export(&self, name: &str) -> Option<Export> {
        let name = VolumeName::parse(name).ok()?;
        self.get(&name).ok()?.export()
    }

    /// Names of the attached volumes, for NBD_OPT_LIST.
    pub fn export_names(&self) -> Vec<VolumeName> {
        self.list()
            .into_iter()
            .filter(|v| v.export().is_some())
            .map(|v| v.name.clone())
            .collect()
    }

    pub async fn create(self: &Arc<Self>, req: CreateVolume) -> Result<Arc<Volume>> {
        let source = match &req.from_snapshot {
            Some(id) => Some(self.source_manifest(id).await?),
            None => None,
        };
        let chunk_size = match (&source, req.chunk_size) {
            (Some(m), Some(c)) if c != m.header.chunk_size => {
                return Err(Error::InvalidSize(format!(
                    "snapshot {} has chunks of {}; a volume created from it has the same, not {}",
                    m.header.id,
                    format_size(m.header.chunk_size),
                    format_size(c)
                )));
            }
            (Some(m), _) => m.header.chunk_size,
            (None, c) => c.unwrap_or(DEFAULT_CHUNK_SIZE),
        };
        validate_chunk_size(chunk_size)?;
        let size = match (req.size, &source) {
            (Some(s), Some(m)) if s < m.header.size => {
                return Err(Error::InvalidSize(format!(
                    "size {} is smaller than snapshot {} ({})",
                    format_size(s),
                    m.header.id,
                    format_size(m.header.size)
                )));
            }
            (Some(s), _) => s,
            (None, Some(m)) => m.header.size,
            (None, None) => {
                return Err(Error::InvalidSize(
                    "size is required unless the volume is created from a snapshot".into(),
                ));
            }
        };
        validate_size(size)?;
        let _guard = self.lifecycle.lock().await;
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
            source.as_ref().map(|m| m.header.id.to_string()),
        );
        rec.last_snapshot = rec.source_snapshot.clone();
        rec.hydrate = source.is_some() && req.hydrate.unwrap_or(true);
        let dir = self.volume_dir(id);
        let data = DataFile::create(&dir, size, Arc::clone(&self.io))
            .ctx(|| format!("create data files in {}", dir.display()))?;
        // A restored volume's base goes beside its data files, and a hold
        // keeps the snapshot's chunks in the store until it is hydrated;
        // both before the record, so a crash leaves only an orphan.
        let base = match &source {
            Some(m) => match self.prepare_base(&rec, &dir, m).await {
                Ok(b) => Some(b),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            },
            None => None,
        };
        failpoint::hit("create-after-files");
        if let Err(e) = self.catalog.put_volume(&rec) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        info!(volume = %rec.name, size = rec.size, chunk_size, ephemeral = rec.ephemeral,
              source = ?rec.source_snapshot, "volume created");
        let map = ChunkMap::new(size, chunk_size);
        if let Some(m) = &source {
            for (i, _) in m.hashed() {
                map.set_base(*i);
            }
        }
        let hydrate = rec.hydrate;
        let vol = Volume::new(rec, data, map, base);
        if let Some(m) = source {
            vol.set_parent_manifest(m);
        }
        self.volumes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vol.name.clone(), Arc::clone(&vol));
        if hydrate {
            self.start_hydration(Arc::clone(&vol));
        } else if vol.base().is_some() {
            vol.set_hydration("off", None);
        }
        Ok(vol)
    }

    /// The manifest of the snapshot a volume is to be created from.
    async fn source_manifest(&self, id: &str) -> Result<Arc<snapshot::Manifest>> {
        let sid =
            snapshot::SnapshotId::parse(id).ok_or_else(|| Error::SnapshotNotFound(id.into()))?;
        match snapshots::with_retry("get manifest", || self.repo.get_manifest(&sid)).await {
            Ok(m) => Ok(Arc::new(m)),
            Err(snapshot::RepoError::MissingManifest(_)) => Err(Error::SnapshotNotFound(id.into())),
            Err(e) => Err(Error::Store(e.to_string())),
        }
    }

    fn hold_name(&self, volume_id: u64) -> String {
        format!("{}-{volume_id:016x}", self.host_id)
    }

    async fn prepare_base(
        &self,
        rec: &VolumeRecord,
        dir: &Path,
        m: &Arc<snapshot::Manifest>,
    ) -> Result<Arc<base::BaseImage>> {
        let path = dir.join(base::MANIFEST_FILE);
        let encoded = m.encode();
        (|| {
            use std::io::Write;
            let mut f = std::fs::File::create(&path)?;
            f.write_all(&encoded)?;
            f.sync_all()
        })()
        .ctx(|| format!("write {}", path.display()))?;
        let log = base::DetachLog::create(&dir.join(base::DETACHED_FILE))
            .ctx(|| format!("create the detach log in {}", dir.display()))?;
        sync_dir(dir).ctx(|| format!("sync {}", dir.display()))?;
        let hold = self.hold_name(rec.id);
        snapshots::with_retry("put hold", || self.repo.put_hold(&hold, m))
            .await
            .map_err(|e| Error::Store(format!("record a hold on snapshot {}: {e}", m.header.id)))?;
        Ok(Arc::new(base::BaseImage::new(
            Arc::clone(m),
            Arc::clone(&self.fetcher),
            log,
        )))
    }

    pub async fn attach(&self, name: &VolumeName, req: AttachVolume) -> Result<Arc<Volume>> {
        if let Some(i) = &req.instance
            && (i.is_empty() || i.len() > MAX_INSTANCE_LEN || i.chars().any(char::is_control))
        {
            return Err(Error::InvalidRequest(format!(
                "instance id must be 1 to {MAX_INSTANCE_LEN} printable characters"
            )));
        }
        let _guard = self.lifecycle.lock().await;
        let vol = self.get(name)?;
        let mut rec = vol.record();
        if let Some(att) = &rec.attachment {
            // Attaching again for the same instance is a no-op, so a
            // hypervisor retrying after a timeout gets the same answer.
            if att.instance == req.instance {
                return Ok(vol);
            }
            let holder = att.instance.clone().unwrap_or_else(|| "(none)".into());
            return Err(Error::AttachedElsewhere(name.clone(), holder));
        }
        rec.attachment = Some(AttachmentRecord {
            instance: req.instance,
            attached_at: unix_now(),
        });
        self.catalog.put_volume(&rec)?;
        vol.set_record(rec);
        vol.open_export();
        info!(volume = %name, "volume attached");
        Ok(vol)
    }

    /// Ends the export (disconnecting its clients after their in-flight
    /// requests), makes the data durable, and records the volume available.
    /// An ephemeral volume is deleted. Returns whether it was deleted.
    pub async fn detach(&self, name: &VolumeName) -> Result<(Arc<Volume>, bool)> {
        let _guard = self.lifecycle.lock().await;
        let vol = self.get(name)?;
        let mut rec = vol.record();
        if rec.attachment.is_none() {
            return Err(Error::VolumeNotAttached(name.clone()));
        }
        if let Some(export) = vol.take_export() {
            export.cancel.cancel();
            export.sessions.close();
            export.sessions.wait().await;
        }
        vol.flush().await.ctx(|| format!("flush volume '{name}'"))?;
        if rec.ephemeral {
            self.delete_locked(&vol).await?;
            info!(volume = %name, "ephemeral volume detached and deleted");
            return Ok((vol, true));
        }
        rec.attachment = None;
        self.catalog.put_volume(&rec)?;
        vol.set_record(rec);
        info!(volume = %name, "volume detached");
        Ok((vol, false))
    }

    pub async fn modify(&self, name: &VolumeName, req: ModifyVolume) -> Result<Arc<Volume>> {
        let _guard = self.lifecycle.lock().await;
        let vol = self.get(name)?;
        let mut rec = vol.record();
        if let Some(size) = req.size {
            validate_size(size)?;
            if size < rec.size {
                return Err(Error::InvalidSize(format!(
                    "volume '{name}' cannot shrink from {} to {}",
                    format_size(rec.size),
                    format_size(size)
                )));
            }
            if size > rec.size {
                // Files grow before the record does: a crash in between leaves
                // longer files than the record, which open() tolerates.
                vol.grow(size).ctx(|| format!("grow volume '{name}'"))?;
                rec.size = size;
            }
        }
        if let Some(e) = req.ephemeral {
            rec.ephemeral = e;
        }
        self.catalog.put_volume(&rec)?;
        vol.set_record(rec);
        info!(volume = %name, size = vol.size(), "volume modified");
        Ok(vol)
    }

    pub async fn delete(&self, name: &VolumeName) -> Result<()> {
        let _guard = self.lifecycle.lock().await;
        let vol = self.get(name)?;
        if vol.record().attachment.is_some() {
            return Err(Error::VolumeAttached(name.clone()));
        }
        self.delete_locked(&vol).await?;
        info!(volume = %name, "volume deleted");
        Ok(())
    }

    async fn delete_locked(&self, vol: &Arc<Volume>) -> Result<()> {
        self.stop_hydration(vol).await;
        let mut rec = vol.record();
        rec.deleting = true;
        self.catalog.put_volume(&rec)?;
        vol.set_record(rec.clone());
        failpoint::hit("delete-after-mark");
        self.volumes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vol.name);
        self.remove_files_and_record(&rec)?;
        if rec.source_snapshot.is_some() && !rec.hydrated {
            // Best effort: a hold left behind is released at the next start.
            let name = self.hold_name(rec.id);
            if let Err(e) = self.repo.release_hold(&name).await {
                warn!(volume = %rec.name, hold = %name, error = %e, "could not release the store hold");
            }
        }
        Ok(())
    }

    fn remove_files_and_record(&self, rec: &VolumeRecord) -> Result<()> {
        let dir = self.volume_dir(rec.id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("remove {}", dir.display()), e)),
        }
        failpoint::hit("delete-after-files");
        sync_dir(&self.volumes_dir).ctx(|| format!("sync {}", self.volumes_dir.display()))?;
        self.catalog.remove_volume(&rec.name)?;
        Ok(())
    }

    /// Shutdown: ends every session after its in-flight requests (the
    /// attachments stay recorded), makes all data durable, and records a
    /// clean shutdown.
    pub async fn shutdown(&self) -> Result<()> {
        // Snapshot jobs stop first: each puts its changes back into the dirty
        // set, which is saved below.
        self.snapshot_cancel.cancel();
        self.snapshot_tasks.close();
        self.snapshot_tasks.wait().await;
        self.background_cancel.cancel();
        self.background.close();
        self.background.wait().await;
        let _guard = self.lifecycle.lock().await;
        for vol in self.list() {
            if let Some(export) = vol.export() {
                export.cancel.cancel();
                export.sessions.close();
                export.sessions.wait().await;
            }
            vol.flush()
                .await
                .ctx(|| format!("flush volume '{}'", vol.name))?;
        }
        self.catalog.mark_clean_shutdown()?;
        Ok(())
    }

    /// The API's view of a volume.
    pub fn describe(&self, vol: &Volume) -> volumed_api::Volume {
        let rec = vol.record();
        let attached = rec.attachment.is_some();
        let (uri, unix_uri) = if attached {
            (
                Some(self.tcp_uri(&vol.name)),
                Some(self.unix_uri(&vol.name)),
            )
        } else {
            (None, None)
        };
        volumed_api::Volume {
            name: rec.name.clone(),
            size: rec.size,
            chunk_size: rec.chunk_size,
            ephemeral: rec.ephemeral,
            state: if attached {
                VolumeState::Attached
            } else {
                VolumeState::Available
            },
            uri,
            unix_uri,
            source_snapshot: rec.source_snapshot.clone(),
            instance: rec.attachment.as_ref().and_then(|a| a.instance.clone()),
            created_at: rfc3339(rec.created_at),
            attached_at: rec.attachment.as_ref().map(|a| rfc3339(a.attached_at)),
            allocated_bytes: vol.data().allocated_bytes(),
            hydration: self.hydration_of(vol),
        }
    }

    fn tcp_uri(&self, name: &VolumeName) -> String {
        // An IPv6 address in a URI goes in brackets; SocketAddr's Display
        // already does that.
        let scheme = if self.endpoints.tls { "nbds" } else { "nbd" };
        format!("{scheme}://{}/{}", self.endpoints.tcp, name)
    }

    fn unix_uri(&self, name: &VolumeName) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            name,
            self.endpoints.unix.display()
        )
    }
}

pub fn rfc3339(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn validate_size(size: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::InvalidSize("size must be greater than 0".into()));
    }
    if !size.is_multiple_of(SIZE_ALIGNMENT) {
        return Err(Error::InvalidSize(format!(
            "size {size} is not a multiple of {SIZE_ALIGNMENT} bytes"
        )));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(Error::InvalidSize(format!(
            "size {} exceeds the maximum volume size of {}",
            format_size(size),
            format_size(MAX_VOLUME_SIZE)
        )));
    }
    Ok(())
}

fn validate_chunk_size(c: u64) -> Result<()> {
    if !c.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c) {
        return Err(Error::InvalidSize(format!(
            "chunk size {c} must be a power of two from {} to {}",
            format_size(MIN_CHUNK_SIZE),
            format_size(MAX_CHUNK_SIZE)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints() -> NbdEndpoints {
        NbdEndpoints {
            tcp: "127.0.0.1:10809".parse().unwrap(),
            unix: "/tmp/nbd.sock".into(),
            tls: false,
        }
    }

    fn io() -> Arc<IoEngine> {
        Arc::new(IoEngine::new(crate::disk::EngineChoice::Auto).unwrap())
    }

    fn open(dir: &Path) -> (Arc<Engine>, bool) {
        let store = snapshot::store::LocalStore::open(&dir.join("store")).unwrap();
        let repo = snapshot::Repo::new(Arc::new(store), 3);
        let fetcher = Arc::new(snapshot::cache::Fetcher::new(repo.clone(), None));
        let (e, clean) = Engine::open(dir, endpoints(), io(), repo, fetcher).unwrap();
        (Arc::new(e), clean)
    }

    fn name(s: &str) -> VolumeName {
        VolumeName::parse(s).unwrap()
    }

    fn create_req(n: &str, size: u64, ephemeral: bool) -> CreateVolume {
        CreateVolume {
            name: name(n),
            size: Some(size),
            ephemeral,
            from_snapshot: None,
            chunk_size: None,
            hydrate: None,
        }
    }

    #[tokio::test]
    async fn lifecycle_rules() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = open(dir.path());
        e.create(create_req("a", 1 << 30, false)).await.unwrap();
        assert!(matches!(
            e.create(create_req("a", 1 << 30, false)).await,
            Err(Error::VolumeExists(_))
        ));
        assert!(matches!(
            e.create(create_req("b", 0, false)).await,
            Err(Error::InvalidSize(_))
        ));
        assert!(matches!(
            e.create(create_req("b", 1000, false)).await,
            Err(Error::InvalidSize(_))
        ));
        assert!(matches!(
            e.create(create_req("b", MAX_VOLUME_SIZE + 512, false))
                .await,
            Err(Error::InvalidSize(_))
        ));
        let mut bad_chunk = create_req("b", 1 << 20, false);
        bad_chunk.chunk_size = Some(3 << 16);
        assert!(matches!(
            e.create(bad_chunk).await,
            Err(Error::InvalidSize(_))
        ));

        e.attach(
            &name("a"),
            AttachVolume {
                instance: Some("i-1".into()),
            },
        )
        .await
        .unwrap();
        e.attach(
            &name("a"),
            AttachVolume {
                instance: Some("i-1".into()),
            },
        )
        .await
        .unwrap();
        assert!(matches!(
            e.attach(
                &name("a"),
                AttachVolume {
                    instance: Some("i-2".into())
                }
            )
            .await,
            Err(Error::AttachedElsewhere(..))
        ));
        assert!(matches!(
            e.delete(&name("a")).await,
            Err(Error::VolumeAttached(_))
        ));
        let shrink = ModifyVolume {
            size: Some(1 << 20),
            ephemeral: None,
        };
        assert!(matches!(
            e.modify(&name("a"), shrink).await,
            Err(Error::InvalidSize(_))
        ));
        let v = e.describe(&e.get(&name("a")).unwrap());
        assert_eq!(v.uri.as_deref(), Some("nbd://127.0.0.1:10809/a"));
        assert_eq!(
            v.unix_uri.as_deref(),
            Some("nbd+unix:///a?socket=/tmp/nbd.sock")
        );
        let (_, deleted) = e.detach(&name("a")).await.unwrap();
        assert!(!deleted);
        assert!(matches!(
            e.detach(&name("a")).await,
            Err(Error::VolumeNotAttached(_))
        ));
        e.delete(&name("a")).await.unwrap();
        assert!(e.list().is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("volumes"))
                .unwrap()
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn restart_finishes_interrupted_delete_and_removes_orphans() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (e, _) = open(dir.path());
            let v = e.create(create_req("gone", 1 << 20, true)).await.unwrap();
            e.create(create_req("kept", 1 << 20, false)).await.unwrap();
            // Simulate a crash right after the delete mark was written.
            let mut rec = v.record();
            rec.deleting = true;
            e.catalog.put_volume(&rec).unwrap();
            // And a crash between creating files and recording a volume.
            std::fs::create_dir(dir.path().join("volumes").join(format!("{:016x}", 999_999)))
                .unwrap();
        }
        let (e, clean) = open(dir.path());
        assert!(!clean);
        let names: Vec<_> = e.list().iter().map(|v| v.name.to_string()).collect();
        assert_eq!(names, ["kept"]);
        assert_eq!(
            std::fs::read_dir(dir.path().join("volumes"))
                .unwrap()
                .count(),
            1
        );
    }
}
