//! The catalog's record of an import or export job: enough to show it
//! after a restart, and for a file import to resume from its checkpoint.

use serde::{Deserialize, Serialize};
use snapshot::SnapshotId;
use volumed_api::{ExportRequest, ImportRequest, JobKind, JobState, VolumeName};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// `job-` and 16 hex digits of a catalog id: never reused.
    pub id: String,
    pub kind: JobKind,
    pub state: JobState,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    #[serde(default)]
    pub finished_at: Option<u64>,
    #[serde(default)]
    pub import: Option<ImportRequest>,
    #[serde(default)]
    pub export: Option<ExportRequest>,
    /// The format read (import) or written (export), as qemu names it.
    pub format: String,
    /// The volumes an import fills, in order (one per OVA disk).
    #[serde(default)]
    pub volumes: Vec<VolumeName>,
    pub bytes_total: u64,
    /// Everything before `offset` of disk `disk` is durable in its volume
    /// (and every earlier disk is complete): where a resumed import starts.
    #[serde(default)]
    pub checkpoint: Checkpoint,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub snapshot: Option<SnapshotId>,
    #[serde(default)]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub disk: usize,
    pub offset: u64,
}
