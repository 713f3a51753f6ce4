//! Jobs: imports and exports of VM images, run by the daemon in the
//! background, with their requests and progress documents.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::VolumeName;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Completed,
    Error,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Error => "error",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        self != JobState::Running
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Import,
    Export,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Import => "import",
            JobKind::Export => "export",
        }
    }
}

/// A job as the API reports it (`GET /v1/jobs/{id}`), and each line of its
/// event stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    pub state: JobState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The volume imported into (the first, for an OVA), or exported from.
    pub volume: Option<String>,
    /// Every volume an import creates: `NAME`, `NAME-1`, ... for an OVA.
    #[serde(default)]
    pub volumes: Vec<String>,
    pub error: Option<String>,
    /// A path, `-` for a stream, or a snapshot id (export).
    pub source: String,
    /// An export's destination.
    #[serde(default)]
    pub destination: Option<String>,
    /// An export's file: the owner it was given (the requester's uid and
    /// gid), or why it could not be.
    #[serde(default)]
    pub owner: Option<String>,
    /// A volume export's snapshot was kept (`keep_snapshot`); otherwise it
    /// was deleted at the end.
    #[serde(default)]
    pub snapshot_kept: Option<bool>,
    pub format: String,
    /// The snapshot an import took with `--snapshot`, or the one an export read.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// SHA-256 of the image's logical bytes, once read whole.
    #[serde(default)]
    pub sha256: Option<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    #[serde(default)]
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<Job>,
}

/// `POST /v1/imports` (a file the daemon reads), or the JSON in the
/// `x-volumed-import` header of `POST /v1/imports/stream` (raw bytes in the
/// body; `source` is `-` there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// An absolute path the daemon can read, or `-` for the request body.
    pub source: String,
    pub name: VolumeName,
    /// `raw`, `qcow2`, `vmdk`, `vhdx`, `vpc` (VHD) or `ova`; detected from
    /// the header when absent.
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub chunk_size: Option<u64>,
    #[serde(default)]
    pub ephemeral: bool,
    /// Take a snapshot of the new volume at the end.
    #[serde(default)]
    pub snapshot: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Expected SHA-256 of the image's logical bytes, in hex.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// `POST /v1/exports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// A snapshot id, or a volume name (an attached volume is snapshotted first).
    pub source: String,
    /// An absolute path the daemon writes, or `-` for the answer's body (raw only).
    pub destination: String,
    /// `raw` (default), `qcow2`, `vmdk`, `vhdx` or `vpc`.
    #[serde(default)]
    pub format: Option<String>,
    /// qcow2 only: zstd-compressed clusters.
    #[serde(default)]
    pub compress: bool,
    /// Keep the snapshot a volume's export takes; without it the snapshot
    /// is deleted when the export ends.
    #[serde(default)]
    pub keep_snapshot: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_request_rejects_unknown_fields_and_defaults() {
        let r: ImportRequest = serde_json::from_str(r#"{"source":"/a","name":"v"}"#).unwrap();
        assert!(!r.snapshot && r.format.is_none() && r.labels.is_empty());
        assert!(
            serde_json::from_str::<ImportRequest>(r#"{"source":"/a","name":"v","colour":1}"#)
                .is_err()
        );
        assert_eq!(
            serde_json::to_string(&JobState::Cancelled).unwrap(),
            "\"cancelled\""
        );
    }
}
