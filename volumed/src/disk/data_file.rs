//! Segmented sparse data files; blocking calls, run on tokio's blocking pool.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Bytes covered by one segment file: half of ext4's 16 TiB file limit, a
/// power of two so chunk boundaries never straddle two segments.
pub const SEGMENT_SIZE: u64 = 8 << 40;

pub struct DataFile {
    dir: PathBuf,
    /// Grows when the volume grows; readers take the lock only to clone the
    /// `Arc`s they need, never across I/O.
    segments: RwLock<Vec<Arc<File>>>,
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

impl DataFile {
    /// Creates the directory and sparse segments for `size` bytes. Allocates
    /// no data blocks, whatever the size.
    pub fn create(dir: &Path, size: u64) -> io::Result<Self> {
        std::fs::create_dir(dir)?;
        let mut segments = Vec::new();
        for idx in 0..segment_count(size) {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(segment_path(dir, idx))?;
            f.set_len(segment_len(size, idx))?;
            f.sync_all()?;
            segments.push(Arc::new(f));
        }
        sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(DataFile {
            dir: dir.to_owned(),
            segments: RwLock::new(segments),
        })
    }

    /// Opens an existing volume of `size` bytes, repairing segment lengths a
    /// crash in the middle of a grow may have left short.
    pub fn open(dir: &Path, size: u64) -> io::Result<Self> {
        let mut segments = Vec::new();
        for idx in 0..segment_count(size) {
            let path = segment_path(dir, idx);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            let want = segment_len(size, idx);
            if f.metadata()?.len() < want {
                f.set_len(want)?;
            }
            segments.push(Arc::new(f));
        }
        Ok(DataFile {
            dir: dir.to_owned(),
            segments: RwLock::new(segments),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn segment(&self, idx: u64) -> io::Result<Arc<File>> {
        let segs = self.segments.read().unwrap_or_else(|e| e.into_inner());
        usize::try_from(idx)
            .ok()
            .and_then(|i| segs.get(i).cloned())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("offset beyond segment {idx}"),
                )
            })
    }

    /// Calls `f(file, offset_in_segment, range_in_buffer)` for each segment
    /// piece of `[offset, offset + len)`.
    fn for_each_piece(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(&File, u64, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let idx = pos / SEGMENT_SIZE;
            let in_seg = pos % SEGMENT_SIZE;
            let take = ((SEGMENT_SIZE - in_seg) as usize).min(len - done);
            let file = self.segment(idx)?;
            f(&file, in_seg, done..done + take)?;
            done += take;
        }
        Ok(())
    }

    /// Fills `buf` from `offset`. Sparse regions read as zeros.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.for_each_piece(offset, buf.len(), |file, pos, range| {
            file.read_exact_at(&mut buf[range], pos)
        })
    }

    pub fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.for_each_piece(offset, buf.len(), |file, pos, range| {
            file.write_all_at(&buf[range], pos)
        })
    }

    /// Makes every completed write durable.
    pub fn sync(&self) -> io::Result<()> {
        let segs = self
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for f in segs {
            f.sync_data()?;
        }
        Ok(())
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
        for idx in 0..segment_count(new_size) {
            let want = segment_len(new_size, idx);
            match segs.get(idx as usize) {
                Some(f) => {
                    if f.metadata()?.len() < want {
                        f.set_len(want)?;
                        f.sync_all()?;
                    }
                }
                None => {
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(segment_path(&self.dir, idx))?;
                    f.set_len(want)?;
                    f.sync_all()?;
                    segs.push(Arc::new(f));
                }
            }
        }
        sync_dir(&self.dir)
    }

    /// Bytes of the host's disk the segments occupy.
    pub fn allocated_bytes(&self) -> u64 {
        let segs = self.segments.read().unwrap_or_else(|e| e.into_inner());
        segs.iter()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }
}

/// Makes a directory's entries (created or removed files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_volume_is_sparse_and_reads_zero() {
        let tmp = tempfile::tempdir().unwrap();
        let size = 64u64 << 40;
        let df = DataFile::create(&tmp.path().join("v"), size).unwrap();
        assert_eq!(df.segments.read().unwrap().len(), 8);
        assert!(df.allocated_bytes() < 1 << 20);
        let mut buf = vec![1u8; 4096];
        df.read_at(size - 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
    }

    #[test]
    fn io_across_a_segment_boundary() {
        let tmp = tempfile::tempdir().unwrap();
        let df = DataFile::create(&tmp.path().join("v"), SEGMENT_SIZE + (1 << 20)).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        df.write_at(SEGMENT_SIZE - 4096, &data).unwrap();
        let mut back = vec![0u8; 8192];
        df.read_at(SEGMENT_SIZE - 4096, &mut back).unwrap();
        assert_eq!(back, data);
        let mut tail = vec![0u8; 4096];
        DataFile::open(df.dir(), SEGMENT_SIZE + (1 << 20))
            .unwrap()
            .read_at(SEGMENT_SIZE, &mut tail)
            .unwrap();
        assert_eq!(tail, data[4096..]);
    }

    #[test]
    fn grow_adds_segments_and_keeps_data() {
        let tmp = tempfile::tempdir().unwrap();
        let df = DataFile::create(&tmp.path().join("v"), 1 << 20).unwrap();
        df.write_at(0, b"hello").unwrap();
        df.grow(1 << 20, SEGMENT_SIZE * 2 + 512).unwrap();
        assert_eq!(df.segments.read().unwrap().len(), 3);
        df.write_at(SEGMENT_SIZE * 2, b"end").unwrap();
        let mut b = [0u8; 5];
        df.read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(df.grow(SEGMENT_SIZE * 2 + 512, 4096).is_err());
    }
}
