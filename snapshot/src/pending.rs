//! A snapshot being written, and its one commit protocol: its `pending/`
//! marker announced in the store before anything it names is read or
//! written, kept fresh in the background for as long as the value lives,
//! and the manifest written (the commit point) only while the marker is
//! still fresh. Every writer of snapshots goes through it, so gc's argument
//! (see `gc`) holds for all of them, however long they take.

use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock, so tests can move it.
use tokio::time::Instant;

use crate::manifest::SnapshotId;
use crate::repo::{Repo, RepoError};
use crate::root::ManifestRoot;

/// Why a pending snapshot could not be committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// gc elsewhere may have judged chunks this snapshot names
    /// unreferenced: committing could leave a dangling reference.
    #[error("could not keep the snapshot's marker in the store fresh for {0:?}")]
    StaleMarker(Duration),
    #[error("write manifest: {0}")]
    Manifest(#[source] RepoError),
}

/// A snapshot announced to gc. Dropping it stops the refresher and leaves
/// the marker to expire after the grace period; [`PendingSnapshot::end`]
/// removes it at once.
pub struct PendingSnapshot {
    repo: Repo,
    id: SnapshotId,
    /// When the marker was last written, by our clock.
    last_ok: Arc<Mutex<Instant>>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Repo {
    /// Announces snapshot `id` to gc: from now on, gc anywhere keeps every
    /// chunk and page this snapshot writes or finds, and a parent it
    /// checks exists from now on stays readable (see `gc`). Refreshed every
    /// quarter of the grace period.
    pub async fn begin_snapshot(&self, id: &SnapshotId) -> Result<PendingSnapshot, RepoError> {
        let start = self.begin_pending(id).await?;
        let last_ok = Arc::new(Mutex::new(Instant::now()));
        let every = self.gc_grace() / 4;
        let (repo, marker_id, ok) = (self.clone(), id.clone(), Arc::clone(&last_ok));
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match repo.refresh_pending(&marker_id, start).await {
                    Ok(()) => *ok.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now(),
                    Err(e) => {
                        tracing::warn!(snapshot = %marker_id, error = %e, "could not refresh the snapshot's marker")
                    }
                }
            }
        });
        Ok(PendingSnapshot {
            repo: self.clone(),
            id: id.clone(),
            last_ok,
            refresher,
        })
    }
}

impl PendingSnapshot {
    pub fn id(&self) -> &SnapshotId {
        &self.id
    }

    /// Whether gc anywhere still honours the marker: refreshed within half
    /// the grace period (gc expires it after the whole period).
    pub fn is_fresh(&self) -> bool {
        self.last_ok
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            < self.repo.gc_grace() / 2
    }

    /// The commit point: writes `root` (whose pages and chunks are stored)
    /// while the marker is fresh. A lost reply is settled by reading back
    /// (see `Repo::commit_root`).
    pub async fn commit(&self, root: &ManifestRoot) -> Result<(), CommitError> {
        debug_assert_eq!(root.header.id, self.id, "a pending snapshot commits itself");
        if !self.is_fresh() {
            return Err(CommitError::StaleMarker(self.repo.gc_grace() / 2));
        }
        self.repo
            .commit_root(root)
            .await
            .map_err(CommitError::Manifest)
    }

    /// Removes the marker, after the commit or on giving up.
    pub async fn end(self) {
        self.refresher.abort();
        if let Err(e) = self.repo.end_pending(&self.id).await {
            // A stale marker only delays gc until it expires.
            tracing::warn!(snapshot = %self.id, error = %e, "could not remove the snapshot's marker");
        }
    }
}

impl Drop for PendingSnapshot {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::pending_key;
    use crate::store::MemoryStore;
    use crate::store::faulty::{Fault, Faulty};
    use crate::{ManifestHeader, ObjectStore};

    fn root(id: &SnapshotId) -> ManifestRoot {
        let header = ManifestHeader {
            id: id.clone(),
            volume: "v".into(),
            size: 1 << 20,
            chunk_size: 1 << 20,
            parent: None,
            created_at: String::new(),
            labels: Default::default(),
            changed_chunks: 0,
            logical_bytes: 0,
            uploaded_bytes: 0,
            encryption: None,
        };
        ManifestRoot::new(header, crate::root::PAGE_CHUNKS, Vec::new())
    }

    #[tokio::test(start_paused = true)]
    async fn the_marker_stays_fresh_while_the_snapshot_lives() {
        let repo = Repo::new(Arc::new(MemoryStore::new()), 1).with_gc_grace(Duration::from_secs(8));
        let id = SnapshotId::generate();
        let p = repo.begin_snapshot(&id).await.unwrap();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(p.is_fresh(), "refreshed every 2 s of an 8 s grace");
        }
        p.commit(&root(&id)).await.unwrap();
        assert!(repo.manifest_exists(&id).await.unwrap());
        assert!(repo.store().get(&pending_key(&id)).await.unwrap().is_some());
        p.end().await;
        assert!(repo.store().get(&pending_key(&id)).await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_marker_that_cannot_be_refreshed_refuses_the_commit() {
        let store = Arc::new(Faulty::new(MemoryStore::new()));
        let dyn_store: Arc<dyn ObjectStore> = store.clone();
        let repo = Repo::new(dyn_store, 1).with_gc_grace(Duration::from_secs(8));
        let id = SnapshotId::generate();
        let p = repo.begin_snapshot(&id).await.unwrap();
        // Every refresh for the next half grace period fails.
        store.fail_next(1000, Fault::Permanent);
        tokio::time::sleep(Duration::from_secs(5)).await;
        store.fail_next(0, Fault::Permanent);
        assert!(!p.is_fresh());
        let err = p.commit(&root(&id)).await.unwrap_err();
        assert!(matches!(err, CommitError::StaleMarker(_)), "{err}");
        assert!(
            !repo.manifest_exists(&id).await.unwrap(),
            "nothing committed"
        );
    }
}
