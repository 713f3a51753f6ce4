//! The raw GET rate of a store for one snapshot's chunk objects, for
//! comparison with hydration: every distinct object the manifest names is
//! fetched with hydration's concurrency through the same store code volumed
//! uses, without decoding or writing anything.
//!
//! Usage: get_rate STORE_URL SNAPSHOT_ID CONCURRENCY
//! Prints: MiB/s of object bytes, then the object count and bytes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use snapshot::{Repo, SnapshotId, StoreUrl};
use tokio::task::JoinSet;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 4,
        "usage: get_rate STORE_URL SNAPSHOT_ID CONCURRENCY"
    );
    let url = StoreUrl::parse(&args[1])?;
    let id = SnapshotId::parse(&args[2]).ok_or_else(|| anyhow::anyhow!("bad snapshot id"))?;
    let concurrency: usize = args[3].parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = snapshot::store::open(&url)?;
        let repo = Repo::new(Arc::clone(&store), 1);
        let m = repo.get_manifest(&id).await?;
        let hashes: BTreeSet<_> = m.hashed().iter().map(|(_, h)| *h).collect();
        let start = Instant::now();
        let mut set = JoinSet::new();
        let mut next = hashes.iter().copied();
        let mut bytes = 0u64;
        loop {
            while set.len() < concurrency {
                let Some(h) = next.next() else { break };
                let repo = repo.clone();
                set.spawn(async move { repo.get_chunk_object(&h).await });
            }
            match set.join_next().await {
                Some(r) => bytes += r??.len() as u64,
                None => break,
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{:.1} {} {}",
            bytes as f64 / (1 << 20) as f64 / secs,
            hashes.len(),
            bytes
        );
        anyhow::Ok(())
    })
}
