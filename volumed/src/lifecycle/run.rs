//! One run of a schedule, and prune.
//!
//! A run snapshots every volume of this host the policy targets (labels
//! naming the policy, the schedule and the volume's id), waits for those
//! snapshots to end, then prunes the schedule's snapshots store-wide. The
//! prune of a scheduled slot is claimed in the store first
//! (`snapshot::bin`'s claims): of several hosts with the same policy, the
//! first to claim the slot prunes and the others record that it was done
//! elsewhere. A prune is also safe to repeat: it judges what is in the
//! store now, deletes through the trash or the recycle bin, and a
//! snapshot already gone is simply not there to judge.

use std::collections::BTreeMap;
use std::time::Duration;

use snapshot::SnapshotId;
use tracing::{info, warn};
use volumed_api::error_chain;
use volumed_api::{
    CreateSnapshot, PruneDecision, PruneReport, PruneRequest, RunResult, RunTrigger, SchedulePrune,
    ScheduleSpec,
};

use super::policy::{self, Source};
use super::prune::{self, Candidate};
use super::{Lifecycle, LifecycleError, Result, labels_of};
use crate::catalog::{PolicyRecord, SnapshotState, rfc3339, unix_now};
use crate::engine::{Error, SnapshotInfo};
use crate::machines::MachineError;

/// How long a run waits for its snapshots before it prunes without them.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(3600);
/// How old a claim must be before a run removes it (claims are tiny, but
/// one per slot adds up).
const CLAIM_KEEP: u64 = 7 * 86400;

/// A snapshot as prune reads it: completed ones only.
struct Seen {
    id: SnapshotId,
    time: i64,
    labels: BTreeMap<String, String>,
    volume: String,
}

fn seen(info: &SnapshotInfo) -> Option<Seen> {
    let (time, volume) = match info {
        SnapshotInfo::Recorded { rec, .. } => {
            if rec.state != SnapshotState::Completed {
                return None;
            }
            (i64::try_from(rec.created_at).ok()?, rec.volume.clone())
        }
        SnapshotInfo::Stored(h) => {
            let t = humantime::parse_rfc3339(&h.created_at).ok()?;
            let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
            (i64::try_from(secs).ok()?, h.volume.clone())
        }
    };
    Some(Seen {
        id: info.id().clone(),
        time,
        labels: labels_of(info),
        volume,
    })
}

impl Lifecycle {
    /// Runs schedule `s` of policy `rec` once. `slot` is the scheduled
    /// slot it stands for (None for run-now, which claims nothing).
    pub(super) async fn run_schedule(
        &self,
        rec: &PolicyRecord,
        s: &ScheduleSpec,
        slot: Option<u64>,
        trigger: RunTrigger,
        missed: u64,
    ) -> RunResult {
        let _busy = self.busy.lock().await;
        let started = unix_now();
        let mut created = Vec::new();
        let mut errors = Vec::new();
        let source = Source::parse(&rec.source);
        for vol in policy::targets(&self.engine, &rec.spec.target) {
            let labels = policy::labels(&self.engine, &rec.spec, source, s, &vol);
            match self
                .engine
                .create_snapshot(&vol.name, CreateSnapshot { labels })
                .await
            {
                Ok(r) => created.push(r.id),
                Err(e) => errors.push(format!("volume {}: {}", vol.name, error_chain(&e))),
            }
        }
        for id in &created {
            if let Err(e) = self.wait_completed(id).await {
                errors.push(format!("snapshot {id}: {}", error_chain(&e)));
            }
        }
        let (prune, pruned) = match self.claim(rec, s, slot).await {
            Ok(Some(holder)) => (format!("claimed by {holder}"), Vec::new()),
            Ok(None) => match self.prune_schedule(rec, s, false).await {
                Ok(p) => {
                    errors.extend(p.failed.iter().cloned());
                    ("done".to_owned(), p.removed)
                }
                Err(e) => {
                    errors.push(format!("prune: {}", error_chain(&e)));
                    ("failed".to_owned(), Vec::new())
                }
            },
            Err(e) => {
                errors.push(format!("claim the prune: {}", error_chain(&e)));
                ("skipped: the claim failed".to_owned(), Vec::new())
            }
        };
        let ok = errors.is_empty();
        let result = RunResult {
            started_at: rfc3339(started),
            finished_at: rfc3339(unix_now()),
            trigger,
            missed,
            ok,
            error: (!ok).then(|| errors.join("; ")),
            created: created.iter().map(ToString::to_string).collect(),
            pruned,
            prune,
        };
        if ok {
            info!(policy = %rec.spec.name, schedule = %s.name, trigger = trigger.as_str(),
                  created = result.created.len(), pruned = result.pruned.len(), "policy run");
        } else {
            warn!(policy = %rec.spec.name, schedule = %s.name, trigger = trigger.as_str(),
                  error = result.error.as_deref().unwrap_or(""), "policy run failed");
        }
        result
    }

