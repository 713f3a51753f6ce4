//! An encrypted repository end to end, on the in-memory store: names,
//! sealing, dedup scope, tampering and swapping, keys missing, disabled or
//! rotated, copies, gc and verify.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::codec;
use crate::copy::{CopyProgress, copy};
use crate::keys;
use crate::manifest::{Manifest, ManifestHeader, SnapshotId};
use crate::repo::{Repo, RepoError};
use crate::store::{MemoryStore, ObjectStore};
use crate::{ChunkHash, gc, verify};

const MARKER: &[u8] = b"MARKER-a-pattern-anyone-could-grep-for-";

fn keys_with(names: &[&str]) -> Arc<StaticKeys> {
    let k = Arc::new(StaticKeys::new());
    for (i, n) in names.iter().enumerate() {
        k.insert(n, 1, MasterSecret([i as u8 + 1; 32]));
    }
    k
}

fn encrypted(store: &Arc<MemoryStore>, keys: &Arc<StaticKeys>) -> Repo {
    Repo::new(
        Arc::clone(store) as Arc<dyn ObjectStore>,
        codec::DEFAULT_LEVEL,
    )
    .with_keys(Arc::clone(keys) as Arc<dyn MasterKeys>)
}

/// A chunk of `n` bytes full of the marker, varied by `seed`.
fn marked(seed: u8, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = MARKER.iter().cycle().take(n).copied().collect();
    v[0] = seed;
    v
}

fn header(enc: Option<Encryption>) -> ManifestHeader {
    ManifestHeader {
        encryption: enc,
        ..crate::manifest::test_header(4 << 20, 1 << 20)
    }
}

async fn all_objects(store: &MemoryStore) -> Vec<(String, Bytes)> {
    let mut out = Vec::new();
    for o in store.list("").await.unwrap() {
        let b = store.get(&o.key).await.unwrap().unwrap();
        out.push((o.key, b));
    }
    out
}

/// Writes a snapshot of two chunks in `enc`; returns the manifest.
async fn snapshot(repo: &Repo, enc: &Encryption, seeds: [u8; 2]) -> Manifest {
    let w = repo.sealed_as(Some(enc)).unwrap();
    let mut m = Manifest::new(header(Some(enc.clone())));
    for (i, s) in seeds.iter().enumerate() {
        let put = w.put_chunk(marked(*s, 100_000)).await.unwrap();
        m.push(i as u64, Some(put.hash));
    }
    repo.put_manifest(&m).await.unwrap();
    m
}

#[tokio::test]
async fn nothing_stored_shows_the_data_or_its_plain_name() {
    let store = Arc::new(MemoryStore::new());
    let keys = keys_with(&["k1"]);
    let repo = encrypted(&store, &keys);
    let enc = Encryption::store_domain("k1");
    let m = snapshot(&repo, &enc, [1, 2]).await;
    let hold = Manifest::new(header(Some(enc.clone())));
    repo.put_hold("host-1", &hold).await.unwrap();
    for (key, obj) in all_objects(&store).await {
        assert!(
            !obj.windows(16).any(|w| w == &MARKER[..16]),
            "{key} holds the marker"
        );
        if key.starts_with(keys::CHUNKS)
            || key.starts_with(keys::PAGES)
            || key.starts_with(keys::MANIFESTS)
            || key.starts_with(keys::HOLDS)
        {
            assert!(seal::is_sealed(&obj), "{key} is not sealed");
        }
    }
    for s in [1u8, 2] {
        let plain = ChunkHash::of(&marked(s, 100_000));
        assert!(!store.exists(&keys::chunk_key(&plain)).await.unwrap());
    }
    assert_eq!(repo.get_manifest(&m.header.id).await.unwrap(), m);
    for (i, h) in m.hashed() {
        assert_eq!(
            repo.get_chunk(h).await.unwrap(),
            marked(*i as u8 + 1, 100_000)
        );
    }
    // Without keys: one line saying so, never a decode error.
    let plain = Repo::new(Arc::clone(&store) as Arc<dyn ObjectStore>, 3);
    let e = plain.get_manifest(&m.header.id).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "manifest {} is sealed: the store is encrypted and no keys were given",
            m.header.id
        )
    );
    assert!(matches!(
        plain.get_chunk(&m.hashed()[0].1).await,
        Err(RepoError::NoKeys(_))
    ));
}

