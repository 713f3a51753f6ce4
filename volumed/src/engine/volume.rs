//! One volume at run time: its data files, its catalog record, and its NBD
//! export while attached.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use volumed_api::VolumeName;

use crate::catalog::VolumeRecord;
use crate::disk::DataFile;

pub struct Volume {
    pub name: VolumeName,
    pub id: u64,
    pub chunk_size: u64,
    /// The size new NBD connections see; a connection keeps the size it
    /// negotiated, as the protocol requires.
    size: AtomicU64,
    data: Arc<DataFile>,
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

impl Volume {
    pub fn new(record: VolumeRecord, data: DataFile) -> Arc<Self> {
        Arc::new(Volume {
            name: record.name.clone(),
            id: record.id,
            chunk_size: record.chunk_size,
            size: AtomicU64::new(record.size),
            data: Arc::new(data),
            record: Mutex::new(record),
            export: Mutex::new(None),
        })
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
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

    /// Reads `len` bytes at `offset`; the caller has checked the range.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let data = Arc::clone(&self.data);
        blocking(move || {
            let mut buf = vec![0u8; len];
            data.read_at(offset, &mut buf)?;
            Ok(buf)
        })
        .await
    }

    /// Writes `buf` at `offset`; with `fua` the bytes are durable on return.
    pub async fn write(&self, offset: u64, buf: Vec<u8>, fua: bool) -> io::Result<()> {
        let data = Arc::clone(&self.data);
        blocking(move || {
            data.write_at(offset, &buf)?;
            if fua { data.sync() } else { Ok(()) }
        })
        .await
    }

    /// Makes every write completed so far, on any connection, durable.
    pub async fn flush(&self) -> io::Result<()> {
        let data = Arc::clone(&self.data);
        blocking(move || data.sync()).await
    }
}

/// Runs blocking file I/O off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("I/O task failed: {e}"))))
}
