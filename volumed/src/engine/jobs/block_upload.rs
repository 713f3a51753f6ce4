//! Snapshots written block by block by a client (the EBS direct APIs'
//! StartSnapshot, PutSnapshotBlock and CompleteSnapshot), through the same
//! commit protocol as a volume's snapshot job (`snapshot::pending`): the
//! marker is announced before the parent is read or any block stored, kept
//! fresh while the upload lives, and the manifest is written only while it
//! is fresh. The record is in the catalog from the start, `pending`, so
//! every listing shows the upload; a restart ends it `error` (the blocks
//! received live in memory until the commit), as an EBS snapshot that times
//! out does.
//!
//! Each block is stored as a chunk object as it arrives (deduplicated,
//! compressed); all-zero blocks need none. An upload with no block written
//! and no completion for its timeout ends `error` and its marker goes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapshot::{
    ChunkHash, ManifestHeader, ManifestReader, PendingSnapshot, Repo, RepoError, SnapshotId,
};
use tokio::time::Instant;
use tracing::{info, warn};

use super::snapshot::complete_record;
use crate::catalog::{Catalog, SnapshotRecord, SnapshotSource, SnapshotState, rfc3339, unix_now};
use crate::engine::error::{Error, Result};

/// What a client asks for when it starts an upload.
pub struct UploadSpec {
    /// What the manifest names as the snapshot's volume.
    pub volume: String,
    pub size: u64,
    pub chunk_size: u64,
    /// The snapshot whose chunks fill every block not written.
    pub parent: Option<SnapshotId>,
    pub labels: BTreeMap<String, String>,
    /// Idle time after which the upload ends `error`.
    pub timeout: Duration,
    /// How a snapshot without a parent is sealed (one with a parent is
    /// sealed as its parent is).
    pub encryption: Option<snapshot::Encryption>,
}

/// A block received: its chunk (none for zeros) and the checksum the
/// client sent with it, kept for the client's check of the whole upload.
pub struct Block {
    pub hash: Option<ChunkHash>,
    pub checksum: [u8; 32],
}

struct Upload {
    rec: SnapshotRecord,
    /// Taken by whoever ends the upload (its completion or its failure),
    /// which then ends the marker.
    pending: Mutex<Option<PendingSnapshot>>,
    parent: Option<Arc<ManifestReader>>,
    blocks: Mutex<BTreeMap<u64, Block>>,
    uploaded: std::sync::atomic::AtomicU64,
    /// Set once a completion starts: later blocks are refused.
    completing: AtomicBool,
    /// Reset by every block; the upload times out when it passes.
    deadline: Mutex<Instant>,
    timeout: Duration,
}

impl Upload {
    fn blocks(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Block>> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_pending(&self) -> Option<PendingSnapshot> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn chunk_count(&self) -> u64 {
        self.rec.size.div_ceil(self.rec.chunk_size)
    }

    fn touch(&self) {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now() + self.timeout;
    }

    fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The block uploads in progress on this host, by snapshot id.
pub struct BlockUploads {
    catalog: Arc<Catalog>,
    repo: Repo,
    uploads: Mutex<HashMap<SnapshotId, Arc<Upload>>>,
}

impl BlockUploads {
    pub fn new(catalog: Arc<Catalog>, repo: Repo) -> Self {
        BlockUploads {
            catalog,
            repo,
            uploads: Mutex::new(HashMap::new()),
        }
    }

    fn uploads(&self) -> std::sync::MutexGuard<'_, HashMap<SnapshotId, Arc<Upload>>> {
        self.uploads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, id: &SnapshotId) -> Result<Arc<Upload>> {
        self.uploads()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::SnapshotNotUploading(id.clone()))
    }

    pub fn contains(&self, id: &SnapshotId) -> bool {
        self.uploads().contains_key(id)
    }

    /// The chunks of upload `id`, while it runs.
    pub fn chunk_count(&self, id: &SnapshotId) -> Option<u64> {
        self.uploads().get(id).map(|u| u.chunk_count())
    }

