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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapshot::Repo;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::catalog::Catalog;
use crate::engine::Volume;
use crate::engine::chunk_map::ChunkState;
use crate::engine::error::Error;
use crate::engine::registry::Registry;
use crate::engine::restore::{hold_name, hold_prefix};

/// Chunks taken from the base per pass.
const HYDRATE_BATCH: usize = 65_536;
const HYDRATE_CONCURRENCY: usize = 16;
const PERSIST_EVERY: u64 = 256;
/// Pause between passes when some chunks failed.
const RETRY_PAUSE: Duration = Duration::from_secs(5);

/// Where a restored volume's hydration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HydrationState {
    Hydrating,
    /// A pass left chunks behind; the next one starts after a pause.
    Retrying,
    /// Background hydration is disabled: chunks arrive only when read.
    Off,
    Complete,
}

impl HydrationState {
    pub fn as_str(self) -> &'static str {
        match self {
            HydrationState::Hydrating => "hydrating",
            HydrationState::Retrying => "retrying",
            HydrationState::Off => "off",
            HydrationState::Complete => "complete",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HydrationStatus {
    pub state: HydrationState,
    pub error: Option<String>,
}

/// A restored volume's hydration in bytes, for views and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HydrationProgress {
    pub state: HydrationState,
    pub hydrated_bytes: u64,
    pub total_bytes: u64,
    pub error: Option<String>,
}

impl HydrationProgress {
    /// `vol`'s hydration from its map and `status` (the job's, if one
    /// ran); `None` for a volume not restored from a snapshot.
    pub fn of(vol: &Volume, status: Option<HydrationStatus>) -> Option<Self> {
        vol.record().source_snapshot.as_ref()?;
        let Some(base) = vol.base() else {
            // Hydrated in an earlier run: nothing is left to fetch.
            return Some(HydrationProgress {
                state: HydrationState::Complete,
                hydrated_bytes: 0,
                total_bytes: 0,
                error: None,
            });
        };
        let total = base.based_bytes();
        // Counted, not listed: a 16 TiB base has 32 Mi chunks.
        let remaining = {
            let g = base.geometry;
            let n = vol.map().base_chunks();
            let last = g.count().saturating_sub(1);
            let short = if n > 0 && vol.map().state(last) == ChunkState::Base {
                g.chunk_size() - base.chunk_len(last)
            } else {
                0
            };
            (n * g.chunk_size()).saturating_sub(short)
        };
        let state = match &status {
            _ if remaining == 0 => HydrationState::Complete,
            Some(s) => s.state,
            None => HydrationState::Hydrating,
        };
        Some(HydrationProgress {
            state,
            hydrated_bytes: total - remaining,
            total_bytes: total,
            error: status.and_then(|s| s.error),
        })
    }
}

struct Entry {
    /// Absent once the job ended (complete, or never started: `Off`).
    cancel: Option<CancellationToken>,
    status: HydrationStatus,
}

/// Hydration of this host's restored volumes: one job per volume.
pub struct Hydrator {
    catalog: Arc<Catalog>,
    repo: Repo,
    registry: Arc<Registry>,
    host_id: String,
    /// By volume id.
    jobs: Mutex<HashMap<u64, Entry>>,
    tasks: TaskTracker,
    /// Fired at shutdown; each job's token is a child.
    cancel: CancellationToken,
}

impl Hydrator {
    pub fn new(
        catalog: Arc<Catalog>,
        repo: Repo,
        registry: Arc<Registry>,
        host_id: String,
    ) -> Self {
        Hydrator {
            catalog,
            repo,
            registry,
            host_id,
            jobs: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_status(&self, vol: &Volume, state: HydrationState, error: Option<String>) {
        let mut jobs = self.jobs();
        let e = jobs.entry(vol.id).or_insert(Entry {
            cancel: None,
            status: HydrationStatus { state, error: None },
        });
        e.status = HydrationStatus { state, error };
    }

    /// The state of `vol`'s hydration, if it has a base.
    pub fn status(&self, vol: &Volume) -> Option<HydrationStatus> {
        self.jobs().get(&vol.id).map(|e| e.status.clone())
    }

    /// Starts hydration for every restored volume that wants it and is not
    /// done, and releases holds this host left behind.
    pub fn start_all(self: &Arc<Self>) {
        for vol in self.registry.list() {
            self.adopt(vol);
        }
        let me = Arc::clone(self);
        self.tasks
            .spawn(async move { me.release_stale_holds().await });
    }

    /// Starts hydrating `vol` if it is restored and wants it.
    pub fn adopt(self: &Arc<Self>, vol: Arc<Volume>) {
        if vol.base().is_none() {
            return;
        }
        if !vol.record().hydrate {
            self.set_status(&vol, HydrationState::Off, None);
            return;
        }
        let token = self.cancel.child_token();
        self.jobs().insert(
            vol.id,
            Entry {
                cancel: Some(token.clone()),
                status: HydrationStatus {
                    state: HydrationState::Hydrating,
                    error: None,
                },
            },
        );
        let me = Arc::clone(self);
        self.tasks
            .spawn(async move { me.hydrate(vol, token).await });
    }

    /// Stops a volume's hydration (it is being deleted).
    pub fn stop(&self, vol: &Volume) {
        if let Some(e) = self.jobs().remove(&vol.id)
            && let Some(t) = e.cancel
        {
            t.cancel();
        }
    }

    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    async fn hydrate(self: Arc<Self>, vol: Arc<Volume>, cancel: CancellationToken) {
        info!(volume = %vol.name, remaining = vol.map().base_chunks(), "hydration started");
        let started = std::time::Instant::now();
        loop {
            // In batches: the list of a 16 TiB base would be 256 MiB.
            let todo = vol.map().base_batch(HYDRATE_BATCH);
            if todo.is_empty() {
                break;
            }
            let Some((failed, error)) = pass(&vol, todo, &cancel).await else {
                return;
            };
            if failed == 0 {
                continue;
            }
            warn!(volume = %vol.name, failed, error = ?error, "some chunks could not be hydrated; retrying");
            self.set_status(&vol, HydrationState::Retrying, error);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RETRY_PAUSE) => {}
            }
            self.set_status(&vol, HydrationState::Hydrating, None);
        }
        if let Err(e) = vol.flush().await {
            warn!(volume = %vol.name, error = %e, "flush after hydration failed");
            self.set_status(&vol, HydrationState::Retrying, Some(e.to_string()));
            return;
        }
        self.finish(&vol, started).await;
    }

