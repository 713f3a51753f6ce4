//! The snapshot repository over an object store: content-addressed chunk
//! objects and manifests, laid out as `keys` says.
//!
//! Objects are immutable. Chunks are written before the manifest that names
//! them; a snapshot exists exactly when its manifest does, and the manifest
//! is written create-if-absent, so a snapshot once committed never changes.
//! A leaked chunk (its snapshot never finished) costs space until gc; a
//! manifest naming a missing chunk is a bug.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::codec::CodecError;
use crate::crypt::{DomainId, Encryption, KeyError, Keyring, MasterKeys, SealError};
use crate::hash::ChunkHash;
use crate::keys;
use crate::manifest::{Manifest, ManifestError, SnapshotId, StoredManifest};
use crate::page::{Page, PageSpan};
use crate::root::ManifestRoot;
use crate::store::{ErrorKind, ObjectStore, PutOutcome, StoreError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("chunk {0} is missing from the store")]
    MissingChunk(ChunkHash),
    #[error("chunk {hash} is damaged: {source}")]
    CorruptChunk { hash: ChunkHash, source: CodecError },
    /// The snapshot id as it was asked for.
    #[error("snapshot {0} not found")]
    MissingManifest(String),
    /// `id` is the snapshot id, or the key of a hold or trash entry.
    #[error("manifest of snapshot {id} is damaged: {source}")]
    CorruptManifest { id: String, source: ManifestError },
    #[error("manifest page {0} is missing from the store")]
    MissingPage(ChunkHash),
    #[error("manifest page {hash} is damaged: {source}")]
    CorruptPage {
        hash: ChunkHash,
        source: ManifestError,
    },
    /// A different manifest is already committed under this id.
    #[error("snapshot {0} already exists with a different manifest")]
    ManifestConflict(SnapshotId),
    /// A master key that cannot be used: unknown here, disabled, ...
    #[error("encryption domain {domain}: {source}")]
    Key { domain: DomainId, source: KeyError },
    #[error("encryption domain {0} has no data keys in the store")]
    MissingDomain(DomainId),
    #[error("encryption domain {domain} has no data key of generation {generation}")]
    MissingDataKey { domain: DomainId, generation: u32 },
    #[error("data key {generation} of encryption domain {domain} is damaged: {source}")]
    CorruptDataKey {
        domain: DomainId,
        generation: u32,
        source: SealError,
    },
    #[error("encryption domain {domain} is wrapped by key {found}, not {want}")]
    DomainKey {
        domain: DomainId,
        want: String,
        found: String,
    },
    /// `what` names the object.
    #[error("{0} is sealed: the store is encrypted and no keys were given")]
    NoKeys(String),
    #[error("the store is not encrypted: a snapshot in it cannot name a key")]
    NotEncrypted,
    #[error("the store is encrypted: a snapshot in it must name a key")]
    NeedsKey,
}

impl RepoError {
    /// A store error's own kind; every other error is about the data
    /// (missing, damaged, conflicting), which trying again does not change.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RepoError::Store(e) => e.kind,
            _ => ErrorKind::Permanent,
        }
    }

    /// Whether a key (not the data) is what is missing: reads fail until
    /// the key is back, and nothing in the store is damaged.
    pub fn is_key(&self) -> bool {
        matches!(
            self,
            RepoError::Key { .. } | RepoError::NoKeys(_) | RepoError::MissingDataKey { .. }
        )
    }

    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }

    /// Whether the store gave up because the caller is shutting down.
    pub fn is_cancelled(&self) -> bool {
        self.kind() == ErrorKind::Cancelled
    }
}

/// What storing one chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutChunk {
    pub hash: ChunkHash,
    /// Bytes written to the store: 0 when the chunk was already there.
    pub uploaded: u64,
}

/// gc's default grace period: an unreferenced object younger than this is
/// kept, and a snapshot must finish within it.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);

/// Pages read at once when a whole manifest is loaded.
const PAGE_READ_CONCURRENCY: usize = 16;

#[derive(Clone)]
pub struct Repo {
    store: Arc<dyn ObjectStore>,
    level: i32,
    gc_grace: Duration,
    /// Present exactly when the store is encrypted.
    keyring: Option<Arc<Keyring>>,
    /// The domain new chunks and pages are sealed in (see [`Repo::sealed_as`]).
    sealing: Option<Encryption>,
}

