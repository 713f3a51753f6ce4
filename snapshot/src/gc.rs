//! Garbage collection: delete the chunk objects no snapshot needs.
//!
//! Mark and sweep over the whole store, safe against snapshots that other
//! hosts are writing at the same moment:
//!
//! 1. Read the store's clock, `now`. The cutoff is `now - grace`, or earlier:
//!    `start - grace` for the oldest snapshot still being written anywhere
//!    (a `pending/` marker refreshed within the grace period). Objects
//!    modified after the cutoff are young.
//! 2. Mark every chunk named by a manifest, a hold (a volume somewhere still
//!    lazily reading that snapshot) or a young trash entry (a deleted
//!    snapshot or released hold, honoured for the grace period).
//! 3. Sweep: delete every chunk object and page that is unmarked and not
//!    young.
//! 4. Expire trash entries that are no longer young.
//!
//! Why a snapshot being written elsewhere never loses a chunk. It starts at
//! `S` (store clock) by writing its marker, and names three kinds of chunk:
//! - chunks it uploaded: modified after `S`;
//! - chunks it found already stored: it touched any older than `grace / 2`,
//!   so they too are modified after `S - grace / 2`;
//! - chunks it took from its parent's manifest: it checked after `S` that
//!   the parent existed, so the parent is a manifest, or it was deleted
//!   after `S` and is a trash entry modified after `S`.
//!
//! A gc that read its clock before `S` has a cutoff before `S - grace`; one
//! that read it later sees the marker (refreshed every `grace / 4`; the
//! snapshot gives up if it cannot refresh it for `grace / 2`) and also cuts
//! off before `S - grace`. Either way everything above is young or marked,
//! however long the snapshot takes; once its manifest exists, it is marked.
//! Pages follow the same argument: a snapshot's new pages are uploaded
//! after `S` or touched like found chunks, and those it names from its
//! parent are marked through the parent's root or trash entry.
//!
//! A marker not refreshed within the grace period belongs to a snapshot
//! that died with its host, and is removed. A manifest that could not be
//! read stops gc before it deletes anything.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::hash::ChunkHash;
use crate::keys;
use crate::manifest::StoredManifest;
use crate::repo::{Repo, RepoError};
use futures_util::{StreamExt, TryStreamExt};

/// Deletes in flight at once.
const DELETE_CONCURRENCY: usize = 16;
/// Pages read at once while marking.
const MARK_CONCURRENCY: usize = 8;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub manifests: u64,
    pub holds: u64,
    /// Young trash entries whose chunks were kept.
    pub trash_honoured: u64,
    /// Trash entries older than the grace period, removed.
    pub trash_expired: u64,
    /// Snapshots being written somewhere, which moved the cutoff back.
    pub pending_snapshots: u64,
    /// Markers of snapshots that died without finishing, removed.
    pub pending_expired: u64,
    pub chunks_seen: u64,
    pub chunks_referenced: u64,
    /// Unreferenced but younger than the grace period: kept this time.
    pub chunks_young: u64,
    pub chunks_deleted: u64,
    pub bytes_deleted: u64,
    pub pages_seen: u64,
    /// Distinct pages named by the roots marked (each read once).
    pub pages_referenced: u64,
    pub pages_young: u64,
    pub pages_deleted: u64,
}

/// What marking found live.
#[derive(Default)]
struct Live {
    chunks: HashSet<ChunkHash>,
    pages: HashSet<ChunkHash>,
}

async fn mark(repo: &Repo, key: &str, live: &mut Live) -> Result<(), RepoError> {
    // A manifest deleted since the listing marks nothing: its deleter
    // trashed it first, and the trash is listed after.
    match repo.get_stored_at(key).await? {
        None => {}
        Some(StoredManifest::V1(m)) => live.chunks.extend(m.hashed().iter().map(|(_, h)| *h)),
        Some(StoredManifest::V2(root)) => {
            // Pages new to this run, read a few at a time. A page that
            // cannot be read stops gc before it deletes anything.
            let fresh: Vec<_> = root
                .pages()
                .iter()
                .filter(|(_, name)| live.pages.insert(*name))
                .filter_map(|&(index, name)| root.span(index).map(|span| (name, span)))
                .collect();
            let mut reads = futures_util::stream::iter(fresh.into_iter().map(|(name, span)| {
                let repo = repo.clone();
                async move { repo.get_page(&name, span).await }
            }))
            .buffer_unordered(MARK_CONCURRENCY);
            while let Some(page) = reads.try_next().await? {
                live.chunks.extend(page.hashed().iter().map(|(_, h)| *h));
            }
        }
    }
    Ok(())
}

