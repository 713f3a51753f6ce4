//! Volume filters with EC2's names and rules, shared by `vol list --filter`
//! and the AWS endpoint's DescribeVolumes, so both select the same volumes.
//!
//! A filter is a name and one or more values: a volume matches when any
//! value matches (`*` and `?` are wildcards, as in EC2); several filters
//! must all match. Tag rules are EC2's too.

use std::collections::BTreeMap;

use crate::types::{Volume, VolumeState};

/// The filter names DescribeVolumes and `vol list --filter` understand;
/// `tag:KEY` is also accepted for any KEY.
pub const VOLUME_FILTERS: &[&str] = &[
    "status",
    "volume-id",
    "snapshot-id",
    "size",
    "volume-type",
    "encrypted",
    "tag-key",
    "attachment.instance-id",
    "attachment.device",
    "attachment.status",
    "attachment.delete-on-termination",
];

/// Tags a resource may carry, and the key and value limits (EC2's).
pub const MAX_TAGS: usize = 50;
pub const MAX_TAG_KEY: usize = 128;
pub const MAX_TAG_VALUE: usize = 256;
/// Tag keys the service keeps for itself: `volumed:nbd-uri` is set while a
/// volume is attached.
pub const RESERVED_TAG_PREFIXES: &[&str] = &["aws:", "volumed:"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("unknown filter {0:?}; known: {known}, tag:KEY", known = VOLUME_FILTERS.join(", "))]
    UnknownName(String),
    #[error("filter {0:?} is not NAME=VALUE")]
    Syntax(String),
    #[error("filter {name:?} has no values")]
    NoValues { name: String },
    #[error("invalid tag {key:?}: {reason}")]
    InvalidTag { key: String, reason: &'static str },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFilter {
    pub name: String,
    pub values: Vec<String>,
}

impl VolumeFilter {
    /// A filter with a known name and at least one value.
    pub fn new(name: &str, values: Vec<String>) -> Result<Self, FilterError> {
        let known = VOLUME_FILTERS.contains(&name)
            || name.strip_prefix("tag:").is_some_and(|k| !k.is_empty());
        if !known {
            return Err(FilterError::UnknownName(name.to_owned()));
        }
        if values.is_empty() {
            return Err(FilterError::NoValues {
                name: name.to_owned(),
            });
        }
        Ok(VolumeFilter {
            name: name.to_owned(),
            values,
        })
    }

    /// `NAME=VALUE`; `vol list --filter` repeats the flag for more filters
    /// and separates several values of one filter with commas.
    pub fn parse(s: &str) -> Result<Self, FilterError> {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| FilterError::Syntax(s.to_owned()))?;
        VolumeFilter::new(name, value.split(',').map(str::to_owned).collect())
    }

    pub fn matches(&self, v: &Volume) -> bool {
        let att = v.attachment.as_ref();
        let candidates: Vec<String> = match self.name.as_str() {
            "status" => vec![ec2_status(v.state).to_owned()],
            "volume-id" => vec![v.volume_id.clone()],
            "snapshot-id" => vec![v.source_snapshot.clone().unwrap_or_default()],
            "size" => vec![size_gib(v.size).to_string()],
            "volume-type" => v.volume_type.iter().cloned().collect(),
            "encrypted" => vec![v.encrypted.to_string()],
            "tag-key" => v.tags.keys().cloned().collect(),
            "attachment.instance-id" => att.and_then(|a| a.instance.clone()).into_iter().collect(),
            "attachment.device" => att.and_then(|a| a.device.clone()).into_iter().collect(),
            "attachment.status" => att.map(|_| "attached".to_owned()).into_iter().collect(),
            "attachment.delete-on-termination" => att
                .map(|a| a.delete_on_termination.to_string())
                .into_iter()
                .collect(),
            other => match other.strip_prefix("tag:") {
                Some(key) => v.tags.get(key).cloned().into_iter().collect(),
                None => Vec::new(),
            },
        };
        candidates
            .iter()
            .any(|c| self.values.iter().any(|p| wildcard(p, c)))
    }
}

/// Whether every filter matches.
pub fn matches_all(filters: &[VolumeFilter], v: &Volume) -> bool {
    filters.iter().all(|f| f.matches(v))
}

/// EC2's name for a volume's state.
pub fn ec2_status(s: VolumeState) -> &'static str {
    match s {
        VolumeState::Available => "available",
        VolumeState::Attached => "in-use",
        // Being filled by an import job: EC2's state for a volume not yet
        // usable.
        VolumeState::Importing => "creating",
    }
}

/// A size in whole GiB, rounded up: EC2 sizes are GiB, ours are bytes.
pub fn size_gib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 30)
}

