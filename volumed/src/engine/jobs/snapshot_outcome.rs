//! How a snapshot job ends: its error (and the text its record keeps, the
//! chain once), its outcome, and the handle a job that asked for the
//! snapshot waits on instead of polling.

use snapshot::{CommitError, RepoError, SnapshotId};

/// Why a snapshot ended `error`; its text is what the record keeps.
///
/// Two of them say more than their source, after it: the record keeps
/// their whole text (see `SnapshotError::record_text`).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("announce the snapshot in the store")]
    Announce(#[source] RepoError),
    /// Rendered by `record_text`: the reason sits inside the sentence.
    #[error("parent snapshot {id} unusable")]
    Parent {
        id: SnapshotId,
        #[source]
        source: RepoError,
    },
    #[error("read chunk {chunk}")]
    Read {
        chunk: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("upload chunk {chunk}")]
    Upload {
        chunk: u64,
        #[source]
        source: RepoError,
    },
    #[error("snapshot task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("volumed is shutting down")]
    ShuttingDown,
    /// Rendered by `record_text`: the consequence follows the reason.
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error("write manifest")]
    Manifest(#[source] RepoError),
    #[error("read the base's hash of chunk {chunk}")]
    Base {
        chunk: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the volume failed during the snapshot: {0}")]
    VolumeFailed(String),
}

impl SnapshotError {
    /// What the record (and the log) says: the chain, once, with what the
    /// failure means for the next snapshot where it matters.
    pub fn record_text(&self) -> String {
        match self {
            SnapshotError::Parent { id, source } => format!(
                "parent snapshot {id} unusable ({}); the next snapshot will be a full one",
                volumed_api::error_chain(source)
            ),
            SnapshotError::Commit(e) => format!(
                "{}; its changes go to the next snapshot",
                volumed_api::error_chain(e)
            ),
            e => volumed_api::error_chain(e),
        }
    }
}

/// How a snapshot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotOutcome {
    Completed,
    /// Its record's error.
    Failed(String),
}

/// Says how a snapshot job ended, for the job that asked for it (an
/// import's `--snapshot`, an export of a volume).
#[derive(Clone)]
pub struct SnapshotDone(pub(super) tokio::sync::watch::Receiver<Option<SnapshotOutcome>>);

impl SnapshotDone {
    pub async fn wait(mut self) -> SnapshotOutcome {
        loop {
            if let Some(o) = self.0.borrow_and_update().clone() {
                return o;
            }
            if self.0.changed().await.is_err() {
                return SnapshotOutcome::Failed("the snapshot job ended without an answer".into());
            }
        }
    }
}
