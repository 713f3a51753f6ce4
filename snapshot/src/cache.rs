//! The host's chunk cache and the fetcher in front of it.
//!
//! The cache is content-addressed: chunk objects, exactly as the store holds
//! them, in files named by hash under one directory shared by every volume
//! of the host, so restoring several volumes from related snapshots fetches
//! each chunk from the store once. It is bounded in bytes and evicts the
//! least recently used objects. Nothing in it is trusted: every object is
//! verified against its hash when read, and a damaged one is dropped and
//! fetched again. Files are written to a temporary name and renamed, without
//! fsync: losing a cache file costs a fetch, never a wrong byte. In an
//! encrypted store the objects are sealed, here as in the store, and opened
//! on every read.
//!
//! The [`Fetcher`] serves chunks from the cache, else from the store, and
//! makes concurrent requests for the same chunk share one fetch.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::OnceCell;
use tracing::{debug, warn};

use crate::hash::ChunkHash;
use crate::repo::{Repo, RepoError};

pub struct ChunkCache {
    dir: PathBuf,
    limit: u64,
    index: Mutex<Index>,
    tmp_seq: AtomicU64,
    pub stats: CacheStats,
}

#[derive(Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub damaged: AtomicU64,
}

#[derive(Default)]
struct Index {
    /// hash -> (size, last use).
    entries: HashMap<ChunkHash, (u64, u64)>,
    /// last use -> hash: the eviction order.
    by_use: BTreeMap<u64, ChunkHash>,
    used: u64,
    clock: u64,
}

impl Index {
    fn touch(&mut self, h: &ChunkHash) -> bool {
        let Some(e) = self.entries.get_mut(h) else {
            return false;
        };
        self.by_use.remove(&e.1);
        self.clock += 1;
        e.1 = self.clock;
        self.by_use.insert(self.clock, *h);
        true
    }

    fn insert(&mut self, h: ChunkHash, size: u64) {
        if self.entries.contains_key(&h) {
            self.touch(&h);
            return;
        }
        self.clock += 1;
        self.entries.insert(h, (size, self.clock));
        self.by_use.insert(self.clock, h);
        self.used += size;
    }

    fn remove(&mut self, h: &ChunkHash) -> bool {
        match self.entries.remove(h) {
            Some((size, tick)) => {
                self.by_use.remove(&tick);
                self.used -= size;
                true
            }
            None => false,
        }
    }

