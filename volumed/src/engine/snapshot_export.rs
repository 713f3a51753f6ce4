//! Read-only NBD exports of snapshots, for backup tools that read a
//! snapshot without restoring it.
//!
//! A [`SnapshotImage`] reads its snapshot's manifest lazily (a format-2
//! root, its pages on demand through a bounded cache) and its chunks
//! through the host chunk cache; every chunk is checked against its hash by the fetcher, so
//! a damaged object fails the requests that touch it and nothing else.
//!
//! While exported, a snapshot is held in the store (`x-HOST-ID` holds), so
//! gc on any host keeps its chunks, and this host refuses to delete it. An
//! export made by `vol snapshot attach` is recorded in the catalog and
//! opened again at every start until detached; a lease (an export the
//! daemon makes for itself, e.g. to convert a snapshot with qemu-img) ends
//! with its last holder and does not survive a restart: its hold is found
//! stale and released at the next start.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use snapshot::cache::Fetcher;
use snapshot::diff::Diff;
use snapshot::{ChunkGeometry, ManifestReader, Repo, SnapshotId};
use tracing::{info, warn};

use super::export::{Backend, Export};
use super::volume::{Extent, ReadPiece};
use crate::catalog::{Catalog, SnapshotExportRecord, unix_now};
use crate::engine::error::{Error, Result};

/// The store hold of a snapshot this host exports. Not under
/// `restore::hold_prefix`, so the hydrator never takes it for its own.
pub fn hold_name(host_id: &str, id: &SnapshotId) -> String {
    format!("{}{id}", hold_prefix(host_id))
}

fn hold_prefix(host_id: &str) -> String {
    format!("x-{host_id}-")
}

/// A snapshot as a read-only disk.
pub struct SnapshotImage {
    pub id: SnapshotId,
    pub manifest: Arc<ManifestReader>,
    fetcher: Arc<Fetcher>,
    geometry: ChunkGeometry,
    /// Changed blocks from other snapshots (dirty-bitmap contexts), made on
    /// first use: a diff costs a walk of both manifests.
    changed: Mutex<HashMap<SnapshotId, Arc<Diff>>>,
    /// The chunks read last, decoded: clients read a chunk in several
    /// requests (nbdcopy and qemu-img in 256 KiB pieces), and each would
    /// otherwise decode and hash it again.
    recent: Mutex<VecDeque<(u64, Bytes)>>,
}

/// Decoded chunks an image keeps, most recent first.
const RECENT_CHUNKS: usize = 32;
/// Manifest pages one base:allocation answer looks at: NBD lets a reply
/// cover less than was asked, and this keeps one answer to a few page
/// reads whatever range the client names.
const EXTENT_PAGES: u64 = 4;

