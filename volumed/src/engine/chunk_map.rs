//! The chunk-state map of a volume, and its dirty set.
//!
//! Each chunk is `Zero` (never written, or trimmed: no bytes on disk, reads
//! cost no I/O), `Local` (its bytes are in the data files) or, in a volume
//! created from a snapshot, `Base` (its bytes are the snapshot's chunk, not
//! yet fetched). The dirty set records chunks changed since the last
//! completed snapshot.
//!
//! Both are bitmaps of atomic words in pages allocated on first use, so a
//! 64 TiB volume that is mostly empty costs kilobytes, and the data path
//! sets bits without a lock.
//!
//! Durability: the `Local` bits are never written anywhere. After a crash
//! they are rebuilt from the data files' own allocation (SEEK_DATA), which
//! is exactly what the last FLUSH made durable. A chunk whose bytes were
//! flushed is allocated, so it comes back `Local`; a chunk that was trimmed
//! is a hole and reads as zeros whichever way its bit comes back. The dirty
//! set is saved at a clean shutdown; after a crash every `Local` chunk is
//! treated as dirty, which can only make a snapshot send more, never less.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::{OnceLock, RwLock};

use snapshot::ChunkGeometry;

/// Bits per page: 32768 chunks, 4 KiB of words.
const PAGE_WORDS: usize = 512;
const PAGE_BITS: u64 = PAGE_WORDS as u64 * 64;

type Page = [AtomicU64; PAGE_WORDS];

/// A growable bitmap whose pages exist only once a bit in them was set.
pub struct Bitmap {
    /// The lock is taken for writing only to grow; bit operations share it.
    pages: RwLock<Vec<OnceLock<Box<Page>>>>,
}

impl Bitmap {
    pub fn new(bits: u64) -> Self {
        let b = Bitmap {
            pages: RwLock::new(Vec::new()),
        };
        b.grow(bits);
        b
    }

    pub fn grow(&self, bits: u64) {
        let want = bits.div_ceil(PAGE_BITS) as usize;
        let mut pages = self.pages.write().unwrap_or_else(|e| e.into_inner());
        while pages.len() < want {
            pages.push(OnceLock::new());
        }
    }

    fn locate(i: u64) -> (usize, usize, u64) {
        let page = (i / PAGE_BITS) as usize;
        let bit = i % PAGE_BITS;
        (page, (bit / 64) as usize, 1u64 << (bit % 64))
    }

    pub fn get(&self, i: u64) -> bool {
        let (p, w, mask) = Self::locate(i);
        let pages = self.pages.read().unwrap_or_else(|e| e.into_inner());
        pages
            .get(p)
            .and_then(OnceLock::get)
            .is_some_and(|page| page[w].load(Ordering::Acquire) & mask != 0)
    }

    /// Sets bit `i`; returns whether it was set before. Out of range is a
    /// no-op: callers check ranges against the volume size first.
    pub fn set(&self, i: u64) -> bool {
        let (p, w, mask) = Self::locate(i);
        let pages = self.pages.read().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = pages.get(p) else {
            return false;
        };
        let page = slot.get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
        page[w].fetch_or(mask, Ordering::AcqRel) & mask != 0
    }

    /// Sets every bit in `range` a word at a time: a 16 TiB base of 32 Mi
    /// chunks is marked in milliseconds, not one bit per call.
    pub fn set_range(&self, range: std::ops::Range<u64>) {
        let pages = self.pages.read().unwrap_or_else(|e| e.into_inner());
        let mut i = range.start;
        while i < range.end {
            let (p, w, _) = Self::locate(i);
            let Some(slot) = pages.get(p) else {
                return;
            };
            let bit = i % 64;
            let n = (64 - bit).min(range.end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let page = slot.get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
            page[w].fetch_or(mask, Ordering::AcqRel);
            i += n;
        }
    }

    /// Indices set in both `self` and `other`, ascending, a word at a time:
    /// only the common bits are listed, however many each has.
    pub fn ones_and(&self, other: &Bitmap) -> Vec<u64> {
        let (a, b) = (
            self.pages.read().unwrap_or_else(|e| e.into_inner()),
            other.pages.read().unwrap_or_else(|e| e.into_inner()),
        );
        let mut out = Vec::new();
        for (p, (x, y)) in a.iter().zip(b.iter()).enumerate() {
            let (Some(x), Some(y)) = (x.get(), y.get()) else {
                continue;
            };
            for (w, (u, v)) in x.iter().zip(y.iter()).enumerate() {
                let mut bits = u.load(Ordering::Acquire) & v.load(Ordering::Acquire);
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    out.push(p as u64 * PAGE_BITS + w as u64 * 64 + b);
                    bits &= bits - 1;
                }
            }
        }
        out
    }

