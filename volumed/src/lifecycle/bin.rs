//! Recycle-bin rules: which deleted snapshots (and images) are kept, and
//! for how long. Pure: the rules in, a retention out. The store side, the
//! bin itself, is `snapshot::bin`; the engine moves snapshots into and out
//! of it.
//!
//! A rule with tags is tag-level: it keeps a deleted resource that carries
//! any of them. A rule without tags is region-level: it keeps every
//! deleted resource of its kind except those carrying any of its exclusion
//! tags. When several rules match, the longest retention wins (as in EBS
//! Recycle Bin). Rules are this host's: a snapshot deleted on a host with
//! no matching rule goes to the trash, whatever other hosts' rules say.
//!
//! Images: `machines/` deregisters an image at once; the bin does not
//! keep images yet. The step left: deregistering asks [`retention_for`]
//! with [`BinResource::Image`] and the image's tags, and `Machines` keeps
//! the image record and its snapshots (`Machines::recycle_snapshot`) for
//! that long; the rules, their API and their matching are here and tested.

use std::collections::BTreeMap;

use volumed_api::{BinResource, BinRuleSpec, TagMatch};

use crate::catalog::BinRuleRecord;

/// EBS Recycle Bin keeps snapshots and images 1 to 365 days; the control
/// API also takes shorter periods (down to a second), which tests use.
pub const MAX_RETENTION: u64 = 365 * 86400;

/// A new rule id: 11 characters, as rbin's identifiers.
pub fn new_rule_id() -> String {
    let s = snapshot::SnapshotId::generate();
    s.as_str()["snap-".len()..][..11].to_owned()
}

pub fn validate(spec: &BinRuleSpec) -> Result<(), String> {
    if spec.retention == 0 || spec.retention > MAX_RETENTION {
        return Err(format!(
            "retention must be from 1s to 365d, not {}",
            humantime::format_duration(std::time::Duration::from_secs(spec.retention))
        ));
    }
    if !spec.tags.is_empty() && !spec.exclude_tags.is_empty() {
        return Err("a rule either keeps resources with tags or excludes some, not both".into());
    }
    for m in spec.tags.iter().chain(&spec.exclude_tags) {
        if m.key.is_empty() || m.key.len() > 127 || m.key.chars().any(char::is_control) {
            return Err(format!(
                "tag {:?}: keys are 1 to 127 printable characters",
                m.key
            ));
        }
    }
    if spec.tags.len() + spec.exclude_tags.len() > 50 {
        return Err("a rule names at most 50 tags".into());
    }
    if spec.description.chars().count() > 255 || spec.description.chars().any(char::is_control) {
        return Err("a description is at most 255 printable characters".into());
    }
    Ok(())
}

fn any(ms: &[TagMatch], tags: &BTreeMap<String, String>) -> bool {
    ms.iter().any(|m| m.matches(tags))
}

/// Whether `rule` keeps a deleted resource of `kind` carrying `tags`.
pub fn matches(rule: &BinRuleSpec, kind: BinResource, tags: &BTreeMap<String, String>) -> bool {
    rule.resource == kind
        && if rule.tags.is_empty() {
            !any(&rule.exclude_tags, tags)
        } else {
            any(&rule.tags, tags)
        }
}

/// How long a deleted resource is kept (seconds), if any rule keeps it.
pub fn retention_for(
    rules: &[BinRuleRecord],
    kind: BinResource,
    tags: &BTreeMap<String, String>,
) -> Option<u64> {
    rules
        .iter()
        .filter(|r| matches(&r.spec, kind, tags))
        .map(|r| r.spec.retention)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(kind: BinResource, retention: u64, tags: &[&str], exclude: &[&str]) -> BinRuleRecord {
        let m = |s: &&str| TagMatch::parse_select(&format!("tag:{s}")).unwrap();
        BinRuleRecord {
            id: new_rule_id(),
            spec: BinRuleSpec {
                resource: kind,
                retention,
                tags: tags.iter().map(m).collect(),
                exclude_tags: exclude.iter().map(m).collect(),
                description: String::new(),
            },
            created_at: 0,
            rule_tags: BTreeMap::new(),
        }
    }

    fn tags(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_longest_matching_rule_decides() {
        use BinResource::{Image, Snapshot};
        let rules = [
            rule(Snapshot, 7 * 86400, &["env=prod"], &[]),
            rule(Snapshot, 86400, &[], &["scratch"]),
            rule(Snapshot, 30 * 86400, &["keep=long", "legal"], &[]),
            rule(Image, 14 * 86400, &[], &[]),
        ];
        #[allow(clippy::type_complexity)]
        let table: &[(BinResource, &[(&str, &str)], Option<u64>)] = &[
            (Snapshot, &[], Some(86400)),
            (Snapshot, &[("env", "prod")], Some(7 * 86400)),
            (Snapshot, &[("env", "dev")], Some(86400)),
            (Snapshot, &[("scratch", "")], None),
            (
                Snapshot,
                &[("scratch", "1"), ("env", "prod")],
                Some(7 * 86400),
            ),
            (Snapshot, &[("legal", "hold")], Some(30 * 86400)),
            (Snapshot, &[("keep", "short"), ("scratch", "y")], None),
            (Image, &[("scratch", "y")], Some(14 * 86400)),
        ];
        for (i, (kind, t, want)) in table.iter().enumerate() {
            assert_eq!(retention_for(&rules, *kind, &tags(t)), *want, "row {i}");
        }
        assert_eq!(retention_for(&rules[..1], Snapshot, &tags(&[])), None);
        assert_eq!(
            retention_for(&[], Snapshot, &tags(&[("env", "prod")])),
            None
        );
    }

    #[test]
    fn rules_are_checked() {
        let ok = rule(BinResource::Snapshot, 86400, &["a=b"], &[]).spec;
        assert!(validate(&ok).is_ok());
        let mut r = ok.clone();
        r.retention = 0;
        assert!(validate(&r).unwrap_err().contains("1s to 365d"));
        r.retention = MAX_RETENTION + 1;
        assert!(validate(&r).is_err());
        let mut r = ok.clone();
        r.exclude_tags = r.tags.clone();
        assert!(validate(&r).unwrap_err().contains("not both"));
        let id = new_rule_id();
        assert_eq!(id.len(), 11);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
