//! Background hydration: a restored volume copies its snapshot's chunks in
//! from the store (through the host cache) until no chunk is `Base`, so it
//! stops depending on the store.
//!
//! - Bounded: [`HYDRATE_CONCURRENCY`] fetches at a time, one while clients
//!   have requests in progress on the volume, so client I/O comes first.
//! - Durable in batches: every [`PERSIST_EVERY`] chunks the volume is
//!   flushed, which syncs the data and then logs the chunks as no longer
//!   `Base`. The flush runs beside the fetches, never stalling them. A crash
//!   loses at most a few batches of fetches, never a byte.
//! - Resumes after a restart: the chunks still `Base` are exactly what is
//!   left to do.
//! - A chunk that cannot be fetched (store down, object damaged) is retried
//!   on the next pass; the state says `retrying` with the error meanwhile.
//! - Done: the store hold is released and the volume recorded `hydrated`.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Engine, Volume};
use crate::engine::volume::HydrationStatus;

const HYDRATE_CONCURRENCY: usize = 16;
const PERSIST_EVERY: u64 = 256;
/// Pause between passes when some chunks failed.
const RETRY_PAUSE: Duration = Duration::from_secs(5);

impl Volume {
    pub(crate) fn set_hydration(&self, state: &'static str, error: Option<String>) {
        *self.hydration.lock().unwrap_or_else(|e| e.into_inner()) =
            HydrationStatus { state, error };
    }

    fn hydration_status(&self) -> HydrationStatus {
        self.hydration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Engine {
    /// Starts background hydration for every restored volume that wants it
    /// and is not done, and releases holds this host left behind.
    pub fn start_background(self: &Arc<Self>) {
        for vol in self.list() {
            let rec = vol.record();
            match vol.base() {
                Some(_) if rec.hydrate => self.start_hydration(vol),
                Some(_) => vol.set_hydration("off", None),
                None => {}
            }
        }
        let engine = Arc::clone(self);
        self.background
            .spawn(async move { engine.release_stale_holds().await });
    }

    pub(crate) fn start_hydration(self: &Arc<Self>, vol: Arc<Volume>) {
        let token = self.background_cancel.child_token();
        self.hydrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vol.id, token.clone());
        vol.set_hydration("hydrating", None);
        let engine = Arc::clone(self);
        self.background
            .spawn(async move { engine.hydrate(vol, token).await });
    }

    /// Stops a volume's hydration (it is being deleted).
    pub(crate) async fn stop_hydration(&self, vol: &Volume) {
        let token = self
            .hydrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vol.id);
        if let Some(t) = token {
            t.cancel();
        }
    }