impl Repo {
    /// A repository over an unencrypted store.
    pub fn new(store: Arc<dyn ObjectStore>, level: i32) -> Self {
        Repo {
            store,
            level,
            gc_grace: DEFAULT_GC_GRACE,
            keyring: None,
            sealing: None,
        }
    }

    /// Makes this a repository over an encrypted store (its header says
    /// so, see `store_header`), unwrapping data keys with `keys`.
    pub fn with_keys(mut self, keys: Arc<dyn MasterKeys>) -> Self {
        self.keyring = Some(Arc::new(Keyring::new(Arc::clone(&self.store), keys)));
        self
    }

    /// This repository, sealing the chunks and pages it writes as `enc`
    /// says: `None` in an unencrypted store, a domain in an encrypted one.
    pub fn sealed_as(&self, enc: Option<&Encryption>) -> Result<Repo, RepoError> {
        match (&self.keyring, enc) {
            (None, Some(_)) => Err(RepoError::NotEncrypted),
            (Some(_), None) => Err(RepoError::NeedsKey),
            _ => Ok(Repo {
                sealing: enc.cloned(),
                ..self.clone()
            }),
        }
    }

    pub fn is_encrypted(&self) -> bool {
        self.keyring.is_some()
    }

    pub fn keyring(&self) -> Option<&Arc<Keyring>> {
        self.keyring.as_ref()
    }

    /// The domain new chunks and pages are sealed in.
    pub fn sealing(&self) -> Option<&Encryption> {
        self.sealing.as_ref()
    }

    /// The zstd level of new chunks (`codec::NO_COMPRESSION`: stored raw).
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Sets the grace period gc honours, which also bounds how long a
    /// snapshot may take (see `gc`).
    pub fn with_gc_grace(mut self, grace: Duration) -> Self {
        self.gc_grace = grace;
        self
    }

