//! One volume at run time: its data files, its chunk-state map, its catalog
//! record, and its NBD export while attached.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use volumed_api::VolumeName;

use super::base::BaseImage;
use super::chunk_map::{Bitmap, Changed, ChunkMap, ChunkState};
use crate::catalog::VolumeRecord;
use crate::disk::DataFile;
use crate::disk::engine::{PUNCH_HOLE, ZERO_RANGE};

pub struct Volume {
    pub name: VolumeName,
    pub id: u64,
    pub chunk_size: u64,
    /// The size new NBD connections see; a connection keeps the size it
    /// negotiated, as the protocol requires.
    size: AtomicU64,
    data: DataFile,
    map: ChunkMap,
    /// Set by hole punches and zero ranges, which change only file metadata:
    /// the next flush must fsync rather than fdatasync.
    metadata_changed: AtomicBool,
    record: Mutex<VolumeRecord>,
    export: Mutex<Option<Export>>,
    /// Writes (and zeroings) hold it shared for their whole duration; a
    /// snapshot takes it exclusively for the instant it freezes the volume,
    /// so every write is either wholly before that instant or wholly after.
    gate: tokio::sync::RwLock<()>,
    /// The snapshot in progress, if any: see [`Freeze`].
    freeze: Mutex<Option<Arc<Freeze>>>,
    /// The manifest of the last snapshot, kept so the next incremental one
    /// need not fetch it from the store.
    parent_manifest: Mutex<Option<Arc<snapshot::Manifest>>>,
    /// The snapshot this volume was created from, while any chunk may still
    /// be `Base`.
    base: Option<Arc<BaseImage>>,
    /// Client requests in progress: background hydration backs off while
    /// there are any.
    client_ops: AtomicU64,
    /// Background hydration's state, for the API.
    pub(crate) hydration: Mutex<HydrationStatus>,
}

#[derive(Debug, Clone, Default)]
pub struct HydrationStatus {
    pub state: &'static str,
    pub error: Option<String>,
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

/// A snapshot's hold on a volume: the chunks it still has to read, and the
/// old bytes of those that writes replaced before it read them
/// (copy-before-write). One lock orders the uploader's reads and the
/// writers' copies, so each frozen chunk is captured exactly once, with its
/// content at the snapshot's instant.
pub struct Freeze {
    pending: Bitmap,
    /// Chunks the uploader is reading from disk right now: a writer to one
    /// of them waits for `read_done` rather than change it under the read.
    reading: Bitmap,
    read_done: tokio::sync::Notify,
    preserved: tokio::sync::Mutex<std::collections::HashMap<u64, Vec<u8>>>,
    /// The volume's size at the instant; the last chunk may be partial.
    pub size: u64,
}

/// What a snapshot takes at its instant.
pub struct SnapshotPlan {
    pub changed: Changed,
    /// Chunks still `Base` at the instant that the parent's manifest cannot
    /// be trusted to name (all of them when the whole volume is read): their
    /// content is the base snapshot's chunk.
    pub base_chunks: Vec<(u64, snapshot::ChunkHash)>,
    /// The changed chunks that held data at the instant, ascending.
    pub to_read: Vec<u64>,
    pub freeze: Arc<Freeze>,
}

/// An attached volume's NBD export. Detach cancels `cancel`, which makes
/// every session stop reading requests, finish the ones in flight and close;
/// `sessions` is how detach waits for that.
#[derive(Clone)]
pub struct Export {
    pub volume: Arc<Volume>,
    pub cancel: CancellationToken,
    pub sessions: TaskTracker,
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
    pub fn new(
        record: VolumeRecord,
        data: DataFile,
        map: ChunkMap,
        base: Option<Arc<BaseImage>>,
    ) -> Arc<Self> {
        Arc::new(Volume {
            name: record.name.clone(),
            id: record.id,
            chunk_size: record.chunk_size,
            size: AtomicU64::new(record.size),
            data,
            map,
            metadata_changed: AtomicBool::new(false),
            record: Mutex::new(record),
            export: Mutex::new(None),
            gate: tokio::sync::RwLock::new(()),
            freeze: Mutex::new(None),
            parent_manifest: Mutex::new(None),
            base,
            client_ops: AtomicU64::new(0),
            hydration: Mutex::new(HydrationStatus::default()),
        })
    }

    pub fn base(&self) -> Option<&Arc<BaseImage>> {
        self.base.as_ref()
    }

