//! A snapshot's hold on a live volume: which chunks it must still read, and
//! the old bytes of those a write replaced first (copy-before-write).
//!
//! `Volume::begin_snapshot` freezes the volume at one instant (no write in
//! flight) and returns a [`FreezeGuard`]. While the guard lives, every write
//! to a frozen chunk first preserves that chunk's content for the snapshot.
//! The guard owns the dirty set it took: dropping it (the snapshot failed or
//! was cancelled) ends the freeze and puts those changes back, so the next
//! snapshot carries them; [`FreezeGuard::commit`] ends the freeze once the
//! manifest is in the store.
//!
//! Copies are held in memory up to [`MEMORY_BOUND`] bytes; beyond it they
//! go to a spill file in the volume's directory ([`SPILL_FILE`]), made when
//! first needed and removed when the freeze ends (or, after a crash, by
//! recovery when the volume is opened). It is never synced: a crash ends
//! the snapshot anyway.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::ops::RangeInclusive;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshot::ChunkGeometry;

use super::Volume;
use super::base::BaseImage;
use super::chunk_map::{Bitmap, Changed, ChunkMap, ChunkState};
use crate::disk::DataFile;

/// The frozen state shared by the uploader and the writers. One lock orders
/// the uploader's reads and the writers' copies, so each frozen chunk is
/// captured exactly once, with its content at the snapshot's instant.
pub struct Freeze {
    pending: Bitmap,
    /// Chunks being read from disk right now, by the uploader or by a
    /// writer preserving them: a writer to one of them waits for
    /// `read_done` rather than change it under the read.
    reading: Bitmap,
    read_done: tokio::sync::Notify,
    preserved: tokio::sync::Mutex<Preserved>,
    /// The volume's geometry at the instant; the last chunk may be partial.
    pub geometry: ChunkGeometry,
}

/// Bytes of copies a freeze holds in memory before it spills to disk. Small
/// beside the upload's own buffers (16 chunks in flight, each read, hashed
/// and compressed): with 4 MiB chunks a 2 GiB volume overwritten during its
/// snapshot peaks near 180 MiB of RSS with this bound (tests/cbw_spill.rs).
pub const MEMORY_BOUND: usize = 32 << 20;

/// The spill file of a freeze, in the volume's directory.
pub const SPILL_FILE: &str = "cbw.spill";

/// Removes a spill file a crash left behind.
pub fn remove_spill(dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(dir.join(SPILL_FILE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The copies writers preserved, by chunk: in memory, else in the spill
/// file, in slots of one chunk size that are reused once taken.
#[derive(Default)]
struct Preserved {
    memory: HashMap<u64, Vec<u8>>,
    memory_bytes: usize,
    /// Chunk to (slot offset, length).
    spilled: HashMap<u64, (u64, usize)>,
    spill: Option<(Arc<File>, PathBuf)>,
    free_slots: Vec<u64>,
    next_slot: u64,
    /// Why a copy could not be kept: the snapshot fails when it takes that
    /// chunk, while the write that needed the copy goes on.
    lost: Option<String>,
}

impl Preserved {
    async fn insert(
        &mut self,
        dir: &Path,
        slot_size: u64,
        chunk: u64,
        bytes: Vec<u8>,
    ) -> io::Result<()> {
        let len = bytes.len();
        match self.memory_bytes.checked_add(len) {
            Some(total) if total <= MEMORY_BOUND => {
                self.memory_bytes = total;
                self.memory.insert(chunk, bytes);
                return Ok(());
            }
            _ => {}
        }
        let file = match &self.spill {
            Some((f, _)) => Arc::clone(f),
            None => {
                let path = dir.join(SPILL_FILE);
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)?;
                let f = Arc::new(f);
                self.spill = Some((Arc::clone(&f), path));
                f
            }
        };
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                let s = self.next_slot;
                self.next_slot = s
                    .checked_add(slot_size)
                    .ok_or_else(|| io::Error::other("spill file offset overflows"))?;
                s
            }
        };
        let written = tokio::task::spawn_blocking(move || file.write_all_at(&bytes, slot))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r);
        if let Err(e) = written {
            self.free_slots.push(slot);
            return Err(e);
        }
        self.spilled.insert(chunk, (slot, len));
        Ok(())
    }

    async fn remove(&mut self, chunk: u64) -> io::Result<Option<Vec<u8>>> {
        if let Some(b) = self.memory.remove(&chunk) {
            self.memory_bytes = self.memory_bytes.saturating_sub(b.len());
            return Ok(Some(b));
        }
        let Some((slot, len)) = self.spilled.remove(&chunk) else {
            return Ok(None);
        };
        let Some((file, _)) = &self.spill else {
            return Err(io::Error::other("a spilled chunk without a spill file"));
        };
        let file = Arc::clone(file);
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, slot).map(|()| buf)
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        self.free_slots.push(slot);
        read.map(Some)
    }
}