    /// Starts an upload: the marker first, then the parent (which must
    /// exist from then on), then the `pending` record.
    pub async fn start(self: &Arc<Self>, spec: UploadSpec) -> Result<SnapshotRecord> {
        let id = SnapshotId::generate();
        let pending = self
            .repo
            .begin_snapshot(&id)
            .await
            .map_err(|e| Error::store(format!("start snapshot {id}"), e))?;
        let parent = match &spec.parent {
            Some(p) => match self.repo.open_manifest(p).await {
                Ok(m) => Some(Arc::new(m)),
                Err(e) => {
                    pending.end().await;
                    return Err(match e {
                        RepoError::MissingManifest(_) => Error::SnapshotNotFound(p.clone()),
                        e => Error::store(format!("read parent snapshot {p}"), e),
                    });
                }
            },
            None => None,
        };
        let encryption = match &parent {
            Some(p) => p.header().encryption.clone(),
            None => spec.encryption,
        };
        if let Err(e) = self.repo.sealed_as(encryption.as_ref()) {
            pending.end().await;
            return Err(Error::InvalidRequest(e.to_string()));
        }
        let rec = SnapshotRecord {
            id: id.clone(),
            volume: spec.volume,
            state: SnapshotState::Pending,
            size: spec.size,
            chunk_size: spec.chunk_size,
            parent: spec.parent,
            created_at: unix_now(),
            labels: spec.labels,
            changed_chunks: 0,
            logical_bytes: 0,
            uploaded_bytes: 0,
            chunks_total: 0,
            chunks_done: 0,
            error: None,
            completed_at: None,
            seq: 0,
            source: SnapshotSource::Blocks,
            encryption,
        };
        let rec = match self.catalog.record_new_snapshot(rec).await {
            Ok(rec) => rec,
            Err(e) => {
                pending.end().await;
                return Err(e.into());
            }
        };
        let upload = Arc::new(Upload {
            rec: rec.clone(),
            pending: Mutex::new(Some(pending)),
            parent,
            blocks: Mutex::new(BTreeMap::new()),
            uploaded: Default::default(),
            completing: AtomicBool::new(false),
            deadline: Mutex::new(Instant::now() + spec.timeout),
            timeout: spec.timeout,
        });
        self.uploads().insert(id.clone(), Arc::clone(&upload));
        let me = Arc::clone(self);
        tokio::spawn(async move { me.expire(upload).await });
        info!(snapshot = %id, size = rec.size, parent = ?rec.parent, "block upload started");
        Ok(rec)
    }

    /// Ends `upload` `error` once its deadline passes without a block or a
    /// completion.
    async fn expire(&self, upload: Arc<Upload>) {
        loop {
            tokio::time::sleep_until(upload.deadline()).await;
            if !self.contains(&upload.rec.id) {
                return;
            }
            if upload.completing.load(Ordering::Acquire) {
                // The completion ends it, one way or the other; a refused
                // completion leaves it pending, so look again later.
                tokio::time::sleep(upload.timeout).await;
                continue;
            }
            if upload.deadline() <= Instant::now() {
                let minutes = upload.timeout.as_secs() / 60;
                self.fail(
                    &upload.rec.id,
                    format!("timed out: no block and no completion for {minutes} minutes"),
                )
                .await;
                return;
            }
        }
    }

    /// Stores block `index` of upload `id`. `checksum` is the client's.
    pub async fn put_block(
        &self,
        id: &SnapshotId,
        index: u64,
        data: Vec<u8>,
        checksum: [u8; 32],
    ) -> Result<()> {
        let upload = self.get(id)?;
        if upload.completing.load(Ordering::Acquire) {
            return Err(Error::SnapshotNotUploading(id.clone()));
        }
        let count = upload.chunk_count();
        if index >= count {
            return Err(Error::InvalidRequest(format!(
                "block {index} is beyond the end of the {count} blocks of snapshot {id}"
            )));
        }
        let len = if index + 1 == count {
            upload.rec.size - index * upload.rec.chunk_size
        } else {
            upload.rec.chunk_size
        };
        if data.len() as u64 != len {
            return Err(Error::InvalidRequest(format!(
                "block {index} of snapshot {id} is {len} bytes, not {}",
                data.len()
            )));
        }
        upload.touch();
        let (hash, uploaded) = if data.iter().all(|b| *b == 0) {
            (None, 0)
        } else {
            let put = self
                .repo
                .sealed_as(upload.rec.encryption.as_ref())
                .map_err(|e| Error::store(format!("store block {index} of {id}"), e))?
                .put_chunk(data)
                .await
                .map_err(|e| Error::store(format!("store block {index} of {id}"), e))?;
            (Some(put.hash), put.uploaded)
        };
        upload.blocks().insert(index, Block { hash, checksum });
        upload.uploaded.fetch_add(uploaded, Ordering::Relaxed);
        upload.touch();
        Ok(())
    }