    /// Drops least recently used entries until `used <= limit`.
    fn evict_to(&mut self, limit: u64) -> Vec<ChunkHash> {
        let mut out = Vec::new();
        while self.used > limit {
            let Some((_, h)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((size, _)) = self.entries.remove(&h) {
                self.used -= size;
            }
            out.push(h);
        }
        out
    }
}

const TMP_DIR: &str = ".tmp";

impl ChunkCache {
    /// Opens (creating) the cache under `dir` with a bound of `limit` bytes,
    /// indexing what a previous run left; a limit of 0 disables caching.
    pub fn open(dir: &Path, limit: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join(TMP_DIR))?;
        for e in std::fs::read_dir(dir.join(TMP_DIR))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let mut found = Vec::new();
        for sub in std::fs::read_dir(dir)?.flatten() {
            if sub.file_name() == TMP_DIR || !sub.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())?.flatten() {
                let name = f.file_name();
                match name.to_str().and_then(|n| n.parse::<ChunkHash>().ok()) {
                    Some(h) => {
                        let m = f.metadata()?;
                        found.push((m.accessed().or_else(|_| m.modified())?, h, m.len()));
                    }
                    None => {
                        let _ = std::fs::remove_file(f.path());
                    }
                }
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, h, size) in found {
            index.insert(h, size);
        }
        let cache = ChunkCache {
            dir: dir.to_owned(),
            limit,
            index: Mutex::new(index),
            tmp_seq: AtomicU64::new(0),
            stats: CacheStats::default(),
        };
        let evicted = cache.lock().evict_to(limit);
        for h in evicted {
            let _ = std::fs::remove_file(cache.path(&h));
        }
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, h: &ChunkHash) -> PathBuf {
        let hex = h.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    pub fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The chunk's verified bytes, if cached and intact, opened and checked
    /// by `repo`.
    pub async fn get(&self, h: &ChunkHash, repo: &Repo) -> Option<Bytes> {
        if !self.lock().touch(h) {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let path = self.path(h);
        let read = tokio::task::spawn_blocking(move || std::fs::read(path)).await;
        let obj = match read {
            Ok(Ok(b)) => Bytes::from(b),
            _ => {
                self.forget(h);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        match repo.decode_chunk(obj, h).await {
            Ok(data) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Some(data)
            }
            // The file is fine; the key is what is missing.
            Err(e) if e.is_key() => {
                debug!(chunk = %h, error = %e, "cached chunk not opened");
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => {
                warn!(chunk = %h, error = %e, "damaged chunk in the cache; dropped");
                self.stats.damaged.fetch_add(1, Ordering::Relaxed);
                self.forget(h);
                let _ = std::fs::remove_file(self.path(h));
                None
            }
        }
    }

    fn forget(&self, h: &ChunkHash) {
        self.lock().remove(h);
    }

    /// Adds a verified chunk object, evicting to stay within the limit.
    /// Failing to cache is logged, never an error: the store still has it.
    pub async fn put(&self, h: ChunkHash, obj: Bytes) {
        if self.limit == 0 || obj.len() as u64 > self.limit {
            return;
        }
        if self.lock().entries.contains_key(&h) {
            return;
        }
        let path = self.path(&h);
        let tmp = self.dir.join(TMP_DIR).join(format!(
            "{}-{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let size = obj.len() as u64;
        let written = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(path.parent().expect("cache paths have a parent"))?;
            std::fs::write(&tmp, &obj)?;
            std::fs::rename(&tmp, &path)
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            debug!(chunk = %h, "could not cache a chunk");
            return;
        }
        let evicted = {
            let mut index = self.lock();
            index.insert(h, size);
            index.evict_to(self.limit)
        };
        for e in evicted {
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            let _ = std::fs::remove_file(self.path(&e));
        }
    }
}

type Shared = Arc<OnceCell<Result<Bytes, RepoError>>>;

/// Chunks by hash: from the cache, else from the store (then cached); one
/// fetch per chunk however many ask at once.
pub struct Fetcher {
    repo: Repo,
    cache: Option<Arc<ChunkCache>>,
    in_flight: Mutex<HashMap<ChunkHash, Shared>>,
    pub fetched_bytes: AtomicU64,
    pub fetches: AtomicU64,
}

impl Fetcher {
    /// The repository chunks are fetched from.
    pub fn repo(&self) -> &Repo {
        &self.repo
    }

    pub fn new(repo: Repo, cache: Option<Arc<ChunkCache>>) -> Self {
        Fetcher {
            repo,
            cache,
            in_flight: Mutex::new(HashMap::new()),
            fetched_bytes: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
        }
    }

    pub fn cache(&self) -> Option<&Arc<ChunkCache>> {
        self.cache.as_ref()
    }

    /// The chunk's bytes, verified against `h`.
    pub async fn get(&self, h: &ChunkHash) -> Result<Bytes, RepoError> {
        let cell = {
            let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(map.entry(*h).or_default())
        };
        // The first caller fetches; the rest wait for its result. If the
        // first is cancelled, the next waiter takes over.
        let result = cell.get_or_init(|| self.load(h)).await.clone();
        {
            let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if map.get(h).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                map.remove(h);
            }
        }
        result
    }

    async fn load(&self, h: &ChunkHash) -> Result<Bytes, RepoError> {
        if let Some(cache) = &self.cache
            && let Some(data) = cache.get(h, &self.repo).await
        {
            return Ok(data);
        }
        let obj = self.repo.get_chunk_object(h).await?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.fetched_bytes
            .fetch_add(obj.len() as u64, Ordering::Relaxed);
        let Some(cache) = &self.cache else {
            // Not shared: a sealed object is opened where it lies.
            return self.repo.decode_chunk(obj, h).await;
        };
        let data = self.repo.decode_chunk(obj.clone(), h).await?;
        cache.put(*h, obj).await;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::store::LocalStore;

    fn repo(dir: &Path) -> Repo {
        Repo::new(
            Arc::new(LocalStore::open(&dir.join("store")).unwrap()),
            codec::DEFAULT_LEVEL,
        )
    }

    #[tokio::test]
    async fn evicts_least_recently_used_and_reindexes_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let objs: Vec<_> = (0..4u8)
            .map(|i| codec::encode(&vec![i; 10_000], codec::DEFAULT_LEVEL))
            .collect();
        let size = objs[0].bytes.len() as u64;
        let cache = ChunkCache::open(&dir.path().join("c"), 3 * size).unwrap();
        for o in &objs[..3] {
            cache.put(o.hash, Bytes::from(o.bytes.clone())).await;
        }
        // Using 0 makes 1 the least recently used.
        assert_eq!(
            cache.get(&objs[0].hash, &r).await.unwrap(),
            vec![0u8; 10_000]
        );
        cache
            .put(objs[3].hash, Bytes::from(objs[3].bytes.clone()))
            .await;
        assert!(cache.get(&objs[1].hash, &r).await.is_none());
        for i in [0, 2, 3] {
            assert!(cache.get(&objs[i].hash, &r).await.is_some(), "chunk {i}");
        }
        assert_eq!(cache.used_bytes(), 3 * size);
        drop(cache);
        let again = ChunkCache::open(&dir.path().join("c"), 3 * size).unwrap();
        assert_eq!(again.used_bytes(), 3 * size);
        assert!(again.get(&objs[3].hash, &r).await.is_some());
    }

    #[tokio::test]
    async fn damaged_cache_files_are_dropped_and_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let data = b"cached chunk ".repeat(5000);
        let put = repo.put_chunk(data.clone()).await.unwrap();
        let cache = Arc::new(ChunkCache::open(&dir.path().join("c"), 1 << 30).unwrap());
        let f = Fetcher::new(repo, Some(Arc::clone(&cache)));
        assert_eq!(*f.get(&put.hash).await.unwrap(), data);
        assert_eq!(f.fetches.load(Ordering::Relaxed), 1);
        assert_eq!(*f.get(&put.hash).await.unwrap(), data);
        assert_eq!(
            f.fetches.load(Ordering::Relaxed),
            1,
            "second read hit the cache"
        );
        let path = cache.path(&put.hash);
        let mut obj = std::fs::read(&path).unwrap();
        let n = obj.len();
        obj[n - 1] ^= 1;
        std::fs::write(&path, obj).unwrap();
        assert_eq!(*f.get(&put.hash).await.unwrap(), data);
        assert_eq!(f.fetches.load(Ordering::Relaxed), 2);
        assert_eq!(cache.stats.damaged.load(Ordering::Relaxed), 1);
    }

    /// A store whose reads wait at a gate, so a test can hold a fetch in
    /// flight while more requests for the same chunk arrive.
    struct GatedStore {
        inner: LocalStore,
        gets: AtomicU64,
        gate: tokio::sync::Semaphore,
    }

    impl crate::store::ObjectStore for GatedStore {
        fn put<'a>(
            &'a self,
            key: &'a str,
            data: Bytes,
        ) -> crate::store::BoxFuture<'a, Result<(), crate::StoreError>> {
            self.inner.put(key, data)
        }
        fn put_if_absent<'a>(
            &'a self,
            key: &'a str,
            data: Bytes,
        ) -> crate::store::BoxFuture<'a, Result<crate::PutOutcome, crate::StoreError>> {
            self.inner.put_if_absent(key, data)
        }
        fn get<'a>(
            &'a self,
            key: &'a str,
        ) -> crate::store::BoxFuture<'a, Result<Option<Bytes>, crate::StoreError>> {
            Box::pin(async move {
                self.gets.fetch_add(1, Ordering::SeqCst);
                let _p = self.gate.acquire().await.unwrap();
                self.inner.get(key).await
            })
        }
        fn head<'a>(
            &'a self,
            key: &'a str,
        ) -> crate::store::BoxFuture<'a, Result<Option<crate::store::ObjectInfo>, crate::StoreError>>
        {
            self.inner.head(key)
        }
        fn touch<'a>(
            &'a self,
            key: &'a str,
        ) -> crate::store::BoxFuture<'a, Result<(), crate::StoreError>> {
            self.inner.touch(key)
        }
        fn list<'a>(
            &'a self,
            prefix: &'a str,
        ) -> crate::store::BoxFuture<'a, Result<Vec<crate::store::ObjectInfo>, crate::StoreError>>
        {
            self.inner.list(prefix)
        }
        fn delete<'a>(
            &'a self,
            key: &'a str,
        ) -> crate::store::BoxFuture<'a, Result<(), crate::StoreError>> {
            self.inner.delete(key)
        }
        fn describe(&self) -> String {
            "gated".into()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_one_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(GatedStore {
            inner: LocalStore::open(dir.path()).unwrap(),
            gets: AtomicU64::new(0),
            gate: tokio::sync::Semaphore::new(0),
        });
        let repo = Repo::new(store.clone(), codec::DEFAULT_LEVEL);
        let data = b"shared ".repeat(70_000);
        let put = repo.put_chunk(data.clone()).await.unwrap();
        let f = Arc::new(Fetcher::new(repo, None));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (f, h) = (Arc::clone(&f), put.hash);
            tasks.push(tokio::spawn(async move { f.get(&h).await.unwrap() }));
        }
        while store.gets.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Let every task reach the fetcher while the first fetch waits.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        store.gate.add_permits(100);
        for t in tasks {
            assert_eq!(*t.await.unwrap(), data);
        }
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
        assert_eq!(f.fetches.load(Ordering::Relaxed), 1);
        assert!(matches!(
            f.get(&crate::ChunkHash::of(b"nothing")).await,
            Err(RepoError::MissingChunk(_))
        ));
    }
}
