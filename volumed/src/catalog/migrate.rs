//! Bringing a catalog written by an older volumed up to [`FORMAT_VERSION`],
//! once, at open, before anything reads it.
//!
//! Format 1 to 2:
//! - job records become one tagged [`JobSpec`] (from the request and the
//!   import's fields side by side, each optional);
//! - the EC2 attributes leave volume records (`volume_type`, `iops`,
//!   `throughput`, an attachment's `device` and `delete_on_termination`)
//!   for the AWS endpoint's `aws_volumes` tree, keyed by the volume's id;
//!   an attachment recorded before attachments had ids keeps them under
//!   "no id", which only that attachment has.
//!
//! Every step may run again after a crash: a record already in the new
//! shape is left alone, and the format is written last.

use tracing::{info, warn};

use super::aws::{AwsAttachmentRecord, AwsVolumeRecord, volume_key};
use super::job::LegacyJobRecord;
use super::{
    CatalogError, FORMAT_VERSION, JobRecord, Result, Trees, VolumeRecord, encode, sled_err,
};

pub(super) fn to_current(db: &sled::Db, trees: &Trees) -> Result<()> {
    let found = match trees.meta.get("format").map_err(sled_err("read format"))? {
        Some(v) => std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(u32::MAX),
        // A fresh catalog, or one from before formats were recorded.
        None if trees.volumes.is_empty() && trees.jobs.is_empty() => FORMAT_VERSION,
        None => 1,
    };
    if found > FORMAT_VERSION {
        return Err(CatalogError::TooNew { found });
    }
    if found < 2 {
        let jobs = jobs_to_spec(&trees.jobs)?;
        let volumes = ec2_attributes_out(&trees.volumes, &trees.aws_volumes)?;
        info!(
            from = found,
            to = FORMAT_VERSION,
            jobs,
            volumes,
            "catalog brought up to date"
        );
    }
    if found != FORMAT_VERSION || trees.meta.get("format").ok().flatten().is_none() {
        trees
            .meta
            .insert("format", FORMAT_VERSION.to_string().as_bytes())
            .map_err(sled_err("write format"))?;
        db.flush().map_err(sled_err("flush"))?;
    }
    Ok(())
}

/// Rewrites every job record still in the old shape; returns how many.
fn jobs_to_spec(jobs: &sled::Tree) -> Result<usize> {
    let mut n = 0;
    for kv in jobs.iter() {
        let (k, v) = kv.map_err(sled_err("scan jobs"))?;
        if serde_json::from_slice::<JobRecord>(&v).is_ok() {
            continue;
        }
        let Ok(old) = serde_json::from_slice::<LegacyJobRecord>(&v) else {
            // Neither shape: reported as corrupt when read.
            continue;
        };
        match old.into_current() {
            Some(rec) => {
                jobs.insert(&k, encode(&rec))
                    .map_err(sled_err("write job"))?;
            }
            None => {
                warn!(job = %String::from_utf8_lossy(&k), "dropping a job record that names no request");
                jobs.remove(&k).map_err(sled_err("remove job"))?;
            }
        }
        n += 1;
    }
    Ok(n)
}

/// Moves the EC2 attributes of every volume record that has any into
/// `aws_volumes`, then rewrites the record without them; returns how many.
fn ec2_attributes_out(volumes: &sled::Tree, aws_volumes: &sled::Tree) -> Result<usize> {
    let mut n = 0;
    for kv in volumes.iter() {
        let (k, v) = kv.map_err(sled_err("scan volumes"))?;
        let Ok(raw) = serde_json::from_slice::<serde_json::Value>(&v) else {
            continue;
        };
        let Some(aws) = legacy_ec2_attributes(&raw) else {
            continue;
        };
        let Ok(rec) = serde_json::from_value::<VolumeRecord>(raw) else {
            continue;
        };
        // The attributes first: a crash before the record's rewrite finds
        // them again next time.
        aws_volumes
            .insert(volume_key(rec.id), encode(&aws))
            .map_err(sled_err("write aws volume"))?;
        volumes
            .insert(&k, encode(&rec))
            .map_err(sled_err("write volume"))?;
        n += 1;
    }
    Ok(n)
}