#[tokio::test]
async fn dedup_within_a_domain_never_across() {
    let store = Arc::new(MemoryStore::new());
    let keys = keys_with(&["k1", "k2"]);
    let repo = encrypted(&store, &keys);
    let data = marked(9, 200_000);
    let a = repo
        .sealed_as(Some(&Encryption::store_domain("k1")))
        .unwrap();
    let first = a.put_chunk(data.clone()).await.unwrap();
    let again = a.put_chunk(data.clone()).await.unwrap();
    assert_eq!(
        (again.hash, again.uploaded),
        (first.hash, 0),
        "same domain: one object"
    );
    for other in [
        Encryption::store_domain("k2"),
        Encryption::new_lineage("k1"),
    ] {
        let b = repo.sealed_as(Some(&other)).unwrap();
        let put = b.put_chunk(data.clone()).await.unwrap();
        assert_ne!(put.hash, first.hash);
        assert!(put.uploaded > 0, "another domain stores its own copy");
    }
    assert_eq!(store.list(keys::CHUNKS).await.unwrap().len(), 3);
    // The repository refuses writes that name no domain, or a domain in
    // an unencrypted store.
    assert!(matches!(repo.sealed_as(None), Err(RepoError::NeedsKey)));
    let plain = Repo::new(Arc::new(MemoryStore::new()), 3);
    assert!(matches!(
        plain.sealed_as(Some(&Encryption::store_domain("k1"))),
        Err(RepoError::NotEncrypted)
    ));
}

#[tokio::test]
async fn damage_anywhere_in_a_chunk_page_or_root_is_caught_and_named() {
    let store = Arc::new(MemoryStore::new());
    let keys = keys_with(&["k1"]);
    let repo = encrypted(&store, &keys);
    let enc = Encryption::store_domain("k1");
    let m = snapshot(&repo, &enc, [1, 2]).await;
    let id = m.header.id.clone();
    let (chunk, other) = (m.hashed()[0].1, m.hashed()[1].1);
    let ck = keys::chunk_key(&chunk);
    let good = store.get(&ck).await.unwrap().unwrap();
    // Every 997th byte, frame, body and tag alike.
    for i in (0..good.len()).step_by(997).chain([good.len() - 1]) {
        let mut bad = good.to_vec();
        bad[i] ^= 0x40;
        store.put(&ck, Bytes::from(bad)).await.unwrap();
        let e = repo.get_chunk(&chunk).await.unwrap_err();
        assert!(matches!(e, RepoError::CorruptChunk { .. }), "byte {i}: {e}");
        assert!(e.to_string().contains(&chunk.to_hex()));
    }
    store.put(&ck, good).await.unwrap();
    // The other chunk reads fine: damage fails only what needs it.
    repo.get_chunk(&other).await.unwrap();
    let report = verify::verify(&repo, &id).await.unwrap();
    assert!(
        report.is_ok() && report.framing_only.is_none(),
        "{report:?}"
    );

    // A page.
    let root = repo.get_stored(&id).await.unwrap();
    let crate::StoredManifest::V2(root) = root else {
        panic!("format 2")
    };
    let page = root.pages()[0].1;
    let pk = keys::page_key(&page);
    let good = store.get(&pk).await.unwrap().unwrap();
    let mut bad = good.to_vec();
    bad[good.len() / 2] ^= 1;
    store.put(&pk, Bytes::from(bad)).await.unwrap();
    let e = repo.get_manifest(&id).await.unwrap_err();
    assert!(
        matches!(e, RepoError::CorruptPage { hash, .. } if hash == page),
        "{e}"
    );
    store.put(&pk, good).await.unwrap();

    // The root.
    let mk = keys::manifest_key(&id);
    let good = store.get(&mk).await.unwrap().unwrap();
    let mut bad = good.to_vec();
    bad[good.len() - 20] ^= 1;
    store.put(&mk, Bytes::from(bad)).await.unwrap();
    let e = repo.get_stored(&id).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "manifest of snapshot {id} is damaged: sealed object does not authenticate: damaged, or sealed under another key"
        )
    );
    store.put(&mk, good).await.unwrap();
    repo.get_manifest(&id).await.unwrap();
}

