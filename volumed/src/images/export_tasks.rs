//! EC2's export tasks (ExportImage, CreateInstanceExportTask) are export
//! jobs to a bucket: one registry, one record each, its `ExportTask`
//! holding what EC2 shows besides the job's state. The AWS endpoint
//! resolves images and instances to snapshots and volumes (the machines
//! layer is not this one's to read) and asks here.

use std::sync::Arc;

use snapshot::SnapshotId;
use volumed_api::{ExportRequest, JobState, VolumeName};

use super::export::{ExportPlan, ExportSource, ObjectSink, OvaSpec, Sink};
use super::registry::JobHandle;
use super::{Error, ImageFormat, Images, Result};
use crate::catalog::{ExportSpec, ExportTask, JobRecord, JobSpec, unix_now};
use crate::engine::SnapshotInfo;

/// One disk of an export to a bucket.
#[derive(Debug, Clone)]
pub enum ExportDisk {
    /// An image's root snapshot.
    Snapshot(SnapshotId),
    /// An instance's volume, snapshotted first (the snapshot is deleted at
    /// the end).
    Volume(VolumeName),
}

/// An export task as the endpoint asks for it.
pub struct BucketExport {
    pub task: ExportTask,
    pub disks: Vec<ExportDisk>,
    pub format: ImageFormat,
    /// CPUs and MiB of memory for an OVA's descriptor; `None` writes the
    /// one disk as an image.
    pub ova: Option<(u32, u64)>,
}

impl Images {
    /// Starts an export task, or returns the one started earlier with the
    /// same `ClientToken` (of the same kind of task).
    pub async fn export_to_bucket(&self, req: BucketExport) -> Result<Arc<JobHandle>> {
        let _one = self.task_starts.lock().await;
        let kind = task_kind(&req.task.id);
        if let Some(token) = &req.task.client_token
            && let Some(h) = self.export_tasks().into_iter().find(|h| {
                h.record()
                    .export()
                    .and_then(|e| e.task.as_ref())
                    .is_some_and(|t| {
                        t.client_token.as_ref() == Some(token) && task_kind(&t.id) == kind
                    })
            })
        {
            return Ok(h);
        }
        let bucket = self
            .exports
            .buckets
            .open(&req.task.bucket)
            .map_err(super::ImageError::from)?;
        let mut sources = Vec::new();
        let mut names = Vec::new();
        let mut size = 0u64;
        for d in &req.disks {
            match d {
                ExportDisk::Snapshot(id) => {
                    size += match self.engine.snapshot(id).await? {
                        SnapshotInfo::Recorded { rec, .. } => rec.size,
                        SnapshotInfo::Stored(h) => h.size,
                    };
                    sources.push(ExportSource::Snapshot(id.clone()));
                }
                ExportDisk::Volume(name) => {
                    let vol = self.engine.get(name)?;
                    if let Some(job) = vol.record().importing {
                        return Err(crate::engine::Error::VolumeImporting(name.clone(), job).into());
                    }
                    size += vol.size();
                    names.push(name.clone());
                    sources.push(ExportSource::Volume(vol));
                }
            }
        }
        let first = match req.disks.first() {
            Some(ExportDisk::Snapshot(id)) => id.to_string(),
            Some(ExportDisk::Volume(n)) => n.to_string(),
            None => return Err(Error::InvalidRequest("an export needs a disk".into())),
        };
        let format = if req.ova.is_some() {
            ImageFormat::Vmdk
        } else {
            req.format
        };
        let id = self.jobs.next_id()?;
        let task = req.task;
        let destination = format!("s3://{}/{}", task.bucket, task.key);
        let single_volume = (req.ova.is_none() && names.len() == 1).then(|| names[0].clone());
        let rec = JobRecord {
            id: id.clone(),
            state: JobState::Running,
            created_at: unix_now(),
            finished_at: None,
            format: if req.ova.is_some() {
                "ova".into()
            } else {
                format.to_string()
            },
            bytes_total: size,
            error: None,
            snapshot: match req.disks.first() {
                Some(ExportDisk::Snapshot(s)) => Some(s.clone()),
                _ => None,
            },
            spec: JobSpec::Export(ExportSpec {
                request: ExportRequest {
                    source: first,
                    destination: destination.clone(),
                    format: Some(format.to_string()),
                    compress: false,
                    keep_snapshot: false,
                },
                volume: single_volume,
                requester: None,
                owner: None,
                snapshot_removed: false,
                disks: if req.ova.is_some() { names } else { Vec::new() },
                upload: None,
                task: Some(Box::new(task.clone())),
            }),
        };
        let h = self.jobs.add(rec).await?;
        tracing::info!(job = %id, task = %task.id, %destination, "export task started");
        let plan = ExportPlan {
            sources,
            format,
            compress: false,
            keep_snapshot: false,
            requester: None,
            sink: Sink::Object(ObjectSink {
                bucket,
                key: task.key.clone(),
                ova: req.ova.map(|(cpus, memory_mib)| OvaSpec {
                    name: task.id.clone(),
                    cpus,
                    memory_mib,
                }),
            }),
        };
        self.exports.spawn(Arc::clone(&h), plan);
        Ok(h)
    }

    /// The jobs that are EC2 export tasks.
    pub fn export_tasks(&self) -> Vec<Arc<JobHandle>> {
        self.jobs
            .list()
            .into_iter()
            .filter(|h| h.record().export().is_some_and(|e| e.task.is_some()))
            .collect()
    }

    /// The job of export task `task_id`.
    pub fn export_task(&self, task_id: &str) -> Option<Arc<JobHandle>> {
        self.export_tasks().into_iter().find(|h| {
            h.record()
                .export()
                .and_then(|e| e.task.as_ref())
                .is_some_and(|t| t.id == task_id)
        })
    }

    /// Cancels export task `task_id`: its upload is aborted, so no partial
    /// object is left. Returns its job as it was, or `None` if no such task.
    pub fn cancel_export_task(&self, task_id: &str) -> Option<Result<Arc<JobHandle>>> {
        let h = self.export_task(task_id)?;
        Some(self.jobs.cancel(&h.id()))
    }
}

/// `export-ami` or `export-i`: a token is matched within one kind.
fn task_kind(id: &str) -> &str {
    id.rsplit_once('-').map_or(id, |(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::task_kind;

    #[test]
    fn a_client_token_is_matched_within_one_kind_of_task() {
        assert_eq!(task_kind("export-ami-0123456789abcdef0"), "export-ami");
        assert_eq!(task_kind("export-i-0123456789abcdef0"), "export-i");
        assert_ne!(
            task_kind("export-ami-0123456789abcdef0"),
            task_kind("export-i-0123456789abcdef0")
        );
    }
}
