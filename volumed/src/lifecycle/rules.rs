//! Recycle-bin rules: created, changed within what their locks allow,
//! locked and unlocked, tagged, deleted. `Lifecycle` is the one writer of
//! the `bin_rules` tree; every read-modify-write here takes its turn.

use std::collections::BTreeMap;

use tracing::info;
use volumed_api::{BinRule, BinRuleSpec, validate_tags};

use super::bin::{self, LockRefusal};
use super::{Lifecycle, LifecycleError, Result};
use crate::catalog::{BinRuleRecord, rfc3339, unix_now};

impl From<LockRefusal> for LifecycleError {
    fn from(e: LockRefusal) -> Self {
        match e {
            LockRefusal::Invalid(m) => LifecycleError::Invalid(m),
            LockRefusal::State(m) => LifecycleError::RuleLocked(m),
        }
    }
}

/// AWS's limit on a rule's own tags.
const MAX_RULE_TAGS: usize = 200;

impl Lifecycle {
    /// Creates a rule; with `lock_days`, locked from the start with that
    /// unlock delay.
    pub async fn create_bin_rule(
        &self,
        spec: BinRuleSpec,
        rule_tags: BTreeMap<String, String>,
        lock_days: Option<u64>,
    ) -> Result<BinRule> {
        bin::validate(&spec).map_err(LifecycleError::Invalid)?;
        check_rule_tags(&rule_tags)?;
        let now = unix_now();
        let mut rec = BinRuleRecord {
            id: bin::new_rule_id(),
            spec,
            created_at: now,
            rule_tags,
            lock: None,
        };
        if let Some(days) = lock_days {
            rec = bin::lock(&rec, days, now)?;
        }
        self.catalog.put_bin_rule(&rec).await?;
        info!(rule = %rec.id, retention = rec.spec.retention, locked = rec.lock.is_some(), "recycle-bin rule created");
        Ok(rule_view(&rec))
    }

    pub fn bin_rule_records(&self) -> Result<Vec<BinRuleRecord>> {
        Ok(self.catalog.bin_rules()?)
    }

    pub fn bin_rule(&self, id: &str) -> Result<BinRuleRecord> {
        self.catalog
            .bin_rules()?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| LifecycleError::RuleNotFound(id.to_owned()))
    }

    /// Rule `id` as the control API shows it.
    pub fn bin_rule_view(&self, id: &str) -> Result<BinRule> {
        Ok(rule_view(&self.bin_rule(id)?))
    }

    pub fn bin_rules(&self) -> Result<Vec<BinRule>> {
        Ok(self.catalog.bin_rules()?.iter().map(rule_view).collect())
    }

    /// Changes rule `id` with `change`, within what its lock allows; the
    /// rule as written.
    pub async fn update_bin_rule(
        &self,
        id: &str,
        change: impl FnOnce(&mut BinRuleRecord),
    ) -> Result<BinRuleRecord> {
        let _turn = self.rule_writes.lock().await;
        let old = self.bin_rule(id)?;
        let mut new = old.clone();
        change(&mut new);
        new.id = old.id.clone();
        new.lock = old.lock.clone();
        bin::validate(&new.spec).map_err(LifecycleError::Invalid)?;
        check_rule_tags(&new.rule_tags)?;
        bin::check_change(&old, Some(&new), unix_now())?;
        self.catalog.put_bin_rule(&new).await?;
        Ok(new)
    }

    pub async fn delete_bin_rule(&self, id: &str) -> Result<()> {
        let _turn = self.rule_writes.lock().await;
        let old = self.bin_rule(id)?;
        bin::check_change(&old, None, unix_now())?;
        self.catalog.remove_bin_rule(id).await?;
        info!(rule = %id, "recycle-bin rule deleted");
        Ok(())
    }

    /// Locks rule `id` with an unlock delay of `days`.
    pub async fn lock_bin_rule(&self, id: &str, days: u64) -> Result<BinRuleRecord> {
        let _turn = self.rule_writes.lock().await;
        let rec = bin::lock(&self.bin_rule(id)?, days, unix_now())?;
        self.catalog.put_bin_rule(&rec).await?;
        info!(rule = %id, unlock_delay_days = days, "recycle-bin rule locked");
        Ok(rec)
    }

    /// Unlocks rule `id`: it stays held for its unlock delay.
    pub async fn unlock_bin_rule(&self, id: &str) -> Result<BinRuleRecord> {
        let _turn = self.rule_writes.lock().await;
        let rec = bin::unlock(&self.bin_rule(id)?, unix_now())?;
        self.catalog.put_bin_rule(&rec).await?;
        info!(rule = %id, "recycle-bin rule unlocked; held until its unlock delay passes");
        Ok(rec)
    }
}

fn check_rule_tags(tags: &BTreeMap<String, String>) -> Result<()> {
    if tags.len() > MAX_RULE_TAGS {
        return Err(LifecycleError::Invalid(format!(
            "a rule has at most {MAX_RULE_TAGS} tags, not {}",
            tags.len()
        )));
    }
    validate_tags(tags).map_err(|e| LifecycleError::Invalid(e.to_string()))
}

fn rule_view(r: &BinRuleRecord) -> BinRule {
    BinRule {
        id: r.id.clone(),
        spec: r.spec.clone(),
        created_at: rfc3339(r.created_at),
        lock_state: r
            .lock
            .as_ref()
            .map(|_| bin::lock_state(r, unix_now()).as_str().to_owned()),
    }
}