impl Drop for Preserved {
    fn drop(&mut self) {
        if let Some((_, path)) = self.spill.take()
            && let Err(e) = std::fs::remove_file(&path)
        {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a copy-before-write spill file");
        }
    }
}

/// What a snapshot takes at its instant.
pub struct SnapshotPlan {
    pub changed: Changed,
    /// Chunks still `Base` at the instant that the parent's manifest cannot
    /// be trusted to name (all of them when the whole volume is read),
    /// ascending: their content is the base snapshot's chunk, whose hash
    /// the snapshot reads from the base's manifest.
    pub base_chunks: Vec<u64>,
    /// The changed chunks that held data at the instant, ascending.
    pub to_read: Vec<u64>,
}

impl SnapshotPlan {
    /// Splits what changed into chunks to read and chunks still `Base`.
    /// Hydration runs outside the snapshot gate, so a chunk may go from
    /// `Base` to `Local` while this looks. Its content is the base's either
    /// way: each chunk is classified once, `Base` first (chunks only ever
    /// leave the base), so none falls between the two lists or lands in both.
    pub(super) fn classify(changed: Changed, map: &ChunkMap, base: Option<&BaseImage>) -> Self {
        let (to_read, base_chunks) = match (&changed, base) {
            (Changed::All, None) => (map.local_list(), Vec::new()),
            (Changed::All, Some(_)) => {
                let based = map.base_list();
                let set: HashSet<u64> = based.iter().copied().collect();
                let local = map
                    .local_list()
                    .into_iter()
                    .filter(|c| !set.contains(c))
                    .collect();
                (local, based)
            }
            (Changed::Chunks(c), base) => {
                let (mut local, mut based) = (Vec::new(), Vec::new());
                for &i in c {
                    match map.state(i) {
                        ChunkState::Local => local.push(i),
                        ChunkState::Base if base.is_some() => based.push(i),
                        ChunkState::Base | ChunkState::Zero => {}
                    }
                }
                (local, based)
            }
        };
        SnapshotPlan {
            changed,
            base_chunks,
            to_read,
        }
    }

    /// How many chunks changed since the parent.
    pub fn changed_chunks(&self) -> u64 {
        match &self.changed {
            Changed::All => self.to_read.len() as u64,
            Changed::Chunks(c) => c.len() as u64,
        }
    }
}

impl Freeze {
    pub(super) fn new(geometry: ChunkGeometry, to_read: &[u64]) -> Self {
        let pending = Bitmap::new(geometry.count());
        for &c in to_read {
            pending.set(c);
        }
        Freeze {
            pending,
            reading: Bitmap::new(geometry.count()),
            read_done: tokio::sync::Notify::new(),
            preserved: tokio::sync::Mutex::new(Preserved::default()),
            geometry,
        }
    }

    async fn read_chunk(&self, data: &DataFile, chunk: u64) -> io::Result<Vec<u8>> {
        let r = self.geometry.range(chunk);
        data.read(r.start, (r.end - r.start) as usize).await
    }

