//! Snapshot lifecycles: policies (schedules and retention), prune plans,
//! recycle-bin rules and entries. A [`PolicySpec`] is both the body of
//! `POST /v1/policies` and what the catalog keeps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Retention: PBS's keep options, plus `keep_within`. Every count is
/// optional; a policy with none of them keeps everything it made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
    /// Seconds: every snapshot younger than this is kept as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<u64>,
}

impl Retention {
    /// Whether any option is set: without one, nothing is pruned.
    pub fn keeps_something(&self) -> bool {
        self.keep_last.is_some()
            || self.keep_hourly.is_some()
            || self.keep_daily.is_some()
            || self.keep_weekly.is_some()
            || self.keep_monthly.is_some()
            || self.keep_yearly.is_some()
            || self.keep_within.is_some()
    }
}

/// A tag a target or rule matches: `key=value`, or any value when `value`
/// is absent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagMatch {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl TagMatch {
    pub fn matches(&self, tags: &BTreeMap<String, String>) -> bool {
        tags.get(&self.key)
            .is_some_and(|v| self.value.as_ref().is_none_or(|want| want == v))
    }

    /// `tag:K=V` or `tag:K` as `--select` takes it.
    pub fn parse_select(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("tag:")
            .ok_or_else(|| format!("selector {s:?}: expected tag:KEY=VALUE or tag:KEY"))?;
        let (key, value) = match rest.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => (rest, None),
        };
        if key.is_empty() {
            return Err(format!("selector {s:?}: the tag key is empty"));
        }
        Ok(TagMatch {
            key: key.to_owned(),
            value,
        })
    }
}

impl std::fmt::Display for TagMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.value {
            Some(v) => write!(f, "tag:{}={v}", self.key),
            None => write!(f, "tag:{}", self.key),
        }
    }
}

/// What a policy snapshots: volumes carrying any of `tags`, the volumes
/// named, or the volumes attached to an instance. Exactly one is given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTarget {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<TagMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// When a schedule runs: every `every` seconds (slots aligned to the
/// epoch, moved by `offset`), or at the times of a cron expression (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<u64>,
    /// Seconds added to every slot of `every` (DLM's `Times`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    #[serde(default)]
    pub retain: Retention,
    /// Labels added to every snapshot the schedule takes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Copy the volume's tags onto its snapshots.
    #[serde(default)]
    pub copy_tags: bool,
}

/// A snapshot policy as created and as kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    pub target: PolicyTarget,
    pub schedules: Vec<ScheduleSpec>,
}

fn yes() -> bool {
    true
}

/// How a run was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunTrigger {
    /// Its slot came.
    Schedule,
    /// At start, for slots missed while the daemon was down (once).
    CatchUp,
    /// `vol policy run-now`.
    RunNow,
}

impl RunTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            RunTrigger::Schedule => "schedule",
            RunTrigger::CatchUp => "catch-up",
            RunTrigger::RunNow => "run-now",
        }
    }
}

/// What one run of a schedule did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    /// RFC 3339, UTC.
    pub started_at: String,
    pub finished_at: String,
    pub trigger: RunTrigger,
    /// Slots this run stood for beyond its own (a catch-up after the
    /// daemon was down).
    #[serde(default)]
    pub missed: u64,
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub created: Vec<String>,
    #[serde(default)]
    pub pruned: Vec<String>,
    /// `done`; `claimed by HOST` (another host pruned this slot);
    /// `skipped: REASON`.
    pub prune: String,
}

/// One schedule of a policy with its state on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleStatus {
    pub name: String,
    /// RFC 3339, UTC; null while the policy is disabled.
    pub next_run: Option<String>,
    pub last_run: Option<RunResult>,
    pub last_success: Option<String>,
    pub runs: u64,
    pub failures: u64,
    pub snapshots_created: u64,
    pub snapshots_pruned: u64,
    /// Prunes this host did, and slots whose prune another host claimed.
    pub prunes: u64,
    pub prunes_claimed_elsewhere: u64,
}

/// A policy as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(flatten)]
    pub spec: PolicySpec,
    /// `native` (vol, the control API) or `dlm` (the DLM API).
    pub source: String,
    pub created_at: String,
    pub updated_at: String,
    /// The volumes of this host it targets now.
    pub volumes_now: Vec<String>,
    pub status: Vec<ScheduleStatus>,
    /// Whether the last run of any schedule failed.
    pub failing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyList {
    pub policies: Vec<Policy>,
}

