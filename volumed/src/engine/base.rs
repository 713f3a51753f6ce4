//! The base of a volume created from a snapshot: the snapshot's manifest
//! (read lazily: a format-2 root in memory, its pages fetched on demand
//! through a bounded cache), the fetcher that brings its chunks in, and the
//! log of chunks that left the base.
//!
//! A chunk is `Base` until it is fetched into the data file (hydrated), or
//! replaced whole by a write or a trim. Which chunks have left the base is
//! the one piece of state the data files cannot tell by themselves: a hole
//! may be a trimmed chunk (zeros) or a chunk never fetched (the snapshot's
//! bytes). So it is logged, in `detached`:
//!
//! | part | encoding |
//! | --- | --- |
//! | magic | `VDETACH1` |
//! | records | u64 LE chunk index, then the same index XOR [`CHECK`], LE |
//!
//! A record is appended only after the data file holding that chunk's bytes
//! was synced (see `Volume::flush`), so a logged chunk's bytes are durable.
//! A chunk not logged is `Base` after a restart whatever the data file holds
//! there: the bytes a fetch wrote but never synced are punched away at open,
//! and unflushed writes to it are lost, as NBD allows. A torn last record is
//! ignored.
//!
//! For a format-2 manifest every chunk of a page that is not all zero
//! starts `Base` (knowing which of them are zero would mean reading every
//! page at open); fetching one that the page names as zero gives zeros.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use snapshot::cache::Fetcher;
use snapshot::{ChunkGeometry, ChunkHash, ManifestReader};
use volumed_api::VolumeName;

const MAGIC: &[u8; 8] = b"VDETACH1";
const CHECK: u64 = 0x5644_4554_4143_4831;
const RECORD: usize = 16;
/// Chunks locked in stripes: a fetch holds its chunk's stripe, so two
/// requests for one chunk never both write it.
const STRIPES: usize = 64;

pub const MANIFEST_FILE: &str = "base.manifest";
pub const DETACHED_FILE: &str = "detached";

pub struct DetachLog {
    file: Arc<File>,
    /// Chunks that left the base since the last append, and the file length.
    state: Mutex<(Vec<u64>, u64)>,
    /// One append at a time, so records never interleave.
    append: tokio::sync::Mutex<()>,
}

impl DetachLog {
    /// Creates an empty log, durable before the volume's record exists.
    pub fn create(path: &Path) -> io::Result<Self> {
        let mut f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        f.write_all(MAGIC)?;
        f.sync_all()?;
        Ok(DetachLog {
            file: Arc::new(f),
            state: Mutex::new((Vec::new(), MAGIC.len() as u64)),
            append: tokio::sync::Mutex::new(()),
        })
    }

