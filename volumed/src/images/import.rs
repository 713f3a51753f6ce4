//! Imports: a VM image's logical bytes copied into new volumes. The image
//! is read through `source` (a raw file directly, any other format
//! through qemu-nbd), chunk by chunk (`copy`): holes and all-zero chunks
//! stay `Zero`, data chunks are written into the volume, reads run ahead
//! of the writes. A request body is read by `stream`.
//!
//! Steps, and what a crash at each leaves:
//! 1. The job record (`running`, its volumes named) is written, then the
//!    volumes are created `importing` (`Engine::create_importing`). A
//!    volume `importing` for a job that is not running is removed at start.
//! 2. Every 64 MiB the volume is flushed, then the record's checkpoint
//!    moves. A restarted file import goes on from the checkpoint
//!    (rereading what it hashes); a stream import cannot be resumed, so it
//!    is rolled back: its volume removed, the job `error`.
//! 3. At the end the volumes are flushed and made available
//!    (`Engine::finish_import`), a snapshot is taken if asked and awaited,
//!    and the job ends `completed`. A failure or cancel removes the
//!    volumes instead (`Engine::remove_importing`).

use std::collections::BTreeSet;
use std::sync::Arc;

use tracing::{info, warn};
use volumed_api::JobState;

use super::ImageError;
use super::inspect::{self, Disk};
use super::qemu::NbdServer;
use super::registry::{JobHandle, JobRegistry};
use super::source::{NbdPool, Source};
use super::work::WorkDirs;
use super::{ImageFormat, error::Error};
use crate::catalog::{Checkpoint, JobId, JobRecord};
use crate::engine::{Engine, SnapshotOutcome, Volume};

/// qemu-nbd connections (one request each) a file import reads through.
const NBD_CONNECTIONS: usize = 8;

/// Why an import stopped.
pub(super) enum Stop {
    /// The daemon is stopping: a file import resumes at the next start.
    Shutdown,
    Cancelled,
    Failed(String),
}

impl Stop {
    /// A failure, its chain as the job's error.
    pub(super) fn failed(e: impl Into<Error>) -> Stop {
        Stop::Failed(volumed_api::error_chain(&e.into()))
    }
}

impl From<ImageError> for Stop {
    fn from(e: ImageError) -> Self {
        Stop::failed(e)
    }
}

pub struct ImportJobs {
    pub(super) engine: Arc<Engine>,
    pub(super) jobs: Arc<JobRegistry>,
    /// Each job's private directory for qemu-nbd's socket (and a task's
    /// downloaded sources).
    pub(super) work: WorkDirs,
}

impl ImportJobs {
    pub fn new(engine: Arc<Engine>, jobs: Arc<JobRegistry>, work: WorkDirs) -> Self {
        ImportJobs { engine, jobs, work }
    }

    /// Runs a file import in the background, from its checkpoint.
    pub fn spawn_file(
        self: &Arc<Self>,
        h: Arc<JobHandle>,
        disks: Vec<Disk>,
        vols: Vec<Arc<Volume>>,
    ) {
        let this = Arc::clone(self);
        self.jobs.tasks.spawn(async move {
            let r = this.fill_disks(&h, &disks, &vols).await;
            this.end(&h, &vols, r).await;
        });
    }

    /// Runs a stream import to its end; the caller awaits the answer.
    pub fn spawn_stream<S, B, E>(
        self: &Arc<Self>,
        h: Arc<JobHandle>,
        vol: Arc<Volume>,
        body: S,
    ) -> tokio::task::JoinHandle<()>
    where
        S: futures_util::Stream<Item = Result<B, E>> + Send + Unpin + 'static,
        B: AsRef<[u8]> + Send,
        E: std::fmt::Display + Send,
    {
        let this = Arc::clone(self);
        self.jobs.tasks.spawn(async move {
            let vols = [vol];
            let r = this.fill_stream(&h, &vols[0], body).await;
            this.end(&h, &vols, r).await;
        })
    }