    pub fn gc_grace(&self) -> Duration {
        self.gc_grace
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Hashes and compresses (and in an encrypted store seals) a chunk,
    /// off the async workers, and uploads it unless an object with its
    /// name is already in the store.
    pub async fn put_chunk(&self, data: Vec<u8>) -> Result<PutChunk, RepoError> {
        let encoded = self.encode_chunk(data).await?;
        let key = keys::chunk_key(&encoded.hash);
        let uploaded = self.put_addressed(&key, encoded.bytes).await?;
        Ok(PutChunk {
            hash: encoded.hash,
            uploaded,
        })
    }

    /// Uploads a content-addressed object unless it is stored already;
    /// returns the bytes written.
    async fn put_addressed(&self, key: &str, bytes: Vec<u8>) -> Result<u64, RepoError> {
        if let Some(info) = self.store.head(key).await? {
            // An old object may be unreferenced and about to be swept by a
            // gc that cannot see this snapshot yet: make it young again, so
            // the grace period covers it until our manifest names it.
            let age = SystemTime::now()
                .duration_since(info.modified)
                .unwrap_or_default();
            if age > self.gc_grace / 2 {
                self.store.touch(key).await?;
            }
            return Ok(0);
        }
        let len = bytes.len() as u64;
        if let Err(e) = self.store.put(key, Bytes::from(bytes)).await {
            // A PUT whose answer was lost may have been done: the object is
            // content-addressed, so finding it settles the outcome (its
            // bytes are verified against the hash whenever they are read).
            if e.is_transient()
                && matches!(self.store.head(key).await, Ok(Some(info)) if info.size == len)
            {
                return Ok(len);
            }
            return Err(e.into());
        }
        Ok(len)
    }

    /// Stores a manifest page unless it is there; returns its name and the
    /// bytes written. An all-zero page is never stored (callers name it as
    /// a zero run instead).
    pub async fn put_page(&self, page: &Page) -> Result<(ChunkHash, u64), RepoError> {
        let (name, bytes) = self.encode_page(page).await?;
        let uploaded = self.put_addressed(&keys::page_key(&name), bytes).await?;
        Ok((name, uploaded))
    }

    /// Page `name`, which must cover `span`, checked against its name.
    pub async fn get_page(&self, name: &ChunkHash, span: PageSpan) -> Result<Page, RepoError> {
        let bytes = self
            .store
            .get(&keys::page_key(name))
            .await?
            .ok_or(RepoError::MissingPage(*name))?;
        self.decode_page(bytes, name, span).await
    }

    /// Page `index` of `root`: read from the store, or empty if all zero.
    pub async fn root_page(&self, root: &ManifestRoot, index: u64) -> Result<Page, RepoError> {
        let Some(span) = root.span(index) else {
            return Err(RepoError::CorruptManifest {
                id: root.header.id.to_string(),
                source: ManifestError::Page("page index past the last page"),
            });
        };
        match root.page(index) {
            Some(name) => self.get_page(&name, span).await,
            None => Ok(Page::new(span, Vec::new())),
        }
    }

    /// Every entry of a stored manifest in memory: the whole list, for
    /// callers that walk all of it (verify, export, diff, EBS listings).
    pub async fn materialize(&self, stored: StoredManifest) -> Result<Manifest, RepoError> {
        use futures_util::{StreamExt, TryStreamExt};
        let root = match stored {
            StoredManifest::V1(m) => return Ok(m),
            StoredManifest::V2(r) => r,
        };
        let mut named = Vec::with_capacity(root.pages().len());
        for &(index, name) in root.pages() {
            let span = root.span(index).ok_or_else(|| RepoError::CorruptManifest {
                id: root.header.id.to_string(),
                source: ManifestError::Page("page index past the last page"),
            })?;
            named.push((name, span));
        }
        // Owned values only: a future borrowing across this stream would
        // not be `Send` for every lifetime the daemon's spawns ask for.
        let mut hashed = Vec::new();
        let mut pages = futures_util::stream::iter(named.into_iter().map(|(name, span)| {
            let repo = self.clone();
            async move { repo.get_page(&name, span).await }
        }))
        .buffered(PAGE_READ_CONCURRENCY);
        while let Some(page) = pages.try_next().await? {
            hashed.extend(page.into_hashed());
        }
        drop(pages);
        Ok(Manifest::from_sorted(root.header, hashed))
    }

    /// A chunk's bytes, verified against its hash.
    pub async fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, RepoError> {
        let obj = self.get_chunk_object(hash).await?;
        self.decode_chunk(obj, hash).await.map(Vec::from)
    }

    /// A chunk object as stored, not yet verified.
    pub async fn get_chunk_object(&self, hash: &ChunkHash) -> Result<Bytes, RepoError> {
        self.store
            .get(&keys::chunk_key(hash))
            .await?
            .ok_or(RepoError::MissingChunk(*hash))
    }

    /// Whether the snapshot's manifest is in the store.
    pub async fn manifest_exists(&self, id: &SnapshotId) -> Result<bool, RepoError> {
        Ok(self.store.exists(&keys::manifest_key(id)).await?)
    }

    /// Deletes a snapshot: its manifest moves to the trash, where gc keeps
    /// honouring it for the grace period, then leaves `manifests/`. A crash
    /// in between leaves the snapshot in place; deleting again finishes.
    pub async fn trash_manifest(&self, id: &SnapshotId) -> Result<(), RepoError> {
        let key = keys::manifest_key(id);
        let bytes = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| RepoError::MissingManifest(id.to_string()))?;
        self.store
            .put(&keys::trashed_manifest_key(id), bytes)
            .await?;
        self.store.delete(&key).await?;
        Ok(())
    }

    /// Records that this host still needs the chunks of `m`: its pages
    /// (already stored when `m` was read from the store) and a root.
    pub async fn put_hold(&self, name: &str, m: &Manifest) -> Result<(), RepoError> {
        let (root, _) = crate::writer::write_pages(self, m).await?;
        self.put_hold_stored(name, &StoredManifest::V2(root)).await
    }

    /// Records a hold on a manifest read from the store: a copy of its
    /// object (for format 2 the root only; gc keeps its pages through it).
    pub async fn put_hold_stored(&self, name: &str, m: &StoredManifest) -> Result<(), RepoError> {
        let bytes = self.encode_root(m).await?;
        self.store
            .put(&keys::hold_key(name), Bytes::from(bytes))
            .await?;
        Ok(())
    }

