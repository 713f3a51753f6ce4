//! The lifecycle layer's trees: snapshot policies, what their schedules
//! last did on this host, and recycle-bin rules. `lifecycle/` is their one
//! writer.
//!
//! - `policies`: policy name -> [`PolicyRecord`]
//! - `policy_runs`: `<policy>\0<schedule>` -> [`ScheduleRunRecord`]
//! - `bin_rules`: rule id -> [`BinRuleRecord`]
//!
//! Every change goes through the catalog's writer, like every other tree's.

use serde::{Deserialize, Serialize};
use volumed_api::{BinRuleSpec, PolicySpec, RunResult};

use super::writer::{Pending, Tree};
use super::{Catalog, Result, decode, encode, get, scan, sled_err};

/// A policy as kept: its spec, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub spec: PolicySpec,
    /// `native` or `dlm`.
    pub source: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub updated_at: u64,
    /// What the DLM API was given (its `PolicyDetails`, `Description`,
    /// `State`, `ExecutionRoleArn`, `Tags`), answered back as given.
    #[serde(default)]
    pub dlm: Option<serde_json::Value>,
}

/// What one schedule of a policy has done on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRunRecord {
    /// The slot (seconds since the epoch) the last scheduled or catch-up
    /// run stood for: a slot at or before it is never run again.
    #[serde(default)]
    pub last_slot: Option<u64>,
    #[serde(default)]
    pub last: Option<RunResult>,
    /// Seconds since the epoch.
    #[serde(default)]
    pub last_success_at: Option<u64>,
    #[serde(default)]
    pub runs: u64,
    #[serde(default)]
    pub failures: u64,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub pruned: u64,
    #[serde(default)]
    pub prunes: u64,
    #[serde(default)]
    pub prunes_claimed_elsewhere: u64,
}

/// A recycle-bin rule as kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinRuleRecord {
    pub id: String,
    pub spec: BinRuleSpec,
    pub created_at: u64,
    /// The rule's own tags (rbin's `Tags`), not the ones it matches.
    #[serde(default)]
    pub rule_tags: std::collections::BTreeMap<String, String>,
    /// Set once the rule was locked (rbin's LockRule); never unset.
    #[serde(default)]
    pub lock: Option<RuleLock>,
}

/// A recycle-bin rule's lock: while locked, and for `unlock_delay` after
/// an unlock, the rule cannot be deleted, shortened or made to match less.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleLock {
    /// Seconds (AWS: 7 to 30 days).
    pub unlock_delay: u64,
    /// When an unlock takes effect (seconds since the epoch); `None` while
    /// locked.
    #[serde(default)]
    pub unlock_at: Option<u64>,
}

impl Catalog {
    /// Every policy, by name.
    pub fn policies(&self) -> Result<Vec<PolicyRecord>> {
        scan(&self.trees.policies, "scan policies")
    }

    pub fn policy(&self, name: &str) -> Result<Option<PolicyRecord>> {
        get(&self.trees.policies, name, "read policy")
    }

    pub fn put_policy(&self, rec: &PolicyRecord) -> Pending {
        self.put(Tree::Policies, rec.spec.name.as_str(), encode(rec))
    }

    /// Removes a policy's record; its schedules' run records go with
    /// [`Catalog::remove_schedule_run`].
    pub fn remove_policy(&self, name: &str) -> Pending {
        self.remove(Tree::Policies, name)
    }

    /// What schedule `schedule` of `policy` has done (nothing yet: the
    /// default).
    pub fn schedule_run(&self, policy: &str, schedule: &str) -> Result<ScheduleRunRecord> {
        let key = run_key(policy, schedule);
        match self
            .trees
            .policy_runs
            .get(&key)
            .map_err(sled_err("read policy run"))?
        {
            None => Ok(ScheduleRunRecord::default()),
            Some(v) => decode(key.replace('\0', "/").as_bytes(), &v),
        }
    }