    /// The first `max` set bits, ascending.
    pub fn first_ones(&self, max: usize) -> Vec<u64> {
        let pages = self.pages.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (p, slot) in pages.iter().enumerate() {
            let Some(page) = slot.get() else { continue };
            for (w, word) in page.iter().enumerate() {
                let mut v = word.load(Ordering::Acquire);
                while v != 0 {
                    if out.len() == max {
                        return out;
                    }
                    let b = v.trailing_zeros() as u64;
                    out.push(p as u64 * PAGE_BITS + w as u64 * 64 + b);
                    v &= v - 1;
                }
            }
        }
        out
    }

    /// Clears bit `i`; returns whether it was set before.
    pub fn clear(&self, i: u64) -> bool {
        let (p, w, mask) = Self::locate(i);
        let pages = self.pages.read().unwrap_or_else(|e| e.into_inner());
        match pages.get(p).and_then(OnceLock::get) {
            Some(page) => page[w].fetch_and(!mask, Ordering::AcqRel) & mask != 0,
            None => false,
        }
    }

    /// Indices of set bits, ascending.
    pub fn ones(&self) -> Vec<u64> {
        let pages = self.pages.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (p, slot) in pages.iter().enumerate() {
            let Some(page) = slot.get() else { continue };
            for (w, word) in page.iter().enumerate() {
                let mut v = word.load(Ordering::Acquire);
                while v != 0 {
                    let b = v.trailing_zeros() as u64;
                    out.push(p as u64 * PAGE_BITS + w as u64 * 64 + b);
                    v &= v - 1;
                }
            }
        }
        out
    }

    /// Clears every bit and returns the indices that were set; a bit set
    /// concurrently lands either in the result or in the bitmap, never lost.
    pub fn take_ones(&self) -> Vec<u64> {
        let pages = self.pages.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (p, slot) in pages.iter().enumerate() {
            let Some(page) = slot.get() else { continue };
            for (w, word) in page.iter().enumerate() {
                let mut v = word.swap(0, Ordering::AcqRel);
                while v != 0 {
                    let b = v.trailing_zeros() as u64;
                    out.push(p as u64 * PAGE_BITS + w as u64 * 64 + b);
                    v &= v - 1;
                }
            }
        }
        out
    }

    pub fn count(&self) -> u64 {
        let pages = self.pages.read().unwrap_or_else(|e| e.into_inner());
        pages
            .iter()
            .filter_map(OnceLock::get)
            .map(|p| {
                p.iter()
                    .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
                    .sum::<u64>()
            })
            .sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    Zero,
    Local,
    Base,
}

pub struct ChunkMap {
    chunk_shift: u32,
    local: Bitmap,
    /// Chunks still `Base`; a set bit wins over `local`. Bits are only ever
    /// cleared once the volume is open: a chunk leaves its base for good.
    base: Bitmap,
    dirty: Bitmap,
    /// Nothing proves which chunks changed (an unclean shutdown): the next
    /// snapshot must read every chunk rather than trust its parent.
    dirty_all: std::sync::atomic::AtomicBool,
}

/// What changed since the last snapshot, taken at a snapshot's instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Every chunk: read the whole volume, ignore the parent.
    All,
    /// These chunks, ascending.
    Chunks(Vec<u64>),
}

