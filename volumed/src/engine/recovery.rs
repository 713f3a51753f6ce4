//! Everything opening the engine does after a run that may have crashed:
//! finish deletes that were marked, rebuild each volume's chunk map from its
//! data files, reopen restored volumes' bases, remove data directories no
//! record names, and empty the trash. Blocking: it runs before the engine
//! serves anything, off the runtime's workers.
//!
//! Crash safety of the lifecycle, step by step (the other half is in
//! `engine/mod.rs`):
//! - create: data files first, then the catalog record. A crash in between
//!   leaves a data directory no record names; [`remove_orphans`] removes it.
//! - delete (and an ephemeral volume's detach): the record is marked
//!   `deleting` first, then the files go (into the trash), then the record.
//!   Opening finishes any delete it finds marked, and empties the trash.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use snapshot::ChunkGeometry;
use snapshot::cache::Fetcher;
use tracing::{info, warn};

use super::Volume;
use super::base::{self, BaseImage, DetachLog};
use super::chunk_map::ChunkMap;
use super::dirs::VolumeDirs;
use super::error::{Error, IoContext, Result};
use crate::catalog::{Catalog, VolumeRecord};
use crate::disk::{DataFile, IoEngine, SectorCipher, sync_dir};

/// Where a volume's dirty set is saved at a clean shutdown.
pub const DIRTY_FILE: &str = "dirty";

/// Opening, off the runtime's workers: marks this run in the catalog
/// (whether the last one was clean), reads the host id, makes the volume
/// directories and opens every volume the catalog records.
pub(super) async fn open(
    catalog: &Arc<Catalog>,
    data_dir: &Path,
    io: &Arc<IoEngine>,
    fetcher: &Arc<Fetcher>,
) -> Result<(bool, String, VolumeDirs, Vec<Arc<Volume>>)> {
    let (c, d, i, f) = (
        Arc::clone(catalog),
        data_dir.to_owned(),
        Arc::clone(io),
        Arc::clone(fetcher),
    );
    tokio::task::spawn_blocking(move || -> Result<_> {
        let clean = c.begin_run()?;
        let host_id = c.host_id()?;
        let dirs = VolumeDirs::create(&d)
            .ctx(|| format!("create the volume directories in {}", d.display()))?;
        let vols = open_volumes(&c, &dirs, &i, &f, clean)?;
        Ok((clean, host_id, dirs, vols))
    })
    .await
    .map_err(|e| Error::io("open the volumes", std::io::Error::other(e.to_string())))?
}

/// Reopens every volume the catalog records. A volume whose files cannot be
/// opened is reported and left out, so the others still come up.
pub fn open_volumes(
    catalog: &Catalog,
    dirs: &VolumeDirs,
    io: &Arc<IoEngine>,
    fetcher: &Arc<Fetcher>,
    clean: bool,
) -> Result<Vec<Arc<Volume>>> {
    let mut live = HashSet::new();
    let mut out = Vec::new();
    for rec in catalog.volumes()? {
        if rec.deleting {
            info!(volume = %rec.name, "finishing a delete interrupted by a crash");
            let trashed = dirs
                .discard(rec.id)
                .ctx(|| format!("finish the interrupted delete of volume '{}'", rec.name))?;
            catalog.remove_volume(&rec).wait()?;
            if let Some(t) = trashed {
                VolumeDirs::remove_discarded(&t);
            }
            // A hold it left in the store is released by the hydrator's
            // sweep of stale holds.
            continue;
        }
        // Counted live even if it fails to open: its files must never be
        // taken for orphans.
        live.insert(rec.id);
        let dir = dirs.volume(rec.id);
        match open_volume(&rec, &dir, io, fetcher, clean) {
            Ok(vol) => out.push(vol),
            Err(e) => {
                tracing::error!(volume = %rec.name, dir = %dir.display(), error = %e,
                    "cannot open volume data files; volume left out");
            }
        }
    }
    remove_orphans(dirs, &live).ctx(|| "remove orphaned data files".into())?;
    dirs.empty_trash()
        .ctx(|| "empty the trash of deleted volumes".into())?;
    Ok(out)
}

pub(super) fn open_volume(
    rec: &VolumeRecord,
    dir: &Path,
    io: &Arc<IoEngine>,
    fetcher: &Arc<Fetcher>,
    clean: bool,
) -> std::io::Result<Arc<Volume>> {
    let geometry = ChunkGeometry::new(rec.size, rec.chunk_size)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut data = DataFile::open(dir, rec.size, Arc::clone(io))?;
    if rec.memory_key {
        data = shred(rec, data)?;
    }
    super::freeze::remove_spill(dir)?;
    let map = rebuild_map(rec, geometry, &data, clean)?;
    let base = open_base(rec, geometry, &map, &data, fetcher)?;
    let attached = rec.attachment.is_some();
    let source_is_parent =
        rec.source_snapshot.is_some() && rec.source_snapshot == rec.last_snapshot;
    let vol = Volume::new(rec.clone(), geometry, data, map, base);
    if source_is_parent && let Some(b) = vol.base() {
        vol.set_parent_manifest(Arc::clone(&b.manifest));
    }
    if attached {
        // Exported again so hypervisors can reconnect.
        vol.open_export();
    }
    Ok(vol)
}

