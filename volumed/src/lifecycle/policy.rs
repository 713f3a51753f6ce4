//! A snapshot policy's rules: what a valid policy is, which volumes of
//! this host it targets, and the labels its snapshots carry.
//!
//! A policy's snapshots are found again by their labels, never by this
//! host's memory: `volumed:policy` and `volumed:schedule` name what made
//! them, `volumed:volume-id` the volume (an id, unique across hosts, so two
//! hosts' volumes of one name are two groups). Retention only ever looks
//! at snapshots with the first two, so a manual snapshot of the same
//! volume is never pruned. A policy name is store-wide: hosts sharing a
//! store that define a policy of the same name prune each other's
//! snapshots of it, and should define it alike.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use volumed_api::{PolicySpec, PolicyTarget, ScheduleSpec, VolumeName};

use super::schedule::Schedule;
use crate::engine::{Engine, Volume};

/// The policy that made a snapshot.
pub const POLICY_LABEL: &str = "volumed:policy";
/// The schedule of that policy.
pub const SCHEDULE_LABEL: &str = "volumed:schedule";
/// The EC2-style id of the volume it was taken of: prune's group.
pub const VOLUME_LABEL: &str = "volumed:volume-id";
/// The instance the volume was attached to, for instance targets.
pub const INSTANCE_LABEL: &str = "volumed:instance";
/// What DLM adds to the snapshots of its policies (AWS's own tags).
pub const DLM_POLICY_TAG: &str = "aws:dlm:lifecycle-policy-id";
pub const DLM_SCHEDULE_TAG: &str = "aws:dlm:lifecycle-schedule-name";
pub const DLM_MANAGED_TAG: &str = "dlm:managed";

/// A policy's snapshot labels beyond these would pass the label limit.
const MAX_SCHEDULES: usize = 4;
const MAX_KEEP: u32 = 1000;
/// How many coming slots of a cron schedule are held to the minimum.
const GAP_SAMPLES: usize = 200;

/// Where a policy came from: its name rules and labels differ a little.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Native,
    Dlm,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Native => "native",
            Source::Dlm => "dlm",
        }
    }

    pub fn parse(s: &str) -> Source {
        if s == "dlm" {
            Source::Dlm
        } else {
            Source::Native
        }
    }
}

/// A schedule's slots, from its spec.
pub fn schedule_of(s: &ScheduleSpec) -> Result<Schedule, String> {
    match (s.every, &s.cron) {
        (Some(every), None) => Schedule::every(every, s.offset.unwrap_or(0)),
        (None, Some(cron)) if s.offset.is_none() => Schedule::cron(cron),
        (None, Some(_)) => Err(format!(
            "schedule '{}': an offset goes with an interval, not a cron expression",
            s.name
        )),
        _ => Err(format!(
            "schedule '{}': give exactly one of an interval (--every) or a cron expression (--schedule)",
            s.name
        )),
    }
}

fn printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// Checks a policy and returns its schedules' slots. `min_interval` is the
/// shortest time between two runs allowed (seconds); `now` places the cron
/// samples.
pub fn validate(p: &PolicySpec, min_interval: u64, now: i64) -> Result<Vec<Schedule>, String> {
    VolumeName::parse(&p.name).map_err(|e| format!("invalid policy name {:?}: {e}", p.name))?;
    if p.description.chars().count() > 500 || !printable(&p.description) {
        return Err("a description is at most 500 printable characters".into());
    }
    validate_target(&p.target)?;
    if p.schedules.is_empty() || p.schedules.len() > MAX_SCHEDULES {
        return Err(format!(
            "a policy has 1 to {MAX_SCHEDULES} schedules, not {}",
            p.schedules.len()
        ));
    }
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    for s in &p.schedules {
        let name_ok = (1..=120).contains(&s.name.len())
            && s.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b' ' | b'_' | b'-'));
        if !name_ok {
            return Err(format!(
                "schedule name {:?}: 1 to 120 of A-Z a-z 0-9 space _ -",
                s.name
            ));
        }
        if !names.insert(&s.name) {
            return Err(format!("two schedules are named '{}'", s.name));
        }
        let sched = schedule_of(s)?;
        let gap = sched.min_gap(now, GAP_SAMPLES).unwrap_or(u64::MAX);
        if gap < min_interval {
            return Err(format!(
                "schedule '{}' runs every {}; the minimum is {}",
                s.name,
                humantime::format_duration(std::time::Duration::from_secs(gap)),
                humantime::format_duration(std::time::Duration::from_secs(min_interval))
            ));
        }
        let r = &s.retain;
        for (opt, v) in [
            ("keep-last", r.keep_last),
            ("keep-hourly", r.keep_hourly),
            ("keep-daily", r.keep_daily),
            ("keep-weekly", r.keep_weekly),
            ("keep-monthly", r.keep_monthly),
            ("keep-yearly", r.keep_yearly),
        ] {
            if v.is_some_and(|n| n > MAX_KEEP) {
                return Err(format!("{opt} is at most {MAX_KEEP}"));
            }
        }
        if r.keep_within == Some(0) {
            return Err("keep-within must be longer than 0s".into());
        }
        for k in s.tags.keys() {
            if reserved(k) {
                return Err(format!(
                    "tag {k:?}: keys starting with volumed:, aws: or dlm: are set by volumed"
                ));
            }
        }
        let mut labels = s.tags.clone();
        labels.insert(POLICY_LABEL.into(), p.name.clone());
        labels.insert(SCHEDULE_LABEL.into(), s.name.clone());
        labels.insert(VOLUME_LABEL.into(), "vol-0".into());
        crate::engine::validate::labels(&labels).map_err(|e| e.to_string())?;
        out.push(sched);
    }
    Ok(out)
}

