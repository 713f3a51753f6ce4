//! Lifecycle rules and crash recovery of the engine, on real data files.

use super::*;
use crate::catalog::Catalog;
use volumed_api::MAX_VOLUME_SIZE;

pub(crate) fn io() -> Arc<IoEngine> {
    Arc::new(IoEngine::new(crate::disk::EngineChoice::Auto).unwrap())
}

pub(crate) async fn open(dir: &Path) -> (Arc<Engine>, bool) {
    let (e, _, clean) = open_with_catalog(dir).await;
    (e, clean)
}

pub(crate) async fn open_with_catalog(dir: &Path) -> (Arc<Engine>, Arc<Catalog>, bool) {
    let store = snapshot::store::LocalStore::open(&dir.join("store")).unwrap();
    let repo = snapshot::Repo::new(Arc::new(store), 3);
    let fetcher = Arc::new(snapshot::cache::Fetcher::new(repo.clone(), None));
    let catalog = Arc::new(Catalog::open(&dir.join("catalog")).unwrap());
    let (e, clean) = Engine::open(dir, Arc::clone(&catalog), io(), repo, fetcher)
        .await
        .unwrap();
    (Arc::new(e), catalog, clean)
}

pub(crate) fn name(s: &str) -> VolumeName {
    VolumeName::parse(s).unwrap()
}

pub(crate) fn create_req(n: &str, size: u64, ephemeral: bool) -> CreateVolume {
    CreateVolume {
        name: name(n),
        size: Some(size),
        ephemeral,
        from_snapshot: None,
        chunk_size: None,
        hydrate: None,
        encrypted: None,
        key: None,
    }
}

#[tokio::test]
async fn lifecycle_rules() {
    let dir = tempfile::tempdir().unwrap();
    let (e, _) = open(dir.path()).await;
    e.create(create_req("a", 1 << 30, false)).await.unwrap();
    assert!(matches!(
        e.create(create_req("a", 1 << 30, false)).await,
        Err(Error::VolumeExists(_))
    ));
    assert!(matches!(
        e.create(create_req("b", 0, false)).await,
        Err(Error::InvalidSize(_))
    ));
    assert!(matches!(
        e.create(create_req("b", 1000, false)).await,
        Err(Error::InvalidSize(_))
    ));
    assert!(matches!(
        e.create(create_req("b", MAX_VOLUME_SIZE + 512, false))
            .await,
        Err(Error::InvalidSize(_))
    ));
    let mut bad_chunk = create_req("b", 1 << 20, false);
    bad_chunk.chunk_size = Some(3 << 16);
    assert!(matches!(
        e.create(bad_chunk).await,
        Err(Error::InvalidSize(_))
    ));

    e.attach(
        &name("a"),
        AttachVolume {
            instance: Some("i-1".into()),
        },
    )
    .await
    .unwrap();
    e.attach(
        &name("a"),
        AttachVolume {
            instance: Some("i-1".into()),
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        e.attach(
            &name("a"),
            AttachVolume {
                instance: Some("i-2".into())
            }
        )
        .await,
        Err(Error::AttachedElsewhere(..))
    ));
    assert!(matches!(
        e.delete(&name("a")).await,
        Err(Error::VolumeAttached(_))
    ));
    let shrink = ModifyVolume {
        size: Some(1 << 20),
        ephemeral: None,
    };
    assert!(matches!(
        e.modify(&name("a"), shrink).await,
        Err(Error::InvalidSize(_))
    ));
    // Its URIs: `present::views::tests::an_attached_volume_shows_its_uris`.
    let (_, deleted) = e.detach(&name("a")).await.unwrap();
    assert!(!deleted);
    assert!(matches!(
        e.detach(&name("a")).await,
        Err(Error::VolumeNotAttached(_))
    ));
    e.delete(&name("a")).await.unwrap();
    assert!(e.list().is_empty());
    assert_eq!(
        std::fs::read_dir(dir.path().join("volumes"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn restart_finishes_interrupted_delete_and_removes_orphans() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (e, catalog, _) = open_with_catalog(dir.path()).await;
        let v = e.create(create_req("gone", 1 << 20, true)).await.unwrap();
        e.create(create_req("kept", 1 << 20, false)).await.unwrap();
        // Simulate a crash right after the delete mark was written.
        let rec = v.record();
        let mut marked = rec.clone();
        marked.deleting = true;
        catalog.replace_volume(&rec, &marked).await.unwrap();
        // And a crash between creating files and recording a volume.
        std::fs::create_dir(dir.path().join("volumes").join(format!("{:016x}", 999_999))).unwrap();
    }
    let (e, clean) = open(dir.path()).await;
    assert!(!clean);
    let names: Vec<_> = e.list().iter().map(|v| v.name.to_string()).collect();
    assert_eq!(names, ["kept"]);
    assert_eq!(
        std::fs::read_dir(dir.path().join("volumes"))
            .unwrap()
            .count(),
        1
    );
}
