//! What an NBD export serves: an attached volume (read-write), or a
//! snapshot (read-only). The NBD session sees only [`Backend`], so both
//! kinds share one transmission loop.

use std::io;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::snapshot_export::SnapshotImage;
use super::volume::{Extent, ReadPiece, Volume};
use crate::disk::SyncOn;

/// The data behind an export.
#[derive(Clone)]
pub enum Backend {
    Volume(Arc<Volume>),
    Snapshot(Arc<SnapshotImage>),
}

impl Backend {
    /// The export's name: the volume's name or the snapshot's id.
    pub fn name(&self) -> &str {
        match self {
            Backend::Volume(v) => v.name.as_str(),
            Backend::Snapshot(s) => s.id.as_str(),
        }
    }

    /// What NBD_INFO_DESCRIPTION says.
    pub fn description(&self) -> String {
        match self {
            Backend::Volume(v) => format!("volumed volume {}", v.name),
            Backend::Snapshot(s) => format!(
                "volumed snapshot {} of volume {} (read-only)",
                s.id,
                s.manifest.header().volume
            ),
        }
    }

    /// The size a new connection is told.
    pub fn size(&self) -> u64 {
        match self {
            Backend::Volume(v) => v.size(),
            Backend::Snapshot(s) => s.size(),
        }
    }

    pub fn chunk_size(&self) -> u64 {
        match self {
            Backend::Volume(v) => v.chunk_size,
            Backend::Snapshot(s) => s.chunk_size(),
        }
    }

    pub fn read_only(&self) -> bool {
        matches!(self, Backend::Snapshot(_))
    }

    /// The volume, for the commands only a writable export takes.
    pub fn volume(&self) -> Option<&Arc<Volume>> {
        match self {
            Backend::Volume(v) => Some(v),
            Backend::Snapshot(_) => None,
        }
    }

    pub fn snapshot(&self) -> Option<&Arc<SnapshotImage>> {
        match self {
            Backend::Volume(_) => None,
            Backend::Snapshot(s) => Some(s),
        }
    }

    pub async fn read(&self, offset: u64, len: u64) -> io::Result<Vec<ReadPiece>> {
        match self {
            Backend::Volume(v) => v.read(offset, len).await,
            Backend::Snapshot(s) => s.read(offset, len).await,
        }
    }

    pub async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Backend::Volume(v) => v.cache(offset, len).await,
            Backend::Snapshot(s) => s.cache(offset, len).await,
        }
    }

    /// A snapshot has nothing to make durable.
    pub async fn flush(&self, on: SyncOn) -> io::Result<()> {
        match self {
            Backend::Volume(v) => v.flush_on(on).await,
            Backend::Snapshot(_) => Ok(()),
        }
    }

    /// base:allocation runs of `[offset, offset + len)`.
    pub async fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        match self {
            Backend::Volume(v) => v.extents(offset, len),
            Backend::Snapshot(s) => s.extents(offset, len).await,
        }
    }
}

/// A served export. Ending it cancels `cancel`, which makes every session
/// stop reading requests, finish the ones in flight and close; `sessions`
/// is how the caller waits for that.
#[derive(Clone)]
pub struct Export {
    pub backend: Backend,
    pub cancel: CancellationToken,
    pub sessions: TaskTracker,
}

impl Export {
    pub fn new(backend: Backend) -> Self {
        Export {
            backend,
            cancel: CancellationToken::new(),
            sessions: TaskTracker::new(),
        }
    }

    /// Ends the export's sessions: they stop reading requests, finish the
    /// ones in flight and close; returns once all are gone.
    pub async fn close(&self) {
        self.cancel.cancel();
        self.sessions.close();
        self.sessions.wait().await;
    }
}
