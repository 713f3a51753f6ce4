//! Verification of a snapshot in the store: every chunk its manifest names
//! is read and checked against its hash (in an encrypted store, opened and
//! authenticated first, as are the manifest and its pages). Without the
//! key only the manifest's sealed framing can be checked (as Proxmox
//! Backup Server checks encrypted chunks without their key): the list of
//! chunks is itself sealed. Transient store failures are the
//! store's to retry (see `store::Retrying`); one that outlasts it ends the
//! verification, since then nothing can be said.

use std::collections::BTreeMap;

use tokio::task::JoinSet;

use crate::hash::ChunkHash;
use crate::manifest::SnapshotId;
use crate::repo::{Repo, RepoError};
use crate::store::{ErrorKind, StoreError};

const VERIFY_CONCURRENCY: usize = 16;

/// A chunk object that is missing or damaged, and where the snapshot uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadChunk {
    pub hash: ChunkHash,
    /// Chunk indices of the volume that hold this content.
    pub indices: Vec<u64>,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub snapshot: SnapshotId,
    /// Non-zero chunks in the manifest.
    pub chunks: u64,
    /// Distinct objects read.
    pub objects: u64,
    pub ok_objects: u64,
    pub missing: Vec<BadChunk>,
    pub damaged: Vec<BadChunk>,
    /// Set when only the manifest's framing could be checked: why (the
    /// key is disabled, unknown here, ...).
    pub framing_only: Option<String>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.damaged.is_empty()
    }
}

/// Reads every chunk of snapshot `id`. A missing or damaged object is
/// reported, not an error; an unreadable manifest or a store that keeps
/// failing is an error, since then nothing can be said.
pub async fn verify(repo: &Repo, id: &SnapshotId) -> Result<VerifyReport, RepoError> {
    let m = match repo.get_manifest(id).await {
        Ok(m) => m,
        Err(e) if e.is_key() => return framing(repo, id, e).await,
        Err(e) => return Err(e),
    };
    let mut by_hash: BTreeMap<ChunkHash, Vec<u64>> = BTreeMap::new();
    for (i, h) in m.hashed() {
        by_hash.entry(*h).or_default().push(*i);
    }
    let mut report = VerifyReport {
        snapshot: id.clone(),
        chunks: m.hashed().len() as u64,
        objects: by_hash.len() as u64,
        ok_objects: 0,
        missing: Vec::new(),
        damaged: Vec::new(),
        framing_only: None,
    };
    let mut set = JoinSet::new();
    let mut todo = by_hash.into_iter();
    loop {
        while set.len() < VERIFY_CONCURRENCY {
            let Some((h, indices)) = todo.next() else {
                break;
            };
            let repo = repo.clone();
            set.spawn(async move {
                let r = repo.get_chunk(&h).await.map(|_| ());
                (h, indices, r)
            });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (hash, indices, r) = joined.map_err(|e| {
            RepoError::Store(StoreError::new(
                "verify",
                "",
                ErrorKind::Transient,
                e.to_string(),
            ))
        })?;
        match r {
            Ok(()) => report.ok_objects += 1,
            Err(e @ RepoError::MissingChunk(_)) => report.missing.push(BadChunk {
                hash,
                indices,
                error: e.to_string(),
            }),
            Err(e @ RepoError::CorruptChunk { .. }) => report.damaged.push(BadChunk {
                hash,
                indices,
                error: e.to_string(),
            }),
            Err(e) => return Err(e),
        }
    }
    report.missing.sort_by_key(|b| b.indices[0]);
    report.damaged.sort_by_key(|b| b.indices[0]);
    Ok(report)
}

/// What can be said of a snapshot without its key: its manifest object is
/// a sealed manifest named by its id, with a frame in order.
async fn framing(repo: &Repo, id: &SnapshotId, why: RepoError) -> Result<VerifyReport, RepoError> {
    use crate::crypt::seal::{self, Kind};
    let bytes = repo
        .store()
        .get(&crate::keys::manifest_key(id))
        .await?
        .ok_or_else(|| RepoError::MissingManifest(id.to_string()))?;
    seal::frame(&bytes)
        .and_then(|f| f.expect(Kind::Root, Some(id.as_str().as_bytes())))
        .map_err(|e| RepoError::CorruptManifest {
            id: id.to_string(),
            source: crate::manifest::ManifestError::Seal(e),
        })?;
    Ok(VerifyReport {
        snapshot: id.clone(),
        chunks: 0,
        objects: 1,
        ok_objects: 1,
        missing: Vec::new(),
        damaged: Vec::new(),
        framing_only: Some(why.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::codec;
    use crate::keys::chunk_key;
    use crate::manifest::{Manifest, ManifestHeader};
    use crate::store::LocalStore;

    #[tokio::test]
    async fn names_missing_and_damaged_objects() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::new(
            Arc::new(LocalStore::open(dir.path()).unwrap()),
            codec::DEFAULT_LEVEL,
        );
        let id = SnapshotId::generate();
        let mut m = Manifest::new(ManifestHeader {
            id: id.clone(),
            volume: "v".into(),
            size: 8 << 20,
            chunk_size: 1 << 20,
            parent: None,
            created_at: "2026-11-25T00:00:00Z".into(),
            labels: Default::default(),
            changed_chunks: 4,
            logical_bytes: 4 << 20,
            uploaded_bytes: 0,
            encryption: None,
        });
        let mut h = Vec::new();
        for i in 0..3u8 {
            h.push(repo.put_chunk(vec![i + 1; 8192]).await.unwrap().hash);
        }
        // Chunk 1 and 5 share content.
        for (i, x) in [(0, h[0]), (1, h[1]), (3, h[2]), (5, h[1])] {
            m.push(i, Some(x));
        }
        repo.put_manifest(&m).await.unwrap();
        let clean = verify(&repo, &id).await.unwrap();
        assert!(clean.is_ok());
        assert_eq!((clean.chunks, clean.objects, clean.ok_objects), (4, 3, 3));

        std::fs::remove_file(dir.path().join(chunk_key(&h[2]))).unwrap();
        let p = dir.path().join(chunk_key(&h[1]));
        let mut obj = std::fs::read(&p).unwrap();
        obj[60] ^= 0x40;
        std::fs::write(&p, obj).unwrap();
        let r = verify(&repo, &id).await.unwrap();
        assert!(!r.is_ok());
        assert_eq!(r.ok_objects, 1);
        assert_eq!(r.missing.len(), 1);
        assert_eq!(
            (r.missing[0].hash, &r.missing[0].indices[..]),
            (h[2], &[3][..])
        );
        assert_eq!(r.damaged.len(), 1);
        assert_eq!(r.damaged[0].indices, [1, 5]);
        assert!(
            verify(&repo, &SnapshotId::generate()).await.is_err(),
            "no manifest"
        );
    }
}
