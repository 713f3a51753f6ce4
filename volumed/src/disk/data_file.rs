//! Segmented sparse data files.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::engine::{IoEngine, SyncOn};
use super::intent_log::{self, IntentLog, RECORD_MAX};
use super::op::{OpKind, ReadBuf};
use super::sector_cipher::SectorCipher;
use super::write_behind::WriteBehind;

/// Bytes covered by one segment file: half of ext4's 16 TiB file limit, a
/// power of two so chunk boundaries never straddle two segments.
pub const SEGMENT_SIZE: u64 = 8 << 40;

pub struct DataFile {
    dir: PathBuf,
    engine: Arc<IoEngine>,
    /// Grows when the volume grows; the lock is held only to clone the
    /// `Arc`s an operation needs, never across I/O.
    segments: RwLock<Vec<Arc<File>>>,
    /// Encrypts every byte written (see `cipher_io`); `None`: plain file.
    cipher: Option<SectorCipher>,
    /// Held by writes that cover part of a sector (read, patch, write).
    partial: tokio::sync::Mutex<()>,
    /// Which large writes start their own writeback.
    write_behind: WriteBehind,
    /// Small writes since the last FLUSH, made durable without syncing the
    /// segments.
    pub(super) log: IntentLog,
}

/// One segment's share of a byte range.
struct Piece {
    file: Arc<File>,
    /// Offset inside the segment file.
    pos: u64,
    /// Offset inside the caller's range.
    at: usize,
    len: usize,
}

fn segment_path(dir: &Path, idx: u64) -> PathBuf {
    dir.join(format!("seg-{idx:05}"))
}

fn segment_count(size: u64) -> u64 {
    size.div_ceil(SEGMENT_SIZE)
}

fn segment_len(size: u64, idx: u64) -> u64 {
    (size - idx * SEGMENT_SIZE).min(SEGMENT_SIZE)
}

fn open_segment(dir: &Path, idx: u64, create_new: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if create_new {
        o.create_new(true);
    } else {
        o.create(true).truncate(false);
    }
    o.open(segment_path(dir, idx))
}

impl DataFile {
    /// Creates the directory and sparse segments for `size` bytes. Allocates
    /// no data blocks, whatever the size.
    pub fn create(dir: &Path, size: u64, engine: Arc<IoEngine>) -> io::Result<Self> {
        std::fs::create_dir(dir)?;
        let mut segments = Vec::new();
        for idx in 0..segment_count(size) {
            let f = open_segment(dir, idx, true)?;
            f.set_len(segment_len(size, idx))?;
            f.sync_all()?;
            engine.hold(&f);
            segments.push(Arc::new(f));
        }
        let (log, _) = IntentLog::open(dir, &engine)?;
        log.restart_blocking(&engine)?;
        sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(DataFile {
            dir: dir.to_owned(),
            engine,
            segments: RwLock::new(segments),
            cipher: None,
            partial: tokio::sync::Mutex::new(()),
            write_behind: WriteBehind::default(),
            log,
        })
    }