/// Runs one collection with the given grace period.
pub async fn collect(repo: &Repo, grace: Duration) -> Result<GcReport, RepoError> {
    collect_observed(repo, grace, &|_| {}).await
}

/// As [`collect`], calling `after_delete` with the count of chunk objects
/// deleted so far after each one (crash tests stop the process there).
pub async fn collect_observed(
    repo: &Repo,
    grace: Duration,
    after_delete: &(dyn Fn(u64) + Sync),
) -> Result<GcReport, RepoError> {
    let store = repo.store();
    let now = repo.store_now().await?;
    let before = |t: SystemTime| t.checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut cutoff = before(now);
    let mut report = GcReport::default();
    let mut live = Live::default();

    let mut dead = Vec::new();
    for o in store.list(keys::PENDING).await? {
        if o.modified <= before(now) {
            dead.push(o.key);
            continue;
        }
        let start = match store.get(&o.key).await? {
            Some(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .filter(|s| *s > 0)
                .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
            None => None,
        };
        // The marker's first write is the start when no refresh has
        // recorded it yet.
        let start = start.map_or(o.modified, |s| s.min(o.modified));
        cutoff = cutoff.min(before(start));
        report.pending_snapshots += 1;
    }

    for o in store.list(keys::MANIFESTS).await? {
        mark(repo, &o.key, &mut live).await?;
        report.manifests += 1;
    }
    for o in store.list(keys::HOLDS).await? {
        mark(repo, &o.key, &mut live).await?;
        report.holds += 1;
    }
    let mut expired = Vec::new();
    for o in store.list(keys::TRASH).await? {
        if o.modified > cutoff {
            mark(repo, &o.key, &mut live).await?;
            report.trash_honoured += 1;
        } else {
            expired.push(o.key);
        }
    }
    report.chunks_referenced = live.chunks.len() as u64;
    report.pages_referenced = live.pages.len() as u64;

    let mut doomed = Vec::new();
    for o in store.list(keys::PAGES).await? {
        let Some(name) = keys::page_of_key(&o.key) else {
            continue;
        };
        report.pages_seen += 1;
        if live.pages.contains(&name) {
            continue;
        }
        if o.modified > cutoff {
            report.pages_young += 1;
        } else {
            doomed.push((o.key, o.size, true));
        }
    }
    for o in store.list(keys::CHUNKS).await? {
        let Some(h) = keys::chunk_of_key(&o.key) else {
            continue;
        };
        report.chunks_seen += 1;
        if live.chunks.contains(&h) {
            continue;
        }
        if o.modified > cutoff {
            report.chunks_young += 1;
        } else {
            doomed.push((o.key, o.size, false));
        }
    }

    let mut set = JoinSet::new();
    let mut doomed = doomed.into_iter();
    loop {
        while set.len() < DELETE_CONCURRENCY {
            let Some((key, size, page)) = doomed.next() else {
                break;
            };
            let store = std::sync::Arc::clone(store);
            set.spawn(async move { store.delete(&key).await.map(|_| (size, page)) });
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        match r {
            Ok(Ok((size, true))) => {
                report.pages_deleted += 1;
                report.bytes_deleted += size;
            }
            Ok(Ok((size, false))) => {
                report.chunks_deleted += 1;
                report.bytes_deleted += size;
                after_delete(report.chunks_deleted);
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => warn!(error = %e, "gc delete task failed"),
        }
    }
    // Only after the sweep: an expired trash entry protected nothing this
    // run anyway, and a crash before here just expires it next time.
    for key in expired {
        store.delete(&key).await?;
        report.trash_expired += 1;
    }
    for key in dead {
        store.delete(&key).await?;
        report.pending_expired += 1;
    }
    info!(?report, grace_secs = grace.as_secs(), "gc finished");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::codec;
    use crate::manifest::{Manifest, ManifestHeader, SnapshotId};
    use crate::store::LocalStore;

    fn manifest(chunks: &[ChunkHash]) -> Manifest {
        let mut m = Manifest::new(ManifestHeader {
            id: SnapshotId::generate(),
            volume: "v".into(),
            size: 16 << 20,
            chunk_size: 1 << 20,
            parent: None,
            created_at: "2026-11-25T00:00:00Z".into(),
            labels: Default::default(),
            changed_chunks: 0,
            logical_bytes: 0,
            uploaded_bytes: 0,
            encryption: None,
        });
        for (i, h) in chunks.iter().enumerate() {
            m.push(i as u64, Some(*h));
        }
        m
    }

    fn age(dir: &std::path::Path, key: &str, secs: u64) {
        let t = SystemTime::now() - Duration::from_secs(secs);
        std::fs::File::options()
            .write(true)
            .open(dir.join(key))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[tokio::test]
    async fn sweeps_only_old_unreferenced_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::new(
            Arc::new(LocalStore::open(dir.path()).unwrap()),
            codec::DEFAULT_LEVEL,
        );
        let mut h = Vec::new();
        for i in 0..6u8 {
            h.push(repo.put_chunk(vec![i + 1; 4096]).await.unwrap().hash);
        }
        let key = |h: &ChunkHash| keys::chunk_key(h);
        for x in &h {
            age(dir.path(), &key(x), 7200);
        }
        // 0: in a manifest; 1: in a hold; 2: in young trash; 3: in old
        // trash; 4: unreferenced but young; 5: unreferenced and old.
        let live = manifest(&h[..1]);
        repo.put_manifest(&live).await.unwrap();
        repo.put_hold("host-1", &manifest(&h[1..2])).await.unwrap();
        let young = manifest(&h[2..3]);
        repo.put_manifest(&young).await.unwrap();
        repo.trash_manifest(&young.header.id).await.unwrap();
        let old = manifest(&h[3..4]);
        repo.put_manifest(&old).await.unwrap();
        repo.trash_manifest(&old.header.id).await.unwrap();
        age(
            dir.path(),
            &keys::trashed_manifest_key(&old.header.id),
            7200,
        );
        age(dir.path(), &key(&h[4]), 10);

        let r = collect(&repo, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(
            (r.manifests, r.holds, r.trash_honoured, r.trash_expired),
            (1, 1, 1, 1)
        );
        assert_eq!((r.chunks_seen, r.chunks_young, r.chunks_deleted), (6, 1, 2));
        for (i, x) in h.iter().enumerate() {
            let kept = repo.store().exists(&key(x)).await.unwrap();
            assert_eq!(kept, ![3, 5].contains(&i), "chunk {i}");
        }
        assert!(repo.list_snapshots().await.unwrap().len() == 1);

        // A damaged manifest stops gc before it deletes anything.
        repo.store()
            .put(
                &keys::manifest_key(&SnapshotId::parse("snap-00000000000000ff").unwrap()),
                bytes::Bytes::from_static(b"junk"),
            )
            .await
            .unwrap();
        age(dir.path(), &key(&h[4]), 7200);
        assert!(collect(&repo, Duration::from_secs(3600)).await.is_err());
        assert!(repo.store().exists(&key(&h[4])).await.unwrap());
    }

    #[tokio::test]
    async fn dedup_hit_on_an_old_chunk_makes_it_young() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::new(
            Arc::new(LocalStore::open(dir.path()).unwrap()),
            codec::DEFAULT_LEVEL,
        );
        let h = repo.put_chunk(vec![9; 4096]).await.unwrap().hash;
        age(dir.path(), &keys::chunk_key(&h), 7200);
        // A snapshot elsewhere finds the old, unreferenced chunk stored and
        // will name it; gc running now must keep it.
        assert_eq!(repo.put_chunk(vec![9; 4096]).await.unwrap().uploaded, 0);
        let r = collect(&repo, Duration::from_secs(3600)).await.unwrap();
        assert_eq!((r.chunks_young, r.chunks_deleted), (1, 0));
    }

    #[tokio::test]
    async fn a_long_snapshot_in_progress_moves_the_cutoff_back() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::new(
            Arc::new(LocalStore::open(dir.path()).unwrap()),
            codec::DEFAULT_LEVEL,
        );
        let h = repo.put_chunk(vec![3; 4096]).await.unwrap().hash;
        let key = keys::chunk_key(&h);
        age(dir.path(), &key, 5400);
        // A snapshot that started 2 h ago and is still running (its marker
        // fresh) may still name a chunk touched 1.5 h ago.
        let id = SnapshotId::generate();
        let start = SystemTime::now() - Duration::from_secs(7200);
        repo.refresh_pending(&id, start).await.unwrap();
        let r = collect(&repo, Duration::from_secs(3600)).await.unwrap();
        assert_eq!((r.pending_snapshots, r.chunks_deleted), (1, 0));
        assert!(repo.store().exists(&key).await.unwrap());
        // Its host died: the marker goes stale, is removed, and the chunk
        // is collected.
        age(dir.path(), &keys::pending_key(&id), 4000);
        let r = collect(&repo, Duration::from_secs(3600)).await.unwrap();
        assert_eq!((r.pending_expired, r.chunks_deleted), (1, 1));
        assert!(!repo.store().exists(&key).await.unwrap());
    }

    #[tokio::test]
    async fn pages_are_marked_once_and_swept_when_old_and_unnamed() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::new(
            Arc::new(LocalStore::open(dir.path()).unwrap()),
            codec::DEFAULT_LEVEL,
        );
        let h = repo.put_chunk(vec![4; 4096]).await.unwrap().hash;
        // Three snapshots with the same single page; one held, one deleted
        // long ago.
        let a = manifest(&[h]);
        let root = repo.put_manifest(&a).await.unwrap();
        let page = keys::page_key(&root.pages()[0].1);
        let mut b = manifest(&[h]);
        b.header.id = SnapshotId::generate();
        repo.put_manifest(&b).await.unwrap();
        repo.put_hold("host-1", &b).await.unwrap();
        let r = collect(&repo, Duration::from_secs(3600)).await.unwrap();
        assert_eq!((r.manifests, r.holds), (2, 1));
        assert_eq!(
            (r.pages_seen, r.pages_referenced, r.pages_deleted),
            (1, 1, 0)
        );
        assert_eq!(r.chunks_referenced, 1);

        // Once nothing names it and it is old, the page goes, and so does
        // the chunk only it named.
        for id in [&a.header.id, &b.header.id] {
            repo.trash_manifest(id).await.unwrap();
            age(dir.path(), &keys::trashed_manifest_key(id), 7200);
        }
        repo.release_hold("host-1").await.unwrap();
        age(dir.path(), &keys::trashed_hold_key("host-1"), 7200);
        age(dir.path(), &page, 7200);
        age(dir.path(), &keys::chunk_key(&h), 7200);
        let r = collect(&repo, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(
            (r.trash_expired, r.pages_deleted, r.chunks_deleted),
            (3, 1, 1)
        );
        assert!(!repo.store().exists(&page).await.unwrap());

        // A root whose page is missing stops gc before it deletes anything.
        let c = manifest(&[h]);
        let root = repo.put_manifest(&c).await.unwrap();
        repo.store()
            .delete(&keys::page_key(&root.pages()[0].1))
            .await
            .unwrap();
        let stray = repo.put_chunk(vec![5; 4096]).await.unwrap().hash;
        age(dir.path(), &keys::chunk_key(&stray), 7200);
        assert!(matches!(
            collect(&repo, Duration::from_secs(3600)).await,
            Err(RepoError::MissingPage(_))
        ));
        assert!(repo.store().exists(&keys::chunk_key(&stray)).await.unwrap());
    }
}
