//! The catalog: what volumes exist and how they are attached, kept in sled.
//!
//! Architecture invariant: no sled type leaves this module. Every mutation is
//! flushed before it returns, because the control plane promises that a
//! completed API call survives `kill -9`.
//!
//! Trees (keys are UTF-8 names; values are JSON documents, see docs/formats.md):
//! - `volumes`: volume name -> [`VolumeRecord`]
//! - `snapshots`: snapshot id -> [`SnapshotRecord`] (snapshots this host took)
//! - `jobs`: job id -> [`JobRecord`] (imports and exports)
//! - `aws_snapshots`: snapshot id -> [`AwsSnapshotRecord`] (EC2 tags and
//!   description set through the AWS endpoint)
//! - `snapshot_sets`: see `snapshot_set`; `images`, `instances`: see
//!   `machines`; `volume_modifications`: see `volume_modifications`
//! - `meta`: `format` -> catalog format version, `clean_shutdown` -> "1" or "0"

mod job;
mod json_tree;
mod machines;
mod record;
mod snapshot_set;
mod volume_modifications;

use std::path::Path;

pub use job::{Checkpoint, JobRecord};
pub use machines::{DeviceRecord, ImageRecord, InstanceRecord};
pub use record::{
    AttachmentRecord, AwsSnapshotRecord, SnapshotExportRecord, SnapshotRecord, SnapshotSource,
    SnapshotState, VolumeRecord, rfc3339, unix_now,
};
pub use snapshot_set::{SetMemberRecord, SetState, SnapshotSetRecord};
pub use volume_modifications::VolumeModificationRecord;
use volumed_api::VolumeName;

/// Bumped when a record changes incompatibly; a newer catalog is refused.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("open {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("{op}: {source}")]
    Sled {
        op: &'static str,
        source: sled::Error,
    },
    #[error("record for key {key:?} is corrupt: {source}")]
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
}

type Result<T> = std::result::Result<T, CatalogError>;

/// The id in a stored volume record, for an error message.
fn record_id(raw: &[u8]) -> Option<u64> {
    serde_json::from_slice::<VolumeRecord>(raw)
        .ok()
        .map(|r| r.id)
}

fn sled_err(op: &'static str) -> impl FnOnce(sled::Error) -> CatalogError {
    move |source| CatalogError::Sled { op, source }
}

pub struct Catalog {
    db: sled::Db,
    volumes: sled::Tree,
    snapshots: sled::Tree,
    /// Snapshots exported with `vol snapshot attach`, by id.
    snapshot_exports: sled::Tree,
    meta: sled::Tree,
    jobs: sled::Tree,
    aws_snapshots: sled::Tree,
    snapshot_sets: json_tree::JsonTree,
    images: json_tree::JsonTree,
    instances: json_tree::JsonTree,
    volume_modifications: json_tree::JsonTree,
}

impl Catalog {
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
            // Every change is flushed before it returns, so sled's periodic
            // flusher adds nothing; without it no thread outlives the handle
            // holding the database's file lock.
            .flush_every_ms(None)
            .open()
            .map_err(|source| CatalogError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let volumes = db
            .open_tree("volumes")
            .map_err(sled_err("open tree volumes"))?;
        let meta = db.open_tree("meta").map_err(sled_err("open tree meta"))?;
        let snapshots = db
            .open_tree("snapshots")
            .map_err(sled_err("open tree snapshots"))?;
        let jobs = db.open_tree("jobs").map_err(sled_err("open tree jobs"))?;
        let snapshot_exports = db
            .open_tree("snapshot_exports")
            .map_err(sled_err("open tree snapshot_exports"))?;
        let aws_snapshots = db
            .open_tree("aws_snapshots")
            .map_err(sled_err("open tree aws_snapshots"))?;
        let catalog = Catalog {
            snapshot_sets: json_tree::JsonTree::open(&db, "snapshot_sets")?,
            images: json_tree::JsonTree::open(&db, "images")?,
            instances: json_tree::JsonTree::open(&db, "instances")?,
            volume_modifications: json_tree::JsonTree::open(&db, "volume_modifications")?,
            jobs,
            db,
            volumes,
            snapshots,
            snapshot_exports,
            meta,
            aws_snapshots,
        };
        catalog.check_format()?;
        Ok(catalog)
    }