    async fn wait_completed(&self, id: &SnapshotId) -> std::result::Result<(), Error> {
        let deadline = tokio::time::Instant::now() + SNAPSHOT_WAIT;
        let mut every = Duration::from_millis(20);
        loop {
            if let SnapshotInfo::Recorded { rec, .. } = self.engine.snapshot(id).await? {
                match rec.state {
                    SnapshotState::Completed => return Ok(()),
                    SnapshotState::Error => {
                        return Err(Error::InvalidRequest(
                            rec.error.unwrap_or_else(|| "ended in error".into()),
                        ));
                    }
                    SnapshotState::Pending => {}
                }
            } else {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::SnapshotBusy(id.clone()));
            }
            tokio::time::sleep(every).await;
            every = (every * 2).min(Duration::from_millis(500));
        }
    }

    /// Claims the prune of `slot` in the store. `Ok(Some(host))`: another
    /// host has it.
    async fn claim(
        &self,
        rec: &PolicyRecord,
        s: &ScheduleSpec,
        slot: Option<u64>,
    ) -> Result<Option<String>> {
        let Some(slot) = slot else {
            return Ok(None);
        };
        let repo = self.engine.repo();
        let scope = claim_scope(&rec.spec.name, &s.name);
        let me = self.engine.host_id();
        let taken = repo
            .claim(&scope, slot, me)
            .await
            .map_err(|e| Error::store(format!("claim {scope}/{slot}"), e))?;
        // Old claims of this scope go, best effort.
        if let Ok(claims) = repo.list_claims(&scope).await {
            for c in claims
                .iter()
                .filter(|c| c.slot.saturating_add(CLAIM_KEEP) < slot)
            {
                let _ = repo.drop_claim(c).await;
            }
        }
        Ok(match taken {
            // A lost reply to our own claim reads back as ours.
            Some(c) if c.holder != me => Some(c.holder),
            _ => None,
        })
    }

    /// Judges (and unless `dry_run`, deletes) the snapshots schedule `s`
    /// of policy `rec` made, every volume's apart, store-wide.
    pub(super) async fn prune_schedule(
        &self,
        rec: &PolicyRecord,
        s: &ScheduleSpec,
        dry_run: bool,
    ) -> Result<SchedulePrune> {
        let all = self.engine.snapshots(None).await?;
        let protected = self.engine.protected_snapshots().await?;
        let mut groups: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
        let mut time_of = BTreeMap::new();
        for info in &all {
            let Some(sn) = seen(info) else { continue };
            if !policy::made_by(&sn.labels, &rec.spec.name, &s.name) {
                continue;
            }
            let group = sn
                .labels
                .get(policy::VOLUME_LABEL)
                .cloned()
                .unwrap_or(sn.volume);
            time_of.insert(sn.id.to_string(), sn.time);
            groups.entry(group).or_default().push(Candidate {
                id: sn.id.to_string(),
                time: sn.time,
                protected: protected.contains(&sn.id),
            });
        }
        let now = Lifecycle::now();
        let mut out = SchedulePrune {
            policy: rec.spec.name.clone(),
            schedule: s.name.clone(),
            decisions: Vec::new(),
            removed: Vec::new(),
            failed: Vec::new(),
        };
        for (group, list) in groups {
            for (c, mark) in prune::plan(&list, &s.retain, now) {
                let t = time_of.get(&c.id).copied().unwrap_or(0);
                out.decisions.push(PruneDecision {
                    snapshot: c.id.clone(),
                    volume: group.clone(),
                    created_at: rfc3339(u64::try_from(t).unwrap_or(0)),
                    mark,
                });
                if mark.keep() {
                    continue;
                }
                if dry_run {
                    out.removed.push(c.id);
                    continue;
                }
                let Some(id) = SnapshotId::parse(&c.id) else {
                    continue;
                };
                match self.delete_snapshot(&id).await {
                    Ok(_) => out.removed.push(c.id),
                    // Another host's prune, or a person, was first.
                    Err(
                        LifecycleError::Engine(Error::SnapshotNotFound(_))
                        | LifecycleError::Machine(MachineError::Engine(Error::SnapshotNotFound(_))),
                    ) => {}
                    Err(e) => out
                        .failed
                        .push(format!("delete {}: {}", c.id, error_chain(&e))),
                }
                crate::failpoint::hit("prune-after-delete");
            }
        }
        Ok(out)
    }

    /// `vol prune`: every schedule of one policy, or of every enabled one.
    pub async fn prune(&self, req: PruneRequest) -> Result<PruneReport> {
        let recs = match &req.policy {
            Some(name) => vec![self.record(name)?],
            None => self
                .catalog
                .policies()?
                .into_iter()
                .filter(|r| r.spec.enabled)
                .collect(),
        };
        let _busy = self.busy.lock().await;
        let mut schedules = Vec::new();
        for rec in &recs {
            for s in &rec.spec.schedules {
                let p = self.prune_schedule(rec, s, req.dry_run).await?;
                if !req.dry_run && !p.removed.is_empty() {
                    let mut run = self.catalog.schedule_run(&rec.spec.name, &s.name)?;
                    run.pruned += p.removed.len() as u64;
                    self.catalog
                        .put_schedule_run(&rec.spec.name, &s.name, &run)
                        .await?;
                }
                schedules.push(p);
            }
        }
        Ok(PruneReport {
            dry_run: req.dry_run,
            schedules,
        })
    }

    /// `vol policy run-now`: every schedule once, now, claiming nothing.
    pub async fn run_now(&self, name: &str) -> Result<Vec<RunResult>> {
        let rec = self.record(name)?;
        let mut out = Vec::new();
        for s in &rec.spec.schedules {
            let r = self
                .run_schedule(&rec, s, None, RunTrigger::RunNow, 0)
                .await;
            self.record_run(&rec, s, None, &r).await?;
            out.push(r);
        }
        Ok(out)
    }

    /// Keeps what a run did in the schedule's run record.
    pub(super) async fn record_run(
        &self,
        rec: &PolicyRecord,
        s: &ScheduleSpec,
        slot: Option<u64>,
        r: &RunResult,
    ) -> Result<()> {
        let mut run = self.catalog.schedule_run(&rec.spec.name, &s.name)?;
        if slot.is_some() {
            run.last_slot = run.last_slot.max(slot);
        }
        run.runs += 1;
        run.created += r.created.len() as u64;
        run.pruned += r.pruned.len() as u64;
        if r.prune == "done" {
            run.prunes += 1;
        } else if r.prune.starts_with("claimed by") {
            run.prunes_claimed_elsewhere += 1;
        }
        if r.ok {
            run.last_success_at = Some(unix_now());
        } else {
            run.failures += 1;
        }
        run.last = Some(r.clone());
        self.catalog
            .put_schedule_run(&rec.spec.name, &s.name, &run)
            .await?;
        Ok(())
    }
}

/// The store scope of a schedule's prune claims: a hash, since policy and
/// schedule names may hold characters keys should not.
fn claim_scope(policy: &str, schedule: &str) -> String {
    let h = snapshot::ChunkHash::of(format!("{policy}\0{schedule}").as_bytes()).to_hex();
    format!("prune-{}", &h[..16])
}
