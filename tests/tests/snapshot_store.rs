//! The `snapshot` crate against both stores: the local directory and a real
//! S3-compatible server. Chunks dedup by hash, read back verified; damage is
//! detected; manifests are the commit point; a store that goes down fails
//! in bounded time and is reported as transient.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use snapshot::codec::DEFAULT_LEVEL;
use snapshot::keys::chunk_key;
use snapshot::keys::manifest_key;
use snapshot::store::{LocalStore, S3Store};
use snapshot::{
    ChunkHash, Manifest, ManifestHeader, ObjectStore, PutOutcome, Repo, RepoError, SnapshotId,
};
use volumed_tests::s3::S3Server;

fn header(id: &SnapshotId) -> ManifestHeader {
    ManifestHeader {
        id: id.clone(),
        volume: "data".into(),
        size: 8 << 20,
        chunk_size: 1 << 20,
        parent: None,
        created_at: "2026-11-25T00:00:00Z".into(),
        labels: [("k".to_string(), "v".to_string())].into(),
        changed_chunks: 2,
        logical_bytes: 2 << 20,
        uploaded_bytes: 0,
        encryption: None,
    }
}

/// The same checks for any store.
async fn exercise(store: Arc<dyn ObjectStore>) {
    let repo = Repo::new(Arc::clone(&store), DEFAULT_LEVEL);
    let text = b"volumed chunk ".repeat(80_000)[..1 << 20].to_vec();
    let mut x = 7u64;
    let random: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();

    let a = repo.put_chunk(text.clone()).await.unwrap();
    let b = repo.put_chunk(random.clone()).await.unwrap();
    assert!(
        a.uploaded > 0 && a.uploaded < 100_000,
        "compressible chunk is compressed: {}",
        a.uploaded
    );
    assert!(b.uploaded >= 1 << 20, "random chunk is stored raw");
    assert_eq!(
        repo.put_chunk(text.clone()).await.unwrap().uploaded,
        0,
        "dedup"
    );
    assert_eq!(repo.get_chunk(&a.hash).await.unwrap(), text);
    assert_eq!(repo.get_chunk(&b.hash).await.unwrap(), random);

    // HEAD and touch, which gc's grace period relies on: a touch makes the
    // object young again and leaves its bytes alone.
    let info = store.head(&chunk_key(&a.hash)).await.unwrap().unwrap();
    assert_eq!(info.size, a.uploaded);
    assert!(store.head("chunks/00/none").await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    store.touch(&chunk_key(&a.hash)).await.unwrap();
    let touched = store.head(&chunk_key(&a.hash)).await.unwrap().unwrap();
    assert!(touched.modified > info.modified, "{info:?} {touched:?}");
    assert_eq!(repo.get_chunk(&a.hash).await.unwrap(), text);
    let listed = store.list("chunks/").await.unwrap();
    assert!(
        listed
            .iter()
            .any(|o| o.key == chunk_key(&a.hash) && o.size == a.uploaded)
    );

    let id = SnapshotId::generate();
    let mut m = Manifest::new(header(&id));
    m.push(1, Some(a.hash));
    m.push(6, Some(b.hash));
    repo.put_manifest(&m).await.unwrap();
    assert!(repo.list_snapshots().await.unwrap().contains(&id));
    assert_eq!(repo.get_manifest(&id).await.unwrap(), m);

    // The manifest is written once: the same bytes again are a retry and
    // succeed, different ones are a conflict that leaves the first alone.
    repo.put_manifest(&m).await.unwrap();
    let mut other = Manifest::new(header(&id));
    other.push(2, Some(a.hash));
    assert!(matches!(
        repo.put_manifest(&other).await,
        Err(RepoError::ManifestConflict(c)) if c == id
    ));
    assert_eq!(repo.get_manifest(&id).await.unwrap(), m);

    // Format 2: the manifest object is a root naming one stored page; a
    // hold of it copies the root only. A damaged or missing page is
    // refused by name.
    let mkey = manifest_key(&id);
    let root_bytes = store.get(&mkey).await.unwrap().unwrap();
    assert_eq!(&root_bytes[4..8], &2u32.to_le_bytes());
    // Two pages: this one's, and the conflicting manifest's, written
    // before its root was refused (garbage for gc).
    assert_eq!(store.list(snapshot::keys::PAGES).await.unwrap().len(), 2);
    let stored = repo.get_stored(&id).await.unwrap();
    let snapshot::StoredManifest::V2(root) = &stored else {
        panic!("new manifests are format 2");
    };
    let page_key = snapshot::keys::page_key(&root.pages()[0].1);
    repo.put_hold_stored("host-x", &stored).await.unwrap();
    assert_eq!(
        store.get("holds/host-x").await.unwrap().unwrap(),
        root_bytes
    );
    assert_eq!(store.list(snapshot::keys::PAGES).await.unwrap().len(), 2);
    repo.release_hold("host-x").await.unwrap();
    let page = store.get(&page_key).await.unwrap().unwrap();
    let mut bad = page.to_vec();
    bad[40] ^= 0x02;
    store.put(&page_key, Bytes::from(bad)).await.unwrap();
    assert!(matches!(
        repo.get_manifest(&id).await,
        Err(RepoError::CorruptPage { .. })
    ));
    store.delete(&page_key).await.unwrap();
    assert!(matches!(
        repo.get_manifest(&id).await,
        Err(RepoError::MissingPage(_))
    ));
    store.put(&page_key, page).await.unwrap();
    assert_eq!(repo.get_manifest(&id).await.unwrap(), m);
    // Format 1, as older versions wrote it, still reads.
    let old = SnapshotId::generate();
    let mut v1 = Manifest::new(header(&old));
    v1.push(3, Some(b.hash));
    repo.put_manifest_v1(&v1).await.unwrap();
    assert_eq!(repo.get_manifest(&old).await.unwrap(), v1);
    repo.delete_manifest(&old).await.unwrap();

    // Create-if-absent is atomic: of racing writers exactly one creates.
    let racing = manifest_key(&SnapshotId::generate());
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8u8 {
        let (store, key) = (Arc::clone(&store), racing.clone());
        set.spawn(async move {
            store
                .put_if_absent(&key, Bytes::from(vec![i; 1000]))
                .await
                .unwrap()
        });
    }
    let outcomes = set.join_all().await;
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == PutOutcome::Created)
            .count(),
        1,
        "{outcomes:?}"
    );
    let won = store.get(&racing).await.unwrap().unwrap();
    assert!(won.len() == 1000 && won.iter().all(|b| *b == won[0]));
    assert_eq!(
        store
            .put_if_absent(&racing, Bytes::from_static(b"late"))
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    store.delete(&racing).await.unwrap();

    // Damage: a flipped byte and a truncated object are caught on read.
    let key = chunk_key(&b.hash);
    let good = store.get(&key).await.unwrap().unwrap();
    let mut flipped = good.to_vec();
    flipped[good.len() / 2] ^= 0x01;
    store.put(&key, Bytes::from(flipped)).await.unwrap();
    assert!(matches!(
        repo.get_chunk(&b.hash).await,
        Err(RepoError::CorruptChunk { .. })
    ));
    store
        .put(&key, good.slice(..good.len() - 10))
        .await
        .unwrap();
    assert!(matches!(
        repo.get_chunk(&b.hash).await,
        Err(RepoError::CorruptChunk { .. })
    ));
    store.delete(&key).await.unwrap();
    assert!(matches!(
        repo.get_chunk(&b.hash).await,
        Err(RepoError::MissingChunk(_))
    ));
    assert!(matches!(
        repo.get_chunk(&ChunkHash::of(b"never")).await,
        Err(RepoError::MissingChunk(_))
    ));

    // A damaged manifest is refused, never half-read.
    let mut mb = store.get(&mkey).await.unwrap().unwrap().to_vec();
    mb[10] ^= 0x10;
    store.put(&mkey, Bytes::from(mb)).await.unwrap();
    assert!(matches!(
        repo.get_manifest(&id).await,
        Err(RepoError::CorruptManifest { .. })
    ));
    repo.delete_manifest(&id).await.unwrap();
    assert!(!repo.list_snapshots().await.unwrap().contains(&id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_store() {
    let dir = tempfile::tempdir().unwrap();
    exercise(Arc::new(LocalStore::open(dir.path()).unwrap())).await;
}

#[test]
fn s3_store_and_outage() {
    let mut server = S3Server::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(exercise(Arc::new(S3Store::new(
        server.settings("repo-test"),
    ))));

    // Two prefixes in one bucket are two separate stores.
    let (one, two) = (
        S3Store::new(server.settings("one")),
        S3Store::new(server.settings("two")),
    );
    rt.block_on(async {
        one.put("manifests/snap-1", Bytes::from_static(b"x"))
            .await
            .unwrap();
        let keys: Vec<String> = one
            .list("manifests/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["manifests/snap-1"]);
        assert!(two.list("manifests/").await.unwrap().is_empty());
    });

    // The store goes down: operations fail, transiently, in bounded time.
    server.stop();
    let store = S3Store::new(server.settings("one"));
    let t = Instant::now();
    let err = rt.block_on(store.get("manifests/snap-1")).unwrap_err();
    assert!(err.is_transient(), "{err}");
    // The bound is the configured operation timeout, not a speed claim.
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());

    // And it comes back with its data.
    server.start_again();
    let got = rt.block_on(store.get("manifests/snap-1")).unwrap();
    assert_eq!(got.as_deref(), Some(&b"x"[..]));
}
