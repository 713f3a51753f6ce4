//! The catalog: what volumes exist and how they are attached, kept in sled.
//!
//! Architecture invariant: no sled type leaves this module. Every change
//! goes through one writer thread (`writer`), which flushes each batch
//! before it answers, because the control plane promises that a completed
//! API call survives `kill -9`. Reads come straight from sled's memory.
//!
//! Each tree has one owner that writes it: `volumes` (through
//! `Volume::update_record`), `snapshots` and `snapshot_exports` the engine,
//! `jobs` the images layer, `aws_volumes` and `aws_snapshots` the AWS
//! endpoint, `policies`, `policy_runs` and `bin_rules` the lifecycle layer
//! (`tests/tests/tidy.rs` holds every other module to reading).
//!
//! Trees (keys are UTF-8; values are JSON documents, see docs/formats.md):
//! - `volumes`: volume name -> [`VolumeRecord`]
//! - `snapshots`: snapshot id -> [`SnapshotRecord`] (snapshots this host took)
//! - `snapshot_exports`: snapshot id -> [`SnapshotExportRecord`]
//! - `jobs`: job id -> [`JobRecord`] (imports and exports)
//! - `aws_volumes`, `aws_snapshots`: see [`aws`]
//! - `policies`, `policy_runs`, `bin_rules`: see [`lifecycle`]
//! - `meta`: `format` -> catalog format version, `clean_shutdown` -> "1" or
//!   "0", `host_id`, `last_job` -> the highest job number given out
//!   (decimal), so job ids stay dense and are never given twice
//! - `snapshot_sets`: see `snapshot_set`; `images`, `instances`: see
//!   `machines`; `volume_modifications`: see `volume_modifications`

mod aws;
mod job;
mod lifecycle;
mod machines;
mod migrate;
mod record;
mod snapshot_set;
mod volume_modifications;
mod writer;

use std::path::Path;

pub use aws::{AwsAttachmentRecord, AwsSnapshotRecord, AwsVolumeRecord};
pub use job::{
    Checkpoint, ExportSpec, ExportTask, ImportSpec, JobId, JobRecord, JobSpec, Requester, TaskDisk,
    TaskKind, TaskSource, TaskSpec,
};
pub use lifecycle::{BinRuleRecord, PolicyRecord, RuleLock, ScheduleRunRecord};
pub use machines::{DeviceRecord, ImageRecord, InstanceRecord};
pub use record::{
    AttachmentRecord, SnapshotExportRecord, SnapshotRecord, SnapshotSource, SnapshotState,
    VolumeRecord, rfc3339, unix_now,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
pub use snapshot_set::{SetMemberRecord, SetState, SnapshotSetRecord};
pub use volume_modifications::VolumeModificationRecord;
use volumed_api::VolumeName;
pub use writer::Pending;
use writer::{Op, Tree, Writer};

/// Bumped when a record changes incompatibly; a newer catalog is refused,
/// an older one is brought up to date once (`migrate`).
pub const FORMAT_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("open {path}")]
    Open { path: String, source: sled::Error },
    #[error("{op}")]
    Sled {
        op: &'static str,
        source: sled::Error,
    },
    #[error("record for key {key:?} is corrupt")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("catalog format {found} is newer than this volumed understands ({FORMAT_VERSION})")]
    TooNew { found: u32 },
    /// A writer held a record that is no longer the catalog's: the volume
    /// was deleted, or deleted and created again, or changed by someone who
    /// bypassed its owner. Nothing was written.
    #[error(
        "volume record name={name} changed under its writer: expected id={expected:?}, found id={found:?}"
    )]
    StaleVolume {
        name: VolumeName,
        expected: Option<u64>,
        found: Option<u64>,
    },
    #[error("the catalog writer has stopped")]
    WriterGone,
    #[error("start the catalog writer")]
    Start(#[source] std::io::Error),
}

type Result<T> = std::result::Result<T, CatalogError>;

fn sled_err(op: &'static str) -> impl FnOnce(sled::Error) -> CatalogError {
    move |source| CatalogError::Sled { op, source }
}

fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|source| CatalogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn encode<T: Serialize>(rec: &T) -> Vec<u8> {
    serde_json::to_vec(rec).expect("a catalog record always serializes")
}

/// Every tree, shared by the readers and the writer thread.
#[derive(Clone)]
struct Trees {
    volumes: sled::Tree,
    snapshots: sled::Tree,
    snapshot_exports: sled::Tree,
    meta: sled::Tree,
    jobs: sled::Tree,
    aws_snapshots: sled::Tree,
    aws_volumes: sled::Tree,
    policies: sled::Tree,
    policy_runs: sled::Tree,
    bin_rules: sled::Tree,
    snapshot_sets: sled::Tree,
    images: sled::Tree,
    instances: sled::Tree,
    volume_modifications: sled::Tree,
}

