//! Snapshot lifecycles, a layer above the engine: policies (schedules and
//! PBS-style retention), the scheduler that runs them, prune, and the
//! recycle bin's rules. It calls only the engine's public API and writes
//! only its own catalog trees (`policies`, `policy_runs`, `bin_rules`),
//! through the catalog's writer.
//!
//! - `policy`: what a valid policy is, its targets and its labels;
//! - `schedule`: slots of an interval or a cron expression (pure);
//! - `prune`: PBS's keep rules (pure);
//! - `run`: one run of a schedule (snapshots, then a claimed prune), and
//!   prune itself;
//! - `scheduler`: the one loop per host that starts runs when slots come;
//! - `bin`: recycle-bin rules and their locks (pure); the bin itself is
//!   `snapshot::bin`;
//! - `rules`: bin rules created, changed within their locks, locked,
//!   unlocked, tagged and deleted;
//! - `images`: DeregisterImage into the bin, images listed and restored,
//!   and collection (expired images first, then gc).

pub mod bin;
pub mod images;
pub mod policy;
pub mod prune;
mod rules;
mod run;
pub mod schedule;
mod scheduler;

use std::collections::BTreeMap;
use std::sync::Arc;

use snapshot::SnapshotId;
use tokio::sync::{Mutex, Notify};
use tracing::info;
use volumed_api::{BinEntry, BinResource, Policy, PolicySpec, ScheduleStatus};

pub use crate::catalog::{BinRuleRecord, PolicyRecord, ScheduleRunRecord};
use crate::catalog::{Catalog, CatalogError, rfc3339, unix_now};
use crate::engine::{Engine, Error, SnapshotInfo};
use crate::machines::{MachineError, Machines};
use policy::Source;

pub use scheduler::spawn as spawn_scheduler;

/// The shortest interval between two runs of a schedule. DLM's own floor
/// is an hour; ours allows Longhorn's every-minute cron.
pub const MIN_INTERVAL: u64 = 60;

/// TEST ONLY: a shorter floor (seconds), so integration tests run a
/// policy several times in seconds. Never set it in production.
pub const TEST_MIN_INTERVAL_ENV: &str = "VOLUMED_TEST_POLICY_MIN_INTERVAL";

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("{0}")]
    Invalid(String),
    #[error("policy '{0}' not found")]
    PolicyNotFound(String),
    #[error("policy '{0}' already exists")]
    PolicyExists(String),
    #[error("recycle-bin rule '{0}' not found")]
    RuleNotFound(String),
    /// A rule's lock forbids the change (rbin's ConflictException).
    #[error("{0}")]
    RuleLocked(String),
    #[error(transparent)]
    Engine(#[from] Error),
    /// A snapshot a registered image uses, refused by `Machines`.
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

pub type Result<T, E = LifecycleError> = std::result::Result<T, E>;

/// Where a deleted snapshot went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// Gone for good (its chunks wait for gc).
    Deleted,
    /// Into the recycle bin, restorable until its retention ends.
    Binned,
}

/// The lifecycle service of one host.
pub struct Lifecycle {
    engine: Arc<Engine>,
    /// Every snapshot deletion goes through it: it refuses one a
    /// registered image uses.
    machines: Arc<Machines>,
    /// Read freely; written only here (`policies`, `policy_runs`,
    /// `bin_rules`).
    catalog: Arc<Catalog>,
    min_interval: u64,
    /// One run or prune at a time on this host: two at once would judge
    /// the same snapshots twice.
    busy: Mutex<()>,
    /// A policy was created, changed or deleted: the scheduler looks again.
    changed: Notify,
    /// Read-modify-writes of bin rules take turns.
    rule_writes: Mutex<()>,
    /// A snapshot was deleted for good here (a delete, a prune, an expiry):
    /// the owners of records kept beside snapshots (the AWS endpoint's
    /// attributes) sweep theirs.
    removed: Notify,
}