    pub fn client_ops(&self) -> u64 {
        self.client_ops.load(Ordering::Relaxed)
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
        let hash = base.hash(chunk).ok_or_else(|| {
            io::Error::other(format!(
                "chunk {chunk} is Base but its snapshot has no hash for it"
            ))
        })?;
        let data = base.fetcher.get(&hash).await.map_err(|e| {
            tracing::error!(volume = %self.name, snapshot = %base.snapshot, chunk, %hash, error = %e,
                "cannot fetch a chunk of the volume's snapshot");
            io::Error::other(format!(
                "chunk {chunk} of snapshot {} (object {hash}): {e}",
                base.snapshot
            ))
        })?;
        if data.len() as u64 != base.chunk_len(chunk) {
            return Err(io::Error::other(format!(
                "chunk {chunk} of snapshot {} has {} bytes, expected {}",
                base.snapshot,
                data.len(),
                base.chunk_len(chunk)
            )));
        }
        // The fetcher's copy is usually ours alone: no copy then.
        let bytes = Arc::try_unwrap(data).unwrap_or_else(|shared| shared.to_vec());
        self.data.write(chunk * self.chunk_size, bytes).await?;
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
        let size = self.size();
        for c in self.map.chunks_of(offset, len) {
            if self.map.state(c) == ChunkState::Base && !self.covers(offset, len, c, size) {
                self.materialize(c).await?;
            }
        }
        Ok(())
    }

    fn covers(&self, offset: u64, len: u64, chunk: u64, size: u64) -> bool {
        let start = chunk * self.chunk_size;
        let end = (start + self.chunk_size).min(size);
        offset <= start && offset + len >= end
    }

