//! The job registry: every import and export this host ran or runs, by id,
//! with live progress, a cancellation token each, and its record in the
//! catalog. Finished jobs stay listed for [`KEEP_FINISHED_SECS`] (7 days,
//! as EC2 lists import and export tasks), and at most the last
//! [`KEEP_FINISHED`] of them.
//!
//! Two tokens stop a job: its own (`vol job cancel`: the job ends
//! `cancelled` and undoes its work) and the registry's shutdown token (the
//! daemon stops: a file import stays `running` in the catalog with its
//! checkpoint and resumes at the next start).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;
use volumed_api::JobState;

use super::error::{Error, Result};
use crate::catalog::{Catalog, JobId, JobRecord, unix_now};

/// Finished jobs kept in the catalog and listed; older ones are dropped.
const KEEP_FINISHED: usize = 100;
/// How long a finished job stays: EC2 describes tasks "completed or
/// cancelled in the previous 7 days".
pub const KEEP_FINISHED_SECS: u64 = 7 * 24 * 3600;

/// Whether a finished job is past its keeping time at `now`.
fn expired(rec: &JobRecord, now: u64) -> bool {
    rec.state.is_final()
        && rec
            .finished_at
            .is_some_and(|f| now.saturating_sub(f) > KEEP_FINISHED_SECS)
}

pub struct JobHandle {
    rec: Mutex<JobRecord>,
    /// Bytes of the source read so far (of every disk, for an OVA).
    pub bytes_done: AtomicU64,
    /// `vol job cancel`.
    pub cancel: CancellationToken,
    /// Bumped on every change a watcher should see.
    changed: watch::Sender<u64>,
}