impl Lifecycle {
    pub fn open(
        engine: Arc<Engine>,
        machines: Arc<Machines>,
        catalog: Arc<Catalog>,
    ) -> Result<Arc<Lifecycle>> {
        let min_interval = match std::env::var(TEST_MIN_INTERVAL_ENV) {
            Ok(v) => {
                let s = v.parse().map_err(|_| {
                    LifecycleError::Invalid(format!("{TEST_MIN_INTERVAL_ENV}={v:?}: not seconds"))
                })?;
                info!(seconds = s, "test-only minimum policy interval in force");
                s
            }
            Err(_) => MIN_INTERVAL,
        };
        Ok(Arc::new(Lifecycle {
            engine,
            machines,
            catalog,
            min_interval,
            busy: Mutex::new(()),
            changed: Notify::new(),
            removed: Notify::new(),
            rule_writes: Mutex::new(()),
        }))
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Returns once a snapshot was deleted for good since the last time
    /// this returned (deletions in between count once).
    pub async fn snapshot_removed(&self) {
        self.removed.notified().await
    }

    fn note_removed(&self) {
        self.removed.notify_one();
    }

    fn now() -> i64 {
        i64::try_from(unix_now()).unwrap_or(i64::MAX)
    }

    fn record(&self, name: &str) -> Result<PolicyRecord> {
        self.catalog
            .policy(name)?
            .ok_or_else(|| LifecycleError::PolicyNotFound(name.to_owned()))
    }

    /// Creates a policy; its first run is its first slot after now.
    pub async fn create_policy(
        &self,
        spec: PolicySpec,
        source: Source,
        dlm: Option<serde_json::Value>,
    ) -> Result<Policy> {
        let now = Self::now();
        let scheds =
            policy::validate(&spec, self.min_interval, now).map_err(LifecycleError::Invalid)?;
        if self.record(&spec.name).is_ok() {
            return Err(LifecycleError::PolicyExists(spec.name));
        }
        let t = unix_now();
        let rec = PolicyRecord {
            spec,
            source: source.as_str().into(),
            created_at: t,
            updated_at: t,
            dlm,
        };
        self.start_at(&rec, &scheds, now).await?;
        self.catalog.put_policy(&rec).await?;
        info!(policy = %rec.spec.name, "policy created");
        self.changed.notify_one();
        self.view(&rec)
    }

    /// Replaces a policy's spec; schedules keep their history by name.
    pub async fn update_policy(
        &self,
        spec: PolicySpec,
        dlm: Option<serde_json::Value>,
    ) -> Result<Policy> {
        let now = Self::now();
        let scheds =
            policy::validate(&spec, self.min_interval, now).map_err(LifecycleError::Invalid)?;
        let old = self.record(&spec.name)?;
        let rec = PolicyRecord {
            spec,
            updated_at: unix_now(),
            dlm: dlm.or(old.dlm),
            ..old
        };
        self.start_at(&rec, &scheds, now).await?;
        self.catalog.put_policy(&rec).await?;
        info!(policy = %rec.spec.name, "policy updated");
        self.changed.notify_one();
        self.view(&rec)
    }

    /// A schedule never run starts at its next slot, not at its last one.
    async fn start_at(
        &self,
        rec: &PolicyRecord,
        scheds: &[schedule::Schedule],
        now: i64,
    ) -> Result<()> {
        for (s, sched) in rec.spec.schedules.iter().zip(scheds) {
            let mut run = self.catalog.schedule_run(&rec.spec.name, &s.name)?;
            if run.last_slot.is_none() {
                run.last_slot = sched
                    .slot_at_or_before(now)
                    .and_then(|t| u64::try_from(t).ok());
                self.catalog
                    .put_schedule_run(&rec.spec.name, &s.name, &run)
                    .await?;
            }
        }
        Ok(())
    }

    /// Deletes a policy and the run records of its schedules (the policy
    /// last: a crash between leaves a policy whose schedules start afresh).
    pub async fn delete_policy(&self, name: &str) -> Result<()> {
        self.record(name)?;
        for s in self.catalog.schedule_runs_of(name)? {
            self.catalog.remove_schedule_run(name, &s).await?;
        }
        self.catalog.remove_policy(name).await?;
        info!(policy = %name, "policy deleted");
        self.changed.notify_one();
        Ok(())
    }

    pub fn policy(&self, name: &str) -> Result<Policy> {
        self.view(&self.record(name)?)
    }

    pub fn policies(&self) -> Result<Vec<Policy>> {
        self.catalog
            .policies()?
            .iter()
            .map(|r| self.view(r))
            .collect()
    }

    /// Every policy as kept, for the DLM API's answers.
    pub fn policy_records(&self) -> Result<Vec<PolicyRecord>> {
        Ok(self.catalog.policies()?)
    }

    /// Each schedule's run record, by policy and schedule name, for the
    /// metrics exporter.
    pub fn schedule_runs(&self) -> Result<Vec<(String, String, ScheduleRunRecord)>> {
        let mut out = Vec::new();
        for rec in self.catalog.policies()? {
            for s in &rec.spec.schedules {
                let run = self.catalog.schedule_run(&rec.spec.name, &s.name)?;
                out.push((rec.spec.name.clone(), s.name.clone(), run));
            }
        }
        Ok(out)
    }

    /// The raw record, for the DLM API's answers.
    pub fn policy_record(&self, name: &str) -> Result<PolicyRecord> {
        self.record(name)
    }

    /// The policies whose last run of some schedule failed.
    pub fn failing_policies(&self) -> Vec<String> {
        self.policies()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.failing)
            .map(|p| p.spec.name)
            .collect()
    }

