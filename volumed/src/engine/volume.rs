//! One volume at run time, and its data path: reads, writes, zeroing,
//! flushes, block status, and the fetches of a restored volume's `Base`
//! chunks. Its data files, its chunk-state map, its catalog record, and its
//! NBD export while attached. Snapshots freeze it through `begin_snapshot`
//! (see `freeze`).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use volumed_api::VolumeName;

use snapshot::ChunkGeometry;

use super::base::BaseImage;
use super::chunk_map::{ChunkMap, ChunkState};
use super::export::{Backend, Export};
use super::freeze::{Freeze, FreezeGuard, SnapshotPlan};
use super::record::RecordOwner;
use crate::catalog::{Catalog, VolumeRecord};
use crate::disk::engine::{PUNCH_HOLE, ZERO_RANGE};
use crate::disk::{DataFile, SyncOn};
use crate::engine::error::Result;

pub struct Volume {
    pub name: VolumeName,
    pub id: u64,
    pub chunk_size: u64,
    /// The chunk size; the size in it is the one at open, see `geometry()`.
    chunks: ChunkGeometry,
    /// The size new NBD connections see; a connection keeps the size it
    /// negotiated, as the protocol requires.
    size: AtomicU64,
    data: DataFile,
    map: ChunkMap,
    /// Set by hole punches and zero ranges, which change only file metadata:
    /// the next flush must fsync rather than fdatasync.
    metadata_changed: AtomicBool,
    /// This volume's catalog record: read by anyone, changed only through
    /// [`Volume::update_record`].
    record: RecordOwner,
    export: Mutex<Option<Export>>,
    /// Writes (and zeroings) hold it shared for their whole duration; a
    /// snapshot takes it exclusively for the instant it freezes the volume,
    /// so every write is either wholly before that instant or wholly after.
    gate: tokio::sync::RwLock<()>,
    /// The snapshot in progress, if any: see [`Freeze`].
    freeze: Mutex<Option<Arc<Freeze>>>,
    /// The manifest of the last snapshot, kept so the next incremental one
    /// need not fetch it from the store.
    parent_manifest: Mutex<Option<Arc<snapshot::ManifestReader>>>,
    /// The snapshot this volume was created from, while any chunk may still
    /// be `Base`.
    base: Option<Arc<BaseImage>>,
    /// Client requests in progress: background hydration backs off while
    /// there are any.
    client_ops: AtomicU64,
    /// Why the volume stopped trusting its files, set by the first failed
    /// write or sync and never cleared: Linux marks the pages a failed
    /// fsync dropped as clean, so a retried FLUSH could report durable data
    /// that is gone. Only reopening the files (detach, attach) ends it.
    failure: OnceLock<String>,
    /// Requests served, by command, for metrics.
    pub stats: crate::metrics::IoStats,
}

/// Counts a client request for as long as it lives.
struct ClientOp<'a>(&'a AtomicU64);

impl<'a> ClientOp<'a> {
    fn new(n: &'a AtomicU64) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        ClientOp(n)
    }
}

impl Drop for ClientOp<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A piece of a read's answer, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadPiece {
    Data(Vec<u8>),
    /// This many bytes of zeros, never read from disk.
    Zero(u64),
}

/// One run of a BLOCK_STATUS answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub zero: bool,
}

impl Volume {
    /// `map` must have been built for the record's geometry.
    pub fn new(
        record: VolumeRecord,
        chunks: ChunkGeometry,
        data: DataFile,
        map: ChunkMap,
        base: Option<Arc<BaseImage>>,
    ) -> Arc<Self> {
        Arc::new(Volume {
            name: record.name.clone(),
            id: record.id,
            chunk_size: chunks.chunk_size(),
            chunks,
            size: AtomicU64::new(record.size),
            data,
            map,
            metadata_changed: AtomicBool::new(false),
            record: RecordOwner::new(record),
            export: Mutex::new(None),
            gate: tokio::sync::RwLock::new(()),
            freeze: Mutex::new(None),
            parent_manifest: Mutex::new(None),
            base,
            client_ops: AtomicU64::new(0),
            failure: OnceLock::new(),
            stats: Default::default(),
        })
    }

