//! Per-policy metrics, read from the lifecycle layer's run records at each
//! scrape: runs, failures, snapshots created and pruned, the last
//! successful run, and whether the last run failed.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;

use super::collector::{Labels, counter, gauge};
use crate::lifecycle::{Lifecycle, ScheduleRunRecord};

pub(super) struct PolicyCollector {
    pub(super) lifecycle: Arc<Lifecycle>,
}

impl std::fmt::Debug for PolicyCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PolicyCollector")
    }
}

impl Collector for PolicyCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        // A catalog that cannot be read shows no policies this scrape; the
        // scheduler logs the failure.
        let rows = self.lifecycle.schedule_runs().unwrap_or_default();
        fn l<'a>(p: &'a str, s: &'a str) -> Labels<'a> {
            vec![("policy", p), ("schedule", s)]
        }
        let c = |f: fn(&ScheduleRunRecord) -> u64| -> Vec<(Labels<'_>, u64)> {
            rows.iter().map(|(p, s, st)| (l(p, s), f(st))).collect()
        };
        counter(
            &mut enc,
            "volumed_policy_runs",
            "Runs of a policy's schedule on this host",
            None,
            &c(|s| s.runs),
        )?;
        counter(
            &mut enc,
            "volumed_policy_failures",
            "Runs that failed",
            None,
            &c(|s| s.failures),
        )?;
        counter(
            &mut enc,
            "volumed_policy_snapshots_created",
            "Snapshots a policy's runs took",
            None,
            &c(|s| s.created),
        )?;
        counter(
            &mut enc,
            "volumed_policy_snapshots_pruned",
            "Snapshots this host's prunes of a policy deleted",
            None,
            &c(|s| s.pruned),
        )?;
        let last: Vec<(Labels<'_>, i64)> = rows
            .iter()
            .map(|(p, s, st)| {
                let t = st.last_success_at.and_then(|t| i64::try_from(t).ok());
                (l(p, s), t.unwrap_or(0))
            })
            .collect();
        gauge(
            &mut enc,
            "volumed_policy_last_success_timestamp",
            "When the last successful run ended (0: never)",
            Some(&Unit::Seconds),
            &last,
        )?;
        let failing: Vec<(Labels<'_>, i64)> = rows
            .iter()
            .map(|(p, s, st)| (l(p, s), i64::from(st.last.as_ref().is_some_and(|r| !r.ok))))
            .collect();
        gauge(
            &mut enc,
            "volumed_policy_last_run_failed",
            "1 while the last run of the schedule failed",
            None,
            &failing,
        )?;
        Ok(())
    }
}