impl ChunkMap {
    /// An all-`Zero` map for the chunks of `geometry`.
    pub fn new(geometry: ChunkGeometry) -> Self {
        let chunk_shift = geometry.shift();
        let chunks = geometry.count();
        ChunkMap {
            chunk_shift,
            local: Bitmap::new(chunks),
            base: Bitmap::new(chunks),
            dirty: Bitmap::new(chunks),
            dirty_all: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_shift
    }

    /// Makes room for the chunks of a larger volume.
    pub fn grow(&self, geometry: ChunkGeometry) {
        let chunks = geometry.count();
        self.local.grow(chunks);
        self.base.grow(chunks);
        self.dirty.grow(chunks);
    }

    pub fn chunk_of(&self, offset: u64) -> u64 {
        offset >> self.chunk_shift
    }

    /// Chunks touched by `[offset, offset + len)`, `len > 0`.
    pub fn chunks_of(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        self.chunk_of(offset)..=self.chunk_of(offset + len - 1)
    }

    pub fn state(&self, chunk: u64) -> ChunkState {
        if self.base.get(chunk) {
            ChunkState::Base
        } else if self.local.get(chunk) {
            ChunkState::Local
        } else {
            ChunkState::Zero
        }
    }

    /// Before a write's bytes go to disk: the chunks hold data and changed.
    pub fn mark_written(&self, offset: u64, len: u64) {
        for c in self.chunks_of(offset, len) {
            self.local.set(c);
            self.dirty.set(c);
        }
    }

    /// Part of a chunk changed without changing its state (a punch inside a
    /// `Local` chunk): it is dirty if it holds data.
    pub fn mark_changed(&self, chunk: u64) {
        if self.local.get(chunk) {
            self.dirty.set(chunk);
        }
    }

    /// A whole chunk became zero (punched). Dirty only if it held data.
    pub fn mark_zero(&self, chunk: u64) {
        if self.local.clear(chunk) {
            self.dirty.set(chunk);
        }
    }

    /// At open: chunk `i` is the base snapshot's and was not yet fetched.
    /// Returns whether it was also marked `Local`, i.e. the data file has
    /// stray bytes there (a fetch that never became durable).
    pub fn set_base(&self, chunk: u64) -> bool {
        self.base.set(chunk);
        self.local.clear(chunk)
    }

    /// At open or restore: every chunk in `range` is the base snapshot's
    /// (or may be: a chunk of a format-2 page that is zero reads as zeros
    /// when fetched). The caller keeps `range` inside the volume. Chunks
    /// also `Local` are not changed here; see
    /// [`ChunkMap::base_and_local`].
    pub fn set_base_range(&self, range: std::ops::Range<u64>) {
        self.base.set_range(range);
    }

    /// A `Base` chunk its snapshot names zero (one of a format-2 page that
    /// holds data) leaves the base as `Zero`. Not dirty: its content, zeros,
    /// did not change.
    pub fn drop_zero_base(&self, chunk: u64) {
        self.base.clear(chunk);
    }

    /// At open: a chunk the detach log records left the base; its state is
    /// what the data file's allocation said (`Local` or `Zero`).
    pub fn unbase_at_open(&self, chunk: u64) {
        self.base.clear(chunk);
    }

    /// Chunks both `Base` and `Local`, ascending: after
    /// [`ChunkMap::set_base_range`], the data file's stray bytes.
    pub fn base_and_local(&self) -> Vec<u64> {
        self.local.ones_and(&self.base)
    }

    /// A `Base` chunk's bytes are now in the data file. Not dirty: its
    /// content did not change. `Local` is set before `Base` clears, so a
    /// reader never sees the chunk as `Zero` in between.
    pub fn mark_hydrated(&self, chunk: u64) {
        self.local.set(chunk);
        self.base.clear(chunk);
    }

    /// A `Base` chunk is replaced whole (written or trimmed) without being
    /// fetched: `Local` for a write about to land, `Zero` for a trim. Its
    /// content changes either way, so it is dirty.
    pub fn unbase(&self, chunk: u64, local: bool) {
        if local {
            self.local.set(chunk);
        }
        self.base.clear(chunk);
        self.dirty.set(chunk);
    }

    pub fn base_chunks(&self) -> u64 {
        self.base.count()
    }

    /// Chunks still `Base`, ascending.
    pub fn base_list(&self) -> Vec<u64> {
        self.base.ones()
    }

    /// The first `max` chunks still `Base`, ascending: work in bounded
    /// batches over a base of any size.
    pub fn base_batch(&self, max: usize) -> Vec<u64> {
        self.base.first_ones(max)
    }

    /// Marks chunks `Local` from allocated byte ranges of the data files.
    pub fn load_allocation(&self, ranges: &[(u64, u64)]) {
        for &(start, end) in ranges {
            if end > start {
                for c in self.chunks_of(start, end - start) {
                    self.local.set(c);
                }
            }
        }
    }

    pub fn local_chunks(&self) -> u64 {
        self.local.count()
    }

    pub fn dirty_chunks(&self) -> Vec<u64> {
        self.dirty.ones()
    }

    /// Whether chunk `chunk` changed since the last snapshot's instant.
    pub fn is_dirty(&self, chunk: u64) -> bool {
        self.all_dirty() || self.dirty.get(chunk)
    }

    /// How many chunks changed since the last snapshot; `None` when every
    /// chunk counts as changed (after an unclean stop).
    pub fn dirty_count(&self) -> Option<u64> {
        (!self.dirty_all.load(Ordering::Acquire)).then(|| self.dirty.count())
    }

    /// After an unclean shutdown nothing proves which chunks changed. Not a
    /// bit per chunk: a 64 TiB volume would need a gigabit of them.
    pub fn mark_all_dirty(&self) {
        self.dirty_all.store(true, Ordering::Release);
    }

    pub fn all_dirty(&self) -> bool {
        self.dirty_all.load(Ordering::Acquire)
    }

    /// Splits the dirty set at a snapshot's instant: what changed goes to
    /// the snapshot, and the set starts empty for the next one.
    pub fn take_changed(&self) -> Changed {
        let ones = self.dirty.take_ones();
        if self.dirty_all.swap(false, Ordering::AcqRel) {
            Changed::All
        } else {
            Changed::Chunks(ones)
        }
    }

    /// A snapshot failed: its changes belong to the next one.
    pub fn restore_changed(&self, changed: &Changed) {
        match changed {
            Changed::All => self.mark_all_dirty(),
            Changed::Chunks(c) => c.iter().for_each(|&i| {
                self.dirty.set(i);
            }),
        }
    }

    /// Chunks holding data, ascending.
    pub fn local_list(&self) -> Vec<u64> {
        self.local.ones()
    }

    /// Splits `[offset, offset + len)` into runs of one state:
    /// `(offset, len, state)`, in order, covering the range exactly.
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, ChunkState)> {
        let mut out: Vec<(u64, u64, ChunkState)> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let c = self.chunk_of(pos);
            let chunk_end = ((c + 1) << self.chunk_shift).min(end);
            let st = self.state(c);
            match out.last_mut() {
                Some(last) if last.2 == st => last.1 += chunk_end - pos,
                _ => out.push((pos, chunk_end - pos, st)),
            }
            pos = chunk_end;
        }
        out
    }

    /// Saves the dirty set (clean shutdown): `VDIRTY01`, u64 LE count, then
    /// that many u64 LE chunk indices; written to a temp file and renamed.
    /// With everything dirty there is nothing to save: a missing file means
    /// exactly that at the next start.
    pub fn save_dirty(&self, path: &Path) -> io::Result<()> {
        if self.all_dirty() {
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let ones = self.dirty.ones();
        let mut buf = Vec::with_capacity(16 + ones.len() * 8);
        buf.extend_from_slice(DIRTY_MAGIC);
        buf.extend_from_slice(&(ones.len() as u64).to_le_bytes());
        for c in ones {
            buf.extend_from_slice(&c.to_le_bytes());
        }
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        // The rename must be durable before the catalog records a clean
        // shutdown, or an older set could be read back after a power loss.
        match path.parent() {
            Some(dir) => crate::disk::sync_dir(dir),
            None => Ok(()),
        }
    }

    /// Loads a dirty set saved by [`ChunkMap::save_dirty`]. A damaged file
    /// is an error; the caller then falls back to "every Local chunk".
    pub fn load_dirty(&self, path: &Path) -> io::Result<()> {
        let data = std::fs::read(path)?;
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("dirty set {}: {why}", path.display()),
            )
        };
        if data.len() < 16 || &data[..8] != DIRTY_MAGIC {
            return Err(bad("bad header"));
        }
        let count = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
        if Some(data.len() as u64) != count.checked_mul(8).and_then(|n| n.checked_add(16)) {
            return Err(bad("length does not match the count"));
        }
        for c in data[16..].chunks_exact(8) {
            self.dirty
                .set(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        Ok(())
    }
}

const DIRTY_MAGIC: &[u8; 8] = b"VDIRTY01";

#[cfg(test)]
#[path = "chunk_map_tests.rs"]
mod tests;
