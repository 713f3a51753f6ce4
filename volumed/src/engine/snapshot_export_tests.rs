//! Unit tests of snapshot exports: reads and extents against the snapshot's
//! bytes.

use super::*;
use proptest::prelude::*;
use snapshot::{Manifest, ManifestHeader, StoredManifest};

const CS: u64 = 4096;

/// A 9.5-chunk snapshot whose odd chunks hold data, stored in memory,
/// and its bytes.
async fn image() -> (SnapshotImage, Vec<u8>) {
    let size = 9 * CS + CS / 2;
    let repo = Repo::new(Arc::new(snapshot::store::MemoryStore::new()), 3);
    let mut m = Manifest::new(ManifestHeader {
        id: SnapshotId::parse("snap-t").unwrap(),
        volume: "v".into(),
        size,
        chunk_size: CS,
        parent: None,
        created_at: "2026-12-02T00:00:00Z".into(),
        labels: Default::default(),
        changed_chunks: 0,
        logical_bytes: 0,
        uploaded_bytes: 0,
        encryption: None,
    });
    let mut bytes = vec![0u8; size as usize];
    for c in (1..10u64).step_by(2) {
        let len = CS.min(size - c * CS) as usize;
        let data: Vec<u8> = (0..len).map(|i| (i as u64 * 7 + c) as u8 | 1).collect();
        bytes[(c * CS) as usize..(c * CS) as usize + len].copy_from_slice(&data);
        let put = repo.put_chunk(data).await.unwrap();
        m.push(c, Some(put.hash));
    }
    // Stored in format 2 and read back lazily, as the daemon does.
    let root = repo.put_manifest(&m).await.unwrap();
    let reader = ManifestReader::new(repo.clone(), StoredManifest::V2(root));
    let fetcher = Arc::new(Fetcher::new(repo, None));
    (
        SnapshotImage::new(Arc::new(reader), fetcher).unwrap(),
        bytes,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any range reads as the snapshot's bytes, zero chunks as zero
    /// pieces; extents tile the range and mark exactly the zero chunks.
    #[test]
    fn reads_and_extents_match_the_bytes(start in 0u64..9 * CS + CS / 2, len in 1u64..4 * CS) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (img, bytes) = rt.block_on(image());
        let len = len.min(img.size() - start);
        let pieces = rt.block_on(img.read(start, len)).unwrap();
        let mut got = Vec::new();
        for p in pieces {
            match p {
                ReadPiece::Data(d) => got.extend_from_slice(&d),
                ReadPiece::Zero(n) => got.resize(got.len() + n as usize, 0),
            }
        }
        prop_assert_eq!(&got[..], &bytes[start as usize..(start + len) as usize]);
        let extents = rt.block_on(img.extents(start, len)).unwrap();
        prop_assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), len);
        let mut pos = start;
        for e in extents {
            let chunk = pos / CS;
            prop_assert_eq!(e.zero, chunk.is_multiple_of(2));
            pos += e.len;
        }
    }
}

#[tokio::test]
async fn a_missing_object_fails_only_its_chunk() {
    let (img, bytes) = image().await;
    let repo = Repo::new(Arc::new(snapshot::store::MemoryStore::new()), 3);
    // Same manifest, an empty store: data chunks fail, zero chunks read.
    let empty = SnapshotImage::new(
        Arc::clone(&img.manifest),
        Arc::new(Fetcher::new(repo, None)),
    )
    .unwrap();
    assert!(empty.read(CS, 10).await.is_err());
    assert_eq!(empty.read(0, CS).await.unwrap(), vec![ReadPiece::Zero(CS)]);
    assert_eq!(
        img.read(CS, 10).await.unwrap(),
        vec![ReadPiece::Data(
            bytes[CS as usize..CS as usize + 10].to_vec()
        )]
    );
}
