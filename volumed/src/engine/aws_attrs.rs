//! What the AWS endpoint and `vol` tags add to volumes and snapshots:
//! EC2-style volume ids, tags, EC2 volume attributes, an attachment's
//! DeleteOnTermination, and snapshots' EC2 tags and description. The rules
//! are here; the EC2 vocabulary (XML, error codes) is in `aws::ec2`.

use std::collections::BTreeMap;
use std::sync::Arc;

use snapshot::cache::Fetcher;
use snapshot::{Manifest, SnapshotId};
use tracing::info;
use volumed_api::{VolumeName, validate_tags};

use super::{Engine, Volume};
use crate::catalog::{AwsSnapshotRecord, VolumeRecord};
use crate::error::{Error, Result};

/// Hex digits after `vol-` or `snap-` in the ids made here, as EC2's.
pub const ID_HEX_DIGITS: usize = 17;

/// Attributes a volume may be created with beyond `CreateVolume`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeAttrs {
    /// The EC2 id to record; without one a volume named like an id gets its
    /// name, any other a fresh id.
    pub volume_id: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub volume_type: Option<String>,
    pub iops: Option<u64>,
    pub throughput: Option<u64>,
}

impl VolumeAttrs {
    pub fn validate(&self) -> Result<()> {
        validate_tags(&self.tags).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        if let Some(id) = &self.volume_id
            && !is_volume_id(id)
        {
            return Err(Error::InvalidRequest(format!(
                "invalid volume id {id:?}: expected vol- and 8 or 17 hex digits"
            )));
        }
        Ok(())
    }

    pub(super) fn apply(self, rec: &mut VolumeRecord) {
        let id = self
            .volume_id
            .or_else(|| is_volume_id(rec.name.as_str()).then(|| rec.name.to_string()))
            .unwrap_or_else(new_volume_id);
        rec.volume_id = Some(id);
        rec.tags = self.tags;
        rec.volume_type = self.volume_type;
        rec.iops = self.iops;
        rec.throughput = self.throughput;
    }
}

/// `vol-` and 8 or 17 lowercase hex digits: EC2's two id lengths.
pub fn is_volume_id(s: &str) -> bool {
    s.strip_prefix("vol-").is_some_and(is_id_hex)
}

/// `snap-` and 8 or 17 lowercase hex digits.
#[cfg(test)]
fn is_ec2_snapshot_id(s: &str) -> bool {
    s.strip_prefix("snap-").is_some_and(is_id_hex)
}

