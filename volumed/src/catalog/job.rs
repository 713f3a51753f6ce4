//! The catalog's record of an import or export job: enough to show it
//! after a restart, and for a file import to resume from its checkpoint.
//! What a job does is one tagged variant ([`JobSpec`]); records written
//! before it (the request and the import's fields side by side, all
//! optional) are rewritten once by `migrate`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use snapshot::SnapshotId;
use volumed_api::{ExportRequest, ImportRequest, JobKind, JobState, VolumeName};

/// A job's id: `job-` and 16 hex digits of a number the registry counts up
/// from the highest job it holds (dense, and stable across restarts).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// The id made of number `n`.
    pub fn new(n: u64) -> Self {
        JobId(format!("job-{n:016x}"))
    }

    /// The number the id is made of.
    pub fn number(&self) -> u64 {
        self.0
            .strip_prefix("job-")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or(0)
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
    /// The EC2 VM import task this import carries out, if any: its volumes
    /// are private scratch volumes, removed once their snapshots are taken.
    /// Boxed: most jobs have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Box<TaskSpec>>,
}

/// What an EC2 import task (ImportSnapshot, ImportImage) asked for, and
/// what it has made so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub kind: TaskKind,
    #[serde(default)]
    pub client_token: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// `DiskContainer` (one for ImportSnapshot), in order.
    pub disks: Vec<TaskDisk>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// ImportImage's fields, stored and shown as given.
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub platform: Option<String>,
    #[serde(default)]
    pub boot_mode: Option<String>,
    #[serde(default)]
    pub license_type: Option<String>,
    /// `Encrypted` and `KmsKeyId`: the scratch volumes (and so their
    /// snapshots) are encrypted as CreateVolume's would be.
    #[serde(default)]
    pub encrypted: Option<bool>,
    #[serde(default)]
    pub kms_key_id: Option<String>,
    /// The snapshot of each of the import's volumes, once taken (parallel
    /// to `ImportSpec::volumes`).
    #[serde(default)]
    pub snapshots: Vec<Option<SnapshotId>>,
    /// The image ImportImage registered.
    #[serde(default)]
    pub image_id: Option<String>,
    /// CancelImportTask's `CancelReason`.
    #[serde(default)]
    pub cancel_reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Snapshot,
    Image,
}

/// One `DiskContainer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskDisk {
    pub source: TaskSource,
    /// As given (`VMDK`, `VHD`, `RAW`, `VHDX`, `QCOW2`, `OVA`).
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub device_name: Option<String>,
    /// Bytes of the source file or object, once known (`DiskImageSize`).
    #[serde(default)]
    pub size: Option<u64>,
    /// How many of the import's volumes it became (an OVA: one per disk),
    /// once inspected.
    #[serde(default)]
    pub volumes: Option<usize>,
}

/// Where a `DiskContainer`'s image is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TaskSource {
    /// `UserBucket` or an `s3://` URL.
    S3 { bucket: String, key: String },
    /// A `file://` URL under an `--import-dir`.
    File { path: String },
    /// An `https://` URL (a presigned one, typically).
    Url { url: String },
    /// ImportImage's `SnapshotId`: an existing snapshot, not imported.
    Snapshot { id: SnapshotId },
}

impl TaskSpec {
    /// The task id EC2 shows for job `job`: the same catalog number, so
    /// either names the other.
    pub fn task_id(&self, job: &JobId) -> String {
        let prefix = match self.kind {
            TaskKind::Snapshot => "import-snap-",
            TaskKind::Image => "import-ami-",
        };
        format!("{prefix}{:017x}", job.number())
    }

