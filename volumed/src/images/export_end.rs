//! What an export leaves behind and how it goes: the snapshots taken of
//! volume sources (deleted at the end unless kept), the file given to the
//! user who asked, and at start the exports a previous run left running
//! (ended `error`, their partial file or upload removed).

use std::path::PathBuf;

use snapshot::SnapshotId;
use tracing::{info, warn};
use volumed_api::JobState;

use super::export::ExportJobs;
use super::registry::JobHandle;
use crate::catalog::{JobRecord, Requester};
use crate::engine::{SnapshotDone, SnapshotInfo};

impl ExportJobs {
    /// At start: exports a previous run left running end `error` (none
    /// resumes). What they left goes: the partial file or the multipart
    /// upload with its parts, and the snapshots taken of volumes (labelled
    /// `export=JOB`) unless kept on request.
    pub async fn settle_interrupted(&self) {
        for h in self.jobs.list() {
            let rec = h.record();
            let Some(e) = rec.export() else { continue };
            if rec.state != JobState::Running {
                continue;
            }
            let mut why = "interrupted by a restart".to_owned();
            if let (Some(upload), Some(task)) = (&e.upload, &e.task) {
                let gone = match self.buckets.open(&task.bucket) {
                    Ok(b) => super::upload::abort(&**b.store(), &task.key, upload)
                        .await
                        .map_err(|e| b.error(&task.key, e).to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match gone {
                    Ok(()) => why.push_str("; its partial upload was removed"),
                    Err(m) => {
                        warn!(job = %rec.id, upload, error = %m, "could not abort an interrupted export's upload");
                        why.push_str(&format!(
                            "; its partial upload {upload} of s3://{}/{} could not be removed: {m}",
                            task.bucket, task.key
                        ));
                    }
                }
            } else if e.task.is_none() && e.request.destination != "-" {
                let d = PathBuf::from(&e.request.destination);
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(d)).await;
            }
            if !e.request.keep_snapshot && (e.volume.is_some() || !e.disks.is_empty()) {
                self.remove_labelled(&h, &rec).await;
            }
            info!(job = %rec.id, "{why}");
            self.jobs.finish(&h, JobState::Error, Some(why)).await;
        }
    }

    /// Deletes the snapshots labelled `export=JOB` of job `rec`.
    async fn remove_labelled(&self, h: &JobHandle, rec: &JobRecord) {
        let Ok(all) = self.engine.snapshots(None).await else {
            return;
        };
        let mut removed = false;
        for info in all {
            let SnapshotInfo::Recorded { rec: s, .. } = info else {
                continue;
            };
            if s.labels.get("export").map(String::as_str) != Some(rec.id.as_str()) {
                continue;
            }
            match self.engine.delete_snapshot(&s.id).await {
                Ok(()) => removed = true,
                Err(e) => {
                    warn!(job = %rec.id, snapshot = %s.id, error = %volumed_api::error_chain(&e),
                          "could not delete the snapshot an interrupted export took")
                }
            }
        }
        if removed {
            self.mark_removed(h).await;
        }
    }

    /// Records on the job that the snapshot it took is gone.
    async fn mark_removed(&self, h: &JobHandle) {
        let _ = self
            .jobs
            .update(h, |r| {
                if let Some(e) = r.export_mut() {
                    e.snapshot_removed = true
                }
            })
            .await;
    }

    /// Deletes the snapshots an export took, once each has ended.
    pub(super) async fn remove_taken(&self, h: &JobHandle, taken: Vec<(SnapshotId, SnapshotDone)>) {
        let mut removed = false;
        for (id, done) in taken {
            done.wait().await;
            match self.engine.delete_snapshot(&id).await {
                Ok(()) => removed = true,
                Err(e) => {
                    warn!(job = %h.id(), snapshot = %id, error = %volumed_api::error_chain(&e),
                          "could not delete the snapshot the export took")
                }
            }
        }
        if removed {
            self.mark_removed(h).await;
        }
    }
}

/// Gives file `path` to the user who asked for it: owned by them when the
/// daemon may change owners (it runs as root), else readable by all
/// (0644) so they can read or copy it. Returns what was done, for the job.
pub(super) async fn give_to(path: PathBuf, who: Requester) -> String {
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        let mut note = None;
        if who.uid != me
            && let Err(e) = std::os::unix::fs::chown(&path, Some(who.uid), Some(who.gid))
        {
            let perm = std::fs::Permissions::from_mode(0o644);
            note = Some(match std::fs::set_permissions(&path, perm) {
                Ok(()) => format!(
                    "made readable by all: the daemon (uid={me}) may not give files to uid={}: {e}",
                    who.uid
                ),
                Err(e2) => format!("chown: {e}; chmod: {e2}"),
            });
        }
        // What the file is now, as the user will find it.
        let mut owner = match std::fs::metadata(&path) {
            Ok(m) => format!(
                "uid={} gid={} mode={:04o}",
                m.uid(),
                m.gid(),
                m.mode() & 0o7777
            ),
            Err(e) => format!("unknown ({e})"),
        };
        if let Some(n) = note {
            owner.push_str(&format!(" ({n})"));
        }
        owner
    })
    .await
    .unwrap_or_else(|e| format!("unknown ({e})"))
}