/// `POST /v1/prune`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// Every enabled policy when absent.
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// Why prune keeps a snapshot or not (PBS's marks, and ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PruneMark {
    Protected,
    KeepLast,
    KeepHourly,
    KeepDaily,
    KeepWeekly,
    KeepMonthly,
    KeepYearly,
    KeepWithin,
    /// No keep option is set: the policy keeps everything it made.
    KeepAll,
    Remove,
}

impl PruneMark {
    pub fn keep(self) -> bool {
        self != PruneMark::Remove
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PruneMark::Protected => "protected",
            PruneMark::KeepLast => "keep-last",
            PruneMark::KeepHourly => "keep-hourly",
            PruneMark::KeepDaily => "keep-daily",
            PruneMark::KeepWeekly => "keep-weekly",
            PruneMark::KeepMonthly => "keep-monthly",
            PruneMark::KeepYearly => "keep-yearly",
            PruneMark::KeepWithin => "keep-within",
            PruneMark::KeepAll => "keep-all",
            PruneMark::Remove => "remove",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneDecision {
    pub snapshot: String,
    /// The group it was judged in: the source volume's id.
    pub volume: String,
    pub created_at: String,
    pub mark: PruneMark,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulePrune {
    pub policy: String,
    pub schedule: String,
    /// Newest first within each volume.
    pub decisions: Vec<PruneDecision>,
    /// What was deleted (or, in a dry run, would be).
    pub removed: Vec<String>,
    /// Deletions that failed, with why.
    #[serde(default)]
    pub failed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub schedules: Vec<SchedulePrune>,
}

/// `POST /v1/snapshots/{id}/protect` and `.../unprotect` answer with this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protection {
    pub id: String,
    pub protected: bool,
}

/// What a recycle-bin rule retains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BinResource {
    Snapshot,
    Image,
}

impl BinResource {
    pub fn as_str(self) -> &'static str {
        match self {
            BinResource::Snapshot => "snapshot",
            BinResource::Image => "image",
        }
    }
}

/// A recycle-bin rule as created and kept: deleted resources of its kind
/// that carry any of `tags` (or, with no tags, every one without any of
/// `exclude_tags`) are kept `retention` seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinRuleSpec {
    pub resource: BinResource,
    pub retention: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<TagMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_tags: Vec<TagMatch>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinRule {
    pub id: String,
    #[serde(flatten)]
    pub spec: BinRuleSpec,
    pub created_at: String,
    /// `locked`, `pending_unlock` or `unlocked`; absent if never locked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_state: Option<String>,
}

/// `POST /v1/bin/rules/{id}/lock`: lock a rule with an unlock delay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockBinRule {
    /// Days (7 to 30) the rule stays held after an unlock.
    pub unlock_delay_days: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinRuleList {
    pub rules: Vec<BinRule>,
}

/// A snapshot in the recycle bin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinEntry {
    pub id: String,
    pub resource: BinResource,
    /// `recoverable`.
    pub state: String,
    pub volume: String,
    pub size: u64,
    pub created_at: String,
    /// When it was deleted into the bin, and until when it can be restored.
    pub entered_at: String,
    pub expires_at: String,
    /// A snapshot's labels, an image's tags.
    pub labels: BTreeMap<String, String>,
    /// An image's name (a snapshot has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinList {
    pub entries: Vec<BinEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_and_match() {
        let m = TagMatch::parse_select("tag:backup=daily").unwrap();
        assert_eq!(m.to_string(), "tag:backup=daily");
        let tags: BTreeMap<_, _> = [("backup".to_owned(), "daily".to_owned())].into();
        assert!(m.matches(&tags));
        let any = TagMatch::parse_select("tag:backup").unwrap();
        assert!(any.matches(&tags));
        assert!(!TagMatch::parse_select("tag:other").unwrap().matches(&tags));
        assert!(
            !TagMatch::parse_select("tag:backup=weekly")
                .unwrap()
                .matches(&tags)
        );
        assert!(TagMatch::parse_select("backup=daily").is_err());
        assert!(TagMatch::parse_select("tag:=x").is_err());
    }

    #[test]
    fn a_policy_round_trips_and_refuses_unknown_fields() {
        let p = PolicySpec {
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
                tags: BTreeMap::new(),
                copy_tags: false,
            }],
        };
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<PolicySpec>(&j).unwrap(), p);
        assert!(serde_json::from_str::<Retention>(r#"{"keep_lats":1}"#).is_err());
        assert!(p.schedules[0].retain.keeps_something());
        assert!(!Retention::default().keeps_something());
    }
}