    /// Opens the log and returns the chunks it records. Records after the
    /// first invalid one (a torn append) are dropped from the file.
    pub fn open(path: &Path) -> io::Result<(Self, HashSet<u64>)> {
        let mut f = File::options().read(true).write(true).open(path)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        if buf.len() < MAGIC.len() || &buf[..MAGIC.len()] != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a detach log", path.display()),
            ));
        }
        let mut chunks = HashSet::new();
        let mut valid = MAGIC.len();
        for rec in buf[MAGIC.len()..].chunks_exact(RECORD) {
            let c = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
            let check = u64::from_le_bytes(rec[8..].try_into().expect("8 bytes"));
            if c ^ CHECK != check {
                break;
            }
            chunks.insert(c);
            valid += RECORD;
        }
        if valid != buf.len() {
            tracing::warn!(path = %path.display(), dropped = buf.len() - valid, "torn tail of a detach log dropped");
            f.set_len(valid as u64)?;
            f.sync_all()?;
        }
        Ok((
            DetachLog {
                file: Arc::new(f),
                state: Mutex::new((Vec::new(), valid as u64)),
                append: tokio::sync::Mutex::new(()),
            },
            chunks,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<u64>, u64)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A chunk left the base; it is logged at the next [`DetachLog::append`].
    pub fn note(&self, chunk: u64) {
        self.lock().0.push(chunk);
    }

    /// The chunks noted so far, to be appended once their data is synced.
    pub fn take_pending(&self) -> Vec<u64> {
        std::mem::take(&mut self.lock().0)
    }

    /// Appends `chunks` and syncs the log. On failure they are noted again,
    /// so the next flush retries them.
    pub async fn append(&self, chunks: Vec<u64>) -> io::Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let _one = self.append.lock().await;
        let at = self.lock().1;
        let mut buf = Vec::with_capacity(chunks.len() * RECORD);
        for c in &chunks {
            buf.extend_from_slice(&c.to_le_bytes());
            buf.extend_from_slice(&(c ^ CHECK).to_le_bytes());
        }
        let len = buf.len() as u64;
        let file = Arc::clone(&self.file);
        let r = tokio::task::spawn_blocking(move || {
            file.write_all_at(&buf, at)?;
            file.sync_data()
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        let mut st = self.lock();
        match r {
            Ok(()) => st.1 += len,
            Err(_) => st.0.extend(chunks),
        }
        r
    }
}

/// A volume's base snapshot.
pub struct BaseImage {
    pub manifest: Arc<ManifestReader>,
    pub fetcher: Arc<Fetcher>,
    pub log: DetachLog,
    /// The snapshot's chunks; the volume may have grown past them.
    pub geometry: ChunkGeometry,
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl BaseImage {
    pub fn new(
        manifest: Arc<ManifestReader>,
        fetcher: Arc<Fetcher>,
        log: DetachLog,
    ) -> io::Result<Self> {
        let h = manifest.header();
        let geometry = ChunkGeometry::new(h.size, h.chunk_size).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot {}: {e}", h.id),
            )
        })?;
        Ok(BaseImage {
            manifest,
            fetcher,
            log,
            geometry,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        })
    }

    /// The snapshot's id.
    pub fn snapshot(&self) -> &str {
        self.manifest.header().id.as_str()
    }

    pub async fn lock(&self, chunk: u64) -> tokio::sync::MutexGuard<'_, ()> {
        self.stripes[(chunk % STRIPES as u64) as usize].lock().await
    }

    /// The snapshot's hash for `chunk` (`None`: zero), reading its page if
    /// it is not cached.
    pub async fn hash(&self, chunk: u64) -> io::Result<Option<ChunkHash>> {
        self.manifest.get(chunk).await.map_err(|e| {
            io::Error::other(format!(
                "chunk {chunk} of snapshot {}: manifest page: {e}",
                self.snapshot()
            ))
        })
    }

    /// Bytes of the snapshot chunk `chunk` (the last one may be short).
    pub fn chunk_len(&self, chunk: u64) -> u64 {
        self.geometry.len(chunk)
    }

    /// Bytes of the chunks that started `Base`: those that may hold data.
    pub fn based_bytes(&self) -> u64 {
        self.manifest
            .maybe_data()
            .iter()
            .filter(|r| r.start < r.end)
            .map(|r| {
                let end = r.end.min(self.geometry.count());
                if r.start >= end {
                    return 0;
                }
                self.geometry.offset(end - 1) + self.chunk_len(end - 1)
                    - self.geometry.offset(r.start)
            })
            .sum()
    }

    /// The bytes of chunk `chunk` of the snapshot, through the host cache,
    /// verified against their hash and length; `None` when the snapshot
    /// names it zero. The caller holds the chunk's stripe; `volume` names
    /// the volume in errors.
    pub async fn fetch(&self, chunk: u64, volume: &VolumeName) -> io::Result<Option<Bytes>> {
        let snapshot = self.snapshot();
        let Some(hash) = self.hash(chunk).await? else {
            // A zero chunk in a page that holds data.
            return Ok(None);
        };
        let data = self.fetcher.get(&hash).await.map_err(|e| {
            // A fetch cut short by shutdown is no fault of the snapshot; the
            // chunk stays `Base` and is fetched after the restart.
            if !e.is_cancelled() {
                tracing::error!(volume = %volume, snapshot, chunk, %hash, error = %e,
                    "cannot fetch a chunk of the volume's snapshot");
            }
            io::Error::other(format!(
                "chunk {chunk} of snapshot {snapshot} (object {hash}): {e}"
            ))
        })?;
        if data.len() as u64 != self.chunk_len(chunk) {
            return Err(io::Error::other(format!(
                "chunk {chunk} of snapshot {snapshot} has {} bytes, expected {}",
                data.len(),
                self.chunk_len(chunk)
            )));
        }
        Ok(Some(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn log_round_trips_and_drops_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DETACHED_FILE);
        let log = DetachLog::create(&path).unwrap();
        log.note(3);
        log.note(70_000);
        let batch = log.take_pending();
        log.append(batch).await.unwrap();
        log.note(9);
        // Not appended: not in the log after a crash.
        drop(log);
        let (log, chunks) = DetachLog::open(&path).unwrap();
        assert_eq!(chunks, HashSet::from([3, 70_000]));
        log.append(vec![5]).await.unwrap();
        drop(log);
        // A torn append: half a record, and a record that fails its check.
        let mut f = File::options().append(true).open(&path).unwrap();
        f.write_all(&7u64.to_le_bytes()).unwrap();
        f.write_all(&[0u8; 8]).unwrap();
        f.write_all(&[1, 2, 3]).unwrap();
        drop(f);
        let (_, chunks) = DetachLog::open(&path).unwrap();
        assert_eq!(chunks, HashSet::from([3, 70_000, 5]));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            (MAGIC.len() + 3 * RECORD) as u64
        );
        std::fs::write(&path, b"garbage!").unwrap();
        assert!(DetachLog::open(&path).is_err());
    }
}