pub struct Catalog {
    db: sled::Db,
    trees: Trees,
    /// Its thread holds handles of the database too: dropping the writer
    /// joins it, so the database (and its file lock) is closed once the
    /// catalog is dropped.
    writer: Writer,
}

impl Catalog {
    /// Opens (or makes) the catalog, brings an older one up to date, and
    /// starts its writer. Blocking.
    pub fn open(path: &Path) -> Result<Self> {
        // A handle dropped a moment ago may still hold the file lock while
        // sled's I/O pool finishes a write (seen when a test reopens at
        // once); waiting briefly is enough.
        let mut tries = 0;
        loop {
            match Self::open_once(path) {
                Err(CatalogError::Open {
                    source: sled::Error::Io(ref e),
                    ..
                }) if tries < 100 && e.to_string().contains("could not acquire lock") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    fn open_once(path: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(path)
            // The catalog is small and written rarely; a small cache keeps the
            // daemon's resident memory for the data path.
            .cache_capacity(16 << 20)
            // The writer flushes every batch before it answers, so sled's
            // periodic flusher adds nothing; without it no thread outlives
            // the handle holding the database's file lock.
            .flush_every_ms(None)
            .open()
            .map_err(|source| CatalogError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let open = |name: &'static str| db.open_tree(name).map_err(sled_err("open tree"));
        let trees = Trees {
            volumes: open("volumes")?,
            snapshots: open("snapshots")?,
            snapshot_exports: open("snapshot_exports")?,
            meta: open("meta")?,
            jobs: open("jobs")?,
            aws_snapshots: open("aws_snapshots")?,
            aws_volumes: open("aws_volumes")?,
            policies: open("policies")?,
            policy_runs: open("policy_runs")?,
            bin_rules: open("bin_rules")?,
            snapshot_sets: open("snapshot_sets")?,
            images: open("images")?,
            instances: open("instances")?,
            volume_modifications: open("volume_modifications")?,
        };
        migrate::to_current(&db, &trees)?;
        let writer = Writer::start(db.clone(), trees.clone()).map_err(CatalogError::Start)?;
        Ok(Catalog { db, trees, writer })
    }

    /// A fresh id, never handed out before, even across restarts.
    pub fn next_id(&self) -> Result<u64> {
        self.db.generate_id().map_err(sled_err("generate id"))
    }

    /// Records a new volume; refused if a record of that name exists.
    pub fn create_volume(&self, rec: &VolumeRecord) -> Pending {
        self.swap_volume(&rec.name, None, Some(rec))
    }

    /// Replaces `old` by `new` (same name), only while `old` is exactly the
    /// record stored: the compare-and-swap that makes a stale writer fail
    /// instead of overwriting a volume it does not own.
    pub fn replace_volume(&self, old: &VolumeRecord, new: &VolumeRecord) -> Pending {
        debug_assert_eq!(old.name, new.name, "a record keeps its name");
        self.swap_volume(&old.name, Some(old), Some(new))
    }

    /// Removes `old`'s record, only while it is exactly the record stored.
    pub fn remove_volume(&self, old: &VolumeRecord) -> Pending {
        self.swap_volume(&old.name, Some(old), None)
    }

    fn swap_volume(
        &self,
        name: &VolumeName,
        expected: Option<&VolumeRecord>,
        new: Option<&VolumeRecord>,
    ) -> Pending {
        self.writer.submit(Op::SwapVolume {
            name: name.clone(),
            expected: expected.cloned().map(Box::new),
            new: new.cloned().map(Box::new),
        })
    }

    fn put(&self, tree: Tree, key: &str, value: Vec<u8>) -> Pending {
        self.writer.submit(Op::Put {
            tree,
            key: key.to_owned(),
            value,
        })
    }

    fn remove(&self, tree: Tree, key: &str) -> Pending {
        self.writer.submit(Op::Remove {
            tree,
            key: key.to_owned(),
        })
    }

    pub fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        scan(&self.trees.volumes, "scan volumes")
    }

    pub fn put_snapshot(&self, rec: &SnapshotRecord) -> Pending {
        self.put(Tree::Snapshots, rec.id.as_str(), encode(rec))
    }

    /// Records a new snapshot under the next catalog id (its `seq`, the
    /// order snapshots are listed in); returns the record as written.
    pub async fn record_new_snapshot(&self, rec: SnapshotRecord) -> Result<SnapshotRecord> {
        let rec = SnapshotRecord {
            seq: self.next_id()?,
            ..rec
        };
        self.put_snapshot(&rec).await?;
        Ok(rec)
    }

    pub fn remove_snapshot(&self, id: &str) -> Pending {
        self.remove(Tree::Snapshots, id)
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        scan(&self.trees.snapshots, "scan snapshots")
    }

    pub fn put_job(&self, rec: &JobRecord) -> Pending {
        self.put(Tree::Jobs, rec.id.as_str(), encode(rec))
    }

    pub fn remove_job(&self, id: &JobId) -> Pending {
        self.remove(Tree::Jobs, id.as_str())
    }

    /// Every job record, oldest first (ids grow).
    pub fn jobs(&self) -> Result<Vec<JobRecord>> {
        scan(&self.trees.jobs, "scan jobs")
    }

    pub fn put_snapshot_export(&self, rec: &SnapshotExportRecord) -> Pending {
        self.put(Tree::SnapshotExports, rec.id.as_str(), encode(rec))
    }

    pub fn remove_snapshot_export(&self, id: &str) -> Pending {
        self.remove(Tree::SnapshotExports, id)
    }

    pub fn snapshot_exports(&self) -> Result<Vec<SnapshotExportRecord>> {
        scan(&self.trees.snapshot_exports, "scan snapshot exports")
    }

    pub fn aws_snapshot(&self, id: &str) -> Result<Option<AwsSnapshotRecord>> {
        get(&self.trees.aws_snapshots, id, "read aws snapshot")
    }

    pub fn put_aws_snapshot(&self, id: &str, rec: &AwsSnapshotRecord) -> Pending {
        self.put(Tree::AwsSnapshots, id, encode(rec))
    }

    pub fn remove_aws_snapshot(&self, id: &str) -> Pending {
        self.remove(Tree::AwsSnapshots, id)
    }

    /// The EC2 attributes of the volume with id `id`, if any were set.
    pub fn aws_volume(&self, id: u64) -> Result<Option<AwsVolumeRecord>> {
        get(
            &self.trees.aws_volumes,
            &aws::volume_key(id),
            "read aws volume",
        )
    }

    /// The ids of every snapshot with EC2 attributes.
    pub fn aws_snapshot_ids(&self) -> Result<Vec<String>> {
        self.trees
            .aws_snapshots
            .iter()
            .keys()
            .map(|k| {
                let k = k.map_err(sled_err("scan aws snapshots"))?;
                Ok(String::from_utf8(k.to_vec()).ok())
            })
            .filter_map(Result::transpose)
            .collect()
    }

    /// The ids of every volume with EC2 attributes.
    pub fn aws_volume_ids(&self) -> Result<Vec<u64>> {
        self.trees
            .aws_volumes
            .iter()
            .keys()
            .map(|k| {
                let k = k.map_err(sled_err("scan aws volumes"))?;
                Ok(std::str::from_utf8(&k)
                    .ok()
                    .and_then(|s| u64::from_str_radix(s, 16).ok()))
            })
            .filter_map(Result::transpose)
            .collect()
    }

    pub fn put_aws_volume(&self, id: u64, rec: &AwsVolumeRecord) -> Pending {
        self.put(Tree::AwsVolumes, &aws::volume_key(id), encode(rec))
    }

    pub fn remove_aws_volume(&self, id: u64) -> Pending {
        self.remove(Tree::AwsVolumes, &aws::volume_key(id))
    }

    /// Whether the previous run ended with [`Catalog::mark_clean_shutdown`].
    /// Marks this run as running, so a crash before the next clean shutdown
    /// is seen by the next start. Blocking: for start-up.
    pub fn begin_run(&self) -> Result<bool> {
        let prev = self
            .trees
            .meta
            .get("clean_shutdown")
            .map_err(sled_err("read clean_shutdown"))?;
        // A fresh catalog has no previous run to distrust.
        let clean = prev.is_none_or(|v| v.as_ref() == b"1");
        self.put(Tree::Meta, "clean_shutdown", b"0".to_vec())
            .wait()?;
        Ok(clean)
    }

    /// This host's id, made once: it names the holds this host keeps in a
    /// shared store. Blocking: for start-up.
    pub fn host_id(&self) -> Result<String> {
        if let Some(v) = self
            .trees
            .meta
            .get("host_id")
            .map_err(sled_err("read host_id"))?
            && let Ok(s) = std::str::from_utf8(&v)
        {
            return Ok(s.to_owned());
        }
        let id = snapshot::SnapshotId::generate().as_str()["snap-".len()..].to_owned();
        self.put(Tree::Meta, "host_id", id.as_bytes().to_vec())
            .wait()?;
        Ok(id)
    }

    /// The highest job number recorded by [`Catalog::put_last_job`] (0 if
    /// none).
    pub fn last_job(&self) -> Result<u64> {
        Ok(self
            .trees
            .meta
            .get("last_job")
            .map_err(sled_err("read last_job"))?
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
            .unwrap_or(0))
    }

    /// Records `n` as the highest job number given out: job records may be
    /// dropped, the count is not.
    pub fn put_last_job(&self, n: u64) -> Pending {
        self.put(Tree::Meta, "last_job", n.to_string().into_bytes())
    }

    pub fn mark_clean_shutdown(&self) -> Pending {
        self.put(Tree::Meta, "clean_shutdown", b"1".to_vec())
    }
}

fn scan<T: DeserializeOwned>(tree: &sled::Tree, op: &'static str) -> Result<Vec<T>> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv.map_err(sled_err(op))?;
            decode(&k, &v)
        })
        .collect()
}

fn get<T: DeserializeOwned>(tree: &sled::Tree, key: &str, op: &'static str) -> Result<Option<T>> {
    tree.get(key)
        .map_err(sled_err(op))?
        .map(|v| decode(key.as_bytes(), &v))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, id: u64) -> VolumeRecord {
        VolumeRecord::new(
            id,
            VolumeName::parse(name).unwrap(),
            1 << 30,
            512 << 10,
            false,
            None,
        )
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        {
            let c = Catalog::open(&path).unwrap();
            assert!(c.begin_run().unwrap(), "a fresh catalog counts as clean");
            c.create_volume(&record("a", 1)).wait().unwrap();
            c.create_volume(&record("b", 2)).wait().unwrap();
            c.remove_volume(&record("a", 1)).wait().unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        assert!(!c.begin_run().unwrap(), "no clean shutdown was recorded");
        let names: Vec<_> = c
            .volumes()
            .unwrap()
            .into_iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["b"]);
        c.mark_clean_shutdown().wait().unwrap();
        drop(c);
        assert!(Catalog::open(&path).unwrap().begin_run().unwrap());
    }

