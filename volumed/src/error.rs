//! The daemon's error type. Each variant knows its stable API code, so the
//! control API maps errors to HTTP statuses in one place.

use volumed_api::{ErrorCode, VolumeName};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("invalid volume name {name:?}: {reason}")]
    InvalidName {
        name: String,
        reason: volumed_api::NameError,
    },
    #[error("{0}")]
    InvalidSize(String),
    #[error("volume '{0}' not found")]
    VolumeNotFound(VolumeName),
    #[error("snapshot '{0}' not found")]
    SnapshotNotFound(String),
    #[error("volume '{0}' already exists")]
    VolumeExists(VolumeName),
    #[error("volume '{0}' is attached; detach it first")]
    VolumeAttached(VolumeName),
    #[error("volume '{0}' is already attached to instance {1}")]
    AttachedElsewhere(VolumeName, String),
    #[error("volume '{0}' is not attached")]
    VolumeNotAttached(VolumeName),
    #[error("volume '{0}' has snapshot {1} in progress; wait for it")]
    SnapshotInProgress(VolumeName, String),
    #[error("volume '{0}' failed ({1}); detach and attach it to reopen it before a snapshot")]
    VolumeFailed(VolumeName, String),
    #[error("invalid label {0:?}: {1}")]
    InvalidLabel(String, &'static str),
    #[error("volumed is shutting down")]
    ShuttingDown,
    /// The store failed; the source says whether it was transient.
    #[error("snapshot store: {context}: {source}")]
    Store {
        context: String,
        /// Boxed: store errors are large and rare, results are many.
        source: Box<snapshot::RepoError>,
    },
    #[error("snapshot {0} is in progress; wait for it to end")]
    SnapshotBusy(String),
    #[error("snapshot {0} is not being uploaded")]
    SnapshotNotUploading(snapshot::SnapshotId),
    #[error("commit snapshot {id}: {source}")]
    SnapshotCommit {
        id: snapshot::SnapshotId,
        /// Boxed: a store error is large and rare, results are many.
        source: Box<snapshot::CommitError>,
    },
    #[error("job '{0}' not found")]
    JobNotFound(String),
    #[error("volume '{0}' is being imported by {1}; wait for it or cancel it")]
    VolumeImporting(VolumeName, String),
    /// An image refused, unreadable, or failing while it was read.
    #[error("{0}")]
    Image(#[from] crate::image::ImageError),
    #[error("snapshot '{0}' is attached; detach it first")]
    SnapshotAttached(String),
    #[error("snapshot '{0}' is not attached")]
    SnapshotNotAttached(String),
    /// A snapshot set that could not capture its members (the barrier
    /// timed out, a capture failed); nothing of it remains.
    #[error("snapshot set failed: {0}")]
    SnapshotSetFailed(String),
    #[error("snapshot set '{0}' not found")]
    SnapshotSetNotFound(String),
    #[error("catalog: {0}")]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn store(context: impl Into<String>, source: snapshot::RepoError) -> Self {
        Error::Store {
            context: context.into(),
            source: Box::new(source),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidRequest(_) => ErrorCode::InvalidRequest,
            Error::InvalidName { .. } => ErrorCode::InvalidName,
            Error::InvalidSize(_) => ErrorCode::InvalidSize,
            Error::VolumeNotFound(_) | Error::SnapshotNotFound(_) => ErrorCode::NotFound,
            Error::VolumeExists(_) => ErrorCode::AlreadyExists,
            Error::VolumeAttached(_) | Error::AttachedElsewhere(..) => ErrorCode::VolumeAttached,
            Error::VolumeNotAttached(_) => ErrorCode::VolumeNotAttached,
            Error::SnapshotInProgress(..) | Error::VolumeFailed(..) => ErrorCode::Conflict,
            Error::InvalidLabel(..) => ErrorCode::InvalidRequest,
            Error::ShuttingDown => ErrorCode::ShuttingDown,
            Error::Store { .. } => ErrorCode::StoreUnavailable,
            Error::SnapshotBusy(_) => ErrorCode::Conflict,
            Error::SnapshotNotUploading(_) => ErrorCode::NotFound,
            Error::SnapshotCommit { .. } => ErrorCode::StoreUnavailable,
            Error::JobNotFound(_) => ErrorCode::NotFound,
            Error::VolumeImporting(..) => ErrorCode::Conflict,
            Error::Image(e) => e.code(),
            Error::SnapshotAttached(_) => ErrorCode::SnapshotAttached,
            Error::SnapshotNotAttached(_) => ErrorCode::SnapshotNotAttached,
            Error::SnapshotSetFailed(_) => ErrorCode::Conflict,
            Error::SnapshotSetNotFound(_) => ErrorCode::NotFound,
            Error::Catalog(_) | Error::Io { .. } => ErrorCode::Internal,
        }
    }
}

/// Adds context to an `io::Result`, the way the daemon reports every I/O error.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