    async fn end(&self, h: &JobHandle, vols: &[Arc<Volume>], r: Result<(), Stop>) {
        let r = match r {
            Ok(()) => self.complete(h, vols).await,
            Err(e) => Err(e),
        };
        let id = h.id();
        match r {
            Ok(()) => {
                info!(job = %id, volumes = ?vols.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
                      "import completed");
                self.jobs.finish(h, JobState::Completed, None).await;
            }
            Err(Stop::Shutdown) => {
                info!(job = %id, "import stopped by shutdown; it resumes at the next start");
            }
            Err(Stop::Cancelled) => {
                self.remove_volumes(&h.record()).await;
                info!(job = %id, "import cancelled; its volumes are removed");
                self.jobs.finish(h, JobState::Cancelled, None).await;
            }
            Err(Stop::Failed(msg)) => {
                self.remove_volumes(&h.record()).await;
                info!(job = %id, error = %msg, "import failed; its volumes are removed");
                self.jobs.finish(h, JobState::Error, Some(msg)).await;
            }
        }
        let work = self.work.clone();
        let _ = tokio::task::spawn_blocking(move || work.remove(id.as_str())).await;
    }

    /// Flushes, makes the volumes available, and takes the snapshot asked
    /// for, waiting for it to end.
    async fn complete(&self, h: &JobHandle, vols: &[Arc<Volume>]) -> Result<(), Stop> {
        for v in vols {
            v.flush()
                .await
                .map_err(|e| Stop::Failed(format!("flush volume '{}': {e}", v.name)))?;
        }
        let rec = h.record();
        self.engine
            .finish_import(&rec.id, vols)
            .await
            .map_err(Stop::failed)?;
        let Some(spec) = rec.import() else {
            return Ok(());
        };
        if !spec.request.snapshot {
            return Ok(());
        }
        for v in vols {
            let (snap, done) = self
                .engine
                .snapshot_for_job(Arc::clone(v), spec.request.labels.clone())
                .await
                .map_err(|e| {
                    Stop::Failed(format!(
                        "snapshot of '{}': {}",
                        v.name,
                        volumed_api::error_chain(&e)
                    ))
                })?;
            let _ = self
                .jobs
                .update(h, |r| {
                    r.snapshot.get_or_insert(snap.id.clone());
                })
                .await;
            // At shutdown the snapshot job ends on its own (`error`); the
            // import is complete either way. The volume stays: the import
            // itself succeeded, and the snapshot's own record says why it
            // failed.
            tokio::select! {
                outcome = done.wait() => {
                    if let SnapshotOutcome::Failed(e) = outcome {
                        warn!(snapshot = %snap.id, error = %e, "the snapshot after an import failed");
                    }
                }
                () = self.jobs.shutdown.cancelled() => {}
            }
        }
        Ok(())
    }

    /// Removes the volumes a failed, cancelled or rolled-back import made.
    async fn remove_volumes(&self, rec: &JobRecord) {
        self.engine.remove_importing(&rec.id, rec.volumes()).await;
    }

    pub(super) async fn fill_disks(
        &self,
        h: &JobHandle,
        disks: &[Disk],
        vols: &[Arc<Volume>],
    ) -> Result<(), Stop> {
        let rec = h.record();
        let Some(spec) = rec.import() else {
            return Err(Stop::Failed("the job is not an import".into()));
        };
        let req = &spec.request;
        let ck = spec.checkpoint;
        let done_before: u64 = disks.iter().take(ck.disk).map(|d| d.size).sum();
        h.bytes_done
            .store(done_before, std::sync::atomic::Ordering::Relaxed);
        let dir = self
            .work
            .create(rec.id.as_str())
            .map_err(|e| Stop::Failed(format!("create the work directory of {}: {e}", rec.id)))?;
        for (i, (disk, vol)) in disks.iter().zip(vols).enumerate().skip(ck.disk) {
            let resume_at = if i == ck.disk { ck.offset } else { 0 };
            let (src, server) = if disk.spec.format == ImageFormat::Raw && disk.spec.range.is_none()
            {
                (Source::open_file(&disk.spec.path)?, None)
            } else {
                let server = NbdServer::start(&disk.spec, &dir, NBD_CONNECTIONS)
                    .await
                    .map_err(ImageError::from)?;
                let pool = NbdPool::connect(server.socket(), "", NBD_CONNECTIONS).await?;
                (Source::Nbd(pool), Some(server))
            };
            let src = Arc::new(src);
            let hash = req.sha256.is_some();
            let r = self
                .copy(h, &src, vol, i, if hash { 0 } else { resume_at }, resume_at)
                .await;
            if let Ok(s) = Arc::try_unwrap(src) {
                s.close().await;
            }
            let said = match server {
                Some(s) => s.stop().await,
                None => None,
            };
            let digest = match r {
                Ok(d) => d,
                Err(Stop::Failed(msg)) => {
                    // qemu's own words are the better reason when it said any.
                    return Err(Stop::Failed(match said {
                        Some(q) if !q.is_empty() => format!("{msg} (qemu-nbd: {q})"),
                        _ => msg,
                    }));
                }
                Err(e) => return Err(e),
            };
            if let (Some(want), Some(got)) = (&req.sha256, digest) {
                if !want.eq_ignore_ascii_case(&got) {
                    return Err(Stop::Failed(format!(
                        "sha256 mismatch: the image is {got}, expected {want}"
                    )));
                }
                let _ = self
                    .jobs
                    .update(h, |r| {
                        if let Some(i) = r.import_mut() {
                            i.sha256 = Some(got);
                        }
                    })
                    .await;
            }
            vol.flush()
                .await
                .map_err(|e| Stop::Failed(format!("flush volume '{}': {e}", vol.name)))?;
            self.jobs
                .update(h, |r| {
                    if let Some(s) = r.import_mut() {
                        s.checkpoint = Checkpoint {
                            disk: i + 1,
                            offset: 0,
                        };
                    }
                })
                .await
                .map_err(Stop::failed)?;
        }
        Ok(())
    }