/// The chunk map from the data files' allocation, which is exactly what
/// the last sync made durable; the dirty set from the clean shutdown's
/// save, or every `Local` chunk when that cannot be trusted.
/// A volume whose key died with the last run (`memory_key`): what its
/// files hold is unreadable, so they are punched empty, and the dirty set
/// goes, so the next snapshot reads every chunk (now zeros) instead of
/// taking the parent's. New bytes get a new key.
fn shred(rec: &VolumeRecord, data: DataFile) -> std::io::Result<DataFile> {
    warn!(volume = %rec.name,
        "ephemeral volume's data was encrypted under a key held only in memory by the last run; it now reads as zeros");
    data.punch_blocking(0, rec.size)?;
    data.sync_blocking()?;
    match std::fs::remove_file(data.dir().join(DIRTY_FILE)) {
        Ok(()) => sync_dir(data.dir())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(data.with_cipher(SectorCipher::random()))
}

fn rebuild_map(
    rec: &VolumeRecord,
    geometry: ChunkGeometry,
    data: &DataFile,
    clean: bool,
) -> std::io::Result<ChunkMap> {
    let map = ChunkMap::new(geometry);
    map.load_allocation(&data.allocated_ranges()?);
    let dirty_path = data.dir().join(DIRTY_FILE);
    let loaded = if clean {
        map.load_dirty(&dirty_path)
    } else {
        Err(std::io::ErrorKind::NotFound.into())
    };
    // Used once: a set left from an older clean shutdown must never be
    // read after a later unclean one.
    match std::fs::remove_file(&dirty_path) {
        Ok(()) => sync_dir(data.dir())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Err(e) = loaded {
        if clean && e.kind() != std::io::ErrorKind::NotFound {
            warn!(volume = %rec.name, error = %e, "dirty set unreadable");
        }
        // Nothing proves which chunks changed: the next snapshot reads
        // every chunk (for a volume never snapshotted, that is the same).
        map.mark_all_dirty();
    }
    info!(volume = %rec.name, local_chunks = map.local_chunks(), dirty_chunks = map.dirty_chunks().len(),
          all_dirty = map.all_dirty(), "volume opened");
    Ok(map)
}

/// A restored volume's base: its snapshot's manifest (kept beside the
/// data files) and the log of chunks that left it. Chunks neither logged
/// nor beyond the volume are `Base`; bytes the data file holds for them
/// came from a fetch that never became durable, and are punched away.
fn open_base(
    rec: &VolumeRecord,
    geometry: ChunkGeometry,
    map: &ChunkMap,
    data: &DataFile,
    fetcher: &Arc<Fetcher>,
) -> std::io::Result<Option<Arc<BaseImage>>> {
    if rec.source_snapshot.is_none() || rec.hydrated {
        return Ok(None);
    }
    let dir = data.dir();
    let path = dir.join(base::MANIFEST_FILE);
    let bytes = std::fs::read(&path)?;
    let stored = snapshot::StoredManifest::decode(&bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    let manifest = snapshot::ManifestReader::new(fetcher.repo().clone(), stored);
    let (log, detached) = DetachLog::open(&dir.join(base::DETACHED_FILE))?;
    for r in manifest.maybe_data() {
        map.set_base_range(r.start..r.end.min(geometry.count()));
    }
    // Chunks that left the base are whatever the data file says.
    for &c in &detached {
        if geometry.contains(c) && map.state(c) == super::chunk_map::ChunkState::Base {
            map.unbase_at_open(c);
        }
    }
    let mut stray = 0u64;
    for i in map.base_and_local() {
        map.set_base(i);
        let r = geometry.range(i);
        data.punch_blocking(r.start, r.end - r.start)?;
        stray += 1;
    }
    if stray > 0 {
        data.sync_blocking()?;
        warn!(volume = %rec.name, chunks = stray, "dropped fetched chunks that were never made durable");
    }
    info!(volume = %rec.name, snapshot = %manifest.header().id, base_chunks = map.base_chunks(), "restored volume opened");
    Ok(Some(Arc::new(BaseImage::new(
        Arc::new(manifest),
        Arc::clone(fetcher),
        log,
    )?)))
}

/// Removes data directories no catalog record names: left by a crash
/// between creating the files and recording the volume.
fn remove_orphans(dirs: &VolumeDirs, live: &HashSet<u64>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dirs.root())? {
        let entry = entry?;
        let name = entry.file_name();
        let id = name.to_str().and_then(VolumeDirs::parse_id);
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
    sync_dir(dirs.root())
}
