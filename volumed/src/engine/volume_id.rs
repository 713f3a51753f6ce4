//! What a volume carries beyond its size and state, for people and for the
//! AWS endpoint alike: an EC2-style id (`vol-` and 17 hex digits) and tags.
//! The EC2-only attributes (volume type, IOPS, an attachment's device) are
//! the AWS endpoint's, in its own catalog tree.

use std::collections::BTreeMap;

use snapshot::SnapshotId;
use volumed_api::validate_tags;

use super::error::{Error, Result};

/// Hex digits after `vol-` or `snap-` in the ids made here, as EC2's.
pub const ID_HEX_DIGITS: usize = 17;

/// What a volume may be created with beyond `CreateVolume`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeOptions {
    /// The EC2-style id to record; without one a volume named like an id
    /// gets its name, any other a fresh id.
    pub volume_id: Option<String>,
    pub tags: BTreeMap<String, String>,
}

impl VolumeOptions {
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

    /// The id the new volume `name` records.
    pub(super) fn volume_id_for(&self, name: &str) -> String {
        self.volume_id
            .clone()
            .or_else(|| is_volume_id(name).then(|| name.to_owned()))
            .unwrap_or_else(new_volume_id)
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
pub(super) fn derived_volume_id(host_id: &str, id: u64) -> String {
    let hex = snapshot::ChunkHash::of(format!("{host_id}/{id}").as_bytes()).to_hex();
    format!("vol-{}", &hex[..ID_HEX_DIGITS])
}

/// `tags` with `set` applied and `remove` taken away (a key whose value is
/// given goes only while it has that value, as EC2's DeleteTags); the
/// result must obey the tag rules (at most 50).
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