    /// The names of the schedules of `policy` with a run record, whether
    /// or not the policy still has them.
    pub fn schedule_runs_of(&self, policy: &str) -> Result<Vec<String>> {
        let prefix = run_key(policy, "");
        self.trees
            .policy_runs
            .scan_prefix(prefix.as_bytes())
            .keys()
            .map(|k| {
                let k = k.map_err(sled_err("scan policy runs"))?;
                Ok(String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            })
            .collect()
    }

    pub fn put_schedule_run(
        &self,
        policy: &str,
        schedule: &str,
        rec: &ScheduleRunRecord,
    ) -> Pending {
        self.put(Tree::PolicyRuns, &run_key(policy, schedule), encode(rec))
    }

    pub fn remove_schedule_run(&self, policy: &str, schedule: &str) -> Pending {
        self.remove(Tree::PolicyRuns, &run_key(policy, schedule))
    }

    pub fn bin_rules(&self) -> Result<Vec<BinRuleRecord>> {
        scan(&self.trees.bin_rules, "scan bin rules")
    }

    pub fn put_bin_rule(&self, rec: &BinRuleRecord) -> Pending {
        self.put(Tree::BinRules, rec.id.as_str(), encode(rec))
    }

    pub fn remove_bin_rule(&self, id: &str) -> Pending {
        self.remove(Tree::BinRules, id)
    }
}

fn run_key(policy: &str, schedule: &str) -> String {
    format!("{policy}\0{schedule}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use volumed_api::{BinResource, PolicyTarget, Retention, ScheduleSpec};

    fn policy(name: &str) -> PolicyRecord {
        PolicyRecord {
            spec: PolicySpec {
                name: name.into(),
                description: String::new(),
                enabled: true,
                target: PolicyTarget {
                    volumes: vec!["a".into()],
                    ..Default::default()
                },
                schedules: vec![ScheduleSpec {
                    name: "default".into(),
                    every: Some(60),
                    offset: None,
                    cron: None,
                    retain: Retention::default(),
                    tags: Default::default(),
                    copy_tags: false,
                }],
            },
            source: "native".into(),
            created_at: 1,
            updated_at: 1,
            dlm: None,
        }
    }

    #[test]
    fn policies_runs_and_rules_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        {
            let c = Catalog::open(&path).unwrap();
            c.put_policy(&policy("a")).wait().unwrap();
            c.put_policy(&policy("ab")).wait().unwrap();
            let run = ScheduleRunRecord {
                last_slot: Some(120),
                runs: 2,
                ..Default::default()
            };
            c.put_schedule_run("a", "default", &run).wait().unwrap();
            c.put_schedule_run("ab", "default", &run).wait().unwrap();
            c.put_bin_rule(&BinRuleRecord {
                lock: None,
                id: "r1".into(),
                spec: BinRuleSpec {
                    resource: BinResource::Snapshot,
                    retention: 86400,
                    tags: vec![],
                    exclude_tags: vec![],
                    description: String::new(),
                },
                created_at: 5,
                rule_tags: Default::default(),
            })
            .wait()
            .unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.policies().unwrap().len(), 2);
        assert_eq!(c.policy("a").unwrap(), Some(policy("a")));
        assert_eq!(c.schedule_run("a", "default").unwrap().runs, 2);
        assert_eq!(
            c.schedule_runs_of("a").unwrap(),
            ["default"],
            "a policy whose name extends another's has runs of its own"
        );
        for s in c.schedule_runs_of("a").unwrap() {
            c.remove_schedule_run("a", &s).wait().unwrap();
        }
        c.remove_policy("a").wait().unwrap();
        assert_eq!(c.policies().unwrap(), vec![policy("ab")]);
        assert_eq!(
            c.schedule_run("a", "default").unwrap(),
            ScheduleRunRecord::default()
        );
        assert_eq!(
            c.schedule_run("ab", "default").unwrap().last_slot,
            Some(120)
        );
        assert_eq!(c.bin_rules().unwrap().len(), 1);
        c.remove_bin_rule("r1").wait().unwrap();
        assert!(c.bin_rules().unwrap().is_empty());
    }
}