impl SnapshotImage {
    pub fn new(manifest: Arc<ManifestReader>, fetcher: Arc<Fetcher>) -> io::Result<Self> {
        let h = manifest.header();
        let geometry = ChunkGeometry::new(h.size, h.chunk_size).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot {}: {e}", h.id),
            )
        })?;
        Ok(SnapshotImage {
            id: h.id.clone(),
            manifest,
            fetcher,
            geometry,
            changed: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_CHUNKS)),
        })
    }

    pub fn size(&self) -> u64 {
        self.geometry.size()
    }

    pub fn chunk_size(&self) -> u64 {
        self.geometry.chunk_size()
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Bytes)>> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bytes of chunk `chunk`, verified against its hash and length.
    async fn chunk(&self, chunk: u64) -> io::Result<Option<Bytes>> {
        let Some(hash) = self.hash(chunk).await? else {
            return Ok(None);
        };
        if let Some(data) = self
            .recent()
            .iter()
            .find(|(c, _)| *c == chunk)
            .map(|(_, d)| d.clone())
        {
            return Ok(Some(data));
        }
        let data = self.fetcher.get(&hash).await.map_err(|e| {
            tracing::error!(snapshot = %self.id, chunk, %hash, error = %e,
                "cannot read a chunk of an exported snapshot");
            io::Error::other(format!(
                "chunk {chunk} of snapshot {} (object {hash}): {e}",
                self.id
            ))
        })?;
        let want = self.geometry.len(chunk);
        if data.len() as u64 != want {
            return Err(io::Error::other(format!(
                "chunk {chunk} of snapshot {} has {} bytes, expected {want}",
                self.id,
                data.len()
            )));
        }
        let mut recent = self.recent();
        if recent.len() == RECENT_CHUNKS {
            recent.pop_back();
        }
        recent.push_front((chunk, data.clone()));
        Ok(Some(data))
    }

    /// Reads `[offset, offset + len)`; the caller has checked the range.
    /// Zero chunks cost nothing and come back as [`ReadPiece::Zero`].
    pub async fn read(&self, offset: u64, len: u64) -> io::Result<Vec<ReadPiece>> {
        let end = offset.saturating_add(len);
        let mut out: Vec<ReadPiece> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        for c in self.geometry.chunks_of(offset, len) {
            let r = self.geometry.range(c);
            let (from, to) = (r.start.max(offset), r.end.min(end));
            match self.chunk(c).await? {
                None => match out.last_mut() {
                    Some(ReadPiece::Zero(n)) => *n += to - from,
                    _ => out.push(ReadPiece::Zero(to - from)),
                },
                Some(data) => {
                    let (a, b) = ((from - r.start) as usize, (to - r.start) as usize);
                    out.push(ReadPiece::Data(data[a..b].to_vec()));
                }
            }
        }
        Ok(out)
    }

    /// Brings the range's chunks into the host cache (NBD_CMD_CACHE).
    pub async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        for c in self.geometry.chunks_of(offset, len) {
            self.chunk(c).await?;
        }
        Ok(())
    }

    async fn hash(&self, chunk: u64) -> io::Result<Option<snapshot::ChunkHash>> {
        self.manifest
            .get(chunk)
            .await
            .map_err(|e| self.manifest_error(chunk, e))
    }

    /// base:allocation runs: zero chunks are holes that read as zeros. The
    /// runs may end before `offset + len` (at most [`EXTENT_PAGES`] pages
    /// of the manifest are looked at), never after.
    pub async fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let mut end = offset.saturating_add(len).min(self.size());
        let mut out: Vec<Extent> = Vec::new();
        if offset >= end {
            return Ok(out);
        }
        let per = u64::from(self.manifest.page_chunks());
        let first = self.geometry.chunk_of(offset);
        let limit = (first / per)
            .saturating_add(EXTENT_PAGES)
            .saturating_mul(per);
        if limit < self.geometry.count() {
            end = end.min(self.geometry.offset(limit));
        }
        let last = self.geometry.chunk_of(end - 1);
        let hashed = self
            .manifest
            .hashed_in(first, last + 1)
            .await
            .map_err(|e| self.manifest_error(first, e))?;
        let mut next = hashed.iter().map(|(i, _)| *i).peekable();
        for c in first..=last {
            let r = self.geometry.range(c);
            let n = r.end.min(end) - r.start.max(offset);
            while next.next_if(|i| *i < c).is_some() {}
            let zero = next.peek() != Some(&c);
            match out.last_mut() {
                Some(e) if e.zero == zero => e.len += n,
                _ => out.push(Extent { len: n, zero }),
            }
        }
        Ok(out)
    }

    fn manifest_error(&self, chunk: u64, e: snapshot::RepoError) -> io::Error {
        tracing::error!(snapshot = %self.id, chunk, error = %e,
            "cannot read a page of an exported snapshot's manifest");
        io::Error::other(format!(
            "chunk {chunk} of snapshot {}: manifest page: {e}",
            self.id
        ))
    }

    /// What changed from snapshot `from` to this one, once per `from`.
    /// Pages both manifests name alike are skipped unread.
    pub async fn changed_from(&self, from: &ManifestReader) -> Result<Arc<Diff>> {
        let id = &from.header().id;
        if let Some(d) = self.lock_changed().get(id) {
            return Ok(Arc::clone(d));
        }
        let d = Arc::new(
            snapshot::diff::diff_readers(Some(from), &self.manifest)
                .await
                .map_err(|e| Error::InvalidRequest(e.to_string()))?,
        );
        self.lock_changed().insert(id.clone(), Arc::clone(&d));
        Ok(d)
    }

    fn lock_changed(&self) -> std::sync::MutexGuard<'_, HashMap<SnapshotId, Arc<Diff>>> {
        self.changed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One exported snapshot.
struct Entry {
    export: Export,
    /// Set by `vol snapshot attach`; `None` while only leases keep it.
    attached_at: Option<u64>,
    leases: usize,
}

