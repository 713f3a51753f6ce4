//! VM images in and out, above the engine. qemu decodes, volumed copies:
//! the formats are read by `qemu-nbd` (and inspected by `qemu-img info`),
//! and this layer does the copying, zero detection, hashing, progress and
//! resumption itself.
//!
//! - `format`: pure detection from the header, and the header refusals;
//! - `inspect`: the full safety check of a file (ours, then qemu's), OVA
//!   members;
//! - `qemu`: the bounded `qemu-img info` and the read-only `qemu-nbd`;
//! - `nbd_client`: our NBD client (handshake, READ, BLOCK_STATUS);
//! - `source`: one reader over a raw file or a pool of NBD connections;
//! - `registry`: the jobs by id, their progress, tokens and records;
//! - `import`, `copy`, `stream`: imports from a file or a request body;
//!   `task`: EC2 VM import tasks (ImportSnapshot, ImportImage) as imports
//!   into scratch volumes that end as snapshots;
//!   `export`: snapshots written out as images; `export_object`,
//!   `upload`, `ova`: exports to a bucket (multipart, OVA);
//!   `export_tasks`: EC2's export tasks over those jobs; `work`: the
//!   jobs' private directories;
//! - `buckets`: S3 buckets tasks name, through the store's client; `url`:
//!   their `https://` sources;
//! - `error`: this layer's errors.
//!
//! Architecture invariant: this layer reaches volumes only through the
//! engine's public functions (`Engine::create_importing`,
//! `finish_import`, `remove_importing`, `grow_importing`,
//! `snapshot_for_job`, `lease_snapshot_export`, an import task's
//! `snapshot`, `snapshots` and `delete_snapshot` of its own,
//! `delete_snapshot` for the snapshots an export took, and the data path
//! of the `Volume` it holds), and it is the one writer of the catalog's
//! `jobs` tree.

pub mod buckets;
mod copy;
pub mod error;
mod export;
mod export_end;
mod export_object;
mod export_tasks;
pub mod format;
mod import;
pub mod inspect;
pub mod nbd_client;
mod ova;
pub mod qemu;
pub mod registry;
pub mod source;
mod stream;
pub mod task;
mod upload;
pub mod url;
mod work;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshot::SnapshotId;
use tracing::info;
use volumed_api::{CreateVolume, ExportRequest, ImportRequest, JobState, VolumeName};

use crate::catalog::{
    Catalog, Checkpoint, ExportSpec, ImportSpec, JobRecord, JobSpec, Requester, unix_now,
};
use crate::engine::{Engine, SnapshotInfo, validate};
pub use error::{Error, ImageError, Result};
use export::{ExportJobs, ExportPlan, ExportSource, Sink};
pub use export_object::extension;
pub use export_tasks::{BucketExport, ExportDisk};
pub use format::ImageFormat;
use import::ImportJobs;
use registry::{JobHandle, JobRegistry};
use work::WorkDirs;

pub struct Images {
    engine: Arc<Engine>,
    /// S3 buckets tasks read from and write to (the import tasks hold
    /// their own handle; the export tasks read this one).
    #[allow(dead_code)]
    buckets: Arc<buckets::Buckets>,
    tasks: Arc<task::ImportTasks>,
    jobs: Arc<JobRegistry>,
    imports: Arc<ImportJobs>,
    exports: Arc<ExportJobs>,
    /// One EC2 export task started at a time, so a `ClientToken` sent
    /// twice at once finds the first.
    task_starts: tokio::sync::Mutex<()>,
}