    #[test]
    fn a_stale_writer_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("catalog")).unwrap();
        let first = record("a", 1);
        c.create_volume(&first).wait().unwrap();
        assert!(matches!(
            c.create_volume(&record("a", 9)).wait(),
            Err(CatalogError::StaleVolume { found: Some(1), .. })
        ));
        // Deleted and created again under the same name.
        c.remove_volume(&first).wait().unwrap();
        let second = record("a", 2);
        c.create_volume(&second).wait().unwrap();
        // The first volume's writer still holds its record: every write of
        // it is refused, naming both ids.
        let mut late = first.clone();
        late.last_snapshot = snapshot::SnapshotId::parse("snap-0123456789abcdef0");
        let err = c.replace_volume(&first, &late).wait().unwrap_err();
        assert!(
            err.to_string()
                .contains("expected id=Some(1), found id=Some(2)"),
            "{err}"
        );
        assert!(c.remove_volume(&first).wait().is_err());
        assert_eq!(c.volumes().unwrap(), vec![second.clone()]);
        // The owner of the current record writes as before.
        let mut next = second.clone();
        next.size *= 2;
        c.replace_volume(&second, &next).wait().unwrap();
        assert_eq!(c.volumes().unwrap(), vec![next]);
    }

    #[test]
    fn a_record_from_an_older_volumed_is_compared_by_value() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("catalog")).unwrap();
        // Written before `tags` and the EC2 fields existed.
        let old = br#"{"id":3,"name":"a","size":1073741824,"chunk_size":524288,"ephemeral":false,"source_snapshot":null,"created_at":5,"attachment":null}"#;
        c.trees.volumes.insert("a", &old[..]).unwrap();
        let rec = c.volumes().unwrap().remove(0);
        let mut next = rec.clone();
        next.ephemeral = true;
        c.replace_volume(&rec, &next).wait().unwrap();
        assert_eq!(c.volumes().unwrap(), vec![next]);
    }

    #[test]
    fn ids_are_unique_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        let first = Catalog::open(&path).unwrap().next_id().unwrap();
        let second = Catalog::open(&path).unwrap().next_id().unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn corrupt_record_is_reported_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("catalog")).unwrap();
        c.trees.volumes.insert("bad", &b"{not json"[..]).unwrap();
        let err = c.volumes().unwrap_err().to_string();
        assert!(err.contains("\"bad\""), "{err}");
    }
}
