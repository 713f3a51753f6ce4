//! EC2 VM import tasks (ImportSnapshot, ImportImage) carried out as import
//! jobs: one job record each (its `ImportSpec::task`), the same registry,
//! checkpoint and resume as `vol import`.
//!
//! A task imports each disk into a private scratch volume (named after the
//! task, created `importing`, so no lifecycle call but the job's reaches
//! it), snapshots it, and removes it once the snapshot is complete: the
//! result is snapshots and no volume. Scratch volumes rather than writing
//! chunks straight into a snapshot, because the import path (zero
//! detection, checkpoints, resume) and the snapshot path (dedup, the one
//! commit protocol, encryption) then stay the only ones.
//!
//! Steps, and what a crash at each leaves (the job stays `running`, and is
//! run again from the top at the next start):
//! 1. Sources are fetched: an S3 object into the job's work directory by
//!    ranged GETs (again after a restart: the work directory is emptied at
//!    start), a `file://` path used in place. Each is inspected with every
//!    refusal `vol import` has.
//! 2. The scratch volumes are named in the record, then created; a resumed
//!    task finds them still `importing` for it and goes on from the
//!    checkpoint.
//! 3. Each volume is snapshotted (labelled `volumed:import-task`); the
//!    snapshot id is recorded when it starts, so a crash leaves a snapshot
//!    the task knows and deletes before taking another.
//! 4. The scratch volumes go; ImportImage registers its image (named after
//!    the task, so a second attempt finds the first), and the job ends
//!    `completed`. A failure or a cancel deletes the task's snapshots and
//!    volumes and ends the job `error` or `cancelled` (EC2: `deleted`).

mod image;
mod steps;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use snapshot::SnapshotId;
use snapshot::store::BoxFuture;
use tracing::{info, warn};
use volumed_api::{ImportRequest, JobState};

use super::ImageFormat;
use super::buckets::Buckets;
use super::error::{Error, Result};
use super::import::{ImportJobs, Stop};
use super::registry::JobHandle;
use crate::catalog::{
    Checkpoint, ImportSpec, JobId, JobRecord, JobSpec, TaskKind, TaskSpec, unix_now,
};
use crate::engine::SnapshotInfo;
pub use image::{aws_format, device_names, one_line};

/// The largest source a task fetches: EBS's largest volume.
const MAX_SOURCE_BYTES: u64 = 64 << 40;
/// The label each snapshot a task takes carries, with the task id.
pub const TASK_LABEL: &str = "volumed:import-task";

/// Registers the image ImportImage made; the daemon wires it to the
/// machines layer (which this layer may not import). Answers the image id,
/// or the reason as one line.
pub trait Registrar: Send + Sync {
    fn register(&self, req: volumed_api::RegisterImage) -> BoxFuture<'_, Result<String, String>>;
}

/// Where a running task is, for its `StatusMessage` and `Progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Pending,
    /// Bytes of the sources fetched so far, of all.
    Downloading(u64, u64),
    Converting,
    Snapshotting,
}

/// A task as EC2 shows it.
#[derive(Debug, Clone)]
pub struct TaskView {
    pub task_id: String,
    pub job: JobRecord,
    /// `active`, `deleting`, `completed` or `deleted`.
    pub status: &'static str,
    pub status_message: Option<String>,
    /// A whole percentage, while active.
    pub progress: Option<u64>,
}

impl TaskView {
    pub fn task(&self) -> &TaskSpec {
        self.job
            .task()
            .expect("a TaskView is built from a task's job only")
    }
}

pub struct ImportTasks {
    imports: Arc<ImportJobs>,
    buckets: Arc<Buckets>,
    /// `--import-dir`: the directories `file://` sources may name.
    import_dirs: Vec<PathBuf>,
    registrar: OnceLock<Arc<dyn Registrar>>,
    /// The caps of `https://` sources.
    url_limits: super::url::UrlLimits,
    stages: Mutex<HashMap<JobId, Stage>>,
    /// A ClientToken's check and its task's record, one at a time.
    starting: tokio::sync::Mutex<()>,
}