impl Images {
    /// Loads the jobs `catalog` records and empties the jobs' work
    /// directories under `data_dir` (before any import resumes). Exports
    /// read snapshots over the NBD server's Unix socket `nbd_socket`; tasks
    /// reach S3 buckets through `buckets`.
    pub async fn open(
        engine: Arc<Engine>,
        catalog: Arc<Catalog>,
        data_dir: &Path,
        nbd_socket: PathBuf,
        buckets: Arc<buckets::Buckets>,
        import_dirs: Vec<PathBuf>,
    ) -> Result<Self> {
        let jobs = Arc::new(JobRegistry::open(catalog).await?);
        let work = WorkDirs::new(data_dir.join("jobs"));
        let work = tokio::task::spawn_blocking(move || {
            work.clear_stale();
            work
        })
        .await
        .map_err(|e| Error::InvalidRequest(format!("clear the job work directories: {e}")))?;
        let imports = Arc::new(ImportJobs::new(
            Arc::clone(&engine),
            Arc::clone(&jobs),
            work.clone(),
        ));
        let tasks = Arc::new(task::ImportTasks::new(
            Arc::clone(&imports),
            Arc::clone(&buckets),
            import_dirs,
        ));
        Ok(Images {
            imports,
            tasks,
            exports: Arc::new(ExportJobs::new(
                Arc::clone(&engine),
                Arc::clone(&jobs),
                nbd_socket,
                work,
                Arc::clone(&buckets),
            )),
            engine,
            jobs,
            task_starts: tokio::sync::Mutex::new(()),
            buckets,
        })
    }

    /// The S3 buckets tasks use.
    #[allow(dead_code)]
    pub fn buckets(&self) -> &Arc<buckets::Buckets> {
        &self.buckets
    }

    /// Resumes the file imports a previous run left running, rolls back the
    /// rest (in the background).
    pub fn start_background(&self) {
        let imports = Arc::clone(&self.imports);
        let tasks = Arc::clone(&self.tasks);
        let exports = Arc::clone(&self.exports);
        tokio::spawn(async move {
            // Exports first: they are ended here with what they left
            // removed, so the imports' settling finds them no longer running.
            exports.settle_interrupted().await;
            imports.settle_interrupted().await;
            tasks.settle_interrupted().await;
        });
    }

    /// EC2 VM import tasks (ImportSnapshot, ImportImage).
    pub fn import_tasks(&self) -> &Arc<task::ImportTasks> {
        &self.tasks
    }

    /// Stops every job's task: a file import resumes from its checkpoint at
    /// the next start. Before the engine's shutdown.
    pub async fn shutdown(&self) {
        self.jobs.stop().await;
    }

    /// Starts importing the image file `req.source` into new volumes;
    /// returns the running job. The image is inspected (and refused) first,
    /// so a bad one changes nothing.
    pub async fn import(&self, req: ImportRequest) -> Result<Arc<JobHandle>> {
        let path = PathBuf::from(&req.source);
        if !path.is_absolute() {
            return Err(Error::InvalidRequest(format!(
                "import source {:?} must be an absolute path the daemon can read",
                req.source
            )));
        }
        let format = check_import(&req)?;
        if self.engine.get(&req.name).is_ok() {
            return Err(crate::engine::Error::VolumeExists(req.name.clone()).into());
        }
        let disks = inspect::open(&path, format).await?;
        if disks.len() > 1 && req.sha256.is_some() {
            return Err(Error::InvalidRequest(
                "--sha256 checks one image; an OVA with several disks has no single hash".into(),
            ));
        }
        let names = import_names(&req.name, disks.len())?;
        let sizes: Vec<u64> = disks.iter().map(|d| d.size.next_multiple_of(512)).collect();
        let fmt = disks
            .first()
            .map_or("raw".into(), |d| d.spec.format.to_string());
        let fmt =
            if format == Some(ImageFormat::Ova) || disks.iter().any(|d| d.spec.range.is_some()) {
                "ova".to_owned()
            } else {
                fmt
            };
        let (h, vols) = self.start_import(req, fmt, names, sizes).await?;
        self.imports.spawn_file(Arc::clone(&h), disks, vols);
        Ok(h)
    }

    /// Starts importing the raw bytes of `body` into a new volume, which
    /// grows as they arrive; the returned task ends with the job.
    pub async fn import_stream<S, B, E>(
        &self,
        req: ImportRequest,
        body: S,
    ) -> Result<(Arc<JobHandle>, tokio::task::JoinHandle<()>)>
    where
        S: futures_util::Stream<Item = std::result::Result<B, E>> + Send + Unpin + 'static,
        B: AsRef<[u8]> + Send,
        E: std::fmt::Display + Send,
    {
        if req.source != "-" {
            return Err(Error::InvalidRequest(
                "a stream import's source is -".into(),
            ));
        }
        match check_import(&req)? {
            None | Some(ImageFormat::Raw) => {}
            Some(f) => {
                return Err(Error::InvalidRequest(format!(
                    "a stream import reads raw bytes only, not {f}; save the image to a file first"
                )));
            }
        }
        // The volume starts one sector long and grows with the stream.
        let name = req.name.clone();
        let (h, vols) = self
            .start_import(req, "raw".into(), vec![name], vec![512])
            .await?;
        let vol = Arc::clone(&vols[0]);
        let task = self.imports.spawn_stream(Arc::clone(&h), vol, body);
        Ok((h, task))
    }