    /// Why the volume failed, if it did: see `failure`.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Every request on a failed volume fails with EIO: not even its reads
    /// can be trusted.
    fn check_health(&self) -> io::Result<()> {
        match self.failure() {
            None => Ok(()),
            Some(reason) => Err(io::Error::other(format!(
                "volume '{}' failed ({reason}); detach and attach it to reopen",
                self.name
            ))),
        }
    }

    /// Puts the volume in the failed state; the first reason stays.
    fn fail(&self, what: &str, e: &io::Error) {
        let reason = format!("{what} failed: {e}");
        if self.failure.set(reason).is_ok() {
            tracing::error!(volume = %self.name, error = %e, op = what,
                "I/O failure: the volume refuses every request until it is detached and attached");
        }
    }

    /// A write's result: a full disk fails only this write (space may come
    /// back); any other error fails the volume.
    fn written<T>(&self, what: &str, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r
            && !is_no_space(e)
        {
            self.fail(what, e);
        }
        r
    }

    /// A sync's result: any error fails the volume, since the kernel may
    /// have dropped the pages it could not write.
    fn synced<T>(&self, what: &str, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            self.fail(what, e);
        }
        r
    }

    pub fn base(&self) -> Option<&Arc<BaseImage>> {
        self.base.as_ref()
    }

    pub fn client_ops(&self) -> u64 {
        self.client_ops.load(Ordering::Relaxed)
    }

    /// The volume's chunks at its current size.
    pub fn geometry(&self) -> ChunkGeometry {
        self.chunks.with_size(self.size())
    }

    /// Brings a `Base` chunk into the data file: fetched (through the cache,
    /// verified), written, then marked `Local`. Holding the chunk's stripe
    /// makes concurrent callers fetch it once.
    pub async fn materialize(&self, chunk: u64) -> io::Result<()> {
        let Some(base) = &self.base else {
            return Ok(());
        };
        let _stripe = base.lock(chunk).await;
        if self.map.state(chunk) != ChunkState::Base {
            return Ok(());
        }
        let Some(bytes) = base.fetch(chunk, &self.name).await? else {
            // Zero in the snapshot: it leaves the base as a `Zero` chunk
            // (a hole in the data file), logged like any other.
            self.map.drop_zero_base(chunk);
            base.log.note(chunk);
            return Ok(());
        };
        self.check_health()?;
        // Through the page cache like every other write of the data file:
        // one I/O mode per file keeps the cache coherent (an O_DIRECT write
        // beside a client's buffered reads could leave stale pages).
        let r = self
            .data
            .write(self.chunks.offset(chunk), Vec::from(bytes))
            .await;
        self.written("write", r)?;
        self.map.mark_hydrated(chunk);
        base.log.note(chunk);
        Ok(())
    }

    /// Before `[offset, offset + len)` changes: fetch the `Base` chunks it
    /// covers only in part, so the change merges into their bytes. Content
    /// does not change here, so this runs outside the snapshot gate.
    async fn fetch_partial_bases(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.base.is_none() {
            return Ok(());
        }
        let g = self.geometry();
        for c in g.chunks_of(offset, len) {
            if self.map.state(c) == ChunkState::Base && !g.covers(offset, len, c) {
                self.materialize(c).await?;
            }
        }
        Ok(())
    }

    /// Under the snapshot gate: `Base` chunks the range covers whole leave
    /// the base without a fetch, becoming `Local` (a write) or `Zero` (a
    /// trim). Partial ones were fetched by [`Volume::fetch_partial_bases`].
    async fn unbase_whole(&self, offset: u64, len: u64, local: bool) -> io::Result<()> {
        let Some(base) = &self.base else {
            return Ok(());
        };
        let g = self.geometry();
        for c in g.chunks_of(offset, len) {
            if self.map.state(c) != ChunkState::Base {
                continue;
            }
            if !g.covers(offset, len, c) {
                // Fetched a moment ago unless that failed; try again.
                self.materialize(c).await?;
                continue;
            }
            let _stripe = base.lock(c).await;
            if self.map.state(c) == ChunkState::Base {
                self.map.unbase(c, local);
                base.log.note(c);
            }
        }
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows the files, then the map, then the size new connections see.
    pub(crate) fn grow(&self, new_size: u64) -> io::Result<()> {
        self.data.grow(self.size(), new_size)?;
        self.map.grow(self.chunks.with_size(new_size));
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Room in the files for `len` bytes ahead of the size (see
    /// `DataFile::reserve`).
    pub(crate) fn reserve(&self, len: u64) -> io::Result<()> {
        self.data.reserve(len)
    }

    pub fn record(&self) -> VolumeRecord {
        self.record.get()
    }

    /// The one way a volume's record changes: `change` is applied to the
    /// current record, and the result replaces it in the catalog only
    /// while the catalog still holds exactly that record (same id, same
    /// contents), then here. Writers of one volume take turns, so none
    /// works on a copy another has replaced. Refused with `VolumeNotFound`
    /// once this object no longer owns the record (deleted, or replaced by
    /// a reopened volume); a `change` that returns an error writes nothing.
    /// A change that marks the record `deleting` is its last.
    pub(crate) async fn update_record<T>(
        &self,
        catalog: &Catalog,
        change: impl FnOnce(&mut VolumeRecord) -> Result<T>,
    ) -> Result<T> {
        self.record.update(&self.name, catalog, change).await
    }

    /// This object gives up its record: a volume reopened from the same
    /// files owns it from now on.
    pub(crate) fn retire_record(&self) {
        self.record.retire();
    }

    pub fn data(&self) -> &DataFile {
        &self.data
    }

    pub fn map(&self) -> &ChunkMap {
        &self.map
    }

    pub fn export(&self) -> Option<Export> {
        self.export
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publishes the export; new NBD connections can find it from now on.
    pub(crate) fn open_export(self: &Arc<Self>) -> Export {
        let mut slot = self.export.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert_with(|| Export::new(Backend::Volume(Arc::clone(self))))
            .clone()
    }

    /// Withdraws the export so no new connection finds it, and returns it so
    /// the caller can end the sessions it has.
    pub(crate) fn take_export(&self) -> Option<Export> {
        self.export.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Reads `[offset, offset + len)`; the caller has checked the range.
    /// `Zero` chunks cost no disk I/O and come back as [`ReadPiece::Zero`].
    pub async fn read(&self, offset: u64, len: u64) -> io::Result<Vec<ReadPiece>> {
        let _op = ClientOp::new(&self.client_ops);
        self.check_health()?;
        let mut out = Vec::new();
        for (off, n, state) in self.map.runs(offset, len) {
            match state {
                ChunkState::Zero => out.push(ReadPiece::Zero(n)),
                ChunkState::Local => {
                    out.push(ReadPiece::Data(self.data.read(off, n as usize).await?))
                }
                ChunkState::Base => {
                    // Fetched into the data file first, then read from it:
                    // one path for every byte a client sees.
                    for c in self.map.chunks_of(off, n) {
                        self.materialize(c).await?;
                    }
                    out.push(ReadPiece::Data(self.data.read(off, n as usize).await?))
                }
            }
        }
        Ok(out)
    }

    /// Freezes the volume for a snapshot: at this instant (no write in
    /// flight) the dirty set is split off and the changed chunks holding
    /// data become pending for the snapshot. See `freeze`.
    pub async fn begin_snapshot(self: &Arc<Self>) -> FreezeGuard {
        let gate = self.close_gate().await;
        self.freeze_closed(&gate)
    }

    /// Takes the snapshot gate exclusively: waits for the writes in
    /// flight, and admits no new one until the guard drops. A snapshot set
    /// holds every member's at once (`snapshot_set`).
    pub(super) async fn close_gate(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().await
    }

    /// Holds the gate as a write in flight does, for tests of the barrier.
    #[cfg(test)]
    pub(super) async fn hold_gate_shared(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// [`Volume::begin_snapshot`] under a gate the caller closed.
    pub(super) fn freeze_closed(
        self: &Arc<Self>,
        _gate: &tokio::sync::RwLockWriteGuard<'_, ()>,
    ) -> FreezeGuard {
        let changed = self.map.take_changed();
        let plan = SnapshotPlan::classify(changed, &self.map, self.base.as_deref());
        let freeze = Arc::new(Freeze::new(self.geometry(), &plan.to_read));
        *self.freeze.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&freeze));
        FreezeGuard::new(Arc::clone(self), freeze, plan)
    }

    /// Ends `freeze` (its guard is gone); copies not yet taken are dropped.
    /// `[offset, offset + len)` as runs of (length, changed since the last
    /// completed snapshot), for the `qemu:dirty-bitmap:LAST` context; the
    /// caller has checked the range. While a snapshot is in progress every
    /// chunk counts as changed (its changes are neither in the last
    /// completed snapshot nor in the dirty set): a superset, never a miss.
    pub fn changed_runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Vec::new();
        }
        let freezing = self
            .freeze
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if freezing || self.map.all_dirty() {
            return vec![(end - offset, true)];
        }
        let g = self.geometry();
        let mut out: Vec<(u64, bool)> = Vec::new();
        for c in g.chunks_of(offset, end - offset) {
            let r = g.range(c);
            let n = r.end.min(end) - r.start.max(offset);
            let changed = self.map.is_dirty(c);
            match out.last_mut() {
                Some((m, d)) if *d == changed => *m += n,
                _ => out.push((n, changed)),
            }
        }
        out
    }

    pub(super) fn end_freeze(&self, freeze: &Arc<Freeze>) {
        let mut slot = self.freeze.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|f| Arc::ptr_eq(f, freeze)) {
            *slot = None;
        }
    }

    pub fn parent_manifest(&self) -> Option<Arc<snapshot::ManifestReader>> {
        self.parent_manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_parent_manifest(&self, m: Arc<snapshot::ManifestReader>) {
        *self
            .parent_manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(m);
    }

    /// Before bytes in `[offset, offset + len)` change: preserve the frozen
    /// chunks among them for the snapshot in progress.
    async fn capture(&self, offset: u64, len: u64) -> io::Result<()> {
        let freeze = self
            .freeze
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match freeze {
            Some(f) => f.capture(&self.data, self.map.chunks_of(offset, len)).await,
            None => Ok(()),
        }
    }

    /// Writes `buf` at `offset`; with `fua` the bytes are durable on return,
    /// the sync waiting where it says.
    pub async fn write(&self, offset: u64, buf: Vec<u8>, fua: Option<SyncOn>) -> io::Result<()> {
        let _op = ClientOp::new(&self.client_ops);
        self.check_health()?;
        let len = buf.len() as u64;
        self.fetch_partial_bases(offset, len).await?;
        let _gate = self.gate.read().await;
        self.unbase_whole(offset, len, true).await?;
        self.capture(offset, len).await?;
        // The chunks are marked before the bytes land, so a read racing the
        // write sees either the old bytes or the new, never a stale Zero
        // after the write completed.
        self.map.mark_written(offset, buf.len() as u64);
        let r = self.data.write(offset, buf).await;
        self.written("write", r)?;
        if let Some(on) = fua {
            let r = self.data.sync_on(false, on).await;
            self.synced("fdatasync", r)
        } else {
            Ok(())
        }
    }

    /// WRITE_ZEROES and TRIM. Without `no_hole` the range is punched: whole
    /// chunks become `Zero` and partial ones keep their state (their punched
    /// part reads as zeros). With `no_hole` the range is zeroed in place and
    /// stays allocated, as the client asked.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: Option<SyncOn>,
    ) -> io::Result<()> {
        let _op = ClientOp::new(&self.client_ops);
        self.check_health()?;
        self.fetch_partial_bases(offset, len).await?;
        let _gate = self.gate.read().await;
        self.unbase_whole(offset, len, no_hole).await?;
        self.capture(offset, len).await?;
        if no_hole {
            self.map.mark_written(offset, len);
            let r = self.data.fallocate(ZERO_RANGE, offset, len).await;
            self.written("zero range", r)?;
        } else {
            // Punch only where there is data: a Zero run is already zeros.
            for (off, n, state) in self.map.runs(offset, len) {
                if state == ChunkState::Local {
                    let r = self.data.fallocate(PUNCH_HOLE, off, n).await;
                    self.written("punch hole", r)?;
                }
            }
            let g = self.geometry();
            let whole = g.whole_chunks_in(offset, len);
            for c in g.chunks_of(offset, len) {
                if whole.contains(&c) {
                    self.map.mark_zero(c);
                } else {
                    // Its punched part now reads as zeros: a change the next
                    // snapshot must read.
                    self.map.mark_changed(c);
                }
            }
        }
        self.metadata_changed.store(true, Ordering::Release);
        match fua {
            Some(on) => self.flush_on(on).await,
            None => Ok(()),
        }
    }

    /// Makes every write completed so far, on any connection, durable.
    /// For a restored volume, the chunks that left the base are logged
    /// after the data is synced, never before (see `base`).
    pub async fn flush(&self) -> io::Result<()> {
        self.flush_on(SyncOn::Ring).await
    }

    /// [`Self::flush`], with the data file's sync waiting where `on` says.
    pub async fn flush_on(&self, on: SyncOn) -> io::Result<()> {
        self.check_health()?;
        let detached = self.base.as_ref().map(|b| b.log.take_pending());
        let metadata = self.metadata_changed.swap(false, Ordering::AcqRel);
        let r = match crate::failpoint::io_error("volume-sync") {
            Err(e) => Err(e),
            Ok(()) => self.data.sync_on(metadata, on).await,
        };
        let r = self.synced(if metadata { "fsync" } else { "fdatasync" }, r);
        if r.is_err() && metadata {
            self.metadata_changed.store(true, Ordering::Release);
        }
        if let (Some(base), Some(chunks)) = (&self.base, detached) {
            if r.is_err() {
                chunks.into_iter().for_each(|c| base.log.note(c));
            } else {
                if !chunks.is_empty() {
                    crate::failpoint::hit("flush-before-log");
                }
                let logged = base.log.append(chunks).await;
                self.synced("detach log write", logged)?;
            }
        }
        r
    }

    /// NBD CACHE: start reading the range's data into the page cache.
    pub async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_health()?;
        for (off, n, state) in self.map.runs(offset, len) {
            match state {
                ChunkState::Local => self.data.will_need(off, n).await?,
                // For a restored volume, CACHE is the way to prefetch.
                ChunkState::Base => {
                    for c in self.map.chunks_of(off, n) {
                        self.materialize(c).await?;
                    }
                }
                ChunkState::Zero => {}
            }
        }
        Ok(())
    }

    /// Allocation of `[offset, offset + len)` from the chunk map; EIO on a
    /// failed volume, whose map may not match its files.
    pub fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check_health()?;
        Ok(self
            .map
            .runs(offset, len)
            .into_iter()
            .map(|(_, n, s)| Extent {
                len: n,
                zero: s == ChunkState::Zero,
            })
            .collect())
    }
}

/// ENOSPC and its kin: the disk (or the quota) is full, the files are fine.
fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
    )
}