    /// A frozen chunk's content at the snapshot's instant: from disk if no
    /// write touched it since, else the copy that write preserved. Many
    /// chunks are read at once; the lock is held only to move a chunk from
    /// pending to reading, never across the read.
    pub(super) async fn take(&self, data: &DataFile, chunk: u64) -> io::Result<Vec<u8>> {
        {
            let mut preserved = self.preserved.lock().await;
            if !self.pending.get(chunk) {
                return preserved
                    .remove(chunk)
                    .await?
                    .ok_or_else(|| match &preserved.lost {
                        Some(why) => io::Error::other(format!(
                            "copy-before-write of chunk {chunk} lost: {why}"
                        )),
                        None => io::Error::other(format!(
                            "chunk {chunk} was taken twice or never frozen"
                        )),
                    });
            }
            // Marked reading before it stops being pending, so a writer
            // always sees one of the two.
            self.reading.set(chunk);
            self.pending.clear(chunk);
        }
        let bytes = self.read_chunk(data, chunk).await;
        self.reading.clear(chunk);
        self.read_done.notify_waiters();
        bytes
    }

    /// Before bytes of `chunks` change: preserve the frozen ones among them.
    pub(super) async fn capture(
        &self,
        data: &DataFile,
        chunks: RangeInclusive<u64>,
    ) -> io::Result<()> {
        for c in chunks {
            // Pending bits only ever clear, so a chunk seen neither pending
            // nor reading needs nothing; one seen pending is checked again
            // under the lock.
            if self.pending.get(c) {
                let mut preserved = self.preserved.lock().await;
                if self.pending.get(c) {
                    // Reading, like the uploader's: another writer to this
                    // chunk sees it and waits until the old bytes are safe.
                    // The lock, held across the read, makes the uploader's
                    // `take` wait for the copy.
                    self.reading.set(c);
                    self.pending.clear(c);
                    let slot = self.geometry.chunk_size();
                    let copied = match self.read_chunk(data, c).await {
                        Ok(bytes) => preserved.insert(data.dir(), slot, c, bytes).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = copied {
                        // The snapshot fails, not the write: the write's
                        // own I/O is what the client asked for.
                        tracing::warn!(chunk = c, error = %e, "could not preserve a frozen chunk; the snapshot will fail");
                        preserved.lost.get_or_insert_with(|| e.to_string());
                    }
                    self.reading.clear(c);
                    self.read_done.notify_waiters();
                    continue;
                }
            }
            // The uploader is reading this chunk: wait until it has its copy.
            loop {
                let done = self.read_done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if !self.reading.get(c) {
                    break;
                }
                done.await;
            }
        }
        Ok(())
    }
}

/// A frozen volume, for as long as its snapshot runs. See the module doc.
pub struct FreezeGuard {
    volume: Arc<Volume>,
    freeze: Arc<Freeze>,
    plan: SnapshotPlan,
    committed: bool,
}

/// A handle the uploader's tasks use to read frozen chunks.
#[derive(Clone)]
pub struct FrozenReader {
    volume: Arc<Volume>,
    freeze: Arc<Freeze>,
}

impl FrozenReader {
    pub async fn take(&self, chunk: u64) -> io::Result<Vec<u8>> {
        self.freeze.take(self.volume.data(), chunk).await
    }
}

impl FreezeGuard {
    pub(super) fn new(volume: Arc<Volume>, freeze: Arc<Freeze>, plan: SnapshotPlan) -> Self {
        FreezeGuard {
            volume,
            freeze,
            plan,
            committed: false,
        }
    }

    pub fn plan(&self) -> &SnapshotPlan {
        &self.plan
    }

    pub fn geometry(&self) -> ChunkGeometry {
        self.freeze.geometry
    }

    pub fn reader(&self) -> FrozenReader {
        FrozenReader {
            volume: Arc::clone(&self.volume),
            freeze: Arc::clone(&self.freeze),
        }
    }

    /// The snapshot is in the store: end the freeze; its changes are not
    /// put back.
    pub fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        self.volume.end_freeze(&self.freeze);
        if !self.committed {
            self.volume.map().restore_changed(&self.plan.changed);
        }
    }
}