impl ImportTasks {
    pub fn new(imports: Arc<ImportJobs>, buckets: Arc<Buckets>, import_dirs: Vec<PathBuf>) -> Self {
        ImportTasks {
            imports,
            buckets,
            import_dirs,
            registrar: OnceLock::new(),
            url_limits: super::url::UrlLimits::from_env(),
            stages: Mutex::new(HashMap::new()),
            starting: tokio::sync::Mutex::new(()),
        }
    }

    pub fn set_registrar(&self, r: Arc<dyn Registrar>) {
        let _ = self.registrar.set(r);
    }

    /// Starts a task, or answers the one started with the same
    /// `ClientToken` and kind. Sources are checked before anything is
    /// recorded; what can only be found by reading them ends the task
    /// `deleted` instead.
    pub async fn start(self: &Arc<Self>, task: TaskSpec) -> Result<Arc<JobHandle>> {
        for d in &task.disks {
            self.check_disk(d)?;
        }
        // What CreateVolume would refuse, refused before a task exists; a
        // key that does not resolve ends the task when its volume is made.
        let wants_key = task.encrypted == Some(true) || task.kms_key_id.is_some();
        if wants_key && !self.imports.engine.store_encrypted() {
            return Err(crate::engine::Error::InvalidRequest(
                "the store is not encrypted; start volumed with --store-encryption on over a new store to encrypt volumes".into(),
            )
            .into());
        }
        let _one = self.starting.lock().await;
        if let Some(token) = &task.client_token
            && let Some(h) = self.imports.jobs.list().into_iter().find(|h| {
                h.record()
                    .task()
                    .is_some_and(|t| t.kind == task.kind && t.client_token.as_ref() == Some(token))
            })
        {
            return Ok(h);
        }
        let id = self.imports.jobs.next_id()?;
        let task_id = task.task_id(&id);
        let name = volumed_api::VolumeName::parse(&task_id).map_err(|reason| {
            crate::engine::Error::InvalidName {
                name: task_id.clone(),
                reason,
            }
        })?;
        let mut labels = BTreeMap::new();
        labels.insert(TASK_LABEL.to_owned(), task_id.clone());
        // What EC2 writes as an imported snapshot's description, and what
        // DescribeSnapshots shows for a snapshot without one of its own.
        labels.insert(
            "description".to_owned(),
            format!("Created by AWS-VMImport service for {task_id}"),
        );
        let rec = JobRecord {
            id: id.clone(),
            state: JobState::Running,
            created_at: unix_now(),
            finished_at: None,
            format: task
                .disks
                .first()
                .and_then(|d| d.format.as_deref())
                .map_or("raw".to_owned(), |f| {
                    aws_format(f).map_or("raw", ImageFormat::as_str).into()
                }),
            bytes_total: 0,
            error: None,
            snapshot: None,
            spec: JobSpec::Import(ImportSpec {
                request: ImportRequest {
                    source: task_id.clone(),
                    name,
                    format: None,
                    chunk_size: None,
                    ephemeral: false,
                    snapshot: true,
                    labels,
                    sha256: None,
                },
                volumes: Vec::new(),
                checkpoint: Checkpoint::default(),
                sha256: None,
                task: Some(Box::new(task)),
            }),
        };
        let h = self.imports.jobs.add(rec).await?;
        info!(job = %id, task = %task_id, "import task started");
        self.spawn(Arc::clone(&h));
        Ok(h)
    }

    fn spawn(self: &Arc<Self>, h: Arc<JobHandle>) {
        let this = Arc::clone(self);
        self.set_stage(&h.id(), Stage::Pending);
        self.imports.jobs.tasks.spawn(async move {
            let r = this.run(&h).await;
            this.end(&h, r).await;
        });
    }