    fn check_format(&self) -> Result<()> {
        match self.meta.get("format").map_err(sled_err("read format"))? {
            Some(v) => {
                let found = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u32::MAX);
                if found > FORMAT_VERSION {
                    return Err(CatalogError::TooNew { found });
                }
                Ok(())
            }
            None => {
                self.meta
                    .insert("format", FORMAT_VERSION.to_string().as_bytes())
                    .map_err(sled_err("write format"))?;
                self.flush()
            }
        }
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(sled_err("flush"))
    }

    /// A fresh id, never handed out before, even across restarts.
    pub fn next_id(&self) -> Result<u64> {
        self.db.generate_id().map_err(sled_err("generate id"))
    }

    /// Records a new volume; refused if a record of that name exists.
    pub fn create_volume(&self, rec: &VolumeRecord) -> Result<()> {
        self.swap_volume(&rec.name, None, Some(rec))
    }

    /// Replaces `old` by `new` (same name), only while `old` is exactly the
    /// record stored: the compare-and-swap that makes a stale writer fail
    /// instead of overwriting a volume it does not own.
    pub fn replace_volume(&self, old: &VolumeRecord, new: &VolumeRecord) -> Result<()> {
        debug_assert_eq!(old.name, new.name, "a record keeps its name");
        self.swap_volume(&old.name, Some(old), Some(new))
    }

    /// Removes `old`'s record, only while it is exactly the record stored.
    pub fn remove_volume(&self, old: &VolumeRecord) -> Result<()> {
        self.swap_volume(&old.name, Some(old), None)
    }

    /// Compares by decoded record, not by bytes: a record written by an
    /// older volumed lacks fields this one would serialize.
    fn swap_volume(
        &self,
        name: &VolumeName,
        expected: Option<&VolumeRecord>,
        new: Option<&VolumeRecord>,
    ) -> Result<()> {
        let stale = |found: Option<u64>| CatalogError::StaleVolume {
            name: name.clone(),
            expected: expected.map(|r| r.id),
            found,
        };
        let raw = self
            .volumes
            .get(name.as_str())
            .map_err(sled_err("read volume"))?;
        let current: Option<VolumeRecord> = raw
            .as_ref()
            .map(|v| {
                serde_json::from_slice(v).map_err(|source| CatalogError::Corrupt {
                    key: name.to_string(),
                    source,
                })
            })
            .transpose()?;
        if current.as_ref() != expected {
            return Err(stale(current.map(|r| r.id)));
        }
        let value = new.map(|r| serde_json::to_vec(r).expect("a VolumeRecord always serializes"));
        self.volumes
            .compare_and_swap(name.as_str(), raw, value)
            .map_err(sled_err("write volume"))?
            // Only a writer bypassing the owner can get here.
            .map_err(|e| stale(e.current.and_then(|v| record_id(&v))))?;
        self.flush()
    }

    pub fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        self.volumes
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(sled_err("scan volumes"))?;
                serde_json::from_slice(&v).map_err(|source| CatalogError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })
            })
            .collect()
    }

    pub fn put_snapshot(&self, rec: &SnapshotRecord) -> Result<()> {
        let value = serde_json::to_vec(rec).expect("a SnapshotRecord always serializes");
        self.snapshots
            .insert(rec.id.as_str(), value)
            .map_err(sled_err("write snapshot"))?;
        self.flush()
    }

    pub fn remove_snapshot(&self, id: &str) -> Result<()> {
        self.snapshots
            .remove(id)
            .map_err(sled_err("remove snapshot"))?;
        self.flush()
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.snapshots
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(sled_err("scan snapshots"))?;
                serde_json::from_slice(&v).map_err(|source| CatalogError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })
            })
            .collect()
    }

    pub fn put_job(&self, rec: &JobRecord) -> Result<()> {
        let value = serde_json::to_vec(rec).expect("a JobRecord always serializes");
        self.jobs
            .insert(rec.id.as_str(), value)
            .map_err(sled_err("write job"))?;
        self.flush()
    }

    pub fn remove_job(&self, id: &str) -> Result<()> {
        self.jobs.remove(id).map_err(sled_err("remove job"))?;
        self.flush()
    }

    /// Every job record, oldest first (ids grow).
    pub fn jobs(&self) -> Result<Vec<JobRecord>> {
        self.jobs
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(sled_err("scan jobs"))?;
                serde_json::from_slice(&v).map_err(|source| CatalogError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })
            })
            .collect()
    }

    pub fn put_snapshot_export(&self, rec: &SnapshotExportRecord) -> Result<()> {
        let value = serde_json::to_vec(rec).expect("a SnapshotExportRecord always serializes");
        self.snapshot_exports
            .insert(rec.id.as_str(), value)
            .map_err(sled_err("write snapshot export"))?;
        self.flush()
    }

    pub fn remove_snapshot_export(&self, id: &str) -> Result<()> {
        self.snapshot_exports
            .remove(id)
            .map_err(sled_err("remove snapshot export"))?;
        self.flush()
    }

    pub fn snapshot_exports(&self) -> Result<Vec<SnapshotExportRecord>> {
        self.snapshot_exports
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(sled_err("scan snapshot exports"))?;
                serde_json::from_slice(&v).map_err(|source| CatalogError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })
            })
            .collect()
    }

    pub fn aws_snapshot(&self, id: &str) -> Result<Option<AwsSnapshotRecord>> {
        let Some(v) = self
            .aws_snapshots
            .get(id)
            .map_err(sled_err("read aws snapshot"))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|source| CatalogError::Corrupt {
                key: id.to_owned(),
                source,
            })
    }

    pub fn put_aws_snapshot(&self, id: &str, rec: &AwsSnapshotRecord) -> Result<()> {
        let value = serde_json::to_vec(rec).expect("an AwsSnapshotRecord always serializes");
        self.aws_snapshots
            .insert(id, value)
            .map_err(sled_err("write aws snapshot"))?;
        self.flush()
    }

    pub fn remove_aws_snapshot(&self, id: &str) -> Result<()> {
        self.aws_snapshots
            .remove(id)
            .map_err(sled_err("remove aws snapshot"))?;
        self.flush()
    }

    /// Whether the previous run ended with [`Catalog::mark_clean_shutdown`].
    /// Marks this run as running, so a crash before the next clean shutdown
    /// is seen by the next start.
    pub fn begin_run(&self) -> Result<bool> {
        let prev = self
            .meta
            .get("clean_shutdown")
            .map_err(sled_err("read clean_shutdown"))?;
        // A fresh catalog has no previous run to distrust.
        let clean = prev.is_none_or(|v| v.as_ref() == b"1");
        self.meta
            .insert("clean_shutdown", "0")
            .map_err(sled_err("write clean_shutdown"))?;
        self.flush()?;
        Ok(clean)
    }

    /// This host's id, made once: it names the holds this host keeps in a
    /// shared store.
    pub fn host_id(&self) -> Result<String> {
        if let Some(v) = self.meta.get("host_id").map_err(sled_err("read host_id"))?
            && let Ok(s) = std::str::from_utf8(&v)
        {
            return Ok(s.to_owned());
        }
        let id = snapshot::SnapshotId::generate().as_str()["snap-".len()..].to_owned();
        self.meta
            .insert("host_id", id.as_bytes())
            .map_err(sled_err("write host_id"))?;
        self.flush()?;
        Ok(id)
    }

    pub fn mark_clean_shutdown(&self) -> Result<()> {
        self.meta
            .insert("clean_shutdown", "1")
            .map_err(sled_err("write clean_shutdown"))?;
        self.flush()
    }
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
            c.create_volume(&record("a", 1)).unwrap();
            c.create_volume(&record("b", 2)).unwrap();
            c.remove_volume(&record("a", 1)).unwrap();
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
        c.mark_clean_shutdown().unwrap();
        drop(c);
        assert!(Catalog::open(&path).unwrap().begin_run().unwrap());
    }

    #[test]
    fn a_stale_writer_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("catalog")).unwrap();
        let first = record("a", 1);
        c.create_volume(&first).unwrap();
        assert!(matches!(
            c.create_volume(&record("a", 9)),
            Err(CatalogError::StaleVolume { found: Some(1), .. })
        ));
        // Deleted and created again under the same name.
        c.remove_volume(&first).unwrap();
        let second = record("a", 2);
        c.create_volume(&second).unwrap();
        // The first volume's writer still holds its record: every write of
        // it is refused, naming both ids.
        let mut late = first.clone();
        late.last_snapshot = snapshot::SnapshotId::parse("snap-0123456789abcdef0");
        let err = c.replace_volume(&first, &late).unwrap_err();
        assert!(
            err.to_string()
                .contains("expected id=Some(1), found id=Some(2)"),
            "{err}"
        );
        assert!(c.remove_volume(&first).is_err());
        assert_eq!(c.volumes().unwrap(), vec![second.clone()]);
        // The owner of the current record writes as before.
        let mut next = second.clone();
        next.size *= 2;
        c.replace_volume(&second, &next).unwrap();
        assert_eq!(c.volumes().unwrap(), vec![next]);
    }

    #[test]
    fn a_record_from_an_older_volumed_is_compared_by_value() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("catalog")).unwrap();
        // Written before `tags` and the EC2 fields existed.
        let old = br#"{"id":3,"name":"a","size":1073741824,"chunk_size":524288,"ephemeral":false,"source_snapshot":null,"created_at":5,"attachment":null}"#;
        c.volumes.insert("a", &old[..]).unwrap();
        let rec = c.volumes().unwrap().remove(0);
        let mut next = rec.clone();
        next.ephemeral = true;
        c.replace_volume(&rec, &next).unwrap();
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
        c.volumes.insert("bad", &b"{not json"[..]).unwrap();
        let err = c.volumes().unwrap_err().to_string();
        assert!(err.contains("\"bad\""), "{err}");
    }
}
