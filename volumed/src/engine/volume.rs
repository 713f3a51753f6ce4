//! One volume at run time: its data files, its chunk-state map, its catalog
//! record, and its NBD export while attached.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use volumed_api::VolumeName;

use super::chunk_map::{ChunkMap, ChunkState};
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
    pub fn new(record: VolumeRecord, data: DataFile, map: ChunkMap) -> Arc<Self> {
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
        })
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
        let mut out = Vec::new();
        for (off, n, state) in self.map.runs(offset, len) {
            match state {
                ChunkState::Zero => out.push(ReadPiece::Zero(n)),
                ChunkState::Local => {
                    out.push(ReadPiece::Data(self.data.read(off, n as usize).await?))
                }
            }
        }
        Ok(out)
    }

    /// Writes `buf` at `offset`; with `fua` the bytes are durable on return.
    pub async fn write(&self, offset: u64, buf: Vec<u8>, fua: bool) -> io::Result<()> {
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
    pub async fn flush(&self) -> io::Result<()> {
        let metadata = self.metadata_changed.swap(false, Ordering::AcqRel);
        let r = self.data.sync(metadata).await;
        if r.is_err() && metadata {
            self.metadata_changed.store(true, Ordering::Release);
        }
        r
    }

    /// NBD CACHE: start reading the range's data into the page cache.
    pub async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        for (off, n, state) in self.map.runs(offset, len) {
            if state == ChunkState::Local {
                self.data.will_need(off, n).await?;
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