    fn set_stage(&self, id: &JobId, s: Stage) {
        self.stages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), s);
    }

    fn stage(&self, id: &JobId) -> Stage {
        self.stages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
            .unwrap_or(Stage::Pending)
    }

    /// The task `task_id` names, of `kind`.
    pub fn get(&self, kind: TaskKind, task_id: &str) -> Option<TaskView> {
        let (k, job) = TaskSpec::job_of(task_id)?;
        if k != kind {
            return None;
        }
        let h = self.imports.jobs.get(&job).ok()?;
        self.view(&h).filter(|v| v.task().kind == kind)
    }

    /// Every task of `kind` the registry keeps, oldest first.
    pub fn list(&self, kind: TaskKind) -> Vec<TaskView> {
        self.imports
            .jobs
            .list()
            .iter()
            .filter_map(|h| self.view(h))
            .filter(|v| v.task().kind == kind)
            .collect()
    }

    pub fn view(&self, h: &JobHandle) -> Option<TaskView> {
        let job = h.record();
        let task = job.task()?;
        let task_id = task.task_id(&job.id);
        let (status, status_message, progress) = match job.state {
            JobState::Running if h.cancel.is_cancelled() => ("deleting", None, None),
            JobState::Running => {
                let (msg, pct) = match self.stage(&job.id) {
                    Stage::Pending => ("pending", 0),
                    Stage::Downloading(done, total) => (
                        "downloading/converting",
                        5 + 40 * done.min(total) / total.max(1),
                    ),
                    Stage::Converting => {
                        let done = h.bytes_done.load(std::sync::atomic::Ordering::Relaxed);
                        (
                            "downloading/converting",
                            45 + 45 * done.min(job.bytes_total) / job.bytes_total.max(1),
                        )
                    }
                    Stage::Snapshotting => ("converting", 95),
                };
                ("active", Some(msg.to_owned()), Some(pct))
            }
            JobState::Completed => ("completed", None, None),
            JobState::Cancelled => (
                "deleted",
                Some(
                    task.cancel_reason
                        .clone()
                        .unwrap_or_else(|| "cancelled".to_owned()),
                ),
                None,
            ),
            JobState::Error => (
                "deleted",
                Some(format!(
                    "ClientError: {}",
                    one_line(job.error.as_deref().unwrap_or("failed"))
                )),
                None,
            ),
        };
        Some(TaskView {
            task_id,
            status,
            status_message,
            progress,
            job: job.clone(),
        })
    }

    /// CancelImportTask: the task's previous state; it ends `deleted`, its
    /// snapshots and volumes removed.
    pub async fn cancel(&self, task_id: &str, reason: Option<String>) -> Result<&'static str> {
        let view = [TaskKind::Snapshot, TaskKind::Image]
            .into_iter()
            .find_map(|k| self.get(k, task_id))
            .ok_or_else(|| Error::NoSuchJobId(task_id.to_owned()))?;
        if view.status != "active" {
            return Err(Error::InvalidRequest(format!(
                "The import task {task_id} cannot be cancelled in state {}",
                view.status
            )));
        }
        let h = self.imports.jobs.get(&view.job.id)?;
        let _ = self
            .imports
            .jobs
            .update(&h, |r| {
                if let Some(t) = r.task_mut() {
                    t.cancel_reason = Some(reason.unwrap_or_else(|| "cancelled".to_owned()));
                }
            })
            .await;
        self.imports.jobs.cancel(&view.job.id)?;
        Ok(view.status)
    }

    /// At start, before the endpoint answers: tasks a previous run left
    /// running are run again from their records.
    pub async fn settle_interrupted(self: &Arc<Self>) {
        for h in self.imports.jobs.list() {
            let rec = h.record();
            if rec.state == JobState::Running && rec.task().is_some() {
                info!(job = %rec.id, "resuming an import task");
                self.spawn(h);
            }
        }
    }

    async fn run(&self, h: &Arc<JobHandle>) -> Result<(), Stop> {
        let rec = h.record();
        let id = rec.id.clone();
        let task = rec
            .task()
            .cloned()
            .ok_or_else(|| Stop::Failed("the job is not a task".into()))?;
        // Cancelled before a restart: CancelImportTask's reason is
        // recorded, the token is not.
        if h.cancel.is_cancelled() || task.cancel_reason.is_some() {
            return Err(Stop::Cancelled);
        }
        let snapshotted = !task.snapshots.is_empty()
            && task.snapshots.len() == rec.volumes().len()
            && self.all_complete(&task.snapshots).await;
        if !snapshotted {
            let disks = self.fetch(h, &task).await?;
            let vols = self.volumes(h, &disks).await?;
            self.set_stage(&id, Stage::Converting);
            self.imports.fill_disks(h, &disks, &vols).await?;
            if h.cancel.is_cancelled() {
                return Err(Stop::Cancelled);
            }
            self.set_stage(&id, Stage::Snapshotting);
            self.snapshot_all(h, &vols).await?;
        }
        let rec = h.record();
        self.imports
            .engine
            .remove_importing(&id, rec.volumes())
            .await;
        if task.kind == TaskKind::Image && task.image_id.is_none() {
            let image = self.register(&rec).await?;
            self.imports
                .jobs
                .update(h, |r| {
                    if let Some(t) = r.task_mut() {
                        t.image_id = Some(image);
                    }
                })
                .await
                .map_err(Stop::failed)?;
        }
        Ok(())
    }

    async fn all_complete(&self, snaps: &[Option<SnapshotId>]) -> bool {
        for s in snaps {
            let Some(s) = s else { return false };
            match self.imports.engine.snapshot(s).await {
                Ok(SnapshotInfo::Recorded { rec, .. })
                    if rec.state == crate::catalog::SnapshotState::Completed => {}
                Ok(SnapshotInfo::Stored(_)) => {}
                _ => return false,
            }
        }
        true
    }

    async fn end(&self, h: &JobHandle, r: Result<(), Stop>) {
        let id = h.id();
        match r {
            Ok(()) => {
                info!(job = %id, "import task completed");
                self.imports.jobs.finish(h, JobState::Completed, None).await;
            }
            Err(Stop::Shutdown) => {
                info!(job = %id, "import task stopped by shutdown; it resumes at the next start");
            }
            Err(Stop::Cancelled) => {
                self.undo(&h.record()).await;
                info!(job = %id, "import task cancelled; its snapshots and volumes are removed");
                self.imports.jobs.finish(h, JobState::Cancelled, None).await;
            }
            Err(Stop::Failed(msg)) => {
                self.undo(&h.record()).await;
                info!(job = %id, error = %msg, "import task failed; its snapshots and volumes are removed");
                self.imports
                    .jobs
                    .finish(h, JobState::Error, Some(msg))
                    .await;
            }
        }
        self.stages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let work = self.imports.work.clone();
        let _ = tokio::task::spawn_blocking(move || work.remove(id.as_str())).await;
    }

    /// Deletes every snapshot of the task's scratch volumes (recorded in
    /// the task or not) and the volumes themselves. Only snapshots this
    /// host took of them, labelled with this task and no older than it:
    /// another host sharing the store may have a task of the same number.
    async fn undo(&self, rec: &JobRecord) {
        let engine = &self.imports.engine;
        let task_id = rec.task().map(|t| t.task_id(&rec.id));
        for name in rec.volumes() {
            let Ok(snaps) = engine.snapshots(Some(name.as_str())).await else {
                continue;
            };
            for s in snaps {
                let SnapshotInfo::Recorded { rec: snap, .. } = s else {
                    continue;
                };
                if snap.labels.get(TASK_LABEL) != task_id.as_ref()
                    || snap.created_at < rec.created_at
                {
                    continue;
                }
                if let Err(e) = engine.delete_snapshot(&snap.id).await {
                    warn!(snapshot = %snap.id, error = %volumed_api::error_chain(&e), "could not delete an import task's snapshot");
                }
            }
        }
        engine.remove_importing(&rec.id, rec.volumes()).await;
    }
}