    /// At start: imports a previous run left running. File imports go on
    /// from their checkpoint (the image inspected again); stream imports
    /// are rolled back; volumes of jobs no longer running go.
    pub async fn settle_interrupted(self: &Arc<Self>) {
        for h in self.jobs.list() {
            let rec = h.record();
            // Tasks resume through `task::ImportTasks`; exports are settled
            // by `ExportJobs::settle_interrupted`.
            if rec.state != JobState::Running || rec.task().is_some() || rec.import().is_none() {
                continue;
            }
            let stream = rec.import().is_some_and(|i| i.request.source == "-");
            if rec.import().is_none() || stream {
                self.remove_volumes(&rec).await;
                let why = if stream {
                    "interrupted by a restart; a stream import cannot resume, so its volume was removed"
                } else {
                    "interrupted by a restart"
                };
                info!(job = %rec.id, "{why}");
                self.jobs
                    .finish(&h, JobState::Error, Some(why.into()))
                    .await;
                continue;
            }
            match self.reopen(&rec).await {
                Ok((disks, vols)) => {
                    info!(job = %rec.id, checkpoint = ?rec.import().map(|i| i.checkpoint), "resuming an import");
                    self.spawn_file(h, disks, vols);
                }
                Err(msg) => {
                    self.remove_volumes(&rec).await;
                    self.jobs
                        .finish(
                            &h,
                            JobState::Error,
                            Some(format!("could not resume: {msg}")),
                        )
                        .await;
                }
            }
        }
        // Volumes whose import is not running: left by a crash between the
        // job's end and their removal, or before the job was recorded.
        let running: BTreeSet<JobId> = self
            .jobs
            .list()
            .into_iter()
            .map(|h| h.record())
            .filter(|r| r.state == JobState::Running)
            .map(|r| r.id)
            .collect();
        for v in self.engine.list() {
            let rec = v.record();
            if let Some(j) = &rec.importing
                && !running.contains(j)
            {
                info!(volume = %rec.name, job = %j, "removing a volume whose import ended");
                self.engine
                    .remove_importing(j, std::slice::from_ref(&rec.name))
                    .await;
            }
        }
    }

    /// What a file import resumed after a restart reads and writes: its
    /// image inspected again, and its volumes, still `importing` for it.
    async fn reopen(&self, rec: &JobRecord) -> Result<(Vec<Disk>, Vec<Arc<Volume>>), String> {
        let spec = rec.import().ok_or("the job has no import request")?;
        let format = spec.request.format.as_deref().and_then(ImageFormat::parse);
        let disks = inspect::open(std::path::Path::new(&spec.request.source), format)
            .await
            .map_err(|e| volumed_api::error_chain(&e))?;
        if disks.len() != spec.volumes.len() {
            return Err("the image's disks changed".into());
        }
        let mut vols = Vec::new();
        for (d, name) in disks.iter().zip(&spec.volumes) {
            let v = self
                .engine
                .get(name)
                .map_err(|e| volumed_api::error_chain(&e))?;
            if v.record().importing.as_ref() != Some(&rec.id)
                || v.size() != d.size.next_multiple_of(512)
            {
                return Err(format!("volume '{name}' no longer matches the image"));
            }
            vols.push(v);
        }
        Ok((disks, vols))
    }
}