    /// The names of the holds whose name starts with `name_prefix`, so a
    /// host can find the ones it recorded.
    pub async fn list_holds(&self, name_prefix: &str) -> Result<Vec<String>, RepoError> {
        let listed = self.store.list(&keys::hold_key(name_prefix)).await?;
        let mut names: Vec<String> = listed
            .iter()
            .filter_map(|o| keys::hold_of_key(&o.key))
            .map(str::to_owned)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Releases a hold through the trash, so a snapshot that took chunk
    /// hashes from the held manifest a moment ago still finishes safely.
    pub async fn release_hold(&self, name: &str) -> Result<(), RepoError> {
        let key = keys::hold_key(name);
        if let Some(bytes) = self.store.get(&key).await? {
            self.store.put(&keys::trashed_hold_key(name), bytes).await?;
            self.store.delete(&key).await?;
        }
        Ok(())
    }

    /// Announces a snapshot in progress to gc. Returns its start by the
    /// store's clock: the marker's own modification time. Writers use
    /// [`Repo::begin_snapshot`], which keeps it fresh.
    pub(crate) async fn begin_pending(&self, id: &SnapshotId) -> Result<SystemTime, RepoError> {
        let key = keys::pending_key(id);
        self.store.put(&key, Bytes::from_static(b"0")).await?;
        Ok(self
            .store
            .head(&key)
            .await?
            .map(|i| i.modified)
            .unwrap_or_else(SystemTime::now))
    }

    /// Keeps a snapshot's marker fresh; it carries the start, in seconds
    /// since the epoch, since its modification time moves.
    pub(crate) async fn refresh_pending(
        &self,
        id: &SnapshotId,
        start: SystemTime,
    ) -> Result<(), RepoError> {
        let secs = start
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.store
            .put(&keys::pending_key(id), Bytes::from(secs.to_string()))
            .await?;
        Ok(())
    }

    /// Removes a snapshot's marker: one a dead run left behind, or (through
    /// `PendingSnapshot::end`) one whose snapshot ended.
    pub async fn end_pending(&self, id: &SnapshotId) -> Result<(), RepoError> {
        Ok(self.store.delete(&keys::pending_key(id)).await?)
    }

    /// The store's own clock, read from a probe object: gc compares it with
    /// objects' modification times, which that clock wrote.
    pub async fn store_now(&self) -> Result<SystemTime, RepoError> {
        let key = keys::clock_probe_key(SnapshotId::generate().as_str());
        self.store.put(&key, Bytes::from_static(b"clock")).await?;
        let info = self.store.head(&key).await;
        let _ = self.store.delete(&key).await;
        Ok(info?.map(|i| i.modified).unwrap_or_else(SystemTime::now))
    }

    /// Decodes any manifest-shaped object (a manifest, a hold, a trashed
    /// one) with every entry in memory.
    pub async fn get_manifest_at(&self, key: &str) -> Result<Option<Manifest>, RepoError> {
        match self.get_stored_at(key).await? {
            Some(s) => self.materialize(s).await.map(Some),
            None => Ok(None),
        }
    }

    /// Decodes any manifest-shaped object as stored (a format-2 root
    /// without its pages), for gc and lazy readers.
    pub async fn get_stored_at(&self, key: &str) -> Result<Option<StoredManifest>, RepoError> {
        let Some(bytes) = self.store.get(key).await? else {
            return Ok(None);
        };
        self.decode_root(bytes, key, key).await.map(Some)
    }
}

impl Repo {
    /// Writes the manifest, format 2: its pages, then the root, the
    /// commit point of a snapshot (see [`Repo::commit_root`]). Returns the
    /// root.
    pub async fn put_manifest(&self, m: &Manifest) -> Result<ManifestRoot, RepoError> {
        let (root, _) = crate::writer::write_pages(self, m).await?;
        self.commit_root(&root).await?;
        Ok(root)
    }

    /// Writes a format-1 manifest, as older versions did: for tests and
    /// tools that make old-format stores.
    pub async fn put_manifest_v1(&self, m: &Manifest) -> Result<(), RepoError> {
        self.commit(StoredManifest::V1(m.clone())).await
    }

    /// Writes a root whose pages are all stored: the commit point.
    pub async fn commit_root(&self, root: &ManifestRoot) -> Result<(), RepoError> {
        self.commit(StoredManifest::V2(root.clone())).await
    }

    /// Whether `existing`, found under our manifest's key, is our manifest:
    /// the same bytes, or (sealed afresh, so with other bytes) the same
    /// plaintext.
    async fn same_manifest(&self, existing: Bytes, bytes: &Bytes, plain: &[u8], key: &str) -> bool {
        if existing == *bytes {
            return true;
        }
        self.is_encrypted()
            && matches!(self.decode_root_plain(existing, key, key).await, Ok((_, p)) if p == plain)
    }