    fn view(&self, rec: &PolicyRecord) -> Result<Policy> {
        let now = Self::now();
        let mut status = Vec::new();
        for s in &rec.spec.schedules {
            let run = self.catalog.schedule_run(&rec.spec.name, &s.name)?;
            let next = policy::schedule_of(s).ok().and_then(|sched| {
                let after = run
                    .last_slot
                    .and_then(|l| i64::try_from(l).ok())
                    .unwrap_or(now);
                // A slot missed while down runs at once.
                let next = sched.next_after(after)?;
                u64::try_from(next.max(now)).ok()
            });
            status.push(ScheduleStatus {
                name: s.name.clone(),
                next_run: next.filter(|_| rec.spec.enabled).map(rfc3339),
                last_run: run.last.clone(),
                last_success: run.last_success_at.map(rfc3339),
                runs: run.runs,
                failures: run.failures,
                snapshots_created: run.created,
                snapshots_pruned: run.pruned,
                prunes: run.prunes,
                prunes_claimed_elsewhere: run.prunes_claimed_elsewhere,
            });
        }
        let failing = status
            .iter()
            .any(|s| s.last_run.as_ref().is_some_and(|r| !r.ok));
        Ok(Policy {
            volumes_now: policy::targets(&self.engine, &rec.spec.target)
                .iter()
                .map(|v| v.name.to_string())
                .collect(),
            spec: rec.spec.clone(),
            source: rec.source.clone(),
            created_at: rfc3339(rec.created_at),
            updated_at: rfc3339(rec.updated_at),
            status,
            failing,
        })
    }

    /// Deletes a snapshot the way every front-end does: into the recycle
    /// bin when a rule of this host keeps it, else for good. A protected
    /// snapshot is refused (by the engine), and so is one a registered
    /// image uses (by `Machines`).
    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<Removed> {
        let rules = self.catalog.bin_rules()?;
        if rules.is_empty() {
            self.machines.delete_snapshot(id).await?;
            self.note_removed();
            return Ok(Removed::Deleted);
        }
        let info = self.engine.snapshot(id).await?;
        // Its labels and, set through EC2, its tags (the AWS endpoint's
        // records, read here, never written).
        let mut tags = labels_of(&info);
        if let Some(meta) = self.catalog.aws_snapshot(id.as_str())? {
            tags.extend(meta.tags);
        }
        let retention = bin::retention_for(&rules, BinResource::Snapshot, &tags);
        match retention {
            Some(r) => {
                let expires = unix_now().saturating_add(r);
                self.machines.recycle_snapshot(id, expires).await?;
                Ok(Removed::Binned)
            }
            None => {
                self.machines.delete_snapshot(id).await?;
                self.note_removed();
                Ok(Removed::Deleted)
            }
        }
    }

    /// Every snapshot and image in the store's recycle bin (any host put
    /// it there), snapshots first.
    pub async fn bin_list(&self) -> Result<Vec<BinEntry>> {
        let mut all = self.bin_list_snapshots().await?;
        all.extend(self.bin_list_images().await?);
        Ok(all)
    }

    /// Every snapshot in the store's recycle bin.
    pub async fn bin_list_snapshots(&self) -> Result<Vec<BinEntry>> {
        let entries = self.engine.binned_snapshots().await?;
        Ok(entries
            .into_iter()
            .map(|(e, h)| BinEntry {
                id: e.id.to_string(),
                resource: BinResource::Snapshot,
                state: "recoverable".into(),
                volume: h.volume,
                size: h.size,
                created_at: h.created_at,
                entered_at: rfc3339(
                    e.entered
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                ),
                expires_at: rfc3339(e.expires),
                labels: h.labels,
                name: None,
            })
            .collect())
    }

    pub async fn bin_restore(&self, id: &SnapshotId) -> Result<SnapshotInfo> {
        Ok(self.engine.restore_binned_snapshot(id).await?)
    }
}

/// A snapshot's labels, however this host knows it.
pub fn labels_of(info: &SnapshotInfo) -> BTreeMap<String, String> {
    match info {
        SnapshotInfo::Recorded { rec, .. } => rec.labels.clone(),
        SnapshotInfo::Stored(h) => h.labels.clone(),
    }
}
