//! The lifecycle layer's trees: snapshot policies, what their schedules
//! last did on this host, and recycle-bin rules. `lifecycle/` is their one
//! writer; it gets them from the engine as [`LifecycleTrees`].
//!
//! - `policies`: policy name -> [`PolicyRecord`]
//! - `policy_runs`: `<policy>\0<schedule>` -> [`ScheduleRunRecord`]
//! - `bin_rules`: rule id -> [`BinRuleRecord`]
//!
//! Every change is flushed before it returns, like every other tree.

use serde::{Deserialize, Serialize};
use volumed_api::{BinRuleSpec, PolicySpec, RunResult};

use super::{Catalog, CatalogError, Result, sled_err};

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
}

/// The three trees, without the rest of the catalog.
pub struct LifecycleTrees {
    db: sled::Db,
    policies: sled::Tree,
    runs: sled::Tree,
    rules: sled::Tree,
}

impl Catalog {
    pub fn lifecycle_trees(&self) -> Result<LifecycleTrees> {
        Ok(LifecycleTrees {
            db: self.db.clone(),
            policies: self
                .db
                .open_tree("policies")
                .map_err(sled_err("open tree policies"))?,
            runs: self
                .db
                .open_tree("policy_runs")
                .map_err(sled_err("open tree policy_runs"))?,
            rules: self
                .db
                .open_tree("bin_rules")
                .map_err(sled_err("open tree bin_rules"))?,
        })
    }
}

fn run_key(policy: &str, schedule: &str) -> String {
    format!("{policy}\0{schedule}")
}

fn scan<T: serde::de::DeserializeOwned>(tree: &sled::Tree, op: &'static str) -> Result<Vec<T>> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv.map_err(sled_err(op))?;
            serde_json::from_slice(&v).map_err(|source| CatalogError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                source,
            })
        })
        .collect()
}

impl LifecycleTrees {
    fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(sled_err("flush"))
    }

    /// Every policy, by name.
    pub fn policies(&self) -> Result<Vec<PolicyRecord>> {
        scan(&self.policies, "scan policies")
    }

    pub fn put_policy(&self, rec: &PolicyRecord) -> Result<()> {
        let value = serde_json::to_vec(rec).expect("a PolicyRecord always serializes");
        self.policies
            .insert(rec.spec.name.as_str(), value)
            .map_err(sled_err("write policy"))?;
        self.flush()
    }

    /// Removes a policy and the run records of its schedules.
    pub fn remove_policy(&self, name: &str) -> Result<()> {
        self.policies
            .remove(name)
            .map_err(sled_err("remove policy"))?;
        let prefix = format!("{name}\0");
        for kv in self.runs.scan_prefix(prefix.as_bytes()) {
            let (k, _) = kv.map_err(sled_err("scan policy runs"))?;
            self.runs.remove(k).map_err(sled_err("remove policy run"))?;
        }
        self.flush()
    }

    pub fn schedule_run(&self, policy: &str, schedule: &str) -> Result<ScheduleRunRecord> {
        let key = run_key(policy, schedule);
        match self.runs.get(&key).map_err(sled_err("read policy run"))? {
            None => Ok(ScheduleRunRecord::default()),
            Some(v) => serde_json::from_slice(&v).map_err(|source| CatalogError::Corrupt {
                key: key.replace('\0', "/"),
                source,
            }),
        }
    }

    pub fn put_schedule_run(
        &self,
        policy: &str,
        schedule: &str,
        rec: &ScheduleRunRecord,
    ) -> Result<()> {
        let value = serde_json::to_vec(rec).expect("a ScheduleRunRecord always serializes");
        self.runs
            .insert(run_key(policy, schedule), value)
            .map_err(sled_err("write policy run"))?;
        self.flush()
    }

    pub fn bin_rules(&self) -> Result<Vec<BinRuleRecord>> {
        scan(&self.rules, "scan bin rules")
    }

    pub fn put_bin_rule(&self, rec: &BinRuleRecord) -> Result<()> {
        let value = serde_json::to_vec(rec).expect("a BinRuleRecord always serializes");
        self.rules
            .insert(rec.id.as_str(), value)
            .map_err(sled_err("write bin rule"))?;
        self.flush()
    }

    pub fn remove_bin_rule(&self, id: &str) -> Result<()> {
        self.rules.remove(id).map_err(sled_err("remove bin rule"))?;
        self.flush()
    }
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
    fn policies_runs_and_rules_survive_reopen_and_go_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        {
            let t = Catalog::open(&path).unwrap().lifecycle_trees().unwrap();
            t.put_policy(&policy("a")).unwrap();
            t.put_policy(&policy("ab")).unwrap();
            let run = ScheduleRunRecord {
                last_slot: Some(120),
                runs: 2,
                ..Default::default()
            };
            t.put_schedule_run("a", "default", &run).unwrap();
            t.put_schedule_run("ab", "default", &run).unwrap();
            t.put_bin_rule(&BinRuleRecord {
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
            .unwrap();
        }
        let t = Catalog::open(&path).unwrap().lifecycle_trees().unwrap();
        assert_eq!(t.policies().unwrap().len(), 2);
        assert_eq!(t.schedule_run("a", "default").unwrap().runs, 2);
        t.remove_policy("a").unwrap();
        assert_eq!(t.policies().unwrap(), vec![policy("ab")]);
        assert_eq!(
            t.schedule_run("a", "default").unwrap(),
            ScheduleRunRecord::default()
        );
        assert_eq!(
            t.schedule_run("ab", "default").unwrap().last_slot,
            Some(120),
            "a policy whose name extends another's keeps its runs"
        );
        assert_eq!(t.bin_rules().unwrap().len(), 1);
        t.remove_bin_rule("r1").unwrap();
        assert!(t.bin_rules().unwrap().is_empty());
    }
}
