//! The snapshot repository over an object store: content-addressed chunk
//! objects and manifests.
//!
//! Layout (every key relative to the store's root or prefix):
//! - `chunks/<first two hex digits>/<64 hex digits>`: a chunk object
//!   (see `codec`), named by the blake3 of its uncompressed bytes;
//! - `manifests/<snapshot id>`: a manifest (see `manifest`).
//!
//! Objects are immutable. Chunks are written before the manifest that names
//! them; a snapshot exists exactly when its manifest does. A leaked chunk
//! (its snapshot never finished) costs space until gc; a manifest naming a
//! missing chunk is a bug.

use std::sync::Arc;

use bytes::Bytes;

use crate::codec::{self, CodecError};
use crate::hash::ChunkHash;
use crate::manifest::{Manifest, ManifestError, SnapshotId};
use crate::store::{ObjectStore, StoreError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("chunk {0} is missing from the store")]
    MissingChunk(ChunkHash),
    #[error("chunk {hash} is damaged: {source}")]
    CorruptChunk { hash: ChunkHash, source: CodecError },
    #[error("snapshot {0} not found")]
    MissingManifest(String),
    #[error("manifest of snapshot {id} is damaged: {source}")]
    CorruptManifest { id: String, source: ManifestError },
}

impl RepoError {
    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, RepoError::Store(e) if e.is_transient())
    }
}

pub fn chunk_key(hash: &ChunkHash) -> String {
    let hex = hash.to_hex();
    format!("chunks/{}/{}", &hex[..2], hex)
}

pub fn manifest_key(id: &SnapshotId) -> String {
    format!("manifests/{id}")
}

/// What storing one chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutChunk {
    pub hash: ChunkHash,
    /// Bytes written to the store: 0 when the chunk was already there.
    pub uploaded: u64,
}

#[derive(Clone)]
pub struct Repo {
    store: Arc<dyn ObjectStore>,
    level: i32,
}

impl Repo {
    pub fn new(store: Arc<dyn ObjectStore>, level: i32) -> Self {
        Repo { store, level }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Hashes and compresses a chunk (off the async workers) and uploads it
    /// unless an object with its hash is already in the store.
    pub async fn put_chunk(&self, data: Vec<u8>) -> Result<PutChunk, RepoError> {
        let level = self.level;
        let encoded = tokio::task::spawn_blocking(move || codec::encode(&data, level))
            .await
            .map_err(|e| {
                StoreError::new(
                    "encode",
                    "",
                    crate::store::ErrorKind::Transient,
                    e.to_string(),
                )
            })?;
        let key = chunk_key(&encoded.hash);
        if self.store.exists(&key).await? {
            return Ok(PutChunk {
                hash: encoded.hash,
                uploaded: 0,
            });
        }
        let len = encoded.bytes.len() as u64;
        self.store.put(&key, Bytes::from(encoded.bytes)).await?;
        Ok(PutChunk {
            hash: encoded.hash,
            uploaded: len,
        })
    }

    /// A chunk's bytes, verified against its hash.
    pub async fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, RepoError> {
        let obj = self
            .store
            .get(&chunk_key(hash))
            .await?
            .ok_or(RepoError::MissingChunk(*hash))?;
        let h = *hash;
        tokio::task::spawn_blocking(move || codec::decode(&obj, &h))
            .await
            .map_err(|e| {
                StoreError::new(
                    "decode",
                    "",
                    crate::store::ErrorKind::Transient,
                    e.to_string(),
                )
            })?
            .map_err(|source| RepoError::CorruptChunk {
                hash: *hash,
                source,
            })
    }

    /// Writes the manifest: the commit point of a snapshot.
    pub async fn put_manifest(&self, m: &Manifest) -> Result<(), RepoError> {
        let id = SnapshotId::parse(&m.header.id)
            .ok_or_else(|| RepoError::MissingManifest(m.header.id.clone()))?;
        self.store
            .put(&manifest_key(&id), Bytes::from(m.encode()))
            .await?;
        Ok(())
    }

    pub async fn get_manifest(&self, id: &SnapshotId) -> Result<Manifest, RepoError> {
        let bytes = self
            .store
            .get(&manifest_key(id))
            .await?
            .ok_or_else(|| RepoError::MissingManifest(id.to_string()))?;
        Manifest::decode(&bytes).map_err(|source| RepoError::CorruptManifest {
            id: id.to_string(),
            source,
        })
    }

    /// Every snapshot in the store, from any host.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotId>, RepoError> {
        let mut ids: Vec<SnapshotId> = self
            .store
            .list("manifests/")
            .await?
            .iter()
            .filter_map(|k| k.strip_prefix("manifests/").and_then(SnapshotId::parse))
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub async fn delete_manifest(&self, id: &SnapshotId) -> Result<(), RepoError> {
        Ok(self.store.delete(&manifest_key(id)).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ManifestHeader;
    use crate::store::LocalStore;

    #[tokio::test]
    async fn dedup_verify_and_manifests_on_the_local_store() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::new(
            Arc::new(LocalStore::open(dir.path()).unwrap()),
            codec::DEFAULT_LEVEL,
        );
        let data = b"chunk ".repeat(10_000);
        let first = repo.put_chunk(data.clone()).await.unwrap();
        assert!(first.uploaded > 0 && first.uploaded < data.len() as u64);
        let again = repo.put_chunk(data.clone()).await.unwrap();
        assert_eq!(
            again,
            PutChunk {
                hash: first.hash,
                uploaded: 0
            },
            "dedup by hash"
        );
        assert_eq!(repo.get_chunk(&first.hash).await.unwrap(), data);
        assert!(matches!(
            repo.get_chunk(&ChunkHash::of(b"x")).await,
            Err(RepoError::MissingChunk(_))
        ));

        // A flipped byte in the stored object is caught on read.
        let path = dir.path().join(chunk_key(&first.hash));
        let mut obj = std::fs::read(&path).unwrap();
        let n = obj.len();
        obj[n - 3] ^= 0xff;
        std::fs::write(&path, &obj).unwrap();
        assert!(matches!(
            repo.get_chunk(&first.hash).await,
            Err(RepoError::CorruptChunk { .. })
        ));

        let id = SnapshotId::generate();
        let mut m = Manifest::new(ManifestHeader {
            id: id.to_string(),
            volume: "v".into(),
            size: 4 << 20,
            chunk_size: 1 << 20,
            parent: None,
            created_at: "2026-11-25T00:00:00Z".into(),
            labels: Default::default(),
            changed_chunks: 1,
            logical_bytes: 1 << 20,
            uploaded_bytes: first.uploaded,
        });
        m.push(2, Some(first.hash));
        repo.put_manifest(&m).await.unwrap();
        assert_eq!(
            repo.list_snapshots().await.unwrap(),
            std::slice::from_ref(&id)
        );
        assert_eq!(repo.get_manifest(&id).await.unwrap(), m);
        repo.delete_manifest(&id).await.unwrap();
        assert!(matches!(
            repo.get_manifest(&id).await,
            Err(RepoError::MissingManifest(_))
        ));
    }
}