/// The snapshots this host exports.
pub struct SnapshotExports {
    catalog: Arc<Catalog>,
    repo: Repo,
    fetcher: Arc<Fetcher>,
    host_id: String,
    entries: Mutex<HashMap<SnapshotId, Entry>>,
    /// One change at a time: each awaits the store (holds).
    changes: tokio::sync::Mutex<()>,
}

impl SnapshotExports {
    pub fn new(catalog: Arc<Catalog>, repo: Repo, fetcher: Arc<Fetcher>, host_id: String) -> Self {
        SnapshotExports {
            catalog,
            repo,
            fetcher,
            host_id,
            entries: Mutex::new(HashMap::new()),
            changes: tokio::sync::Mutex::new(()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<SnapshotId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The export of snapshot `id`, for the NBD server.
    pub fn export(&self, id: &SnapshotId) -> Option<Export> {
        self.entries().get(id).map(|e| e.export.clone())
    }

    /// The ids of the snapshots exported now, in order.
    pub fn names(&self) -> Vec<SnapshotId> {
        let mut v: Vec<_> = self.entries().keys().cloned().collect();
        v.sort();
        v
    }

    /// When `vol snapshot attach` exported `id`, if it did.
    pub fn attached_at(&self, id: &SnapshotId) -> Option<u64> {
        self.entries().get(id).and_then(|e| e.attached_at)
    }

    /// Whether anything exports `id` (a delete must wait).
    pub fn is_exported(&self, id: &SnapshotId) -> bool {
        self.entries().contains_key(id)
    }

    /// Serves `m` under its id; the store hold comes first, so no gc can
    /// take a chunk a client is about to read.
    async fn open(&self, m: Arc<ManifestReader>) -> Result<Export> {
        let id = m.header().id.clone();
        self.repo
            .put_hold_stored(&hold_name(&self.host_id, &id), m.stored())
            .await
            .map_err(|e| Error::store(format!("record a hold on snapshot {id}"), e))?;
        let image = SnapshotImage::new(m, Arc::clone(&self.fetcher))
            .map_err(|e| Error::io(format!("open snapshot {id}"), e))?;
        Ok(Export::new(Backend::Snapshot(Arc::new(image))))
    }

    /// Exports `m` until [`SnapshotExports::detach`], across restarts.
    /// Attaching an attached snapshot changes nothing.
    pub async fn attach(&self, m: Arc<ManifestReader>) -> Result<u64> {
        let _one = self.changes.lock().await;
        let id = m.header().id.clone();
        if let Some(at) = self.attached_at(&id) {
            return Ok(at);
        }
        let rec = SnapshotExportRecord {
            id: id.clone(),
            attached_at: unix_now(),
        };
        let leased = self.is_exported(&id);
        if !leased {
            let export = self.open(m).await?;
            self.entries().insert(
                id.clone(),
                Entry {
                    export,
                    attached_at: None,
                    leases: 0,
                },
            );
        }
        if let Err(e) = self.catalog.put_snapshot_export(&rec).await {
            if !leased {
                self.end(&id).await;
            }
            return Err(e.into());
        }
        if let Some(entry) = self.entries().get_mut(&id) {
            entry.attached_at = Some(rec.attached_at);
        }
        info!(snapshot = %id, "snapshot exported read-only");
        Ok(rec.attached_at)
    }

    /// Ends the export `attach` made; clients are disconnected after their
    /// requests in flight. A lease keeps serving until its holder is done.
    /// Returns the header of the snapshot it served.
    pub async fn detach(&self, id: &SnapshotId) -> Result<snapshot::ManifestHeader> {
        let _one = self.changes.lock().await;
        let header = match self.entries().get(id) {
            Some(e) if e.attached_at.is_some() => e
                .export
                .backend
                .snapshot()
                .map(|s| s.manifest.header().clone()),
            _ => None,
        };
        let Some(header) = header else {
            return Err(Error::SnapshotNotAttached(id.clone()));
        };
        self.catalog.remove_snapshot_export(id.as_str()).await?;
        let leased = match self.entries().get_mut(id) {
            Some(e) => {
                e.attached_at = None;
                e.leases > 0
            }
            None => false,
        };
        if !leased {
            self.end(id).await;
        }
        info!(snapshot = %id, "snapshot export ended");
        Ok(header)
    }

    /// Exports `m` for as long as the lease lives.
    pub async fn lease(self: &Arc<Self>, m: Arc<ManifestReader>) -> Result<SnapshotExportLease> {
        let _one = self.changes.lock().await;
        let id = m.header().id.clone();
        let exists = match self.entries().get_mut(&id) {
            Some(e) => {
                e.leases += 1;
                true
            }
            None => false,
        };
        if !exists {
            let export = self.open(m).await?;
            self.entries().insert(
                id.clone(),
                Entry {
                    export,
                    attached_at: None,
                    leases: 1,
                },
            );
        }
        Ok(SnapshotExportLease {
            exports: Arc::clone(self),
            id,
        })
    }

    async fn release(&self, id: &SnapshotId) {
        let _one = self.changes.lock().await;
        let last = match self.entries().get_mut(id) {
            Some(e) => {
                e.leases = e.leases.saturating_sub(1);
                e.leases == 0 && e.attached_at.is_none()
            }
            None => false,
        };
        if last {
            self.end(id).await;
        }
    }

    /// Withdraws the export, waits for its sessions, releases the hold.
    async fn end(&self, id: &SnapshotId) {
        let Some(entry) = self.entries().remove(id) else {
            return;
        };
        entry.export.close().await;
        let hold = hold_name(&self.host_id, id);
        if let Err(e) = self.repo.release_hold(&hold).await {
            // Released as stale at the next start.
            warn!(snapshot = %id, hold, error = %e, "could not release the store hold of a snapshot export");
        }
    }

    /// Opens again every export recorded by `attach`, and releases the
    /// holds of exports that are no longer recorded (leases, detaches cut
    /// short). An export whose snapshot cannot be read stays recorded and
    /// is tried again at the next start.
    pub async fn reopen(&self) {
        let records = match self.catalog.snapshot_exports() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot read the recorded snapshot exports");
                return;
            }
        };
        for rec in &records {
            // The hold is the manifest's copy, and it outlives a delete of
            // the snapshot by another host.
            let hold = snapshot::keys::hold_key(&hold_name(&self.host_id, &rec.id));
            let found = match self.repo.get_stored_at(&hold).await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => self.repo.get_stored(&rec.id).await,
                Err(e) => Err(e),
            };
            let m = match found {
                Ok(m) => Arc::new(ManifestReader::new(self.repo.clone(), m)),
                Err(e) => {
                    warn!(snapshot = %rec.id, error = %e, "cannot export the snapshot again; will retry at next start");
                    continue;
                }
            };
            let _one = self.changes.lock().await;
            match self.open(m).await {
                Ok(export) => {
                    self.entries().insert(
                        rec.id.clone(),
                        Entry {
                            export,
                            attached_at: Some(rec.attached_at),
                            leases: 0,
                        },
                    );
                    info!(snapshot = %rec.id, "snapshot exported again after a restart");
                }
                Err(e) => {
                    warn!(snapshot = %rec.id, error = %e, "cannot export the snapshot again; will retry at next start");
                }
            }
        }
        let prefix = hold_prefix(&self.host_id);
        let holds = match self.repo.list_holds(&prefix).await {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "cannot list this host's snapshot export holds");
                return;
            }
        };
        for hold in holds {
            let live = records
                .iter()
                .any(|r| hold_name(&self.host_id, &r.id) == hold);
            if !live {
                info!(hold, "releasing the hold of a snapshot export that ended");
                if let Err(e) = self.repo.release_hold(&hold).await {
                    warn!(hold, error = %e, "could not release a stale snapshot export hold");
                }
            }
        }
    }

    /// Ends every session (shutdown); records and holds stay, so the
    /// exports come back at the next start.
    pub async fn close_sessions(&self) {
        let exports: Vec<Export> = self.entries().values().map(|e| e.export.clone()).collect();
        for e in exports {
            e.close().await;
        }
    }
}

/// A snapshot export the daemon made for itself; it ends when the lease is
/// dropped unless `vol snapshot attach` exported the snapshot too.
pub struct SnapshotExportLease {
    exports: Arc<SnapshotExports>,
    id: SnapshotId,
}

impl SnapshotExportLease {
    pub fn snapshot(&self) -> &SnapshotId {
        &self.id
    }
}

impl Drop for SnapshotExportLease {
    fn drop(&mut self) {
        let exports = Arc::clone(&self.exports);
        let id = self.id.clone();
        // Ending an export waits for its sessions: not in a destructor.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { exports.release(&id).await });
            }
            Err(_) => {
                warn!(snapshot = %id, "snapshot export lease dropped outside the runtime; it ends at the next start")
            }
        }
    }
}

#[cfg(test)]
#[path = "snapshot_export_tests.rs"]
mod tests;
