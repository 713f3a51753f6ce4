//! Setting up a volume created from a snapshot: its manifest is read from
//! the store, kept beside the data files with an empty detach log, and a
//! hold in the store keeps the snapshot's chunks until the volume no longer
//! needs them (see `jobs::hydrate`). All of it before the volume's catalog
//! record exists, so a crash in between leaves only an orphan.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use snapshot::cache::Fetcher;
use snapshot::{ChunkGeometry, ManifestReader, Repo, RepoError, SnapshotId};

use super::base::{self, BaseImage, DetachLog};
use super::chunk_map::ChunkMap;
use crate::disk::sync_dir;
use crate::engine::error::{Error, IoContext, Result, blocking};

/// The store hold of a restored volume: named by host and volume id, so a
/// host can find and release its own stale holds.
pub fn hold_name(host_id: &str, volume_id: u64) -> String {
    format!("{host_id}-{volume_id:016x}")
}

/// The prefix of every hold `host_id` takes.
pub fn hold_prefix(host_id: &str) -> String {
    format!("{host_id}-")
}

/// The manifest of the snapshot a volume is to be created from, read
/// lazily (a format-2 root costs a few bytes per 8192 chunks).
pub async fn source_manifest(repo: &Repo, id: &SnapshotId) -> Result<Arc<ManifestReader>> {
    match repo.open_manifest(id).await {
        Ok(m) => Ok(Arc::new(m)),
        Err(RepoError::MissingManifest(_)) => Err(Error::SnapshotNotFound(id.clone())),
        Err(e) => Err(Error::store(format!("read snapshot {id}"), e)),
    }
}

/// Writes the base beside the data files in `dir` and takes the hold.
pub async fn prepare_base(
    repo: &Repo,
    fetcher: &Arc<Fetcher>,
    hold: &str,
    dir: &Path,
    m: &Arc<ManifestReader>,
) -> Result<Arc<BaseImage>> {
    let local = local_copy(repo, m).await?;
    let encoded = local.stored().encode();
    // The files and their syncs, off the runtime's workers.
    let d = dir.to_owned();
    let log = blocking(
        || format!("write the base of a restored volume in {}", dir.display()),
        move || {
            let mut f = std::fs::File::create(d.join(base::MANIFEST_FILE))?;
            f.write_all(&encoded)?;
            f.sync_all()?;
            let log = DetachLog::create(&d.join(base::DETACHED_FILE))?;
            sync_dir(&d)?;
            Ok(log)
        },
    )
    .await?;
    repo.put_hold_stored(hold, m.stored())
        .await
        .map_err(|e| Error::store(format!("record a hold on snapshot {}", m.header().id), e))?;
    let base = BaseImage::new(local, Arc::clone(fetcher), log)
        .ctx(|| format!("open the base of {}", dir.display()))?;
    Ok(Arc::new(base))
}

/// Format-2 manifests with at most this many stored pages are kept beside
/// the volume whole, in format 1: 16 pages are 128 Ki entries (5 MiB in
/// memory), and knowing every zero chunk keeps such a base exact. Larger
/// ones keep the root only, read lazily.
const WHOLE_PAGES: usize = 16;

/// What the volume keeps as its base manifest: `m` whole (format 1) when it
/// is small, else `m`'s root, whose pages the hold keeps in the store.
async fn local_copy(repo: &Repo, m: &Arc<ManifestReader>) -> Result<Arc<ManifestReader>> {
    match m.root() {
        Some(r) if r.pages().len() <= WHOLE_PAGES => {
            let whole = m.materialize().await.map_err(|e| {
                Error::store(format!("read the pages of snapshot {}", m.header().id), e)
            })?;
            Ok(Arc::new(ManifestReader::new(
                repo.clone(),
                snapshot::StoredManifest::V1(whole),
            )))
        }
        _ => Ok(Arc::clone(m)),
    }
}

/// A new volume's chunk map: every chunk its snapshot may hold data for
/// is `Base` (see `base`), the rest `Zero`. Bits set a word at a time, so
/// a fully written 16 TiB base costs its 4 MiB of bits and no more.
pub fn initial_map(geometry: ChunkGeometry, source: Option<&ManifestReader>) -> ChunkMap {
    let map = ChunkMap::new(geometry);
    if let Some(m) = source {
        for r in m.maybe_data() {
            map.set_base_range(r.start..r.end.min(geometry.count()));
        }
    }
    map
}
