//! Snapshot sets: one crash-consistent snapshot of several volumes, as
//! EC2's CreateSnapshots and CreateImage take them and `vol snapshot create
//! --set` asks for.
//!
//! **The barrier.** Every write holds its volume's snapshot gate shared.
//! A set closes the gates of all its members (in volume-id order, so two
//! sets never wait on each other), which stops admitting new writes on
//! every member and waits for the ones in flight; with all gates closed it
//! freezes each member (`Volume::freeze_closed`), then opens them all. So
//! every write acknowledged before the set was requested is in every
//! member's snapshot, and no write admitted after the barrier is in any.
//! Closing the gates is bounded by the barrier timeout: a member whose
//! writes do not drain in time fails the set (nothing frozen, nothing
//! recorded but the failed set) rather than stalling the others' I/O.
//!
//! **All or nothing.** The set is recorded (`creating`, with the snapshot
//! id of every member) before any member exists. The members then upload
//! as ordinary snapshot jobs; when all have ended the set is `completed`,
//! or, if any failed, `failed` and every member is removed (completed ones
//! deleted, failed ones forgotten). A restart that finds a set `creating`
//! marks it `failed` before anything can read it, and removes its members
//! once the snapshots the restart interrupted are settled; until then they
//! are hidden from every listing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snapshot::SnapshotId;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use volumed_api::VolumeName;

use super::Volume;
use super::error::{Error, Result};
use super::jobs::snapshot::SnapshotJobs;
use super::jobs::snapshot::{SnapshotDone, SnapshotOutcome};
use super::registry::Registry;
use super::snapshot_catalog::SnapshotCatalog;
use crate::catalog::{
    Catalog, SetMemberRecord, SetState, SnapshotRecord, SnapshotSetRecord, unix_now,
};
use crate::failpoint;

/// How long closing every member's gate may take by default: long beside a
/// write's latency, short enough that a stalled member does not hold the
/// others' writes for long (`--snapshot-barrier-timeout`).
pub const DEFAULT_BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
/// Members one set may have.
pub const MAX_MEMBERS: usize = 64;
const MAX_SET_NAME: usize = 128;

/// The engine's snapshot sets: their records' one writer.
pub struct SnapshotSets {
    catalog: Arc<Catalog>,
    jobs: Arc<SnapshotJobs>,
    snapshots: Arc<SnapshotCatalog>,
    registry: Arc<Registry>,
    barrier_timeout: Mutex<Duration>,
    /// Member snapshot -> its set, for the sets recorded.
    member_of: Mutex<HashMap<SnapshotId, String>>,
    /// Members of failed sets not yet removed: no listing shows them.
    hidden: Mutex<HashSet<SnapshotId>>,
    /// The tasks that settle sets once their members end.
    tasks: TaskTracker,
}

impl SnapshotSets {
    /// Loads the sets; a set a previous run left `creating` is `failed`
    /// from now on, and its members hidden until `discard_failed` removes
    /// them.
    pub async fn open(
        catalog: Arc<Catalog>,
        jobs: Arc<SnapshotJobs>,
        snapshots: Arc<SnapshotCatalog>,
        registry: Arc<Registry>,
    ) -> Result<Self> {
        let sets = SnapshotSets {
            catalog,
            jobs,
            snapshots,
            registry,
            barrier_timeout: Mutex::new(DEFAULT_BARRIER_TIMEOUT),
            member_of: Mutex::new(HashMap::new()),
            hidden: Mutex::new(HashSet::new()),
            tasks: TaskTracker::new(),
        };
        for mut rec in sets.catalog.snapshot_sets()? {
            if rec.state == SetState::Creating {
                rec.state = SetState::Failed;
                rec.error = Some("interrupted by a daemon restart".into());
                rec.to_discard = rec.members.iter().map(|m| m.snapshot.clone()).collect();
                sets.catalog.put_snapshot_set(&rec).await?;
                info!(set = %rec.id, "snapshot set interrupted by a restart: its members will be removed");
            }
            sets.note(&rec);
        }
        Ok(sets)
    }

    fn note(&self, rec: &SnapshotSetRecord) {
        let mut of = lock(&self.member_of);
        for m in &rec.members {
            of.insert(m.snapshot.clone(), rec.id.clone());
        }
        lock(&self.hidden).extend(rec.to_discard.iter().cloned());
    }

    pub fn set_barrier_timeout(&self, d: Duration) {
        *lock(&self.barrier_timeout) = d;
    }

    /// Whether snapshot `id` belongs to a failed set and is on its way out.
    pub fn hidden(&self, id: &SnapshotId) -> bool {
        lock(&self.hidden).contains(id)
    }

    /// The set snapshot `id` was taken in, if any.
    pub fn set_of(&self, id: &SnapshotId) -> Option<String> {
        lock(&self.member_of).get(id).cloned()
    }