    async fn hydrate(self: Arc<Self>, vol: Arc<Volume>, cancel: CancellationToken) {
        info!(volume = %vol.name, remaining = vol.map().base_chunks(), "hydration started");
        loop {
            let todo = vol.map().base_list();
            if todo.is_empty() {
                break;
            }
            let (failed, error) = match self.hydrate_pass(&vol, todo, &cancel).await {
                Some(r) => r,
                None => return,
            };
            if failed == 0 {
                continue;
            }
            warn!(volume = %vol.name, failed, error = ?error, "some chunks could not be hydrated; retrying");
            vol.set_hydration("retrying", error);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RETRY_PAUSE) => {}
            }
            vol.set_hydration("hydrating", None);
        }
        if let Err(e) = vol.flush().await {
            warn!(volume = %vol.name, error = %e, "flush after hydration failed");
            vol.set_hydration("retrying", Some(e.to_string()));
            return;
        }
        self.finish_hydration(&vol).await;
    }

    /// One pass over `todo`. Returns the failures and the last error, or
    /// `None` when cancelled.
    async fn hydrate_pass(
        &self,
        vol: &Arc<Volume>,
        todo: Vec<u64>,
        cancel: &CancellationToken,
    ) -> Option<(u64, Option<String>)> {
        let mut set = JoinSet::new();
        let mut next = todo.into_iter();
        let (mut failed, mut error, mut since_flush) = (0u64, None, 0u64);
        let mut flushing: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let limit = if vol.client_ops() > 0 {
                1
            } else {
                HYDRATE_CONCURRENCY
            };
            while set.len() < limit {
                let Some(c) = next.next() else { break };
                let vol = Arc::clone(vol);
                set.spawn(async move {
                    crate::failpoint::delay("hydrate-chunk").await;
                    let r = vol.materialize(c).await;
                    crate::failpoint::hit("hydrate-after-fetch");
                    r
                });
            }
            let joined = tokio::select! {
                _ = cancel.cancelled() => {
                    set.abort_all();
                    while set.join_next().await.is_some() {}
                    let _ = vol.flush().await;
                    return None;
                }
                j = set.join_next() => j,
            };
            let Some(joined) = joined else { break };
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failed += 1;
                    error = Some(e.to_string());
                }
                Err(e) => {
                    failed += 1;
                    error = Some(e.to_string());
                }
            }
            since_flush += 1;
            if since_flush >= PERSIST_EVERY && flushing.as_ref().is_none_or(|f| f.is_finished()) {
                since_flush = 0;
                let vol = Arc::clone(vol);
                flushing = Some(tokio::spawn(async move {
                    if let Err(e) = vol.flush().await {
                        warn!(volume = %vol.name, error = %e, "flush during hydration failed");
                    }
                }));
            }
        }
        if let Some(f) = flushing {
            let _ = f.await;
        }
        if let Err(e) = vol.flush().await {
            failed += 1;
            error = Some(format!("flush: {e}"));
        }
        Some((failed, error))
    }

    async fn finish_hydration(&self, vol: &Arc<Volume>) {
        let rec = vol.record();
        let name = self.hold_name(rec.id);
        if let Err(e) =
            super::snapshots::with_retry("release hold", || self.repo.release_hold(&name)).await
        {
            // The volume is whole; the hold only keeps chunks alive longer.
            warn!(volume = %vol.name, error = %e, "could not release the store hold; will retry at next start");
        } else {
            let _guard = self.lifecycle.lock().await;
            let still_ours = self.get(&vol.name).is_ok_and(|v| Arc::ptr_eq(&v, vol));
            if still_ours {
                let mut rec = vol.record();
                rec.hydrated = true;
                match self.catalog.put_volume(&rec) {
                    Ok(()) => vol.set_record(rec),
                    Err(e) => warn!(volume = %vol.name, error = %e, "could not record hydration"),
                }
            }
        }
        self.hydrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vol.id);
        vol.set_hydration("complete", None);
        info!(volume = %vol.name, "hydration complete");
    }

    /// Holds named for this host whose volume is gone or hydrated: left by a
    /// delete that could not reach the store, or a crash.
    async fn release_stale_holds(self: Arc<Self>) {
        let prefix = format!("{}-", self.host_id);
        let holds = match self.repo.list_holds(&prefix).await {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "cannot list this host's holds");
                return;
            }
        };
        let needed: Vec<String> = self
            .list()
            .iter()
            .map(|v| v.record())
            .filter(|r| r.source_snapshot.is_some() && !r.hydrated)
            .map(|r| self.hold_name(r.id))
            .collect();
        for name in &holds {
            if needed.iter().any(|n| n == name) {
                continue;
            }
            info!(hold = %name, "releasing a hold no volume needs");
            if let Err(e) = self.repo.release_hold(name).await {
                warn!(hold = %name, error = %e, "could not release a stale hold");
            }
        }
    }

    /// Fetches from the store and the cache's state, for `vol status`.
    pub fn fetch_stats(&self) -> (u64, u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let f = &self.fetcher;
        let (used, hits) = f
            .cache()
            .map_or((0, 0), |c| (c.used_bytes(), c.stats.hits.load(Relaxed)));
        (
            f.fetches.load(Relaxed),
            f.fetched_bytes.load(Relaxed),
            used,
            hits,
        )
    }

    /// The API's view of a volume's hydration.
    pub(crate) fn hydration_of(&self, vol: &Volume) -> Option<volumed_api::Hydration> {
        let rec = vol.record();
        rec.source_snapshot.as_ref()?;
        let status = vol.hydration_status();
        let Some(base) = vol.base() else {
            // Hydrated in an earlier run: nothing is left to fetch.
            return Some(volumed_api::Hydration {
                state: "complete".into(),
                hydrated_bytes: 0,
                total_bytes: 0,
                error: None,
            });
        };
        let chunks = rec.size.div_ceil(rec.chunk_size);
        let total: u64 = base
            .manifest
            .hashed()
            .iter()
            .filter(|(i, _)| *i < chunks)
            .map(|(i, _)| base.chunk_len(*i))
            .sum();
        let remaining: u64 = vol
            .map()
            .base_list()
            .iter()
            .map(|&i| base.chunk_len(i))
            .sum();
        let state = if remaining == 0 {
            "complete"
        } else if status.state.is_empty() {
            "hydrating"
        } else {
            status.state
        };
        Some(volumed_api::Hydration {
            state: state.into(),
            hydrated_bytes: total - remaining,
            total_bytes: total,
            error: status.error,
        })
    }
}