    /// Completes upload `id`: `check` sees the blocks received (in index
    /// order) and may refuse, which leaves the upload pending; then the
    /// manifest is written through the commit protocol. A store failure
    /// ends the snapshot `error`.
    pub async fn complete(
        &self,
        id: &SnapshotId,
        check: impl FnOnce(&BTreeMap<u64, Block>) -> Result<()>,
    ) -> Result<SnapshotRecord> {
        let upload = self.get(id)?;
        if upload.completing.swap(true, Ordering::AcqRel) {
            return Err(Error::SnapshotBusy(id.clone()));
        }
        let changes: Vec<(u64, Option<ChunkHash>)> = {
            let blocks = upload.blocks();
            if let Err(e) = check(&blocks) {
                upload.completing.store(false, Ordering::Release);
                return Err(e);
            }
            blocks.iter().map(|(&i, b)| (i, b.hash)).collect()
        };
        // Failed meanwhile (timed out): the failure recorded it.
        let Some(pending) = upload.take_pending() else {
            return Err(Error::SnapshotNotUploading(id.clone()));
        };
        let result = self.commit(&upload, &pending, &changes).await;
        self.uploads().remove(id);
        pending.end().await;
        match result {
            Ok(header) => {
                let mut rec = upload.rec.clone();
                complete_record(&mut rec, &header);
                if let Err(e) = self.catalog.put_snapshot(&rec).await {
                    // The manifest is in the store: the next start settles
                    // the record from it.
                    warn!(snapshot = %id, error = %volumed_api::error_chain(&e), "snapshot completed but its record could not be saved");
                }
                info!(snapshot = %id, blocks = changes.len(), "block upload completed");
                Ok(rec)
            }
            Err(e) => {
                self.record_failure(&upload, volumed_api::error_chain(&e))
                    .await;
                Err(e)
            }
        }
    }

    /// Writes the manifest: the blocks received over the parent's chunks.
    async fn commit(
        &self,
        upload: &Upload,
        pending: &PendingSnapshot,
        changes: &[(u64, Option<ChunkHash>)],
    ) -> Result<ManifestHeader> {
        let rec = &upload.rec;
        let header = ManifestHeader {
            id: rec.id.clone(),
            volume: rec.volume.clone(),
            size: rec.size,
            chunk_size: rec.chunk_size,
            parent: rec.parent.clone(),
            created_at: rfc3339(rec.created_at),
            labels: rec.labels.clone(),
            changed_chunks: changes.len() as u64,
            logical_bytes: 0,
            uploaded_bytes: upload.uploaded.load(Ordering::Relaxed),
            encryption: rec.encryption.clone(),
        };
        let store_err = |e| Error::store(format!("complete snapshot {}", rec.id), e);
        let root = match &upload.parent {
            Some(parent) => {
                snapshot::writer::write_incremental(&self.repo, header, parent, changes)
                    .await
                    .map_err(store_err)?
                    .root
            }
            None => {
                let entries: Vec<(u64, ChunkHash)> = changes
                    .iter()
                    .filter_map(|&(i, h)| h.map(|h| (i, h)))
                    .collect();
                let geometry = snapshot::ChunkGeometry::new(rec.size, rec.chunk_size)
                    .map_err(|e| Error::InvalidSize(e.to_string()))?;
                let mut header = header;
                header.logical_bytes = entries.iter().map(|(c, _)| geometry.len(*c)).sum();
                let (mut root, pages) =
                    snapshot::writer::write_entries(&self.repo, header, &entries)
                        .await
                        .map_err(store_err)?;
                root.header.uploaded_bytes += pages;
                root
            }
        };
        pending
            .commit(&root)
            .await
            .map_err(|source| Error::SnapshotCommit {
                id: rec.id.clone(),
                source: Box::new(source),
            })?;
        Ok(root.header)
    }