#[tokio::test]
async fn an_object_copied_over_another_name_is_refused() {
    let store = Arc::new(MemoryStore::new());
    let keys = keys_with(&["k1"]);
    let repo = encrypted(&store, &keys);
    let enc = Encryption::store_domain("k1");
    let a = snapshot(&repo, &enc, [1, 2]).await;
    let b = snapshot(&repo, &enc, [3, 4]).await;
    // A chunk's object under another chunk's name.
    let (x, y) = (a.hashed()[0].1, b.hashed()[0].1);
    let obj = store.get(&keys::chunk_key(&x)).await.unwrap().unwrap();
    store.put(&keys::chunk_key(&y), obj).await.unwrap();
    let e = repo.get_chunk(&y).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("an object copied over another's name"),
        "{e}"
    );
    // A manifest over another's: the frame names the other snapshot.
    let ma = store
        .get(&keys::manifest_key(&a.header.id))
        .await
        .unwrap()
        .unwrap();
    store
        .put(&keys::manifest_key(&b.header.id), ma)
        .await
        .unwrap();
    let e = repo.get_stored(&b.header.id).await.unwrap_err();
    assert!(matches!(e, RepoError::CorruptManifest { .. }), "{e}");
    // A plain object in an encrypted store is refused too.
    let plain = codec::encode(&marked(7, 1000), 3);
    store
        .put(&keys::chunk_key(&plain.hash), Bytes::from(plain.bytes))
        .await
        .unwrap();
    let e = repo.get_chunk(&plain.hash).await.unwrap_err();
    assert!(e.to_string().contains("object is not sealed"), "{e}");
}

#[tokio::test]
async fn missing_disabled_and_rotated_keys() {
    let store = Arc::new(MemoryStore::new());
    let keys = keys_with(&["k1"]);
    let repo = encrypted(&store, &keys);
    let enc = Encryption::store_domain("k1");
    let old = snapshot(&repo, &enc, [1, 2]).await;

    // Disabled: every read and write stops at once, with one line.
    keys.set_enabled("k1", false);
    let e = repo.get_chunk(&old.hashed()[0].1).await.unwrap_err();
    assert!(e.is_key());
    assert_eq!(
        e.to_string(),
        format!("encryption domain {}: key k1 is disabled", enc.domain)
    );
    let w = repo.sealed_as(Some(&enc)).unwrap();
    assert!(w.put_chunk(vec![1; 10]).await.unwrap_err().is_key());
    let report = verify::verify(&repo, &old.header.id).await.unwrap();
    assert_eq!(
        report.framing_only.as_deref(),
        Some(format!("encryption domain {}: key k1 is disabled", enc.domain).as_str())
    );
    keys.set_enabled("k1", true);
    repo.get_chunk(&old.hashed()[0].1).await.unwrap();

    // Another host without the key: unknown, in one line.
    let other = encrypted(&store, &Arc::new(StaticKeys::new()));
    let e = other.get_manifest(&old.header.id).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "encryption domain {}: key k1 is not known on this host",
            enc.domain
        )
    );

    // Rotation: version 2 wraps every data key anew and a new generation
    // seals new data; old data stays readable, without version 1 too.
    keys.insert("k1", 2, MasterSecret([42; 32]));
    let r = repo.keyring().unwrap().rotate("k1").await.unwrap();
    assert_eq!(
        r,
        keyring::RotateReport {
            domains: 1,
            rewrapped: 1,
            generations: 1
        }
    );
    let new = snapshot(&repo, &enc, [3, 4]).await;
    let obj = store
        .get(&keys::chunk_key(&new.hashed()[0].1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        seal::frame(&obj).unwrap().generation,
        1,
        "new data, new data key"
    );
    keys.remove("k1", 1);
    let fresh = encrypted(&store, &keys);
    for m in [&old, &new] {
        assert_eq!(&fresh.get_manifest(&m.header.id).await.unwrap(), m);
        for (_, h) in m.hashed() {
            fresh.get_chunk(h).await.unwrap();
        }
    }
    // Dedup still finds a chunk stored before the rotation.
    let w = fresh.sealed_as(Some(&enc)).unwrap();
    assert_eq!(w.put_chunk(marked(1, 100_000)).await.unwrap().uploaded, 0);
}

#[tokio::test]
async fn a_manifest_commits_once_even_though_sealing_differs_each_time() {
    let store = Arc::new(MemoryStore::new());
    let keys = keys_with(&["k1"]);
    let repo = encrypted(&store, &keys);
    let enc = Encryption::store_domain("k1");
    let m = snapshot(&repo, &enc, [1, 2]).await;
    // The same manifest again: success (a retry whose first reply was lost).
    repo.put_manifest(&m).await.unwrap();
    let mut other = Manifest::new(m.header.clone());
    other.push(3, Some(m.hashed()[0].1));
    assert!(matches!(
        repo.put_manifest(&other).await,
        Err(RepoError::ManifestConflict(_))
    ));
}