    /// Opens an existing volume of `size` bytes, repairing segment lengths a
    /// crash in the middle of a grow may have left short.
    pub fn open(dir: &Path, size: u64, engine: Arc<IoEngine>) -> io::Result<Self> {
        if !dir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is missing", dir.display()),
            ));
        }
        let mut segments = Vec::new();
        for idx in 0..segment_count(size) {
            let f = open_segment(dir, idx, false)?;
            let want = segment_len(size, idx);
            if f.metadata()?.len() < want {
                f.set_len(want)?;
            }
            engine.hold(&f);
            segments.push(Arc::new(f));
        }
        let (log, replay) = IntentLog::open(dir, &engine)?;
        let df = DataFile {
            dir: dir.to_owned(),
            engine,
            segments: RwLock::new(segments),
            cipher: None,
            partial: tokio::sync::Mutex::new(()),
            write_behind: WriteBehind::default(),
            log,
        };
        df.replay(replay, size)?;
        Ok(df)
    }

    /// Writes back what the intent log made durable (every write a FLUSH
    /// covered since the segments' last sync), syncs it, and starts the
    /// log's next generation.
    fn replay(&self, records: intent_log::Replay, size: u64) -> io::Result<()> {
        if !records.is_empty() {
            tracing::info!(dir = %self.dir.display(), writes = records.len(),
                "replaying the intent log into the data files");
            for (offset, data) in &records {
                // Past the size the catalog holds (a grow that never became
                // durable): not the volume's bytes, and no file may grow.
                if offset.saturating_add(data.len() as u64) > size {
                    tracing::warn!(dir = %self.dir.display(), offset, len = data.len(), size,
                        "intent log record past the volume's size; skipped");
                    continue;
                }
                for p in self.pieces(*offset, data.len() as u64)? {
                    p.file.write_all_at(&data[p.at..p.at + p.len], p.pos)?;
                }
            }
            self.segments_now()
                .iter()
                .try_for_each(|f| self.engine.sync_blocking(f))?;
        }
        self.log.restart_blocking(&self.engine)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This file with every byte written from now on encrypted under
    /// `cipher` (bytes already in it then read as garbage: a new or
    /// punched file only).
    pub fn with_cipher(mut self, cipher: SectorCipher) -> Self {
        self.cipher = Some(cipher);
        self
    }

    pub(super) fn cipher(&self) -> Option<&SectorCipher> {
        self.cipher.as_ref()
    }

    /// Whether the file is encrypted under a key only this process holds.
    pub fn is_encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    pub(super) async fn partial_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.partial.lock().await
    }

    /// Splits `[offset, offset + len)` at segment boundaries.
    fn pieces(&self, offset: u64, len: u64) -> io::Result<Vec<Piece>> {
        let segs = self.segments.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(1);
        let mut done = 0u64;
        while done < len {
            let abs = offset + done;
            let idx = abs / SEGMENT_SIZE;
            let pos = abs % SEGMENT_SIZE;
            let take = (SEGMENT_SIZE - pos).min(len - done);
            let file = usize::try_from(idx)
                .ok()
                .and_then(|i| segs.get(i).cloned())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("offset {abs} beyond the data files"),
                    )
                })?;
            out.push(Piece {
                file,
                pos,
                at: done as usize,
                len: take as usize,
            });
            done += take;
        }
        Ok(out)
    }

    /// Reads `len` stored bytes at `offset`. Holes read as zeros.
    pub(super) async fn read_raw(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut pieces = self.pieces(offset, len as u64)?;
        if pieces.len() == 1 {
            let p = pieces.pop().expect("one piece");
            let (r, kind) = self
                .engine
                .run(p.file, p.pos, OpKind::Read(ReadBuf::uninit(len)))
                .await;
            r?;
            return match kind {
                OpKind::Read(buf) => Ok(buf.into_vec()),
                _ => Err(io::Error::other("I/O engine returned another op")),
            };
        }
        // Pieces come in file order, each right after the one before.
        let mut out = Vec::with_capacity(len);
        for p in pieces {
            debug_assert_eq!(p.at, out.len());
            let (r, kind) = self
                .engine
                .run(p.file, p.pos, OpKind::Read(ReadBuf::uninit(p.len)))
                .await;
            r?;
            match kind {
                OpKind::Read(buf) => out.extend_from_slice(&buf.into_vec()),
                _ => return Err(io::Error::other("I/O engine returned another op")),
            }
        }
        Ok(out)
    }

    /// Stores `buf` at `offset` as it is. A small write is recorded in the
    /// intent log; a large one leaves the next FLUSH to sync the segments
    /// and starts its own writeback if `WriteBehind` says so.
    pub(super) async fn write_raw(&self, offset: u64, buf: Vec<u8>) -> io::Result<()> {
        let len = buf.len();
        if len <= RECORD_MAX {
            let mut pending = self.log.lock().await;
            let buf = self.write_pieces(offset, buf).await?;
            self.log.record(&mut pending, offset, &buf);
            return Ok(());
        }
        let written = self.write_pieces(offset, buf).await;
        // Marked once the bytes are in (or failed): a FLUSH that arrived
        // before need not cover this write, and one after must sync.
        self.log.mark_unlogged();
        written?;
        if self.write_behind.on_write(offset, len) {
            // Split again rather than kept from above: the writes took the
            // pieces' files, and a clone each would tax every 4 KiB write.
            for p in self.pieces(offset, len as u64)? {
                self.engine.write_back(p.file, p.pos, p.len as u64);
            }
        }
        Ok(())
    }

    /// Writes `buf` to the segments; gives it back.
    async fn write_pieces(&self, offset: u64, buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut pieces = self.pieces(offset, buf.len() as u64)?;
        if pieces.len() == 1 {
            let p = pieces.pop().expect("one piece");
            return match self.engine.run(p.file, p.pos, OpKind::Write(buf)).await {
                (Ok(()), OpKind::Write(buf)) => Ok(buf),
                (Ok(()), _) => Err(io::Error::other("I/O engine returned another op")),
                (Err(e), _) => Err(e),
            };
        }
        for p in pieces {
            let part = buf[p.at..p.at + p.len].to_vec();
            self.engine
                .run(p.file, p.pos, OpKind::Write(part))
                .await
                .0?;
        }
        Ok(buf)
    }

    /// fallocate(2) over a byte range of the files.
    pub(super) async fn fallocate_raw(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let done = async {
            for p in self.pieces(offset, len)? {
                let kind = OpKind::Fallocate {
                    mode,
                    len: p.len as u64,
                };
                self.engine.run(p.file, p.pos, kind).await.0?;
            }
            Ok(())
        }
        .await;
        // As for a large write: the next FLUSH must sync the segments.
        self.log.mark_unlogged();
        done
    }

    /// Punches a hole, blocking: for repairs while a volume is being opened.
    pub fn punch_blocking(&self, offset: u64, len: u64) -> io::Result<()> {
        let done = self.pieces(offset, len).and_then(|pieces| {
            pieces.iter().try_for_each(|p| {
                let punch = super::engine::PUNCH_HOLE;
                self.engine
                    .fallocate_blocking(&p.file, punch, p.pos, p.len as u64)
            })
        });
        self.log.mark_unlogged();
        done
    }

    /// Starts reading a range into the page cache.
    pub async fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        for p in self.pieces(offset, len)? {
            self.engine
                .run(p.file, p.pos, OpKind::WillNeed { len: p.len as u64 })
                .await
                .0?;
        }
        Ok(())
    }

    /// Makes every completed write durable; `metadata` also syncs what
    /// fdatasync may skip (hole punches change only the extent tree).
    pub async fn sync(&self, metadata: bool) -> io::Result<()> {
        self.sync_on(metadata, SyncOn::Ring).await
    }

    /// [`Self::sync`], waiting where `on` says: through the intent log when
    /// it holds every write since the segments' last sync.
    pub async fn sync_on(&self, metadata: bool, on: SyncOn) -> io::Result<()> {
        let segments = self.sync_segments(metadata, on);
        self.log.flush(&self.engine, on, metadata, segments).await
    }

    async fn sync_segments(&self, metadata: bool, on: SyncOn) -> io::Result<()> {
        self.write_behind.on_sync();
        for f in self.segments_now() {
            self.engine.sync(f, !metadata, on).await?;
        }
        Ok(())
    }

    /// Blocking sync for the control path (detach, shutdown, tests).
    pub fn sync_blocking(&self) -> io::Result<()> {
        self.log.checkpoint_blocking(&self.engine, || {
            self.write_behind.on_sync();
            self.segments_now()
                .iter()
                .try_for_each(|f| self.engine.sync_blocking(f))
        })
    }

    /// The segments as they are now; the lock is not held past this.
    fn segments_now(&self) -> Vec<Arc<File>> {
        self.segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Grows the volume to `new_size`, sparse. Shrinking is the caller's to
    /// refuse; here it is an error.
    pub fn grow(&self, old_size: u64, new_size: u64) -> io::Result<()> {
        if new_size < old_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "data files cannot shrink",
            ));
        }
        let mut segs = self.segments.write().unwrap_or_else(|e| e.into_inner());
        let mut created = false;
        for idx in 0..segment_count(new_size) {
            let want = segment_len(new_size, idx);
            if let Some(f) = segs.get(idx as usize) {
                if f.metadata()?.len() < want {
                    f.set_len(want)?;
                    self.engine.sync_blocking(f)?;
                }
            } else {
                let f = open_segment(&self.dir, idx, false)?;
                f.set_len(want)?;
                self.engine.sync_blocking(&f)?;
                self.engine.hold(&f);
                segs.push(Arc::new(f));
                created = true;
            }
        }
        // Only a new segment changed the directory.
        if created { sync_dir(&self.dir) } else { Ok(()) }
    }

    /// Extends the existing segments to hold `len` bytes, ahead of the
    /// size, so later grows up to `len` change no file. For a stream import,
    /// which grows its volume chunk by chunk: one `set_len` per step instead
    /// of a `set_len`, an fsync and a directory sync per chunk, each taking
    /// the inode lock from the writes in flight. Not synced: `open` extends
    /// files shorter than the record, so their length needs no durability.
    pub fn reserve(&self, len: u64) -> io::Result<()> {
        let segs = self.segments.read().unwrap_or_else(|e| e.into_inner());
        for (idx, f) in segs.iter().enumerate() {
            let want = len
                .saturating_sub(idx as u64 * SEGMENT_SIZE)
                .min(SEGMENT_SIZE);
            if f.metadata()?.len() < want {
                f.set_len(want)?;
            }
        }
        Ok(())
    }

    /// Bytes of the host's disk the segments occupy.
    pub fn allocated_bytes(&self) -> u64 {
        let segs = self.segments.read().unwrap_or_else(|e| e.into_inner());
        segs.iter()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// Allocated byte ranges of the volume, `(start, end)`, from the files'
    /// extent maps (SEEK_DATA / SEEK_HOLE). Blocking; used when opening,
    /// when nothing is pending: under the power-loss engine it sees only
    /// what was synced, as after a real power cut.
    pub fn allocated_ranges(&self) -> io::Result<Vec<(u64, u64)>> {
        let segs = self
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = Vec::new();
        for (idx, f) in segs.iter().enumerate() {
            let base = idx as u64 * SEGMENT_SIZE;
            let len = f.metadata()?.len();
            let mut pos = 0u64;
            while pos < len {
                let Some(start) = seek(f, pos, libc::SEEK_DATA)? else {
                    break;
                };
                let end = seek(f, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
                out.push((base + start, base + end));
                pos = end;
            }
        }
        Ok(out)
    }
}

impl Drop for DataFile {
    fn drop(&mut self) {
        let segs = self.segments.get_mut().unwrap_or_else(|e| e.into_inner());
        for f in segs.iter() {
            self.engine.release(f);
        }
        self.engine.release(self.log.file());
    }
}

/// lseek with SEEK_DATA/SEEK_HOLE; `None` past the last data (ENXIO).
fn seek(f: &File, pos: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor we hold open; no memory effects. The
    // descriptor's shared offset is never used for I/O (all I/O is
    // positional), so moving it is harmless.
    let r = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Makes a directory's entries (created or removed files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
#[path = "data_file_tests.rs"]
mod tests;