    /// Ends upload `id` `error` with `reason`: recorded, marker removed.
    /// A completion in progress owns the ending instead.
    async fn fail(&self, id: &SnapshotId, reason: String) {
        let Some(upload) = self.uploads().remove(id) else {
            return;
        };
        let Some(pending) = upload.take_pending() else {
            return;
        };
        self.record_failure(&upload, reason).await;
        pending.end().await;
    }

    async fn record_failure(&self, upload: &Upload, reason: String) {
        let mut rec = upload.rec.clone();
        rec.state = SnapshotState::Error;
        rec.error = Some(reason.clone());
        if let Err(e) = self.catalog.put_snapshot(&rec).await {
            warn!(snapshot = %rec.id, error = %volumed_api::error_chain(&e), "could not record a failed block upload");
        }
        warn!(snapshot = %rec.id, reason, "block upload failed");
    }

    /// Every upload ends `error` (a clean stop keeps no blocks either).
    pub async fn shutdown(&self) {
        let ids: Vec<SnapshotId> = self.uploads().keys().cloned().collect();
        for id in ids {
            self.fail(&id, "volumed was shut down during the upload".into())
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::store::MemoryStore;
    use snapshot::{Manifest, ObjectStore};

    const CHUNK: u64 = 512 << 10;

    fn spec(parent: Option<SnapshotId>, timeout: Duration) -> UploadSpec {
        UploadSpec {
            volume: "vol-ffffffff".into(),
            size: 8 * CHUNK,
            chunk_size: CHUNK,
            parent,
            labels: BTreeMap::new(),
            timeout,
            encryption: None,
        }
    }

    fn setup() -> (tempfile::TempDir, Arc<Catalog>, Repo) {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Arc::new(Catalog::open(&dir.path().join("catalog")).unwrap());
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        (dir, catalog, Repo::new(store, 1))
    }

    /// A parent with chunks 0, 1 and 3 holding data; their hashes.
    async fn parent(repo: &Repo) -> (SnapshotId, Vec<ChunkHash>) {
        let id = SnapshotId::generate();
        let mut m = Manifest::new(ManifestHeader {
            id: id.clone(),
            volume: "v".into(),
            size: 4 * CHUNK,
            chunk_size: CHUNK,
            parent: None,
            created_at: String::new(),
            labels: BTreeMap::new(),
            changed_chunks: 0,
            logical_bytes: 0,
            uploaded_bytes: 0,
            encryption: None,
        });
        let mut hashes = Vec::new();
        for (i, b) in [(0u64, 1u8), (1, 2), (3, 4)] {
            let h = repo.put_chunk(vec![b; CHUNK as usize]).await.unwrap().hash;
            m.push(i, Some(h));
            hashes.push(h);
        }
        repo.put_manifest(&m).await.unwrap();
        (id, hashes)
    }

    #[tokio::test]
    async fn blocks_overlay_the_parent_and_commit_a_normal_snapshot() {
        let (_dir, catalog, repo) = setup();
        let (pid, ph) = parent(&repo).await;
        let uploads = Arc::new(BlockUploads::new(Arc::clone(&catalog), repo.clone()));
        let rec = uploads
            .start(spec(Some(pid), Duration::from_secs(600)))
            .await
            .unwrap();
        let id = rec.id.clone();
        assert_eq!(
            catalog.snapshots().unwrap()[0].state,
            SnapshotState::Pending
        );
        assert!(
            repo.store()
                .get(&snapshot::keys::pending_key(&id))
                .await
                .unwrap()
                .is_some(),
            "announced to gc from the start"
        );
        let written = vec![9u8; CHUNK as usize];
        uploads
            .put_block(&id, 1, vec![0; CHUNK as usize], [1; 32])
            .await
            .unwrap();
        uploads
            .put_block(&id, 2, written.clone(), [2; 32])
            .await
            .unwrap();
        let short = uploads.put_block(&id, 3, vec![1; 10], [0; 32]).await;
        assert!(matches!(short, Err(Error::InvalidRequest(_))), "{short:?}");
        let past = uploads.put_block(&id, 8, written.clone(), [0; 32]).await;
        assert!(matches!(past, Err(Error::InvalidRequest(_))), "{past:?}");
        // A refusing check leaves the upload pending.
        let refused = uploads
            .complete(&id, |_| Err(Error::InvalidRequest("no".into())))
            .await;
        assert!(refused.is_err());
        assert!(uploads.contains(&id));
        let done = uploads
            .complete(&id, |blocks| {
                let sums: Vec<[u8; 32]> = blocks.values().map(|b| b.checksum).collect();
                assert_eq!(sums, [[1; 32], [2; 32]]);
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(done.state, SnapshotState::Completed);
        assert_eq!(
            catalog.snapshots().unwrap()[0].state,
            SnapshotState::Completed
        );
        assert!(!uploads.contains(&id));
        let m = repo.get_manifest(&id).await.unwrap();
        assert_eq!(m.chunk_count(), 8);
        assert_eq!(m.get(0), Some(ph[0]), "unchanged: the parent's");
        assert_eq!(m.get(1), None, "written zeros");
        assert_eq!(
            m.get(2).unwrap(),
            repo.put_chunk(written).await.unwrap().hash
        );
        assert_eq!(m.get(3), Some(ph[2]));
        assert_eq!(m.get(7), None);
        assert_eq!(m.header.logical_bytes, 3 * CHUNK);
        assert!(
            repo.store()
                .get(&snapshot::keys::pending_key(&id))
                .await
                .unwrap()
                .is_none(),
            "the marker goes with the commit"
        );
    }

    #[tokio::test]
    async fn a_missing_parent_changes_nothing() {
        let (_dir, catalog, repo) = setup();
        let uploads = Arc::new(BlockUploads::new(Arc::clone(&catalog), repo.clone()));
        let missing = SnapshotId::generate();
        let r = uploads
            .start(spec(Some(missing), Duration::from_secs(600)))
            .await;
        assert!(
            matches!(r, Err(Error::SnapshotNotFound(_))),
            "{:?}",
            r.err()
        );
        assert!(catalog.snapshots().unwrap().is_empty());
        let left: Vec<String> = repo
            .store()
            .list(snapshot::keys::PENDING)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert!(left.is_empty(), "marker ended: {left:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_upload_times_out_as_error() {
        let (_dir, catalog, repo) = setup();
        let uploads = Arc::new(BlockUploads::new(Arc::clone(&catalog), repo.clone()));
        let id = uploads
            .start(spec(None, Duration::from_secs(600)))
            .await
            .unwrap()
            .id;
        tokio::time::sleep(Duration::from_secs(300)).await;
        // Zeros: stored without the blocking pool, which the paused clock
        // would not wait for.
        uploads
            .put_block(&id, 0, vec![0; CHUNK as usize], [0; 32])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(400)).await;
        assert!(uploads.contains(&id), "a block restarted the clock");
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert!(!uploads.contains(&id));
        // The timeout's record goes through the catalog's writer thread,
        // which the paused clock does not wait for.
        let mut tries = 0;
        let rec = loop {
            let rec = catalog.snapshots().unwrap().remove(0);
            if rec.state != SnapshotState::Pending || tries == 1000 {
                break rec;
            }
            tries += 1;
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(rec.state, SnapshotState::Error);
        assert!(rec.error.unwrap().contains("timed out"));
        let late = uploads
            .put_block(&id, 1, vec![0; CHUNK as usize], [0; 32])
            .await;
        assert!(matches!(late, Err(Error::SnapshotNotUploading(_))));
    }
}