fn is_id_hex(s: &str) -> bool {
    (s.len() == 8 || s.len() == ID_HEX_DIGITS)
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A fresh `vol-` id, unique across hosts in the same way snapshot ids are.
pub fn new_volume_id() -> String {
    let seed = SnapshotId::generate();
    let hex = snapshot::ChunkHash::of(seed.as_str().as_bytes()).to_hex();
    format!("vol-{}", &hex[..ID_HEX_DIGITS])
}

/// The id of a volume recorded before ids were: derived from the host and
/// the record's id, so it never changes and never collides on this host.
fn derived_volume_id(host_id: &str, id: u64) -> String {
    let hex = snapshot::ChunkHash::of(format!("{host_id}/{id}").as_bytes()).to_hex();
    format!("vol-{}", &hex[..ID_HEX_DIGITS])
}

impl Engine {
    /// A volume's EC2-style id.
    pub fn volume_id(&self, rec: &VolumeRecord) -> String {
        rec.volume_id
            .clone()
            .unwrap_or_else(|| derived_volume_id(&self.host_id, rec.id))
    }

    /// The volume with this EC2-style id.
    pub fn find_volume_id(&self, volume_id: &str) -> Option<Arc<Volume>> {
        self.list()
            .into_iter()
            .find(|v| self.volume_id(&v.record()) == volume_id)
    }

    /// Sets the tags in `set` and removes the keys in `remove` (a key whose
    /// value is given is removed only while it has that value, as EC2's
    /// DeleteTags). Checks the result before changing anything.
    pub async fn tag_volume(
        &self,
        name: &VolumeName,
        set: &BTreeMap<String, String>,
        remove: &[(String, Option<String>)],
    ) -> Result<Arc<Volume>> {
        validate_tags(set).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let _guard = self.registry.lock().await;
        let vol = self.get(name)?;
        vol.update_record(&self.catalog, |rec| {
            rec.tags = retag(&rec.tags, set, remove)?;
            Ok(())
        })
        .await?;
        info!(volume = %name, "volume tags changed");
        Ok(vol)
    }

    /// Records whether ending the instance the volume is attached to
    /// deletes it.
    pub async fn set_delete_on_termination(
        &self,
        name: &VolumeName,
        value: bool,
    ) -> Result<Arc<Volume>> {
        let _guard = self.registry.lock().await;
        let vol = self.get(name)?;
        vol.update_record(&self.catalog, |rec| {
            let Some(att) = rec.attachment.as_mut() else {
                return Err(Error::VolumeNotAttached(name.clone()));
            };
            att.delete_on_termination = value;
            Ok(())
        })
        .await?;
        Ok(vol)
    }

    /// The EC2 metadata of a snapshot, if any was set.
    pub fn snapshot_meta(&self, id: &SnapshotId) -> Result<Option<AwsSnapshotRecord>> {
        Ok(self.catalog.aws_snapshot(id.as_str())?)
    }

    pub fn put_snapshot_meta(&self, id: &SnapshotId, rec: &AwsSnapshotRecord) -> Result<()> {
        validate_tags(&rec.tags).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        Ok(self.catalog.put_aws_snapshot(id.as_str(), rec)?)
    }

    /// A completed snapshot's manifest.
    pub async fn manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        self.snapshots.manifest(id).await
    }

    /// A completed snapshot's header (its manifest's root alone).
    pub async fn snapshot_header(&self, id: &SnapshotId) -> Result<snapshot::ManifestHeader> {
        Ok(self.snapshots.reader(id).await?.header().clone())
    }

    /// A completed snapshot's manifest, read lazily (pages on demand).
    pub async fn manifest_reader(&self, id: &SnapshotId) -> Result<snapshot::ManifestReader> {
        self.snapshots.reader(id).await
    }

    pub fn repo(&self) -> &snapshot::Repo {
        &self.repo
    }

    /// Chunks through the host's cache, each verified against its hash.
    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }
}

/// `tags` with `set` applied and `remove` taken away; the result must obey
/// the tag rules (at most 50).
pub fn retag(
    tags: &BTreeMap<String, String>,
    set: &BTreeMap<String, String>,
    remove: &[(String, Option<String>)],
) -> Result<BTreeMap<String, String>> {
    let mut out = tags.clone();
    for (k, v) in set {
        out.insert(k.clone(), v.clone());
    }
    for (k, v) in remove {
        if v.as_ref().is_none_or(|v| out.get(k) == Some(v)) {
            out.remove(k);
        }
    }
    if out.len() > volumed_api::filter::MAX_TAGS {
        return Err(Error::InvalidRequest(format!(
            "a resource has at most {} tags; this would leave {}",
            volumed_api::filter::MAX_TAGS,
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        let v = new_volume_id();
        assert!(is_volume_id(&v), "{v}");
        assert_ne!(v, new_volume_id());
        assert!(is_volume_id("vol-0123abcd"));
        assert!(!is_volume_id("vol-0123ABCD"));
        assert!(!is_volume_id("vol-0123"));
        assert!(!is_volume_id("data"));
        let d = derived_volume_id("h", 7);
        assert_eq!(d, derived_volume_id("h", 7));
        assert_ne!(d, derived_volume_id("h", 8));
        assert!(is_volume_id(&d));
        let s = SnapshotId::generate();
        assert!(is_ec2_snapshot_id(s.as_str()), "{s}");
    }

    #[test]
    fn retag_applies_set_then_remove() {
        let t: BTreeMap<_, _> = [("a".to_owned(), "1".to_owned())].into();
        let set: BTreeMap<_, _> = [("b".to_owned(), "2".to_owned())].into();
        let out = retag(&t, &set, &[("a".into(), Some("other".into()))]).unwrap();
        assert_eq!(out.len(), 2, "a value that differs keeps the tag");
        let out = retag(&out, &BTreeMap::new(), &[("a".into(), None)]).unwrap();
        assert_eq!(out.keys().collect::<Vec<_>>(), ["b"]);
        let many: BTreeMap<_, _> = (0..50).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(retag(&many, &set, &[]).is_err());
    }
}
