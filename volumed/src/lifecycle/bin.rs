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
//! Images: DeregisterImage asks [`retention_for`] with
//! [`BinResource::Image`] and the image's tags (`lifecycle::images`).
//!
//! Locks (rbin's LockRule): only a region-level rule without exclusion
//! tags can be locked. While locked, and during the unlock delay after an
//! unlock, it cannot be deleted, its retention cannot be shortened and
//! what it matches cannot change ([`check_change`]); a longer retention,
//! a new description and the rule's own tags still can.

use std::collections::BTreeMap;

use volumed_api::{BinResource, BinRuleSpec, TagMatch};

use crate::catalog::{BinRuleRecord, RuleLock};

/// AWS's unlock delay: 7 to 30 days.
pub const UNLOCK_DELAY_DAYS: std::ops::RangeInclusive<u64> = 7..=30;

/// A rule's lock as rbin names it at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockState {
    /// Never locked, or unlocked and past the delay.
    Unlocked,
    Locked,
    /// Unlocked, still within the delay, until this time.
    PendingUnlock(u64),
}

impl LockState {
    pub fn as_str(self) -> &'static str {
        match self {
            LockState::Unlocked => "unlocked",
            LockState::Locked => "locked",
            LockState::PendingUnlock(_) => "pending_unlock",
        }
    }

    /// Whether the rule is held (locked or within its unlock delay).
    pub fn holds(self) -> bool {
        self != LockState::Unlocked
    }
}

pub fn lock_state(rule: &BinRuleRecord, now: u64) -> LockState {
    match &rule.lock {
        None => LockState::Unlocked,
        Some(RuleLock {
            unlock_at: None, ..
        }) => LockState::Locked,
        Some(RuleLock {
            unlock_at: Some(t), ..
        }) if *t > now => LockState::PendingUnlock(*t),
        Some(_) => LockState::Unlocked,
    }
}

/// Locks `rule` with an unlock delay of `days`; the rule as locked.
pub fn lock(rule: &BinRuleRecord, days: u64, now: u64) -> Result<BinRuleRecord, LockRefusal> {
    if !UNLOCK_DELAY_DAYS.contains(&days) {
        return Err(LockRefusal::Invalid(format!(
            "UnlockDelayValue must be from 7 to 30 days, not {days}"
        )));
    }
    if !rule.spec.tags.is_empty() || !rule.spec.exclude_tags.is_empty() {
        return Err(LockRefusal::Invalid(
            "only a region-level rule without exclusion tags can be locked".into(),
        ));
    }
    if lock_state(rule, now) == LockState::Locked {
        return Err(LockRefusal::State(format!(
            "rule {} is already locked",
            rule.id
        )));
    }
    Ok(BinRuleRecord {
        lock: Some(RuleLock {
            unlock_delay: days * 86400,
            unlock_at: None,
        }),
        ..rule.clone()
    })
}

/// Unlocks `rule`: it stays held for its unlock delay from `now`.
pub fn unlock(rule: &BinRuleRecord, now: u64) -> Result<BinRuleRecord, LockRefusal> {
    match (&rule.lock, lock_state(rule, now)) {
        (Some(l), LockState::Locked) => Ok(BinRuleRecord {
            lock: Some(RuleLock {
                unlock_delay: l.unlock_delay,
                unlock_at: Some(now.saturating_add(l.unlock_delay)),
            }),
            ..rule.clone()
        }),
        (_, state) => Err(LockRefusal::State(format!(
            "rule {} is {}, not locked",
            rule.id,
            state.as_str()
        ))),
    }
}

