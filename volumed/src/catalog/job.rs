//! The catalog's record of an import or export job: enough to show it
//! after a restart, and for a file import to resume from its checkpoint.
//! What a job does is one tagged variant ([`JobSpec`]); records written
//! before it (the request and the import's fields side by side, all
//! optional) are rewritten once by `migrate`.

use serde::{Deserialize, Serialize};
use snapshot::SnapshotId;
use volumed_api::{ExportRequest, ImportRequest, JobKind, JobState, VolumeName};

/// A job's id: `job-` and 16 hex digits of a catalog id, never reused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// The id made of catalog id `n`.
    pub fn new(n: u64) -> Self {
        JobId(format!("job-{n:016x}"))
    }

    pub fn parse(s: &str) -> Option<Self> {
        let hex = s.strip_prefix("job-")?;
        (hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| JobId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for JobId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        JobId::parse(&s).ok_or_else(|| format!("invalid job id {s:?}"))
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub state: JobState,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    #[serde(default)]
    pub finished_at: Option<u64>,
    /// The format read (import) or written (export), as qemu names it.
    pub format: String,
    pub bytes_total: u64,
    #[serde(default)]
    pub error: Option<String>,
    /// The snapshot an import took, or the one an export read.
    #[serde(default)]
    pub snapshot: Option<SnapshotId>,
    pub spec: JobSpec,
}

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum JobSpec {
    Import(ImportSpec),
    Export(ExportSpec),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportSpec {
    pub request: ImportRequest,
    /// The volumes it fills, in order (one per OVA disk).
    pub volumes: Vec<VolumeName>,
    /// Everything before `offset` of disk `disk` is durable in its volume
    /// (and every earlier disk is complete): where a resumed import starts.
    #[serde(default)]
    pub checkpoint: Checkpoint,
    /// SHA-256 of the image's logical bytes, once read whole.
    #[serde(default)]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportSpec {
    pub request: ExportRequest,
    /// The volume snapshotted first, when the source names one.
    #[serde(default)]
    pub volume: Option<VolumeName>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub disk: usize,
    pub offset: u64,
}

impl JobRecord {
    pub fn kind(&self) -> JobKind {
        match self.spec {
            JobSpec::Import(_) => JobKind::Import,
            JobSpec::Export(_) => JobKind::Export,
        }
    }

    pub fn import(&self) -> Option<&ImportSpec> {
        match &self.spec {
            JobSpec::Import(i) => Some(i),
            JobSpec::Export(_) => None,
        }
    }

    pub fn import_mut(&mut self) -> Option<&mut ImportSpec> {
        match &mut self.spec {
            JobSpec::Import(i) => Some(i),
            JobSpec::Export(_) => None,
        }
    }

    /// The volumes the job names: an import's, or the one an export
    /// snapshotted.
    pub fn volumes(&self) -> &[VolumeName] {
        match &self.spec {
            JobSpec::Import(i) => &i.volumes,
            JobSpec::Export(e) => e.volume.as_slice(),
        }
    }
}

/// A record as volumed wrote it before [`JobSpec`].
#[derive(Debug, Clone, Deserialize)]
pub(super) struct LegacyJobRecord {
    id: JobId,
    kind: JobKind,
    state: JobState,
    created_at: u64,
    #[serde(default)]
    finished_at: Option<u64>,
    #[serde(default)]
    import: Option<ImportRequest>,
    #[serde(default)]
    export: Option<ExportRequest>,
    format: String,
    #[serde(default)]
    volumes: Vec<VolumeName>,
    bytes_total: u64,
    #[serde(default)]
    checkpoint: Checkpoint,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    snapshot: Option<SnapshotId>,
    #[serde(default)]
    sha256: Option<String>,
}

impl LegacyJobRecord {
    /// The same job as a [`JobRecord`]; `None` for one that names no
    /// request (never written, but then nothing can be shown or resumed).
    pub(super) fn into_current(self) -> Option<JobRecord> {
        let spec = match self.kind {
            JobKind::Import => JobSpec::Import(ImportSpec {
                request: self.import?,
                volumes: self.volumes,
                checkpoint: self.checkpoint,
                sha256: self.sha256,
            }),
            JobKind::Export => JobSpec::Export(ExportSpec {
                request: self.export?,
                volume: self.volumes.into_iter().next(),
            }),
        };
        Some(JobRecord {
            id: self.id,
            state: self.state,
            created_at: self.created_at,
            finished_at: self.finished_at,
            format: self.format,
            bytes_total: self.bytes_total,
            error: self.error,
            snapshot: self.snapshot,
            spec,
        })
    }
}