/// EC2's tag rules: at most 50, keys 1 to 128 characters, values up to
/// 256, no control characters, and no key with a reserved prefix.
pub fn validate_tags<'a>(
    tags: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), FilterError> {
    let mut n = 0usize;
    for (k, v) in tags {
        n += 1;
        let bad = |reason| FilterError::InvalidTag {
            key: k.clone(),
            reason,
        };
        if k.is_empty() || k.chars().count() > MAX_TAG_KEY {
            return Err(bad("keys are 1 to 128 characters"));
        }
        if v.chars().count() > MAX_TAG_VALUE {
            return Err(bad("values are at most 256 characters"));
        }
        if k.chars().chain(v.chars()).any(char::is_control) {
            return Err(bad("keys and values may not hold control characters"));
        }
        if RESERVED_TAG_PREFIXES.iter().any(|p| k.starts_with(p)) {
            return Err(bad("keys starting with aws: or volumed: are reserved"));
        }
    }
    if n > MAX_TAGS {
        return Err(FilterError::InvalidTag {
            key: format!("({n} tags)"),
            reason: "a resource has at most 50 tags",
        });
    }
    Ok(())
}

/// Tags as EC2 shows them, sorted by key.
pub type Tags = BTreeMap<String, String>;

/// EC2's filter wildcards: `*` any run, `?` any one character; `\` escapes.
pub fn wildcard(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Classic two-pointer match with one backtrack point: linear in
    // practice and never exponential.
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        let (lit, step) = match p.get(pi).copied() {
            Some('\\') if pi + 1 < p.len() => (Some(p[pi + 1]), 2),
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
                continue;
            }
            Some('?') => (None, 1),
            Some(c) => (Some(c), 1),
            None => (Some('\0'), 0),
        };
        let ok = step > 0 && lit.is_none_or(|c| c == t[ti]);
        if ok {
            pi += step;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Attachment;

    fn vol() -> Volume {
        let mut tags = BTreeMap::new();
        tags.insert("team".to_owned(), "web".to_owned());
        Volume {
            name: crate::VolumeName::parse("vol-0123456789abcdef0").unwrap(),
            size: 3 << 30,
            chunk_size: 512 << 10,
            ephemeral: false,
            state: VolumeState::Attached,
            uri: None,
            unix_uri: None,
            source_snapshot: Some("snap-1".into()),
            instance: Some("i-1".into()),
            created_at: String::new(),
            attached_at: None,
            allocated_bytes: 0,
            hydration: None,
            health: Default::default(),
            health_reason: None,
            volume_id: "vol-0123456789abcdef0".into(),
            tags,
            attachment: Some(Attachment {
                instance: Some("i-1".into()),
                device: Some("/dev/sdf".into()),
                delete_on_termination: true,
                attached_at: String::new(),
            }),
            volume_type: Some("gp3".into()),
            iops: None,
            throughput: None,
            encrypted: false,
            encryption: None,
            memory_key: false,
        }
    }

    #[test]
    fn each_filter_selects() {
        let v = vol();
        for (f, yes) in [
            ("status=in-use", true),
            ("status=available", false),
            ("volume-id=vol-0123*", true),
            ("snapshot-id=snap-1", true),
            ("size=3", true),
            ("size=1,3", true),
            ("size=2", false),
            ("tag:team=web", true),
            ("tag:team=db", false),
            ("tag:other=web", false),
            ("tag-key=team", true),
            ("attachment.instance-id=i-1", true),
            ("attachment.device=/dev/sd?", true),
            ("attachment.status=attached", true),
            ("attachment.delete-on-termination=true", true),
            ("attachment.delete-on-termination=false", false),
            ("volume-type=gp3", true),
            ("encrypted=false", true),
            ("encrypted=true", false),
        ] {
            assert_eq!(VolumeFilter::parse(f).unwrap().matches(&v), yes, "{f}");
        }
        let mut free = vol();
        free.attachment = None;
        free.state = VolumeState::Available;
        assert!(
            !VolumeFilter::parse("attachment.status=attached")
                .unwrap()
                .matches(&free)
        );
    }

    #[test]
    fn bad_filters_are_refused() {
        assert!(matches!(
            VolumeFilter::parse("colour=red"),
            Err(FilterError::UnknownName(_))
        ));
        assert!(matches!(
            VolumeFilter::parse("status"),
            Err(FilterError::Syntax(_))
        ));
        assert!(VolumeFilter::parse("tag:=x").is_err());
        assert!(VolumeFilter::new("status", vec![]).is_err());
    }

    #[test]
    fn wildcards() {
        assert!(wildcard("*", ""));
        assert!(wildcard("a*c", "abbbc"));
        assert!(!wildcard("a*c", "abbb"));
        assert!(wildcard("a?c", "abc"));
        assert!(!wildcard("a?c", "ac"));
        assert!(wildcard("a\\*", "a*"));
        assert!(!wildcard("a\\*", "ab"));
        assert!(wildcard("*x*y*", "__x__y__"));
        assert!(!wildcard("abc", "abcd"));
    }

    #[test]
    fn tag_rules() {
        let ok: Tags = [("Name".to_owned(), "db 1".to_owned())].into();
        assert!(validate_tags(&ok).is_ok());
        for (k, v) in [
            ("", "x"),
            ("aws:x", "y"),
            ("volumed:nbd-uri", "y"),
            ("k\n", "y"),
        ] {
            let t: Tags = [(k.to_owned(), v.to_owned())].into();
            assert!(validate_tags(&t).is_err(), "{k:?}");
        }
        let long: Tags = [("k".repeat(129), String::new())].into();
        assert!(validate_tags(&long).is_err());
        let many: Tags = (0..51).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_tags(&many).is_err());
    }
}