#[tokio::test]
async fn copies_in_the_domain_are_metadata_into_another_are_full() {
    let store = Arc::new(MemoryStore::new());
    let keys = keys_with(&["k1", "k2"]);
    let repo = encrypted(&store, &keys);
    let enc = Encryption::store_domain("k1");
    let src = snapshot(&repo, &enc, [1, 2]).await;
    let chunks = || async { store.list(keys::CHUNKS).await.unwrap().len() };
    let before = chunks().await;

    let id = SnapshotId::generate();
    let p = repo.begin_snapshot(&id).await.unwrap();
    let progress = CopyProgress::default();
    let c = copy(
        &repo,
        &p,
        &src.header.id,
        Some(enc.clone()),
        "t".into(),
        &progress,
    )
    .await
    .unwrap();
    p.end().await;
    assert!(!c.full);
    assert_eq!(chunks().await, before, "metadata only");
    let copied = repo.get_manifest(&id).await.unwrap();
    assert_eq!(copied.hashed(), src.hashed());

    let id2 = SnapshotId::generate();
    let p = repo.begin_snapshot(&id2).await.unwrap();
    let k2 = Encryption::store_domain("k2");
    let c = copy(
        &repo,
        &p,
        &src.header.id,
        Some(k2.clone()),
        "t".into(),
        &progress,
    )
    .await
    .unwrap();
    p.end().await;
    assert!(c.full);
    assert_eq!(chunks().await, before + 2, "every chunk sealed anew");
    let full = repo.get_manifest(&id2).await.unwrap();
    assert_eq!(full.header.encryption, Some(k2));
    for ((i, a), (j, b)) in src.hashed().iter().zip(full.hashed()) {
        assert_eq!(i, j);
        assert_ne!(a, b, "names differ across domains");
        assert_eq!(
            repo.get_chunk(a).await.unwrap(),
            repo.get_chunk(b).await.unwrap()
        );
    }
    // With k1 disabled, the copy under k2 still reads; the source does not.
    keys.set_enabled("k1", false);
    repo.get_chunk(&full.hashed()[0].1).await.unwrap();
    assert!(repo.get_chunk(&src.hashed()[0].1).await.is_err());
}

#[tokio::test]
async fn gc_marks_through_sealed_roots_and_pages() {
    let store = Arc::new(MemoryStore::new());
    let keys = keys_with(&["k1"]);
    let repo = encrypted(&store, &keys);
    let enc = Encryption::store_domain("k1");
    let kept = snapshot(&repo, &enc, [1, 2]).await;
    let gone = snapshot(&repo, &enc, [3, 4]).await;
    repo.trash_manifest(&gone.header.id).await.unwrap();
    // A zero grace: the trash entry and unreferenced objects are old at once.
    let r = gc::collect(&repo, Duration::ZERO).await.unwrap();
    assert_eq!(r.chunks_deleted, 2, "{r:?}");
    for (_, h) in kept.hashed() {
        repo.get_chunk(h).await.unwrap();
    }
    // Data keys are never swept.
    assert_eq!(store.list(keys::DATAKEYS).await.unwrap().len(), 1);
    // A disabled key stops gc before it deletes anything.
    keys.set_enabled("k1", false);
    assert!(gc::collect(&repo, Duration::ZERO).await.is_err());
}

#[tokio::test]
async fn a_new_domain_is_fetched_and_created_once_however_many_seal_at_once() {
    // Every chunk of a snapshot seals side by side. Each used to miss the
    // cache at once and list, create and read the domain itself; against
    // SeaweedFS the racing conditional PUTs cost whole seconds.
    let store = Arc::new(crate::store::faulty::Faulty::new(MemoryStore::new()));
    let keyring = crate::crypt::Keyring::new(
        Arc::clone(&store) as Arc<dyn ObjectStore>,
        keys_with(&["k1"]) as Arc<dyn MasterKeys>,
    );
    let enc = Encryption::store_domain("k1");
    let sealers = (0..16).map(|_| keyring.for_seal(&enc));
    let keys = futures_util::future::join_all(sealers).await;
    let first = keys[0].as_ref().unwrap();
    assert!(keys.iter().all(|k| Arc::ptr_eq(k.as_ref().unwrap(), first)));
    // One listing of the domain's data keys, one create-if-absent.
    assert_eq!(store.calls(), 2);
}
