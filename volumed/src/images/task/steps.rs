//! Steps 1 to 3 of an import task: its sources checked, fetched and
//! inspected, its scratch volumes named and made (or found again), and
//! their snapshots taken.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use volumed_api::CreateVolume;

use super::super::buckets::BucketError;
use super::super::error::{Error, ImageError, Result};
use super::super::import::Stop;
use super::super::import_names;
use super::super::inspect::{self, Disk};
use super::super::registry::JobHandle;
use super::image::aws_format;
use super::{ImportTasks, MAX_SOURCE_BYTES, Stage};
use crate::catalog::{TaskSource, TaskSpec};
use crate::engine::{SnapshotOutcome, Volume};

impl ImportTasks {
    /// A disk's values, before anything is recorded.
    pub(super) fn check_disk(&self, d: &crate::catalog::TaskDisk) -> Result<()> {
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
                if !super::super::buckets::valid_bucket(bucket) {
                    return Err(ImageError::from(BucketError::InvalidName(bucket.clone())).into());
                }
            }
            TaskSource::Url { url } => {
                if !super::super::url::is_https(url) {
                    return Err(ImageError::from(super::super::url::UrlError::Invalid(
                        url.clone(),
                    ))
                    .into());
                }
            }
            TaskSource::Snapshot { .. } => {}
        }
        Ok(())
    }

    /// A `file://` path, if it lies under an `--import-dir` (symbolic links
    /// resolved first, so none leads out).
    pub(super) fn allowed_file(&self, path: &Path) -> Result<PathBuf> {
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

    /// Step 1: every source fetched and inspected; the disks in order.
    pub(super) async fn fetch(
        &self,
        h: &Arc<JobHandle>,
        task: &TaskSpec,
    ) -> Result<Vec<Disk>, Stop> {
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
        if task.kind == crate::catalog::TaskKind::Snapshot && disks.len() > 1 {
            return Err(Stop::Failed(format!(
                "the image has {} disks; ImportSnapshot imports one (ImportImage imports them all)",
                disks.len()
            )));
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

    pub(super) async fn download(
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

    pub(super) async fn download_url(
        &self,
        h: &JobHandle,
        url: &str,
        dest: &Path,
    ) -> Result<(), Stop> {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        let id = h.id();
        let (done, total) = (AtomicU64::new(0), AtomicU64::new(0));
        let got = tokio::select! {
            r = super::super::url::download(url, dest, self.url_limits, &h.cancel,
                |t| total.store(t, Relaxed),
                |n| {
                    let d = done.fetch_add(n, Relaxed) + n;
                    self.set_stage(&id, Stage::Downloading(d, total.load(Relaxed)));
                }) => r,
            () = self.imports.jobs.shutdown.cancelled() => return Err(Stop::Shutdown),
        };
        match got {
            Ok(_) => Ok(()),
            Err(super::super::url::UrlError::Cancelled) => Err(Stop::Cancelled),
            Err(e) => Err(Stop::failed(ImageError::from(e))),
        }
    }

    /// Step 2: the scratch volumes, named in the record before they are
    /// made; a resumed task's found `importing` for it.
    pub(super) async fn volumes(
        &self,
        h: &Arc<JobHandle>,
        disks: &[Disk],
    ) -> Result<Vec<Arc<Volume>>, Stop> {
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
    pub(super) async fn snapshot_all(
        &self,
        h: &Arc<JobHandle>,
        vols: &[Arc<Volume>],
    ) -> Result<(), Stop> {
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
}
