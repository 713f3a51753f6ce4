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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use snapshot::SnapshotId;
use snapshot::store::BoxFuture;
use tracing::{info, warn};
use volumed_api::{BlockDeviceMapping, CreateVolume, EbsDevice, ImportRequest, JobState};

use super::buckets::{BucketError, Buckets};
use super::error::{Error, ImageError, Result};
use super::import::{ImportJobs, Stop};
use super::inspect::{self, Disk};
use super::registry::JobHandle;
use super::{ImageFormat, import_names};
use crate::catalog::{
    Checkpoint, ImportSpec, JobId, JobRecord, JobSpec, TaskKind, TaskSource, TaskSpec, unix_now,
};
use crate::engine::{SnapshotInfo, SnapshotOutcome, Volume};

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

    /// A disk's values, before anything is recorded.
    fn check_disk(&self, d: &crate::catalog::TaskDisk) -> Result<()> {
        if let Some(f) = &d.format
            && aws_format(f).is_none()
        {
            return Err(Error::InvalidRequest(format!(
                "Invalid value '{f}' for Format: expected VMDK, VHD, VHDX, RAW, QCOW2 or OVA"
            )));
        }
        match &d.source {
            TaskSource::File { path } => {
                self.allowed_file(Path::new(path))?;
            }
            TaskSource::S3 { bucket, .. } => {
                if !super::buckets::valid_bucket(bucket) {
                    return Err(ImageError::from(BucketError::InvalidName(bucket.clone())).into());
                }
            }
            TaskSource::Url { url } => {
                if !super::url::is_https(url) {
                    return Err(ImageError::from(super::url::UrlError::Invalid(url.clone())).into());
                }
            }
            TaskSource::Snapshot { .. } => {}
        }
        Ok(())
    }

    /// A `file://` path, if it lies under an `--import-dir` (symbolic links
    /// resolved first, so none leads out).
    fn allowed_file(&self, path: &Path) -> Result<PathBuf> {
        if self.import_dirs.is_empty() {
            return Err(Error::InvalidRequest(
                "file:// sources need --import-dir on the daemon; none is configured".into(),
            ));
        }
        let real = std::fs::canonicalize(path).map_err(|source| ImageError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let inside = self
            .import_dirs
            .iter()
            .any(|d| std::fs::canonicalize(d).is_ok_and(|d| real.starts_with(d)));
        if !inside {
            return Err(Error::InvalidRequest(format!(
                "{} is not under an --import-dir",
                path.display()
            )));
        }
        Ok(real)
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
                    t.cancel_reason = reason;
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

    /// Step 1: every source fetched and inspected; the disks in order.
    async fn fetch(&self, h: &Arc<JobHandle>, task: &TaskSpec) -> Result<Vec<Disk>, Stop> {
        let id = h.id();
        let dir = self
            .imports
            .work
            .create(id.as_str())
            .map_err(|e| Stop::Failed(format!("create the work directory of {id}: {e}")))?;
        let mut disks = Vec::new();
        let mut sizes = Vec::new();
        let mut counts = Vec::new();
        for (i, d) in task.disks.iter().enumerate() {
            let format = d.format.as_deref().and_then(aws_format);
            let path = match &d.source {
                TaskSource::Snapshot { .. } => {
                    sizes.push(None);
                    counts.push(0);
                    continue;
                }
                TaskSource::File { path } => {
                    self.allowed_file(Path::new(path)).map_err(Stop::failed)?
                }
                TaskSource::S3 { bucket, key } => {
                    let dest = dir.join(format!("disk-{i}"));
                    self.download(h, bucket, key, &dest).await?;
                    dest
                }
                TaskSource::Url { url } => {
                    let dest = dir.join(format!("disk-{i}"));
                    self.download_url(h, url, &dest).await?;
                    dest
                }
            };
            let size = std::fs::metadata(&path).map(|m| m.len()).ok();
            let found = inspect::open(&path, format).await?;
            sizes.push(size);
            counts.push(found.len());
            disks.extend(found);
        }
        let total: u64 = disks.iter().map(|d| d.size).sum();
        self.imports
            .jobs
            .update(h, |r| {
                r.bytes_total = total;
                if let Some(t) = r.task_mut() {
                    for ((d, s), c) in t.disks.iter_mut().zip(&sizes).zip(&counts) {
                        d.size = *s;
                        d.volumes = Some(*c);
                    }
                }
            })
            .await
            .map_err(Stop::failed)?;
        Ok(disks)
    }

    async fn download(
        &self,
        h: &JobHandle,
        bucket: &str,
        key: &str,
        dest: &Path,
    ) -> Result<(), Stop> {
        let id = h.id();
        let b = self.buckets.open(bucket).map_err(ImageError::from)?;
        let total = b.size(key).await.map_err(ImageError::from)?;
        self.set_stage(&id, Stage::Downloading(0, total));
        let done = std::sync::atomic::AtomicU64::new(0);
        let got = tokio::select! {
            r = b.download(key, dest, MAX_SOURCE_BYTES, &h.cancel, |n| {
                let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                self.set_stage(&id, Stage::Downloading(d, total));
            }) => r,
            () = self.imports.jobs.shutdown.cancelled() => return Err(Stop::Shutdown),
        };
        match got {
            Ok(_) => Ok(()),
            Err(BucketError::Cancelled) => Err(Stop::Cancelled),
            Err(e) => Err(Stop::failed(ImageError::from(e))),
        }
    }

    async fn download_url(&self, h: &JobHandle, url: &str, dest: &Path) -> Result<(), Stop> {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        let id = h.id();
        let (done, total) = (AtomicU64::new(0), AtomicU64::new(0));
        let got = tokio::select! {
            r = super::url::download(url, dest, self.url_limits, &h.cancel,
                |t| total.store(t, Relaxed),
                |n| {
                    let d = done.fetch_add(n, Relaxed) + n;
                    self.set_stage(&id, Stage::Downloading(d, total.load(Relaxed)));
                }) => r,
            () = self.imports.jobs.shutdown.cancelled() => return Err(Stop::Shutdown),
        };
        match got {
            Ok(_) => Ok(()),
            Err(super::url::UrlError::Cancelled) => Err(Stop::Cancelled),
            Err(e) => Err(Stop::failed(ImageError::from(e))),
        }
    }

    /// Step 2: the scratch volumes, named in the record before they are
    /// made; a resumed task's found `importing` for it.
    async fn volumes(&self, h: &Arc<JobHandle>, disks: &[Disk]) -> Result<Vec<Arc<Volume>>, Stop> {
        let rec = h.record();
        let id = rec.id.clone();
        let spec = rec
            .import()
            .ok_or_else(|| Stop::Failed("not an import".into()))?;
        let (encrypted, key) = spec
            .task
            .as_ref()
            .map_or((None, None), |t| (t.encrypted, t.kms_key_id.clone()));
        let names = import_names(&spec.request.name, disks.len()).map_err(Stop::failed)?;
        if spec.volumes.is_empty() {
            self.imports
                .jobs
                .update(h, |r| {
                    if let Some(i) = r.import_mut() {
                        i.volumes = names.clone();
                        if let Some(t) = i.task.as_mut() {
                            t.snapshots = vec![None; names.len()];
                        }
                    }
                })
                .await
                .map_err(Stop::failed)?;
        } else if spec.volumes != names {
            return Err(Stop::Failed(
                "the images' disks changed since the task started".into(),
            ));
        }
        let mut vols = Vec::new();
        for (d, name) in disks.iter().zip(&names) {
            let size = d.size.next_multiple_of(512);
            let v = match self.imports.engine.get(name) {
                Ok(v) if v.record().importing.as_ref() == Some(&id) && v.size() == size => v,
                Ok(_) => {
                    return Err(Stop::Failed(format!(
                        "volume '{name}' no longer matches the image"
                    )));
                }
                Err(_) => {
                    crate::engine::validate::size(size).map_err(Stop::failed)?;
                    let create = CreateVolume {
                        name: name.clone(),
                        size: Some(size),
                        ephemeral: false,
                        from_snapshot: None,
                        chunk_size: None,
                        hydrate: None,
                        encrypted,
                        key: key.clone(),
                    };
                    self.imports
                        .engine
                        .create_importing(create, &id)
                        .await
                        .map_err(Stop::failed)?
                }
            };
            vols.push(v);
        }
        Ok(vols)
    }

    /// Step 3: a snapshot of each volume, its id recorded before it is
    /// awaited; one the task recorded but that did not complete is deleted
    /// first.
    async fn snapshot_all(&self, h: &Arc<JobHandle>, vols: &[Arc<Volume>]) -> Result<(), Stop> {
        let engine = &self.imports.engine;
        for (i, v) in vols.iter().enumerate() {
            let recorded = h
                .record()
                .task()
                .and_then(|t| t.snapshots.get(i).cloned().flatten());
            if let Some(s) = &recorded {
                if self.all_complete(std::slice::from_ref(&recorded)).await {
                    continue;
                }
                let _ = engine.delete_snapshot(s).await;
            }
            v.flush()
                .await
                .map_err(|e| Stop::Failed(format!("flush volume '{}': {e}", v.name)))?;
            let labels = h
                .record()
                .import()
                .map(|i| i.request.labels.clone())
                .unwrap_or_default();
            let (snap, done) = engine
                .snapshot_for_job(Arc::clone(v), labels)
                .await
                .map_err(Stop::failed)?;
            self.imports
                .jobs
                .update(h, |r| {
                    r.snapshot.get_or_insert(snap.id.clone());
                    if let Some(t) = r.task_mut()
                        && let Some(slot) = t.snapshots.get_mut(i)
                    {
                        *slot = Some(snap.id.clone());
                    }
                })
                .await
                .map_err(Stop::failed)?;
            tokio::select! {
                outcome = done.wait() => {
                    if let SnapshotOutcome::Failed(e) = outcome {
                        return Err(Stop::Failed(format!("snapshot of disk {i}: {e}")));
                    }
                }
                () = self.imports.jobs.shutdown.cancelled() => return Err(Stop::Shutdown),
            }
            if h.cancel.is_cancelled() {
                return Err(Stop::Cancelled);
            }
        }
        Ok(())
    }

    /// Step 4 of ImportImage: `/dev/sda1` for the first disk, `/dev/sdb`,
    /// `/dev/sdc`, ... for the others, unless a `DeviceName` says.
    async fn register(&self, rec: &JobRecord) -> Result<String, Stop> {
        let task = rec
            .task()
            .ok_or_else(|| Stop::Failed("not a task".into()))?;
        let registrar = self
            .registrar
            .get()
            .ok_or_else(|| Stop::Failed("images cannot be registered on this host".into()))?;
        let mut imported = task.snapshots.iter();
        let mut devices: Vec<(Option<String>, SnapshotId)> = Vec::new();
        for d in &task.disks {
            match &d.source {
                TaskSource::Snapshot { id } => devices.push((d.device_name.clone(), id.clone())),
                _ => {
                    for n in 0..d.volumes.unwrap_or(0) {
                        let snap = imported
                            .next()
                            .cloned()
                            .flatten()
                            .ok_or_else(|| Stop::Failed("a disk has no snapshot".into()))?;
                        devices.push((if n == 0 { d.device_name.clone() } else { None }, snap));
                    }
                }
            }
        }
        let names = device_names(&devices.iter().map(|d| d.0.clone()).collect::<Vec<_>>());
        let mappings: Vec<BlockDeviceMapping> = names
            .iter()
            .zip(&devices)
            .map(|(name, (_, snap))| BlockDeviceMapping {
                device_name: name.clone(),
                ebs: Some(EbsDevice {
                    snapshot_id: Some(snap.to_string()),
                    delete_on_termination: Some(true),
                    ..EbsDevice::default()
                }),
                virtual_name: None,
                no_device: false,
            })
            .collect();
        let task_id = task.task_id(&rec.id);
        let req = volumed_api::RegisterImage {
            name: task_id.clone(),
            description: task
                .description
                .clone()
                .unwrap_or_else(|| format!("imported by {task_id}")),
            architecture: task.architecture.clone(),
            root_device_name: names.first().cloned().unwrap_or_else(|| "/dev/sda1".into()),
            mappings,
            tags: BTreeMap::new(),
        };
        registrar.register(req).await.map_err(Stop::Failed)
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

    /// Deletes every snapshot of the task's scratch volumes (recorded or
    /// not) and the volumes themselves.
    async fn undo(&self, rec: &JobRecord) {
        let engine = &self.imports.engine;
        for name in rec.volumes() {
            let Ok(snaps) = engine.snapshots(Some(name.as_str())).await else {
                continue;
            };
            for s in snaps {
                let sid = match &s {
                    SnapshotInfo::Recorded { rec, .. } => rec.id.clone(),
                    SnapshotInfo::Stored(h) => h.id.clone(),
                };
                if let Err(e) = engine.delete_snapshot(&sid).await {
                    warn!(snapshot = %sid, error = %volumed_api::error_chain(&e), "could not delete an import task's snapshot");
                }
            }
        }
        engine.remove_importing(&rec.id, rec.volumes()).await;
    }
}

/// The qemu format of an EC2 `Format` (case-insensitive).
pub fn aws_format(f: &str) -> Option<ImageFormat> {
    match f.to_ascii_lowercase().as_str() {
        "vhd" => Some(ImageFormat::Vpc),
        "vmdk" => Some(ImageFormat::Vmdk),
        "raw" | "img" => Some(ImageFormat::Raw),
        "vhdx" => Some(ImageFormat::Vhdx),
        "qcow2" => Some(ImageFormat::Qcow2),
        "ova" => Some(ImageFormat::Ova),
        _ => None,
    }
}

/// The devices of an image's disks: as given, else `/dev/sda1` for the
/// first and the next free of `/dev/sdb` ... `/dev/sdz` for the others.
pub fn device_names(given: &[Option<String>]) -> Vec<String> {
    let mut used: Vec<String> = given.iter().flatten().cloned().collect();
    let mut letters = (b'b'..=b'z').map(|c| format!("/dev/sd{}", c as char));
    given
        .iter()
        .enumerate()
        .map(|(i, g)| match g {
            Some(n) => n.clone(),
            None if i == 0 && !used.iter().any(|u| u == "/dev/sda1") => {
                used.push("/dev/sda1".into());
                "/dev/sda1".into()
            }
            None => {
                let n = letters
                    .by_ref()
                    .find(|n| !used.contains(n))
                    .unwrap_or_else(|| format!("/dev/xvd{i}"));
                used.push(n.clone());
                n
            }
        })
        .collect()
}

/// The first line of a message, for a one-line `StatusMessage`.
fn one_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_devices() {
        assert_eq!(aws_format("VHD"), Some(ImageFormat::Vpc));
        assert_eq!(aws_format("vmdk"), Some(ImageFormat::Vmdk));
        assert_eq!(aws_format("ISO"), None);
        let n = |g: &[Option<&str>]| {
            device_names(&g.iter().map(|x| x.map(str::to_owned)).collect::<Vec<_>>())
        };
        assert_eq!(
            n(&[None, None, None]),
            ["/dev/sda1", "/dev/sdb", "/dev/sdc"]
        );
        assert_eq!(
            n(&[None, Some("/dev/sdb"), None]),
            ["/dev/sda1", "/dev/sdb", "/dev/sdc"]
        );
        assert_eq!(n(&[Some("/dev/xvda"), None]), ["/dev/xvda", "/dev/sdb"]);
        assert_eq!(one_line("a\nb"), "a");
    }
}
