//! The one scheduler of a host: a loop that sleeps until the next slot of
//! any enabled policy's schedule, runs what is due, and records it.
//!
//! A schedule's run record keeps the last slot it ran for. When the loop
//! finds that the latest slot is past that, it runs once for the latest
//! slot, whatever came between: a daemon stopped across several slots
//! runs once at start (trigger `catch-up`, `missed` counting the others),
//! not once per slot. A failed run is recorded and counted, and the next
//! slot runs again as usual.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use volumed_api::RunTrigger;

use super::Lifecycle;
use super::policy;

/// The longest the loop sleeps without looking again (a changed clock, a
/// catalog the loop could not read).
const MAX_SLEEP: Duration = Duration::from_secs(60);

pub fn spawn(lc: Arc<Lifecycle>, cancel: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let wait = match tick(&lc, &cancel).await {
                Ok(w) => w,
                Err(e) => {
                    warn!(error = %e, "policy scheduler");
                    MAX_SLEEP
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = lc.changed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    })
}

/// Runs every schedule whose slot has come; returns how long to sleep.
async fn tick(lc: &Lifecycle, cancel: &CancellationToken) -> super::Result<Duration> {
    let mut next_due: Option<i64> = None;
    for rec in lc.catalog.policies()? {
        if !rec.spec.enabled {
            continue;
        }
        for s in &rec.spec.schedules {
            if cancel.is_cancelled() {
                return Ok(Duration::ZERO);
            }
            let Ok(sched) = policy::schedule_of(s) else {
                continue;
            };
            let now = Lifecycle::now();
            let run = lc.catalog.schedule_run(&rec.spec.name, &s.name)?;
            let Some(slot) = sched.slot_at_or_before(now) else {
                continue;
            };
            let last = run.last_slot.and_then(|l| i64::try_from(l).ok());
            if last.is_none_or(|l| slot > l) {
                let between = last.map_or(0, |l| sched.slots_between(l, slot, u64::MAX));
                let missed = between.saturating_sub(1);
                let trigger = if missed > 0 {
                    RunTrigger::CatchUp
                } else {
                    RunTrigger::Schedule
                };
                let slot = u64::try_from(slot).ok();
                let r = lc.run_schedule(&rec, s, slot, trigger, missed).await;
                lc.record_run(&rec, s, slot, &r).await?;
            }
            let now = Lifecycle::now();
            if let Some(n) = sched.next_after(now) {
                next_due = Some(next_due.map_or(n, |d| d.min(n)));
            }
        }
    }
    let now = Lifecycle::now();
    Ok(next_due.map_or(MAX_SLEEP, |d| {
        Duration::from_secs(u64::try_from(d - now).unwrap_or(0)).min(MAX_SLEEP)
    }))
}