    /// The job a task id names, if it is one.
    pub fn job_of(task_id: &str) -> Option<(TaskKind, JobId)> {
        let (kind, hex) = if let Some(h) = task_id.strip_prefix("import-snap-") {
            (TaskKind::Snapshot, h)
        } else {
            (TaskKind::Image, task_id.strip_prefix("import-ami-")?)
        };
        if hex.len() != 17 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some((kind, JobId::new(u64::from_str_radix(hex, 16).ok()?)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportSpec {
    pub request: ExportRequest,
    /// The volume snapshotted first, when the source names one.
    #[serde(default)]
    pub volume: Option<VolumeName>,
    /// Who asked, from the control socket's peer credentials: a file
    /// export is given to them.
    #[serde(default)]
    pub requester: Option<Requester>,
    /// What the exported file was given (`uid=U gid=G`), or why not.
    #[serde(default)]
    pub owner: Option<String>,
    /// The snapshot the export took of `volume` was deleted at its end.
    #[serde(default)]
    pub snapshot_removed: bool,
    /// An instance export's volumes, in order (its OVA's disks), each
    /// snapshotted first; empty for an export of one source.
    #[serde(default)]
    pub disks: Vec<VolumeName>,
    /// The multipart upload in progress of an export to a bucket, recorded
    /// before its first part so a restart can abort it.
    #[serde(default)]
    pub upload: Option<String>,
    /// The EC2 task this export is (ExportImage, CreateInstanceExportTask).
    #[serde(default)]
    pub task: Option<Box<ExportTask>>,
}

/// An export started through EC2: what DescribeExportImageTasks and
/// DescribeExportTasks show besides the job's state and progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportTask {
    /// `export-ami-` or `export-i-` and 17 hex digits.
    pub id: String,
    /// The image exported (ExportImage).
    #[serde(default)]
    pub image_id: Option<String>,
    /// The instance exported (CreateInstanceExportTask).
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub client_token: Option<String>,
    /// As EC2 spells it: `VMDK`, `RAW`, `VHD` (or `QCOW2`, ours).
    pub disk_image_format: String,
    /// `ova`, for an instance's disks in one appliance.
    #[serde(default)]
    pub container_format: Option<String>,
    #[serde(default)]
    pub target_environment: Option<String>,
    /// Accepted and kept; volumed assumes no role.
    #[serde(default)]
    pub role_name: Option<String>,
    pub bucket: String,
    #[serde(default)]
    pub prefix: String,
    /// The object written: the prefix, then the task id and the extension.
    pub key: String,
    #[serde(default)]
    pub tags: Vec<(String, String)>,
}

/// The uid and gid of a control-API client (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    pub uid: u32,
    pub gid: u32,
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

    /// The EC2 import task the job carries out, if any.
    pub fn task(&self) -> Option<&TaskSpec> {
        self.import().and_then(|i| i.task.as_deref())
    }

    pub fn task_mut(&mut self) -> Option<&mut TaskSpec> {
        self.import_mut().and_then(|i| i.task.as_deref_mut())
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
            JobSpec::Export(e) if !e.disks.is_empty() => &e.disks,
            JobSpec::Export(e) => e.volume.as_slice(),
        }
    }

    pub fn export(&self) -> Option<&ExportSpec> {
        match &self.spec {
            JobSpec::Export(e) => Some(e),
            JobSpec::Import(_) => None,
        }
    }

    pub fn export_mut(&mut self) -> Option<&mut ExportSpec> {
        match &mut self.spec {
            JobSpec::Export(e) => Some(e),
            JobSpec::Import(_) => None,
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
                task: None,
            }),
            JobKind::Export => JobSpec::Export(ExportSpec {
                request: self.export?,
                volume: self.volumes.into_iter().next(),
                requester: None,
                owner: None,
                snapshot_removed: false,
                disks: Vec::new(),
                upload: None,
                task: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_name_their_jobs() {
        let job = JobId::new(0x1e8481);
        let t = TaskSpec {
            kind: TaskKind::Snapshot,
            client_token: None,
            description: None,
            disks: Vec::new(),
            tags: BTreeMap::new(),
            architecture: None,
            platform: None,
            boot_mode: None,
            license_type: None,
            encrypted: None,
            kms_key_id: None,
            snapshots: Vec::new(),
            image_id: None,
            cancel_reason: None,
        };
        let id = t.task_id(&job);
        assert_eq!(id, "import-snap-000000000001e8481");
        assert_eq!(id.len(), "import-snap-".len() + 17);
        assert_eq!(
            TaskSpec::job_of(&id),
            Some((TaskKind::Snapshot, job.clone()))
        );
        let ami = TaskSpec {
            kind: TaskKind::Image,
            ..t
        }
        .task_id(&job);
        assert_eq!(TaskSpec::job_of(&ami), Some((TaskKind::Image, job)));
        for bad in [
            "import-snap-",
            "import-snap-00000000001e8481",
            "import-ami-0xyz",
            "snap-0",
        ] {
            assert_eq!(TaskSpec::job_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_export_record_written_before_the_task_fields_still_reads() {
        let old = r#"{"id":"job-0000000000000007","state":"completed","created_at":1,
            "finished_at":2,"format":"raw","bytes_total":10,"error":null,
            "snapshot":"snap-0123456789abcdef0",
            "spec":{"kind":"export","request":{"source":"data","destination":"/tmp/x.raw"},
                    "volume":"data"}}"#;
        let r: JobRecord = serde_json::from_str(old).unwrap();
        let e = r.export().unwrap();
        assert!(!e.request.keep_snapshot && !e.snapshot_removed);
        assert!(e.requester.is_none() && e.upload.is_none() && e.task.is_none());
        assert_eq!(r.volumes(), [VolumeName::parse("data").unwrap()]);
        assert_eq!(r.id.number(), 7);
        // And a task's record round-trips.
        let mut r2 = r.clone();
        if let Some(e) = r2.export_mut() {
            e.disks = vec![
                VolumeName::parse("a").unwrap(),
                VolumeName::parse("b").unwrap(),
            ];
            e.upload = Some("up-1".into());
            e.task = Some(Box::new(ExportTask {
                id: "export-i-0123456789abcdef0".into(),
                image_id: None,
                instance_id: Some("i-0123456789abcdef0".into()),
                description: None,
                client_token: None,
                disk_image_format: "VMDK".into(),
                container_format: Some("ova".into()),
                target_environment: Some("vmware".into()),
                role_name: None,
                bucket: "b".into(),
                prefix: "p/".into(),
                key: "p/export-i-0123456789abcdef0.ova".into(),
                tags: vec![("k".into(), "v".into())],
            }));
        }
        let back: JobRecord = serde_json::from_str(&serde_json::to_string(&r2).unwrap()).unwrap();
        assert_eq!(back, r2);
        assert_eq!(back.volumes().len(), 2);
    }
}
