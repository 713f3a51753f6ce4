//! The engine's error. A message names the object and the reason with its
//! own context only: a variant that wraps another error never prints it,
//! and whoever shows the error renders the chain once
//! (`volumed_api::error_chain`). Which API code a variant is, the
//! front-ends decide (`present::failure`, and the AWS endpoint's own).

use snapshot::SnapshotId;
use volumed_api::VolumeName;

use crate::catalog::JobId;

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
    SnapshotNotFound(SnapshotId),
    /// An id no snapshot can have: named as given.
    #[error("snapshot '{0}' not found")]
    NoSuchSnapshotId(String),
    #[error("volume '{0}' already exists")]
    VolumeExists(VolumeName),
    #[error("volume '{0}' is attached; detach it first")]
    VolumeAttached(VolumeName),
    #[error("volume '{0}' is already attached to instance {1}")]
    AttachedElsewhere(VolumeName, String),
    #[error("volume '{0}' is not attached")]
    VolumeNotAttached(VolumeName),
    #[error("volume '{0}' has snapshot {1} in progress; wait for it")]
    SnapshotInProgress(VolumeName, SnapshotId),
    #[error("volume '{0}' failed ({1}); detach and attach it to reopen it before a snapshot")]
    VolumeFailed(VolumeName, String),
    #[error("invalid label {0:?}: {1}")]
    InvalidLabel(String, &'static str),
    #[error("volumed is shutting down")]
    ShuttingDown,
    /// The store failed; the source says whether it was transient.
    #[error("snapshot store: {context}")]
    Store {
        context: String,
        /// Boxed: store errors are large and rare, results are many.
        source: Box<snapshot::RepoError>,
    },
    #[error("snapshot {0} is in progress; wait for it to end")]
    SnapshotBusy(SnapshotId),
    #[error("snapshot {0} is not being uploaded")]
    SnapshotNotUploading(SnapshotId),
    #[error("commit snapshot {id}")]
    SnapshotCommit {
        id: SnapshotId,
        /// Boxed, as `Store`'s.
        source: Box<snapshot::CommitError>,
    },
    #[error("volume '{0}' is being imported by {1}; wait for it or cancel it")]
    VolumeImporting(VolumeName, JobId),
    #[error("snapshot '{0}' is attached; detach it first")]
    SnapshotAttached(SnapshotId),
    #[error("snapshot '{0}' is not attached")]
    SnapshotNotAttached(SnapshotId),
    #[error("snapshot '{0}' is protected; unprotect it first")]
    SnapshotProtected(SnapshotId),
    #[error("snapshot '{0}' is not in the recycle bin")]
    NotInBin(SnapshotId),
    #[error(
        "snapshot '{0}' has stayed in the recycle bin past its retention; it can no longer be restored"
    )]
    BinExpired(SnapshotId),
    /// A snapshot set that could not capture its members (the barrier
    /// timed out, a capture failed); nothing of it remains.
    #[error("snapshot set failed: {0}")]
    SnapshotSetFailed(String),
    #[error("snapshot set '{0}' not found")]
    SnapshotSetNotFound(String),
    /// The key service's answer (`crate::keys`), whole.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyServiceError),
    #[error("catalog")]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("{context}")]
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

    /// The snapshot `raw` names, or not found.
    pub fn snapshot_id(raw: &str) -> Result<SnapshotId> {
        SnapshotId::parse(raw).ok_or_else(|| Error::NoSuchSnapshotId(raw.to_owned()))
    }
}

/// Adds context to an `io::Result`, the way the engine reports every I/O
/// error.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

/// A blocking step run off the runtime's workers (file creation, removal,
/// fsync of a directory); a panic in it is reported, not propagated.
pub async fn blocking<T: Send + 'static>(
    what: impl FnOnce() -> String,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.ctx(what),
        Err(e) => Err(Error::io(what(), std::io::Error::other(e.to_string()))),
    }
}