    /// Records the job, then creates its volumes `importing`.
    async fn start_import(
        &self,
        req: ImportRequest,
        format: String,
        names: Vec<VolumeName>,
        sizes: Vec<u64>,
    ) -> Result<(Arc<JobHandle>, Vec<Arc<crate::engine::Volume>>)> {
        for s in &sizes {
            validate::size(*s)?;
        }
        let id = self.jobs.next_id()?;
        let rec = JobRecord {
            id: id.clone(),
            state: JobState::Running,
            created_at: unix_now(),
            finished_at: None,
            format,
            bytes_total: if req.source == "-" {
                0
            } else {
                sizes.iter().sum()
            },
            error: None,
            snapshot: None,
            spec: JobSpec::Import(ImportSpec {
                request: req.clone(),
                volumes: names.clone(),
                checkpoint: Checkpoint::default(),
                sha256: None,
                task: None,
            }),
        };
        let h = self.jobs.add(rec).await?;
        let mut vols = Vec::new();
        for (name, size) in names.iter().zip(&sizes) {
            let create = CreateVolume {
                name: name.clone(),
                size: Some(*size),
                ephemeral: req.ephemeral,
                from_snapshot: None,
                chunk_size: req.chunk_size,
                hydrate: None,
                encrypted: None,
                key: None,
            };
            match self.engine.create_importing(create, &id).await {
                Ok(v) => vols.push(v),
                Err(e) => {
                    let made: Vec<VolumeName> = vols.iter().map(|v| v.name.clone()).collect();
                    self.engine.remove_importing(&id, &made).await;
                    let e = Error::from(e);
                    self.jobs
                        .finish(&h, JobState::Error, Some(volumed_api::error_chain(&e)))
                        .await;
                    return Err(e);
                }
            }
        }
        info!(job = %id, volumes = ?names.iter().map(VolumeName::as_str).collect::<Vec<_>>(),
              source = %req.source, "import started");
        Ok((h, vols))
    }

    /// Starts exporting a snapshot (or a volume, snapshotted first) as an
    /// image. For destination `-` the raw bytes come through the returned
    /// receiver, in order. A file is given to `requester`.
    pub async fn export_image(
        &self,
        req: ExportRequest,
        requester: Option<Requester>,
    ) -> Result<(
        Arc<JobHandle>,
        Option<tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>>,
    )> {
        let format = match req.format.as_deref() {
            None => ImageFormat::Raw,
            Some(f) => match ImageFormat::parse(f) {
                Some(ImageFormat::Ova) | None => {
                    return Err(Error::InvalidRequest(format!(
                        "unknown export format {f:?}: expected raw, qcow2, vmdk, vhdx or vpc"
                    )));
                }
                Some(f) => f,
            },
        };
        if req.compress && format != ImageFormat::Qcow2 {
            return Err(Error::InvalidRequest(
                "--compress applies to qcow2 exports only".into(),
            ));
        }
        let stream = req.destination == "-";
        if stream && format != ImageFormat::Raw {
            return Err(Error::InvalidRequest(format!(
                "only raw exports go to stdout, not {format}; give a file"
            )));
        }
        if !stream {
            check_destination(&req.destination)?;
        }
        let (source, size) = match SnapshotId::parse(&req.source) {
            Some(id) if req.source.starts_with("snap-") => {
                let size = match self.engine.snapshot(&id).await? {
                    SnapshotInfo::Recorded { rec, .. } => rec.size,
                    SnapshotInfo::Stored(h) => h.size,
                };
                (ExportSource::Snapshot(id), size)
            }
            _ => {
                let name = VolumeName::parse(&req.source).map_err(|reason| {
                    crate::engine::Error::InvalidName {
                        name: req.source.clone(),
                        reason,
                    }
                })?;
                let vol = self.engine.get(&name)?;
                if let Some(job) = vol.record().importing {
                    return Err(crate::engine::Error::VolumeImporting(name, job).into());
                }
                let size = vol.size();
                (ExportSource::Volume(vol), size)
            }
        };
        let id = self.jobs.next_id()?;
        let rec = JobRecord {
            id: id.clone(),
            state: JobState::Running,
            created_at: unix_now(),
            finished_at: None,
            format: format.to_string(),
            bytes_total: size,
            error: None,
            snapshot: match &source {
                ExportSource::Snapshot(id) => Some(id.clone()),
                ExportSource::Volume(_) => None,
            },
            spec: JobSpec::Export(ExportSpec {
                request: req.clone(),
                volume: match &source {
                    ExportSource::Volume(v) => Some(v.name.clone()),
                    ExportSource::Snapshot(_) => None,
                },
                requester,
                owner: None,
                snapshot_removed: false,
                disks: Vec::new(),
                upload: None,
                task: None,
            }),
        };
        let h = self.jobs.add(rec).await?;
        let (sink, rx) = if stream {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            (Sink::Stream(tx), Some(rx))
        } else {
            (Sink::File(req.destination.clone().into()), None)
        };
        info!(job = %id, source = %req.source, destination = %req.destination, %format, "export started");
        let plan = ExportPlan {
            sources: vec![source],
            format,
            compress: req.compress,
            keep_snapshot: req.keep_snapshot,
            requester,
            sink,
        };
        self.exports.spawn(Arc::clone(&h), plan);
        Ok((h, rx))
    }

