//! A snapshot copied under a new id (EC2 CopySnapshot, `vol snapshot
//! copy`).
//!
//! In the source's own domain (or in an unencrypted store) the copy is a
//! new root naming the source's pages: metadata only, no chunk read or
//! written. Into another domain (another key, or a lineage of its own)
//! every distinct chunk is read, opened, and sealed anew under the new
//! domain's names: a full copy, as AWS makes when the key changes.
//!
//! A copy commits like any snapshot, through its [`PendingSnapshot`]; the
//! source is opened only after the copy's marker is in the store, so the
//! source's pages and chunks stay for gc as a parent's do (see `gc`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{StreamExt, TryStreamExt};

use crate::crypt::Encryption;
use crate::hash::ChunkHash;
use crate::manifest::{ManifestHeader, SnapshotId, StoredManifest};
use crate::pending::{CommitError, PendingSnapshot};
use crate::repo::{Repo, RepoError};
use crate::root::ManifestRoot;
use crate::writer;

/// Chunks copied at once into another domain.
const COPY_CONCURRENCY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("read the source snapshot {id}: {source}")]
    Source {
        id: SnapshotId,
        #[source]
        source: RepoError,
    },
    #[error("copy chunk {hash}: {source}")]
    Chunk {
        hash: ChunkHash,
        #[source]
        source: RepoError,
    },
    #[error("write the copy's manifest: {0}")]
    Manifest(#[source] RepoError),
    #[error(transparent)]
    Commit(#[from] CommitError),
}

/// Progress of a copy, in distinct chunks.
#[derive(Debug, Default)]
pub struct CopyProgress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// What a committed copy is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub root: ManifestRoot,
    /// Whether every chunk was sealed anew (another domain).
    pub full: bool,
}

/// Copies snapshot `source` into the snapshot `pending` is writing, sealed
/// as `target` says, and commits it. The copy keeps the source's volume,
/// geometry and labels, has no parent, and is dated `created_at`.
pub async fn copy(
    repo: &Repo,
    pending: &PendingSnapshot,
    source: &SnapshotId,
    target: Option<Encryption>,
    created_at: String,
    progress: &CopyProgress,
) -> Result<Copied, CopyError> {
    let src_err = |source_err| CopyError::Source {
        id: source.clone(),
        source: source_err,
    };
    let src = repo.open_manifest(source).await.map_err(src_err)?;
    let sh = src.header();
    let mut header = ManifestHeader {
        id: pending.id().clone(),
        volume: sh.volume.clone(),
        size: sh.size,
        chunk_size: sh.chunk_size,
        parent: None,
        created_at,
        labels: sh.labels.clone(),
        changed_chunks: 0,
        logical_bytes: sh.logical_bytes,
        uploaded_bytes: 0,
        encryption: target.clone(),
    };
    let same_domain = sh.encryption == target;
    let root = match (same_domain, src.stored()) {
        (true, StoredManifest::V2(r)) => {
            ManifestRoot::new(header, r.page_chunks(), r.pages().to_vec())
        }
        (true, StoredManifest::V1(m)) => {
            let (mut root, pages) = writer::write_entries(repo, header, m.hashed())
                .await
                .map_err(CopyError::Manifest)?;
            root.header.uploaded_bytes = pages;
            root
        }
        (false, _) => {
            let dst = repo
                .sealed_as(target.as_ref())
                .map_err(CopyError::Manifest)?;
            let entries = src.hashed_in(0, src.chunk_count()).await.map_err(src_err)?;
            let (renamed, uploaded) = reseal(repo, &dst, &entries, progress).await?;
            let entries: Vec<(u64, ChunkHash)> =
                entries.iter().map(|(i, h)| (*i, renamed[h])).collect();
            header.changed_chunks = entries.len() as u64;
            let (mut root, pages) = writer::write_entries(&dst, header, &entries)
                .await
                .map_err(CopyError::Manifest)?;
            root.header.uploaded_bytes = uploaded + pages;
            root
        }
    };
    pending.commit(&root).await?;
    Ok(Copied {
        root,
        full: !same_domain,
    })
}

/// Reads each distinct chunk of `entries` through `repo` and stores it
/// through `dst`: each old name's new one, and the bytes uploaded.
async fn reseal(
    repo: &Repo,
    dst: &Repo,
    entries: &[(u64, ChunkHash)],
    progress: &CopyProgress,
) -> Result<(HashMap<ChunkHash, ChunkHash>, u64), CopyError> {
    let mut distinct: Vec<ChunkHash> = entries.iter().map(|(_, h)| *h).collect();
    distinct.sort_unstable();
    distinct.dedup();
    progress
        .total
        .store(distinct.len() as u64, Ordering::Relaxed);
    let mut renamed = HashMap::with_capacity(distinct.len());
    let mut uploaded = 0u64;
    let mut puts = futures_util::stream::iter(distinct.into_iter().map(|h| {
        let (repo, dst) = (repo.clone(), dst.clone());
        async move {
            let err = |source| CopyError::Chunk { hash: h, source };
            let data = repo.get_chunk(&h).await.map_err(err)?;
            let put = dst.put_chunk(data).await.map_err(err)?;
            Ok::<_, CopyError>((h, put))
        }
    }))
    .buffer_unordered(COPY_CONCURRENCY);
    while let Some((old, put)) = puts.try_next().await? {
        renamed.insert(old, put.hash);
        uploaded += put.uploaded;
        progress.done.fetch_add(1, Ordering::Relaxed);
    }
    Ok((renamed, uploaded))
}