fn validate_target(t: &PolicyTarget) -> Result<(), String> {
    let given = usize::from(!t.tags.is_empty())
        + usize::from(!t.volumes.is_empty())
        + usize::from(t.instance.is_some());
    if given != 1 {
        return Err(
            "give exactly one target: --select tag:K=V, --volume NAME or --instance ID".into(),
        );
    }
    for m in &t.tags {
        if m.key.is_empty() || m.key.len() > 128 || !printable(&m.key) {
            return Err(format!(
                "target tag {:?}: keys are 1 to 128 printable characters",
                m.key
            ));
        }
    }
    for v in &t.volumes {
        VolumeName::parse(v).map_err(|e| format!("invalid volume name {v:?}: {e}"))?;
    }
    if let Some(i) = &t.instance {
        crate::engine::validate::instance(i).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Keys volumed sets itself, which a policy may not set.
pub fn reserved(key: &str) -> bool {
    ["volumed:", "aws:", "dlm:"]
        .iter()
        .any(|p| key.starts_with(p))
}

/// The volumes of this host the target names now, by name. Volumes being
/// imported are left out (they take no snapshot until ready).
pub fn targets(engine: &Engine, t: &PolicyTarget) -> Vec<Arc<Volume>> {
    let mut vols: Vec<Arc<Volume>> = engine
        .list()
        .into_iter()
        .filter(|v| {
            let rec = v.record();
            if rec.importing.is_some() || rec.deleting {
                return false;
            }
            if !t.tags.is_empty() {
                return t.tags.iter().any(|m| m.matches(&rec.tags));
            }
            if !t.volumes.is_empty() {
                return t.volumes.iter().any(|n| n == rec.name.as_str());
            }
            let attached_to = rec.attachment.as_ref().and_then(|a| a.instance.as_deref());
            t.instance.is_some() && attached_to == t.instance.as_deref()
        })
        .collect();
    vols.sort_by(|a, b| a.name.cmp(&b.name));
    vols
}

/// The labels of the snapshot schedule `s` of policy `p` takes of `vol`.
/// Copied volume tags that are not valid labels are left out.
pub fn labels(
    engine: &Engine,
    p: &PolicySpec,
    source: Source,
    s: &ScheduleSpec,
    vol: &Volume,
) -> BTreeMap<String, String> {
    let rec = vol.record();
    let mut out = BTreeMap::new();
    if s.copy_tags {
        for (k, v) in &rec.tags {
            let one: BTreeMap<String, String> = [(k.clone(), v.clone())].into();
            if !reserved(k) && crate::engine::validate::labels(&one).is_ok() {
                out.insert(k.clone(), v.clone());
            } else {
                tracing::debug!(volume = %rec.name, tag = %k, "volume tag not copied: not a valid snapshot label");
            }
        }
    }
    out.extend(s.tags.clone());
    out.insert(POLICY_LABEL.into(), p.name.clone());
    out.insert(SCHEDULE_LABEL.into(), s.name.clone());
    out.insert(VOLUME_LABEL.into(), engine.volume_id(&rec));
    if let Some(i) = &p.target.instance {
        out.insert(INSTANCE_LABEL.into(), i.clone());
    }
    if source == Source::Dlm {
        out.insert(DLM_POLICY_TAG.into(), p.name.clone());
        out.insert(DLM_SCHEDULE_TAG.into(), s.name.clone());
        out.insert(DLM_MANAGED_TAG.into(), "true".into());
    }
    // Copied tags go first when the label limit is near.
    while out.len() > 50 {
        let Some(k) = out
            .keys()
            .find(|k| !reserved(k) && !s.tags.contains_key(*k))
            .cloned()
        else {
            break;
        };
        out.remove(&k);
    }
    out
}

/// Whether a snapshot with `labels` was made by schedule `s` of policy `p`.
pub fn made_by(labels: &BTreeMap<String, String>, policy: &str, schedule: &str) -> bool {
    labels.get(POLICY_LABEL).is_some_and(|p| p == policy)
        && labels.get(SCHEDULE_LABEL).is_some_and(|s| s == schedule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use volumed_api::{Retention, TagMatch};

    fn spec() -> PolicySpec {
        PolicySpec {
            name: "daily".into(),
            description: String::new(),
            enabled: true,
            target: PolicyTarget {
                tags: vec![TagMatch::parse_select("tag:backup=daily").unwrap()],
                ..Default::default()
            },
            schedules: vec![ScheduleSpec {
                name: "default".into(),
                every: Some(3600),
                offset: None,
                cron: None,
                retain: Retention {
                    keep_last: Some(3),
                    ..Default::default()
                },
                tags: [("team".to_owned(), "db".to_owned())].into(),
                copy_tags: false,
            }],
        }
    }

    #[test]
    fn valid_policies_and_one_line_refusals() {
        let now = 1_765_000_000;
        assert_eq!(validate(&spec(), 60, now).unwrap().len(), 1);
        let refuse = |f: fn(&mut PolicySpec), want: &str| {
            let mut p = spec();
            f(&mut p);
            let e = validate(&p, 60, now).unwrap_err();
            assert!(e.contains(want) && !e.contains('\n'), "{e}");
        };
        refuse(|p| p.name = "bad name".into(), "invalid policy name");
        refuse(
            |p| p.target.volumes = vec!["a".into()],
            "exactly one target",
        );
        refuse(|p| p.target = PolicyTarget::default(), "exactly one target");
        refuse(|p| p.schedules.clear(), "1 to 4 schedules");
        refuse(|p| p.schedules[0].every = Some(30), "the minimum is 1m");
        refuse(
            |p| p.schedules[0].cron = Some("0 * * * *".into()),
            "exactly one of",
        );
        refuse(
            |p| p.schedules[0].retain.keep_last = Some(1001),
            "at most 1000",
        );
        refuse(
            |p| p.schedules[0].retain.keep_within = Some(0),
            "keep-within",
        );
        refuse(
            |p| {
                p.schedules[0]
                    .tags
                    .insert("volumed:policy".into(), "x".into());
            },
            "set by volumed",
        );
        refuse(
            |p| {
                let s = p.schedules[0].clone();
                p.schedules.push(s);
            },
            "two schedules",
        );
        refuse(
            |p| {
                p.schedules[0].tags.insert("bad key".into(), "v".into());
            },
            "invalid label",
        );
        // Test-only floors allow seconds.
        let mut p = spec();
        p.schedules[0].every = Some(2);
        assert!(validate(&p, 1, now).is_ok());
        // A cron schedule is held to the minimum too.
        p.schedules[0].every = None;
        p.schedules[0].cron = Some("*/5 * * * *".into());
        assert!(
            validate(&p, 3600, now)
                .unwrap_err()
                .contains("runs every 5m")
        );
        assert!(validate(&p, 300, now).is_ok());
    }

    #[test]
    fn snapshots_are_found_by_their_labels() {
        let labels: BTreeMap<String, String> = [
            (POLICY_LABEL.to_owned(), "daily".to_owned()),
            (SCHEDULE_LABEL.to_owned(), "default".to_owned()),
        ]
        .into();
        assert!(made_by(&labels, "daily", "default"));
        assert!(!made_by(&labels, "daily", "other"));
        assert!(!made_by(&labels, "weekly", "default"));
        assert!(!made_by(&BTreeMap::new(), "daily", "default"));
        assert!(reserved("aws:dlm:lifecycle-policy-id") && reserved("volumed:x"));
        assert!(!reserved("backup"));
    }
}
