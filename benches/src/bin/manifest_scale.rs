//! Builds a synthetic, fully written snapshot for `benches/manifest_scale.sh`:
//! CHUNKS chunks of CHUNK_SIZE bytes, every one naming one of OBJECTS chunk
//! objects, as a format-2 manifest (pages and root) written with the
//! `snapshot` crate straight into a store. The entries are made page by
//! page, so building 32 Mi of them never holds more than one page.
//!
//! Usage: manifest_scale STORE_URL CHUNKS CHUNK_SIZE OBJECTS
//! Prints one JSON line: the snapshot id, the pages and their bytes, the
//! root's bytes, what a format-1 manifest would take, and the seconds.

use std::sync::Arc;
use std::time::Instant;

use snapshot::page::Page;
use snapshot::root::{self, ManifestRoot};
use snapshot::{ManifestHeader, Repo, SnapshotId, StoreUrl};
use tokio::task::JoinSet;

/// Pages written at once.
const CONCURRENCY: usize = 8;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 5,
        "usage: manifest_scale STORE_URL CHUNKS CHUNK_SIZE OBJECTS"
    );
    let url = StoreUrl::parse(&args[1])?;
    let chunks: u64 = args[2].parse()?;
    let chunk_size: u64 = args[3].parse()?;
    let objects: u64 = args[4].parse()?;
    anyhow::ensure!(chunks > 0 && objects > 0, "CHUNKS and OBJECTS must be > 0");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let t = Instant::now();
        let repo = Repo::new(snapshot::store::open(&url)?, 1);
        // A handful of distinct chunks, each its own pseudo-random bytes.
        let mut hashes = Vec::new();
        for o in 0..objects {
            let mut x = o.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let data: Vec<u8> = (0..chunk_size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            hashes.push(repo.put_chunk(data).await?.hash);
        }
        let hashes = Arc::new(hashes);
        let per = root::PAGE_CHUNKS;
        let count = root::page_count(chunks, per);
        let mut named = Vec::with_capacity(count as usize);
        let (mut page_bytes, mut next) = (0u64, 0u64);
        let mut set = JoinSet::new();
        loop {
            while set.len() < CONCURRENCY && next < count {
                let span = root::span(chunks, per, next).expect("below the page count");
                let (repo, hashes) = (repo.clone(), Arc::clone(&hashes));
                set.spawn(async move {
                    let entries = (span.first..span.end())
                        .map(|i| (i, hashes[(i % hashes.len() as u64) as usize]))
                        .collect();
                    let (name, up) = repo.put_page(&Page::new(span, entries)).await?;
                    Ok::<_, snapshot::RepoError>((span.index, name, up))
                });
                next += 1;
            }
            let Some(done) = set.join_next().await else {
                break;
            };
            let (index, name, up) = done??;
            named.push((index, name));
            page_bytes += up;
        }
        named.sort_unstable_by_key(|(i, _)| *i);
        let header = ManifestHeader {
            id: SnapshotId::generate(),
            volume: "synthetic".into(),
            size: chunks * chunk_size,
            chunk_size,
            parent: None,
            created_at: "2026-12-02T00:00:00Z".into(),
            labels: Default::default(),
            changed_chunks: chunks,
            logical_bytes: chunks * chunk_size,
            uploaded_bytes: page_bytes,
            encryption: None,
        };
        let root = ManifestRoot::new(header, per, named);
        let root_bytes = root.encode().len();
        repo.commit_root(&root).await?;
        println!(
            "{{\"id\":\"{}\",\"pages\":{},\"page_bytes\":{},\"root_bytes\":{},\"v1_bytes\":{},\"secs\":{:.1}}}",
            root.header.id,
            root.pages().len(),
            page_bytes,
            root_bytes,
            chunks * 33,
            t.elapsed().as_secs_f64()
        );
        Ok(())
    })
}