    pub fn get(&self, id: &str) -> Result<SnapshotSetRecord> {
        self.catalog
            .snapshot_sets()?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| Error::SnapshotSetNotFound(id.to_owned()))
    }

    pub fn list(&self) -> Result<Vec<SnapshotSetRecord>> {
        Ok(self.catalog.snapshot_sets()?)
    }

    /// Takes one snapshot of each of `vols` at one instant (see the module
    /// comment) and uploads them in the background; returns the set and
    /// its members' `pending` records once the barrier is over.
    pub async fn create(
        self: &Arc<Self>,
        name: &str,
        vols: Vec<Arc<Volume>>,
        labels: BTreeMap<String, String>,
    ) -> Result<(SnapshotSetRecord, Vec<SnapshotRecord>)> {
        check_request(name, &vols)?;
        // The slots first: a member with a snapshot in progress refuses
        // the set before anything is recorded.
        let mut slots = Vec::with_capacity(vols.len());
        for v in &vols {
            slots.push(self.jobs.reserve(v).await?);
        }
        let created_at = unix_now();
        let mut rec = SnapshotSetRecord {
            id: new_set_id(),
            name: name.to_owned(),
            state: SetState::Creating,
            created_at,
            members: vols
                .iter()
                .zip(&slots)
                .map(|(v, s)| SetMemberRecord {
                    volume: v.name.clone(),
                    volume_id: v.id,
                    snapshot: s.id.clone(),
                })
                .collect(),
            error: None,
            to_discard: Vec::new(),
        };
        self.catalog.put_snapshot_set(&rec).await?;
        self.note(&rec);
        let guards = match self.barrier(&rec, &vols).await {
            Ok(g) => g,
            Err(e) => {
                // Nothing was frozen or recorded but the set itself.
                rec.state = SetState::Failed;
                rec.error = Some(e.to_string());
                if let Err(w) = self.catalog.put_snapshot_set(&rec).await {
                    warn!(set = %rec.id, error = %w, "could not record the failed snapshot set; the next start settles it");
                }
                warn!(set = %rec.id, error = %e, "snapshot set failed at its barrier");
                return Err(e);
            }
        };
        let mut members = Vec::with_capacity(vols.len());
        let mut ended = Vec::with_capacity(vols.len());
        let mut launch_error = None;
        for ((vol, slot), guard) in vols.into_iter().zip(slots).zip(guards) {
            if launch_error.is_some() {
                // Dropping the guard and the slot gives the changes back.
                continue;
            }
            match self
                .jobs
                .launch(slot, vol, guard, labels.clone(), created_at)
                .await
            {
                Ok((r, rx)) => {
                    members.push(r);
                    ended.push(rx);
                }
                Err(e) => launch_error = Some(e),
            }
        }
        let sets = Arc::clone(self);
        let settled = rec.clone();
        let failed = launch_error.as_ref().map(ToString::to_string);
        self.tasks
            .spawn(async move { sets.settle(settled, ended, failed).await });
        if let Some(e) = launch_error {
            return Err(e);
        }
        info!(set = %rec.id, name = %rec.name, members = members.len(), "snapshot set started");
        Ok((rec, members))
    }

    /// Closes every member's gate within the barrier timeout, freezes each
    /// member under them, and opens them again.
    async fn barrier(
        &self,
        rec: &SnapshotSetRecord,
        vols: &[Arc<Volume>],
    ) -> Result<Vec<super::freeze::FreezeGuard>> {
        let timeout = *lock(&self.barrier_timeout);
        let started = Instant::now();
        let mut order: Vec<usize> = (0..vols.len()).collect();
        order.sort_by_key(|&i| vols[i].id);
        let closing = async {
            let mut gates = Vec::with_capacity(vols.len());
            for &i in &order {
                gates.push(vols[i].close_gate().await);
            }
            gates
        };
        let Ok(gates) = tokio::time::timeout(timeout, closing).await else {
            return Err(Error::SnapshotSetFailed(format!(
                "set {}: the writes in flight did not drain within the barrier timeout of {timeout:?}; no member was frozen",
                rec.id
            )));
        };
        let mut guards = Vec::with_capacity(vols.len());
        for (n, v) in vols.iter().enumerate() {
            if let Err(e) = failpoint::io_error("snapshot-set-capture") {
                // The guards taken so far drop with the gates: their
                // changes go back to their dirty sets.
                return Err(Error::SnapshotSetFailed(format!(
                    "set {}: capture of member {n} (volume '{}') failed: {e}",
                    rec.id, v.name
                )));
            }
            let gate = &gates[order.iter().position(|&i| i == n).unwrap_or(0)];
            guards.push(v.freeze_closed(gate));
            failpoint::hit("snapshot-set-after-capture");
        }
        drop(gates);
        info!(set = %rec.id, members = vols.len(), barrier_us = started.elapsed().as_micros() as u64,
              "snapshot set captured");
        Ok(guards)
    }

    /// Waits for every member's job, then records the set `completed`, or
    /// `failed` and removes its members. A shutdown leaves the set as it
    /// is: the next start settles it.
    async fn settle(
        &self,
        mut rec: SnapshotSetRecord,
        ended: Vec<SnapshotDone>,
        mut failed: Option<String>,
    ) {
        let mut ok = 0;
        for done in ended {
            if matches!(done.wait().await, SnapshotOutcome::Completed) {
                ok += 1;
            } else if failed.is_none() {
                failed = Some("a member snapshot failed".into());
            }
        }
        if self.jobs.stopping() {
            return;
        }
        failpoint::hit("snapshot-set-before-settle");
        match failed {
            None => {
                rec.state = SetState::Completed;
                if let Err(e) = self.catalog.put_snapshot_set(&rec).await {
                    warn!(set = %rec.id, error = %e, "could not record the completed snapshot set");
                    return;
                }
                info!(set = %rec.id, members = ok, "snapshot set completed");
            }
            Some(why) => {
                rec.state = SetState::Failed;
                rec.error = Some(why);
                rec.to_discard = rec.members.iter().map(|m| m.snapshot.clone()).collect();
                if let Err(e) = self.catalog.put_snapshot_set(&rec).await {
                    warn!(set = %rec.id, error = %e, "could not record the failed snapshot set");
                    return;
                }
                self.note(&rec);
                warn!(set = %rec.id, error = rec.error.as_deref().unwrap_or(""),
                      "snapshot set failed; removing its members");
                self.discard(rec).await;
            }
        }
    }

    /// Removes what failed sets left (at start, once the interrupted
    /// snapshots are settled).
    pub async fn discard_failed(&self) {
        let Ok(sets) = self.catalog.snapshot_sets() else {
            return;
        };
        for rec in sets {
            if !rec.to_discard.is_empty() {
                self.discard(rec).await;
            }
        }
    }

    /// Removes each member of failed set `rec`; one that cannot be removed
    /// now stays listed in the record (and hidden) for the next start.
    async fn discard(&self, mut rec: SnapshotSetRecord) {
        let mut left = Vec::new();
        for id in std::mem::take(&mut rec.to_discard) {
            match forget_snapshot(&self.catalog, &self.snapshots, &self.registry, &id, None).await {
                Ok(()) | Err(Error::SnapshotNotFound(_)) => {
                    info!(set = %rec.id, snapshot = %id, "member of a failed snapshot set removed");
                }
                Err(e) => {
                    warn!(set = %rec.id, snapshot = %id, error = %e, "could not remove a member of a failed snapshot set; trying again at the next start");
                    left.push(id);
                }
            }
        }
        rec.to_discard = left;
        if let Err(e) = self.catalog.put_snapshot_set(&rec).await {
            warn!(set = %rec.id, error = %e, "could not record the removal of a failed set's members");
            return;
        }
        let keep: HashSet<&SnapshotId> = rec.to_discard.iter().collect();
        lock(&self.hidden)
            .retain(|id| keep.contains(id) || !rec.members.iter().any(|m| &m.snapshot == id));
    }

    /// Waits for the tasks settling sets (after the snapshot jobs ended).
    pub async fn shutdown(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Removes snapshot `id`: from the store (through the trash, or into the
/// recycle bin until `bin_until`) and the catalog. A volume whose next
/// snapshot would have built on it takes a full one instead. The second
/// half of `Engine::delete_snapshot` and `recycle_snapshot`, and how a
/// failed set's members go.
pub(super) async fn forget_snapshot(
    catalog: &Catalog,
    snapshots: &SnapshotCatalog,
    registry: &Registry,
    id: &SnapshotId,
    bin_until: Option<u64>,
) -> Result<()> {
    match bin_until {
        None => snapshots.delete(id).await?,
        Some(expires) => snapshots.recycle(id, expires).await?,
    }
    let _guard = registry.lock().await;
    for vol in registry.list() {
        // A volume deleted meanwhile owns no record to change.
        let changed = vol
            .update_record(catalog, |rec| {
                if rec.last_snapshot.as_ref() != Some(id) {
                    return Ok(());
                }
                // Before the record says "no parent": the next snapshot
                // must then be a full one.
                vol.map().mark_all_dirty();
                rec.last_snapshot = None;
                Ok(())
            })
            .await;
        match changed {
            Ok(()) | Err(Error::VolumeNotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn check_request(name: &str, vols: &[Arc<Volume>]) -> Result<()> {
    let name_ok = (1..=MAX_SET_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/'));
    if !name_ok {
        return Err(Error::InvalidRequest(format!(
            "invalid set name {name:?}: 1 to {MAX_SET_NAME} of A-Z a-z 0-9 . _ - : /"
        )));
    }
    if vols.is_empty() || vols.len() > MAX_MEMBERS {
        return Err(Error::InvalidRequest(format!(
            "a snapshot set has 1 to {MAX_MEMBERS} volumes, not {}",
            vols.len()
        )));
    }
    let mut seen: HashSet<&VolumeName> = HashSet::new();
    for v in vols {
        if !seen.insert(&v.name) {
            return Err(Error::InvalidRequest(format!(
                "volume '{}' is named twice in the set",
                v.name
            )));
        }
        if let Some(job) = v.record().importing {
            return Err(Error::VolumeImporting(v.name.clone(), job));
        }
    }
    Ok(())
}

/// `set-` and 17 hex digits, unique across hosts as snapshot ids are.
fn new_set_id() -> String {
    let seed = SnapshotId::generate();
    let hex = snapshot::ChunkHash::of(seed.as_str().as_bytes()).to_hex();
    format!("set-{}", &hex[..17])
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use volumed_api::CreateVolume;

    async fn open(dir: &std::path::Path) -> Arc<Engine> {
        crate::engine::tests::open(dir).await.0
    }

    async fn volume(e: &Engine, n: &str) -> Arc<Volume> {
        e.create(CreateVolume {
            name: VolumeName::parse(n).unwrap(),
            size: Some(4 << 20),
            ephemeral: false,
            from_snapshot: None,
            chunk_size: None,
            hydrate: None,
            encrypted: None,
            key: None,
        })
        .await
        .unwrap()
    }

    /// A member whose write does not drain fails the set within the
    /// barrier timeout: nothing is frozen or recorded but the failed set,
    /// and the other member's writes go on. Once it drains, a set works.
    #[tokio::test]
    async fn a_stalled_member_fails_the_set_not_the_io() {
        let dir = tempfile::tempdir().unwrap();
        let e = open(dir.path()).await;
        let a = volume(&e, "a").await;
        let b = volume(&e, "b").await;
        a.write(0, vec![1; 4096], None).await.unwrap();
        e.set_barrier_timeout(Duration::from_millis(100));
        let names = [a.name.clone(), b.name.clone()];
        let stalled = b.hold_gate_shared().await;
        let t = Instant::now();
        let r = e.create_snapshot_set("s", &names, BTreeMap::new()).await;
        assert!(
            matches!(r, Err(Error::SnapshotSetFailed(_))),
            "{:?}",
            r.err()
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        tokio::time::timeout(Duration::from_secs(1), a.write(0, vec![2; 4096], None))
            .await
            .expect("a's writes are admitted again")
            .unwrap();
        assert!(e.snapshots(None).await.unwrap().is_empty());
        let sets = e.snapshot_sets().unwrap();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].state, SetState::Failed);
        // Nothing of the failed set holds either volume's snapshot slot.
        drop(stalled);
        let (set, members) = e
            .create_snapshot_set("s", &names, BTreeMap::new())
            .await
            .unwrap();
        assert_eq!(members.len(), 2);
        assert!(members.iter().all(|m| m.created_at == set.created_at));
        let deadline = Instant::now() + Duration::from_secs(10);
        while e.snapshot_set(&set.id).unwrap().state == SetState::Creating {
            assert!(Instant::now() < deadline, "the set did not settle");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(e.snapshot_set(&set.id).unwrap().state, SetState::Completed);
        for m in &members {
            assert_eq!(e.snapshot_set_of(&m.id).as_deref(), Some(set.id.as_str()));
        }
    }

    #[tokio::test]
    async fn bad_sets_are_refused_before_anything_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let e = open(dir.path()).await;
        let a = volume(&e, "a").await;
        let n = || BTreeMap::new();
        let twice = [a.name.clone(), a.name.clone()];
        assert!(e.create_snapshot_set("s", &twice, n()).await.is_err());
        assert!(e.create_snapshot_set("s", &[], n()).await.is_err());
        assert!(
            e.create_snapshot_set("bad name", std::slice::from_ref(&a.name), n())
                .await
                .is_err()
        );
        let missing = [a.name.clone(), VolumeName::parse("nope").unwrap()];
        assert!(matches!(
            e.create_snapshot_set("s", &missing, n()).await,
            Err(Error::VolumeNotFound(_))
        ));
        assert!(e.snapshot_sets().unwrap().is_empty());
    }

    #[test]
    fn set_ids_are_fresh() {
        let a = new_set_id();
        assert_eq!(a.len(), 21);
        assert!(a.starts_with("set-"));
        assert_ne!(a, new_set_id());
    }
}