    /// Fires when the jobs stop for shutdown: event streams end with it.
    pub fn jobs_stopping(&self) -> tokio_util::sync::CancellationToken {
        self.jobs.shutdown.clone()
    }

    pub fn jobs(&self) -> Vec<Arc<JobHandle>> {
        self.jobs.list()
    }

    pub fn job(&self, id: &str) -> Result<Arc<JobHandle>> {
        self.jobs.get(&Error::job_id(id)?)
    }

    /// Cancels a running job: it ends `cancelled`, its volumes removed.
    pub fn cancel_job(&self, id: &str) -> Result<Arc<JobHandle>> {
        self.jobs.cancel(&Error::job_id(id)?)
    }
}

/// Checks an import request's values; returns the format asked for.
fn check_import(req: &ImportRequest) -> Result<Option<ImageFormat>> {
    if let Some(c) = req.chunk_size {
        validate::chunk_size(c)?;
    }
    validate::labels(&req.labels)?;
    if let Some(h) = &req.sha256
        && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(Error::InvalidRequest(format!(
            "sha256 {h:?} is not 64 hex digits"
        )));
    }
    req.format
        .as_deref()
        .map(|f| {
            ImageFormat::parse(f).ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "unknown image format {f:?}: expected raw, qcow2, vmdk, vhdx, vpc or ova"
                ))
            })
        })
        .transpose()
}

/// An export's destination file: absolute, new, in a directory that exists.
fn check_destination(raw: &str) -> Result<()> {
    let dest = Path::new(raw);
    if !dest.is_absolute() {
        return Err(Error::InvalidRequest(format!(
            "export destination {raw:?} must be an absolute path"
        )));
    }
    if dest.symlink_metadata().is_ok() {
        return Err(Error::InvalidRequest(format!(
            "export destination {} exists; remove it or choose another",
            dest.display()
        )));
    }
    if !dest.parent().is_some_and(Path::is_dir) {
        return Err(Error::InvalidRequest(format!(
            "the directory of export destination {} does not exist",
            dest.display()
        )));
    }
    Ok(())
}

/// `NAME`, `NAME-1`, ... for the disks of one import.
fn import_names(name: &VolumeName, n: usize) -> Result<Vec<VolumeName>> {
    (0..n)
        .map(|i| {
            if i == 0 {
                return Ok(name.clone());
            }
            let raw = format!("{name}-{i}");
            VolumeName::parse(&raw)
                .map_err(|reason| crate::engine::Error::InvalidName { name: raw, reason }.into())
        })
        .collect()
}