/// Whether `old` may become `new` (`None`: be deleted) at `now`.
pub fn check_change(
    old: &BinRuleRecord,
    new: Option<&BinRuleRecord>,
    now: u64,
) -> Result<(), LockRefusal> {
    let state = lock_state(old, now);
    if !state.holds() {
        return Ok(());
    }
    let why = match new {
        None => Some("deleted"),
        Some(n) if n.spec.retention < old.spec.retention => Some("given a shorter retention"),
        Some(n)
            if n.spec.tags != old.spec.tags
                || n.spec.exclude_tags != old.spec.exclude_tags
                || n.spec.resource != old.spec.resource =>
        {
            Some("made to match other resources")
        }
        Some(_) => None,
    };
    match why {
        None => Ok(()),
        Some(what) => Err(LockRefusal::State(format!(
            "rule {} is {}: it cannot be {what}{}",
            old.id,
            state.as_str(),
            match state {
                LockState::PendingUnlock(t) => format!(" until {}", crate::catalog::rfc3339(t)),
                _ => " until it is unlocked and its unlock delay has passed".into(),
            }
        ))),
    }
}

/// Why a lock, an unlock or a change of a locked rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockRefusal {
    /// The request itself is wrong (rbin's ValidationException).
    #[error("{0}")]
    Invalid(String),
    /// The rule's lock state forbids it (rbin's ConflictException).
    #[error("{0}")]
    State(String),
}

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
            lock: None,
        }
    }

    #[test]
    fn a_locked_rule_keeps_its_reach_until_its_unlock_delay_passes() {
        let day = 86400;
        let open = rule(BinResource::Snapshot, 7 * day, &[], &[]);
        assert_eq!(lock_state(&open, 0), LockState::Unlocked);
        assert!(matches!(lock(&open, 6, 0), Err(LockRefusal::Invalid(_))));
        let tagged = rule(BinResource::Snapshot, day, &["a=b"], &[]);
        assert!(matches!(lock(&tagged, 7, 0), Err(LockRefusal::Invalid(_))));
        let excluding = rule(BinResource::Snapshot, day, &[], &["a"]);
        assert!(matches!(
            lock(&excluding, 7, 0),
            Err(LockRefusal::Invalid(_))
        ));

        let locked = lock(&open, 7, 100).unwrap();
        assert_eq!(lock_state(&locked, 100), LockState::Locked);
        assert!(matches!(lock(&locked, 7, 100), Err(LockRefusal::State(_))));
        let shorter = BinRuleRecord {
            spec: BinRuleSpec {
                retention: day,
                ..locked.spec.clone()
            },
            ..locked.clone()
        };
        let longer = BinRuleRecord {
            spec: BinRuleSpec {
                retention: 30 * day,
                description: "kept longer".into(),
                ..locked.spec.clone()
            },
            ..locked.clone()
        };
        let narrower = BinRuleRecord {
            spec: BinRuleSpec {
                exclude_tags: vec![TagMatch::parse_select("tag:x").unwrap()],
                ..locked.spec.clone()
            },
            ..locked.clone()
        };
        assert!(check_change(&locked, None, 100).is_err());
        assert!(check_change(&locked, Some(&shorter), 100).is_err());
        assert!(check_change(&locked, Some(&narrower), 100).is_err());
        assert!(check_change(&locked, Some(&longer), 100).is_ok());
        assert!(check_change(&open, None, 100).is_ok());

        // Unlocked: held for the delay, then free; locking again is allowed.
        assert!(matches!(unlock(&open, 100), Err(LockRefusal::State(_))));
        let unlocking = unlock(&locked, 1000).unwrap();
        let end = 1000 + 7 * day;
        assert_eq!(lock_state(&unlocking, 1000), LockState::PendingUnlock(end));
        assert!(matches!(
            unlock(&unlocking, 1000),
            Err(LockRefusal::State(_))
        ));
        let err = check_change(&unlocking, None, end - 1).unwrap_err();
        assert!(err.to_string().contains("pending_unlock"), "{err}");
        assert_eq!(lock_state(&unlocking, end), LockState::Unlocked);
        assert!(check_change(&unlocking, None, end).is_ok());
        assert!(check_change(&unlocking, Some(&shorter), end).is_ok());
        let again = lock(&unlocking, 30, 1001).unwrap();
        assert_eq!(lock_state(&again, end + 1), LockState::Locked);
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