impl JobHandle {
    pub fn record(&self) -> JobRecord {
        self.rec.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn id(&self) -> JobId {
        self.rec
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .id
            .clone()
    }

    /// Whether the job has ended (without copying the record).
    pub fn is_final(&self) -> bool {
        self.rec
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state
            .is_final()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn add_done(&self, n: u64) {
        self.bytes_done.fetch_add(n, Ordering::Relaxed);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

pub struct JobRegistry {
    catalog: Arc<Catalog>,
    /// The number of the last job id given out: ids are dense, and a
    /// restart goes on from the highest recorded.
    last_id: AtomicU64,
    jobs: Mutex<BTreeMap<JobId, Arc<JobHandle>>>,
    /// Record writes of one job in the order they were made.
    writes: tokio::sync::Mutex<()>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

impl JobRegistry {
    /// Loads the jobs the catalog holds; those still `running` are for the
    /// caller to resume or settle.
    pub async fn open(catalog: Arc<Catalog>) -> Result<Self> {
        let recs = catalog.jobs()?;
        let last = recs
            .iter()
            .map(|r| r.id.number())
            .max()
            .unwrap_or(0)
            .max(catalog.last_job()?);
        let reg = JobRegistry {
            catalog: Arc::clone(&catalog),
            last_id: AtomicU64::new(last),
            jobs: Mutex::new(BTreeMap::new()),
            writes: tokio::sync::Mutex::new(()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        let now = unix_now();
        let finished = recs
            .iter()
            .filter(|r| r.state.is_final() && !expired(r, now))
            .count();
        let mut drop_n = finished.saturating_sub(KEEP_FINISHED);
        for r in recs {
            let over = drop_n > 0 && r.state.is_final() && !expired(&r, now);
            if over || expired(&r, now) {
                drop_n -= usize::from(over);
                if let Err(e) = catalog.remove_job(&r.id).await {
                    warn!(job = %r.id, error = %volumed_api::error_chain(&e), "could not drop an old job record");
                }
                continue;
            }
            reg.insert_handle(r);
        }
        Ok(reg)
    }

    fn insert_handle(&self, rec: JobRecord) -> Arc<JobHandle> {
        let done = if rec.state == JobState::Completed {
            rec.bytes_total
        } else {
            0
        };
        let h = Arc::new(JobHandle {
            rec: Mutex::new(rec.clone()),
            bytes_done: AtomicU64::new(done),
            cancel: CancellationToken::new(),
            changed: watch::channel(0).0,
        });
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(rec.id, Arc::clone(&h));
        h
    }

    /// A new job's id: one past the last given out (recorded with the job,
    /// so an id is not given twice even once old records are dropped).
    pub fn next_id(&self) -> Result<JobId> {
        Ok(JobId::new(self.last_id.fetch_add(1, Ordering::Relaxed) + 1))
    }

    /// Records a new job (flushed) and lists it; jobs past their keeping
    /// time go.
    pub async fn add(&self, rec: JobRecord) -> Result<Arc<JobHandle>> {
        self.catalog.put_job(&rec).await?;
        // After the record: a crash between the two leaves the record,
        // which counts as well.
        let n = self.last_id.load(Ordering::Relaxed).max(rec.id.number());
        self.catalog.put_last_job(n).await?;
        let h = self.insert_handle(rec);
        self.expire(unix_now()).await;
        Ok(h)
    }

    /// Drops the finished jobs past their keeping time at `now`, from the
    /// list and the catalog.
    pub async fn expire(&self, now: u64) {
        let old: Vec<JobId> = {
            let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let old: Vec<JobId> = jobs
                .iter()
                .filter(|(_, h)| expired(&h.rec.lock().unwrap_or_else(|e| e.into_inner()), now))
                .map(|(id, _)| id.clone())
                .collect();
            for id in &old {
                jobs.remove(id);
            }
            old
        };
        for id in old {
            if let Err(e) = self.catalog.remove_job(&id).await {
                warn!(job = %id, error = %volumed_api::error_chain(&e), "could not drop an expired job record");
            }
        }
    }

    /// A job by id; one past its keeping time is gone, even before
    /// [`JobRegistry::expire`] drops its record.
    pub fn get(&self, id: &JobId) -> Result<Arc<JobHandle>> {
        let now = unix_now();
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .filter(|h| !expired(&h.rec.lock().unwrap_or_else(|e| e.into_inner()), now))
            .cloned()
            .ok_or_else(|| Error::JobNotFound(id.clone()))
    }

    /// Every job kept, by id.
    pub fn list(&self) -> Vec<Arc<JobHandle>> {
        let now = unix_now();
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|h| !expired(&h.rec.lock().unwrap_or_else(|e| e.into_inner()), now))
            .cloned()
            .collect()
    }

    /// Changes a job's record and writes it (flushed). The registry is the
    /// one writer of job records; writes go out in the order they were made.
    pub async fn update(&self, h: &JobHandle, f: impl FnOnce(&mut JobRecord)) -> Result<()> {
        let _order = self.writes.lock().await;
        let rec = {
            let mut r = h.rec.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut r);
            if r.state.is_final() && r.finished_at.is_none() {
                r.finished_at = Some(unix_now());
            }
            r.clone()
        };
        let res = self.catalog.put_job(&rec).await;
        h.changed.send_modify(|v| *v = v.wrapping_add(1));
        res.map_err(Into::into)
    }

    /// Ends a job in `state` with `error`, recorded.
    pub async fn finish(&self, h: &JobHandle, state: JobState, error: Option<String>) {
        let ended = self
            .update(h, |r| {
                r.state = state;
                r.error = error;
            })
            .await;
        if let Err(e) = ended {
            warn!(job = %h.id(), error = %volumed_api::error_chain(&e), "could not record the job's end");
        }
    }

    pub fn cancel(&self, id: &JobId) -> Result<Arc<JobHandle>> {
        let h = self.get(id)?;
        if h.record().state.is_final() {
            return Err(Error::InvalidRequest(format!(
                "job {id} has already ended ({})",
                h.record().state.as_str()
            )));
        }
        h.cancel.cancel();
        Ok(h)
    }

    /// Stops every job's task, leaving what resumes recorded as running.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Checkpoint, ImportSpec, JobSpec};

    fn rec(id: JobId, state: JobState) -> JobRecord {
        JobRecord {
            id,
            state,
            created_at: 0,
            finished_at: None,
            format: "raw".into(),
            bytes_total: 10,
            error: None,
            snapshot: None,
            spec: JobSpec::Import(ImportSpec {
                request: serde_json::from_str(r#"{"source":"-","name":"a"}"#).unwrap(),
                volumes: Vec::new(),
                checkpoint: Checkpoint::default(),
                sha256: None,
                task: None,
            }),
        }
    }

    #[tokio::test]
    async fn finished_jobs_go_after_seven_days() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        let now = unix_now();
        let ids = {
            let reg = JobRegistry::open(Arc::new(Catalog::open(&path).unwrap()))
                .await
                .unwrap();
            let mut ids = Vec::new();
            // Finished 8 days ago, 6 days ago, and a running one as old.
            for (state, age) in [
                (JobState::Completed, 8),
                (JobState::Error, 6),
                (JobState::Running, 30),
            ] {
                let mut r = rec(reg.next_id().unwrap(), state);
                r.created_at = now - age * 86400;
                r.finished_at = state.is_final().then_some(now - age * 86400);
                ids.push(reg.add(r).await.unwrap().id());
            }
            // The one past seven days is gone from the list at once.
            assert!(reg.get(&ids[0]).is_err());
            assert_eq!(reg.list().len(), 2);
            ids
        };
        let reg = JobRegistry::open(Arc::new(Catalog::open(&path).unwrap()))
            .await
            .unwrap();
        let kept: Vec<JobId> = reg.list().iter().map(|h| h.id()).collect();
        assert_eq!(kept, ids[1..]);
        // A day later the second goes too; the running one stays.
        reg.expire(now + 2 * 86400).await;
        let catalog_ids: Vec<JobId> = reg
            .catalog
            .jobs()
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(catalog_ids, ids[2..]);
    }

    fn offset(r: &JobRecord) -> u64 {
        r.import().map_or(0, |i| i.checkpoint.offset)
    }

    #[tokio::test]
    async fn jobs_survive_reopen_and_old_finished_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        {
            let reg = JobRegistry::open(Arc::new(Catalog::open(&path).unwrap()))
                .await
                .unwrap();
            for i in 0..KEEP_FINISHED + 5 {
                let id = reg.next_id().unwrap();
                let state = if i == 0 {
                    JobState::Running
                } else {
                    JobState::Completed
                };
                reg.add(rec(id, state)).await.unwrap();
            }
            let first = reg.list()[0].clone();
            reg.update(&first, |r| {
                if let Some(i) = r.import_mut() {
                    i.checkpoint.offset = 4096
                }
            })
            .await
            .unwrap();
            assert!(reg.cancel(&JobId::new(u64::MAX)).is_err());
            let done = reg.list()[1].id();
            let err = reg.cancel(&done).err().expect("refused").to_string();
            assert!(err.contains("already ended"), "{err}");
        }
        let reg = JobRegistry::open(Arc::new(Catalog::open(&path).unwrap()))
            .await
            .unwrap();
        // Ids are dense and go on from the highest after a restart, also
        // once the records holding it are gone.
        let n = (KEEP_FINISHED + 5) as u64;
        assert_eq!(reg.list().last().unwrap().id(), JobId::new(n));
        assert_eq!(reg.next_id().unwrap(), JobId::new(n + 1));
        let catalog = Catalog::open(&dir.path().join("other")).unwrap();
        let catalog = Arc::new(catalog);
        {
            let reg = JobRegistry::open(Arc::clone(&catalog)).await.unwrap();
            let h = reg
                .add(rec(reg.next_id().unwrap(), JobState::Completed))
                .await
                .unwrap();
            assert_eq!(h.id(), JobId::new(1));
            catalog.remove_job(&h.id()).await.unwrap();
        }
        let again = JobRegistry::open(catalog).await.unwrap();
        assert!(again.list().is_empty());
        assert_eq!(again.next_id().unwrap(), JobId::new(2));
        let all = reg.list();
        // The running one stays, and the newest finished ones.
        assert_eq!(all.len(), KEEP_FINISHED + 1);
        let running: Vec<_> = all
            .iter()
            .filter(|h| h.record().state == JobState::Running)
            .collect();
        assert_eq!(running.len(), 1);
        assert_eq!(offset(&running[0].record()), 4096);
        // Finished jobs show all their bytes done.
        let done = all
            .iter()
            .find(|h| h.record().state == JobState::Completed)
            .unwrap();
        assert_eq!(done.bytes_done.load(Ordering::Relaxed), 10);
        let h = reg.cancel(&running[0].id()).unwrap();
        assert!(h.cancel.is_cancelled());
    }
}