    /// Under the snapshot gate: `Base` chunks the range covers whole leave
    /// the base without a fetch, becoming `Local` (a write) or `Zero` (a
    /// trim). Partial ones were fetched by [`Volume::fetch_partial_bases`].
    async fn unbase_whole(&self, offset: u64, len: u64, local: bool) -> io::Result<()> {
        let Some(base) = &self.base else {
            return Ok(());
        };
        let size = self.size();
        for c in self.map.chunks_of(offset, len) {
            if self.map.state(c) != ChunkState::Base {
                continue;
            }
            if !self.covers(offset, len, c, size) {
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
        self.map.grow(new_size);
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    pub fn record(&self) -> VolumeRecord {
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_record(&self, rec: VolumeRecord) {
        *self.record.lock().unwrap_or_else(|e| e.into_inner()) = rec;
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
        slot.get_or_insert_with(|| Export {
            volume: Arc::clone(self),
            cancel: CancellationToken::new(),
            sessions: TaskTracker::new(),
        })
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
    /// data become pending for the snapshot.
    pub async fn begin_snapshot(&self) -> SnapshotPlan {
        let _gate = self.gate.write().await;
        let changed = self.map.take_changed();
        // Hydration runs outside the gate, so a chunk may go from Base to
        // Local while this looks. Its content is the base's either way: each
        // chunk is classified once, Base first (chunks only ever leave the
        // base), so none falls between the two lists or lands in both.
        let (to_read, base_chunks): (Vec<u64>, Vec<(u64, snapshot::ChunkHash)>) =
            match (&changed, &self.base) {
                (Changed::All, None) => (self.map.local_list(), Vec::new()),
                (Changed::All, Some(b)) => {
                    let based = self.map.base_list();
                    let set: std::collections::HashSet<u64> = based.iter().copied().collect();
                    let local = self
                        .map
                        .local_list()
                        .into_iter()
                        .filter(|c| !set.contains(c))
                        .collect();
                    let hashes = based
                        .into_iter()
                        .filter_map(|c| b.hash(c).map(|h| (c, h)))
                        .collect();
                    (local, hashes)
                }
                (Changed::Chunks(c), base) => {
                    let (mut local, mut hashes) = (Vec::new(), Vec::new());
                    for &i in c {
                        match self.map.state(i) {
                            ChunkState::Local => local.push(i),
                            ChunkState::Base => {
                                if let Some(h) = base.as_ref().and_then(|b| b.hash(i)) {
                                    hashes.push((i, h));
                                }
                            }
                            ChunkState::Zero => {}
                        }
                    }
                    (local, hashes)
                }
            };
        let size = self.size();
        let pending = Bitmap::new(size.div_ceil(self.chunk_size));
        for &c in &to_read {
            pending.set(c);
        }
        let freeze = Arc::new(Freeze {
            pending,
            reading: Bitmap::new(size.div_ceil(self.chunk_size)),
            read_done: tokio::sync::Notify::new(),
            preserved: tokio::sync::Mutex::new(Default::default()),
            size,
        });
        *self.freeze.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&freeze));
        SnapshotPlan {
            changed,
            base_chunks,
            to_read,
            freeze,
        }
    }

    pub fn parent_manifest(&self) -> Option<Arc<snapshot::Manifest>> {
        self.parent_manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_parent_manifest(&self, m: Arc<snapshot::Manifest>) {
        *self
            .parent_manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(m);
    }

    /// Releases the freeze (the snapshot read everything it needed, or
    /// gave up); copies not yet taken are dropped.
    pub fn end_snapshot(&self) {
        *self.freeze.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// A frozen chunk's content at the snapshot's instant: from disk if no
    /// write touched it since, else the copy that write preserved.
    /// Many chunks are read at once; the lock is held only to move a chunk
    /// from pending to reading, never across the read.
    pub async fn take_frozen_chunk(&self, freeze: &Freeze, chunk: u64) -> io::Result<Vec<u8>> {
        {
            let mut preserved = freeze.preserved.lock().await;
            if !freeze.pending.get(chunk) {
                return preserved.remove(&chunk).ok_or_else(|| {
                    io::Error::other(format!("chunk {chunk} was taken twice or never frozen"))
                });
            }
            // Marked reading before it stops being pending, so a writer
            // always sees one of the two.
            freeze.reading.set(chunk);
            freeze.pending.clear(chunk);
        }
        let data = self.read_chunk(chunk, freeze.size).await;
        freeze.reading.clear(chunk);
        freeze.read_done.notify_waiters();
        data
    }

    async fn read_chunk(&self, chunk: u64, size: u64) -> io::Result<Vec<u8>> {
        let off = chunk * self.chunk_size;
        let len = self.chunk_size.min(size.saturating_sub(off));
        self.data.read(off, len as usize).await
    }

    /// Before bytes in `[offset, offset + len)` change: preserve the frozen
    /// chunks among them for the snapshot in progress.
    async fn capture(&self, offset: u64, len: u64) -> io::Result<()> {
        let Some(freeze) = self
            .freeze
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return Ok(());
        };
        for c in self.map.chunks_of(offset, len) {
            // Pending bits only ever clear, so a chunk seen neither pending
            // nor reading needs nothing; one seen pending is checked again
            // under the lock.
            if freeze.pending.get(c) {
                let mut preserved = freeze.preserved.lock().await;
                if freeze.pending.clear(c) {
                    let old = self.read_chunk(c, freeze.size).await?;
                    preserved.insert(c, old);
                    continue;
                }
            }
            // The uploader is reading this chunk: wait until it has its copy.
            loop {
                let done = freeze.read_done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if !freeze.reading.get(c) {
                    break;
                }
                done.await;
            }
        }
        Ok(())
    }

    /// Writes `buf` at `offset`; with `fua` the bytes are durable on return.
    pub async fn write(&self, offset: u64, buf: Vec<u8>, fua: bool) -> io::Result<()> {
        let _op = ClientOp::new(&self.client_ops);
        let len = buf.len() as u64;
        self.fetch_partial_bases(offset, len).await?;
        let _gate = self.gate.read().await;
        self.unbase_whole(offset, len, true).await?;
        self.capture(offset, len).await?;
        // The chunks are marked before the bytes land, so a read racing the
        // write sees either the old bytes or the new, never a stale Zero
        // after the write completed.
        self.map.mark_written(offset, buf.len() as u64);
        self.data.write(offset, buf).await?;
        if fua {
            self.data.sync(false).await
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
        fua: bool,
    ) -> io::Result<()> {
        let _op = ClientOp::new(&self.client_ops);
        self.fetch_partial_bases(offset, len).await?;
        let _gate = self.gate.read().await;
        self.unbase_whole(offset, len, no_hole).await?;
        self.capture(offset, len).await?;
        if no_hole {
            self.map.mark_written(offset, len);
            self.data.fallocate(ZERO_RANGE, offset, len).await?;
        } else {
            // Punch only where there is data: a Zero run is already zeros.
            for (off, n, state) in self.map.runs(offset, len) {
                if state == ChunkState::Local {
                    self.data.fallocate(PUNCH_HOLE, off, n).await?;
                }
            }
            let cs = self.chunk_size;
            let first_full = offset.div_ceil(cs);
            let end_full = (offset + len) / cs;
            for c in first_full..end_full {
                self.map.mark_zero(c);
            }
        }
        self.metadata_changed.store(true, Ordering::Release);
        if fua { self.flush().await } else { Ok(()) }
    }

    /// Makes every write completed so far, on any connection, durable.
    /// For a restored volume, the chunks that left the base are logged
    /// after the data is synced, never before (see `base`).
    pub async fn flush(&self) -> io::Result<()> {
        let detached = self.base.as_ref().map(|b| b.log.take_pending());
        let metadata = self.metadata_changed.swap(false, Ordering::AcqRel);
        let r = self.data.sync(metadata).await;
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
                base.log.append(chunks).await?;
            }
        }
        r
    }

    /// NBD CACHE: start reading the range's data into the page cache.
    pub async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
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

    /// Allocation of `[offset, offset + len)` from the chunk map.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        self.map
            .runs(offset, len)
            .into_iter()
            .map(|(_, n, s)| Extent {
                len: n,
                zero: s == ChunkState::Zero,
            })
            .collect()
    }
}