/// The EC2 attributes a format-1 volume record carries, if any is set.
fn legacy_ec2_attributes(raw: &serde_json::Value) -> Option<AwsVolumeRecord> {
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    let att = raw.get("attachment").filter(|a| !a.is_null());
    let device = att.and_then(|a| a.get("device")).and_then(text);
    let dot = att
        .and_then(|a| a.get("delete_on_termination"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let rec = AwsVolumeRecord {
        volume_type: raw.get("volume_type").and_then(text),
        iops: raw.get("iops").and_then(serde_json::Value::as_u64),
        throughput: raw.get("throughput").and_then(serde_json::Value::as_u64),
        attachment: (device.is_some() || dot).then_some(AwsAttachmentRecord {
            attachment: None,
            device,
            delete_on_termination: dot,
        }),
    };
    (rec != AwsVolumeRecord::default()).then_some(rec)
}

#[cfg(test)]
mod tests {
    use super::super::{Catalog, JobSpec};
    use volumed_api::{JobKind, JobState};

    /// A format-1 catalog as an older volumed left it: an import job in the
    /// flattened shape, a volume with EC2 attributes on its attachment.
    #[test]
    fn a_format_one_catalog_is_brought_up_to_date_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        {
            let db = sled::open(&path).unwrap();
            let jobs = db.open_tree("jobs").unwrap();
            jobs.insert(
                "job-000000000000000a",
                br#"{"id":"job-000000000000000a","kind":"import","state":"running","created_at":5,"finished_at":null,"import":{"source":"/img/disk.qcow2","name":"data","format":null,"chunk_size":null,"ephemeral":false,"snapshot":true,"labels":{},"sha256":null},"export":null,"format":"qcow2","volumes":["data"],"bytes_total":1048576,"checkpoint":{"disk":0,"offset":65536},"error":null,"snapshot":null,"sha256":null}"#.as_slice(),
            )
            .unwrap();
            jobs.insert(
                "job-000000000000000b",
                br#"{"id":"job-000000000000000b","kind":"export","state":"completed","created_at":6,"import":null,"export":{"source":"data","destination":"/tmp/x.raw","format":null,"compress":false},"format":"raw","volumes":["data"],"bytes_total":7,"snapshot":"snap-0123456789abcdef0"}"#.as_slice(),
            )
            .unwrap();
            let volumes = db.open_tree("volumes").unwrap();
            volumes
                .insert(
                    "data",
                    br#"{"id":3,"name":"data","size":1048576,"chunk_size":524288,"ephemeral":false,"source_snapshot":null,"created_at":5,"attachment":{"instance":"i-1","attached_at":9,"device":"/dev/sdf","delete_on_termination":true},"volume_type":"gp3","iops":3000,"throughput":null,"tags":{"a":"b"}}"#.as_slice(),
                )
                .unwrap();
            volumes
                .insert(
                    "plain",
                    br#"{"id":4,"name":"plain","size":1048576,"chunk_size":524288,"ephemeral":false,"source_snapshot":null,"created_at":5,"attachment":null}"#.as_slice(),
                )
                .unwrap();
            db.flush().unwrap();
        }
        for _ in 0..2 {
            let c = Catalog::open(&path).unwrap();
            let jobs = c.jobs().unwrap();
            assert_eq!(jobs.len(), 2);
            assert_eq!(jobs[0].kind(), JobKind::Import);
            assert_eq!(jobs[0].state, JobState::Running);
            let JobSpec::Import(i) = &jobs[0].spec else {
                panic!("{:?}", jobs[0])
            };
            assert_eq!(i.request.source, "/img/disk.qcow2");
            assert!(i.request.snapshot);
            assert_eq!(i.volumes[0].as_str(), "data");
            assert_eq!((i.checkpoint.disk, i.checkpoint.offset), (0, 65536));
            let JobSpec::Export(e) = &jobs[1].spec else {
                panic!("{:?}", jobs[1])
            };
            assert_eq!(e.request.destination, "/tmp/x.raw");
            assert_eq!(e.volume.as_ref().map(|v| v.as_str()), Some("data"));
            assert_eq!(
                jobs[1].snapshot.as_ref().unwrap().as_str(),
                "snap-0123456789abcdef0"
            );

            let vols = c.volumes().unwrap();
            assert_eq!(vols.len(), 2);
            let data = &vols[0];
            assert_eq!(data.tags.get("a").map(String::as_str), Some("b"));
            let att = data.attachment.as_ref().unwrap();
            assert_eq!((att.instance.as_deref(), att.id), (Some("i-1"), None));
            let aws = c.aws_volume(3).unwrap().expect("moved");
            assert_eq!(aws.volume_type.as_deref(), Some("gp3"));
            assert_eq!(aws.iops, Some(3000));
            let a = aws.attachment_of(att).expect("the same attachment");
            assert_eq!(a.device.as_deref(), Some("/dev/sdf"));
            assert!(a.delete_on_termination);
            // A later attachment of the volume sees none of it.
            let later = crate::catalog::AttachmentRecord {
                instance: Some("i-2".into()),
                attached_at: 10,
                id: Some(77),
            };
            assert!(aws.attachment_of(&later).is_none());
            assert_eq!(c.aws_volume(4).unwrap(), None);
            assert_eq!(c.aws_volume_ids().unwrap(), vec![3]);
            let raw = c.trees.volumes.get("data").unwrap().unwrap();
            let text = String::from_utf8_lossy(&raw).into_owned();
            assert!(
                !text.contains("gp3") && !text.contains("/dev/sdf"),
                "{text}"
            );
        }
    }
}