    /// `started`: when this run of the hydration began (since the daemon's
    /// start, if it resumed one), for the log line.
    async fn finish(&self, vol: &Arc<Volume>, started: std::time::Instant) {
        let name = hold_name(&self.host_id, vol.id);
        if let Err(e) = self.repo.release_hold(&name).await {
            // The volume is whole; the hold only keeps chunks alive longer.
            warn!(volume = %vol.name, error = %e, "could not release the store hold; will retry at next start");
        } else {
            let recorded = vol
                .update_record(&self.catalog, |rec| {
                    rec.hydrated = true;
                    Ok(())
                })
                .await;
            match recorded {
                Ok(()) => {}
                // Deleted (or reopened) meanwhile: not ours to record.
                Err(Error::VolumeNotFound(_)) => {}
                Err(e) => warn!(volume = %vol.name, error = %e, "could not record hydration"),
            }
        }
        self.jobs().insert(
            vol.id,
            Entry {
                cancel: None,
                status: HydrationStatus {
                    state: HydrationState::Complete,
                    error: None,
                },
            },
        );
        info!(volume = %vol.name, elapsed_ms = started.elapsed().as_millis() as u64, "hydration complete");
    }

    /// Holds named for this host whose volume is gone or hydrated: left by a
    /// delete that could not reach the store, or a crash.
    async fn release_stale_holds(self: Arc<Self>) {
        let holds = match self.repo.list_holds(&hold_prefix(&self.host_id)).await {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "cannot list this host's holds");
                return;
            }
        };
        let needed: Vec<String> = self
            .registry
            .list()
            .iter()
            .map(|v| v.record())
            .filter(|r| r.source_snapshot.is_some() && !r.hydrated)
            .map(|r| hold_name(&self.host_id, r.id))
            .collect();
        for name in holds {
            if needed.contains(&name) {
                continue;
            }
            info!(hold = %name, "releasing a hold no volume needs");
            if let Err(e) = self.repo.release_hold(&name).await {
                warn!(hold = %name, error = %e, "could not release a stale hold");
            }
        }
    }
}

/// One pass over `todo`. Returns the failures and the last error, or `None`
/// when cancelled.
async fn pass(
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