    /// Never replaces a manifest: finding the very same manifest committed
    /// already is success (an earlier attempt whose reply was lost),
    /// finding anything else is a conflict.
    async fn commit(&self, m: StoredManifest) -> Result<(), RepoError> {
        let id = &m.header().id;
        let plain = m.encode();
        let bytes = Bytes::from(self.encode_root(&m).await?);
        let key = keys::manifest_key(id);
        let outcome = match self.store.put_if_absent(&key, bytes.clone()).await {
            Ok(o) => o,
            // The retries gave up on a transient error: the last attempt may
            // have landed and only its reply been lost. The snapshot exists
            // exactly when its manifest does, so the store decides.
            Err(e) if e.is_transient() => match self.store.get(&key).await {
                Ok(Some(existing))
                    if self
                        .same_manifest(existing.clone(), &bytes, &plain, &key)
                        .await =>
                {
                    tracing::warn!(snapshot = %id, error = %e,
                        "the manifest write's reply was lost, but the manifest is in the store: the snapshot completed");
                    return Ok(());
                }
                _ => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        };
        match outcome {
            PutOutcome::Created => Ok(()),
            // A manifest that vanished since is one deleted as it was
            // written: not ours to recreate.
            PutOutcome::AlreadyExists => match self.store.get(&key).await? {
                Some(existing)
                    if self
                        .same_manifest(existing.clone(), &bytes, &plain, &key)
                        .await =>
                {
                    Ok(())
                }
                _ => Err(RepoError::ManifestConflict(id.clone())),
            },
        }
    }

    /// A snapshot's manifest with every entry in memory.
    pub async fn get_manifest(&self, id: &SnapshotId) -> Result<Manifest, RepoError> {
        let stored = self.get_stored(id).await?;
        self.materialize(stored).await
    }

    /// A snapshot's manifest as stored: for format 2 the root only.
    pub async fn get_stored(&self, id: &SnapshotId) -> Result<StoredManifest, RepoError> {
        let bytes = self
            .store
            .get(&keys::manifest_key(id))
            .await?
            .ok_or_else(|| RepoError::MissingManifest(id.to_string()))?;
        self.decode_root(bytes, &keys::manifest_key(id), id.as_str())
            .await
    }

    /// Every snapshot in the store, from any host.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotId>, RepoError> {
        let mut ids: Vec<SnapshotId> = self
            .store
            .list(keys::MANIFESTS)
            .await?
            .iter()
            .filter_map(|o| keys::snapshot_of_manifest_key(&o.key))
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub async fn delete_manifest(&self, id: &SnapshotId) -> Result<(), RepoError> {
        Ok(self.store.delete(&keys::manifest_key(id)).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::manifest::ManifestHeader;
    use crate::store::faulty::{Fault, Faulty};
    use crate::store::{LocalStore, MemoryStore, RetryPolicy, Retrying};

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
        let path = dir.path().join(keys::chunk_key(&first.hash));
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
            id: id.clone(),
            volume: "v".into(),
            size: 4 << 20,
            chunk_size: 1 << 20,
            parent: None,
            created_at: "2026-11-25T00:00:00Z".into(),
            labels: Default::default(),
            changed_chunks: 1,
            logical_bytes: 1 << 20,
            uploaded_bytes: first.uploaded,
            encryption: None,
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

    fn header(id: &SnapshotId) -> ManifestHeader {
        ManifestHeader {
            id: id.clone(),
            volume: "v".into(),
            size: 4 << 20,
            chunk_size: 1 << 20,
            parent: None,
            created_at: "2026-11-25T00:00:00Z".into(),
            labels: Default::default(),
            changed_chunks: 0,
            logical_bytes: 0,
            uploaded_bytes: 0,
            encryption: None,
        }
    }

    /// The manifest is never replaced: the same bytes again are fine (a
    /// retry), different ones are a conflict and leave the first in place.
    async fn manifest_is_written_once(store: Arc<dyn ObjectStore>) {
        let repo = Repo::new(store, codec::DEFAULT_LEVEL);
        let id = SnapshotId::generate();
        let mut m = Manifest::new(header(&id));
        m.push(1, Some(ChunkHash::of(b"a")));
        repo.put_manifest(&m).await.unwrap();
        repo.put_manifest(&m).await.unwrap();
        let mut other = Manifest::new(header(&id));
        other.push(2, Some(ChunkHash::of(b"b")));
        match repo.put_manifest(&other).await {
            Err(RepoError::ManifestConflict(c)) => assert_eq!(c, id),
            r => panic!("expected a conflict, got {r:?}"),
        }
        assert_eq!(repo.get_manifest(&id).await.unwrap(), m);
        let e = RepoError::ManifestConflict(id.clone());
        assert!(!e.is_transient());
        assert_eq!(
            e.to_string(),
            format!("snapshot {id} already exists with a different manifest")
        );
    }

    #[tokio::test]
    async fn manifest_is_written_once_on_the_local_store() {
        let dir = tempfile::tempdir().unwrap();
        manifest_is_written_once(Arc::new(LocalStore::open(dir.path()).unwrap())).await;
    }

    #[tokio::test]
    async fn manifest_is_written_once_in_memory() {
        manifest_is_written_once(Arc::new(MemoryStore::new())).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_reply_to_the_manifest_write_is_success_on_retry() {
        let faulty = Arc::new(Faulty::new(MemoryStore::new()));
        let store = Retrying::new(
            Arc::clone(&faulty) as Arc<dyn ObjectStore>,
            RetryPolicy::default(),
        );
        let repo = Repo::new(Arc::new(store), codec::DEFAULT_LEVEL);
        let id = SnapshotId::generate();
        let m = Manifest::new(header(&id));
        faulty.fail_next(1, Fault::LostReply);
        repo.put_manifest(&m).await.unwrap();
        assert_eq!(repo.get_manifest(&id).await.unwrap(), m);
    }

    /// Every PUT is done but its answer is lost.
    struct LostPuts(MemoryStore);

    impl ObjectStore for LostPuts {
        fn put<'a>(
            &'a self,
            key: &'a str,
            data: Bytes,
        ) -> crate::store::BoxFuture<'a, Result<(), StoreError>> {
            Box::pin(async move {
                self.0.put(key, data).await?;
                Err(StoreError::new(
                    "put",
                    key,
                    ErrorKind::Transient,
                    "connection reset",
                ))
            })
        }
        fn put_if_absent<'a>(
            &'a self,
            key: &'a str,
            data: Bytes,
        ) -> crate::store::BoxFuture<'a, Result<crate::store::PutOutcome, StoreError>> {
            self.0.put_if_absent(key, data)
        }
        fn get<'a>(
            &'a self,
            key: &'a str,
        ) -> crate::store::BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
            self.0.get(key)
        }
        fn head<'a>(
            &'a self,
            key: &'a str,
        ) -> crate::store::BoxFuture<'a, Result<Option<crate::store::ObjectInfo>, StoreError>>
        {
            self.0.head(key)
        }
        fn touch<'a>(
            &'a self,
            key: &'a str,
        ) -> crate::store::BoxFuture<'a, Result<(), StoreError>> {
            self.0.touch(key)
        }
        fn list<'a>(
            &'a self,
            prefix: &'a str,
        ) -> crate::store::BoxFuture<'a, Result<Vec<crate::store::ObjectInfo>, StoreError>>
        {
            self.0.list(prefix)
        }
        fn delete<'a>(
            &'a self,
            key: &'a str,
        ) -> crate::store::BoxFuture<'a, Result<(), StoreError>> {
            self.0.delete(key)
        }
        fn describe(&self) -> String {
            "lost-puts".into()
        }
    }

    #[tokio::test]
    async fn a_chunk_put_whose_answer_was_lost_is_found_and_kept() {
        let repo = Repo::new(Arc::new(LostPuts(MemoryStore::new())), codec::DEFAULT_LEVEL);
        let data = vec![7u8; 100_000];
        let put = repo.put_chunk(data.clone()).await.unwrap();
        assert!(put.uploaded > 0);
        assert_eq!(repo.get_chunk(&put.hash).await.unwrap(), data);
    }

    #[tokio::test]
    async fn holds_are_listed_by_name() {
        let repo = Repo::new(Arc::new(MemoryStore::new()), codec::DEFAULT_LEVEL);
        let m = Manifest::new(header(&SnapshotId::generate()));
        for name in ["host-a-2", "host-a-1", "host-b-1"] {
            repo.put_hold(name, &m).await.unwrap();
        }
        assert_eq!(
            repo.list_holds("host-a-").await.unwrap(),
            ["host-a-1", "host-a-2"]
        );
        assert_eq!(repo.list_holds("").await.unwrap().len(), 3);
        repo.release_hold("host-a-1").await.unwrap();
        assert_eq!(repo.list_holds("host-a-").await.unwrap(), ["host-a-2"]);
        // The released hold waits in the trash for gc's grace period.
        assert!(
            repo.store()
                .exists(&keys::trashed_hold_key("host-a-1"))
                .await
                .unwrap()
        );
    }
}
