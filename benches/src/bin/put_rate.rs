//! The raw PUT rate of a store, for comparison with snapshot throughput:
//! pre-generated random objects of one chunk each, put with the snapshot
//! job's concurrency, through the same store code volumed uses.
//!
//! Usage: put_rate STORE_URL TOTAL_MIB CHUNK_KIB CONCURRENCY
//! (S3 settings from the AWS environment, as for volumed.)

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use snapshot::StoreUrl;
use tokio::task::JoinSet;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 5,
        "usage: put_rate STORE_URL TOTAL_MIB CHUNK_KIB CONCURRENCY"
    );
    let url = StoreUrl::parse(&args[1])?;
    let total: usize = args[2].parse::<usize>()? << 20;
    let chunk: usize = args[3].parse::<usize>()? << 10;
    let concurrency: usize = args[4].parse()?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    let objects: Vec<Bytes> = (0..total / chunk)
        .map(|_| {
            Bytes::from(
                (0..chunk)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect::<Vec<u8>>(),
            )
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = snapshot::store::open(&url)?;
        let start = Instant::now();
        let mut set = JoinSet::new();
        let mut next = objects.into_iter().enumerate();
        loop {
            while set.len() < concurrency {
                let Some((i, obj)) = next.next() else { break };
                let store = Arc::clone(&store);
                set.spawn(async move { store.put(&format!("bench/put-rate/{i:08}"), obj).await });
            }
            match set.join_next().await {
                Some(r) => r??,
                None => break,
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!("{:.1}", total as f64 / (1 << 20) as f64 / secs);
        for i in 0..total / chunk {
            let _ = store.delete(&format!("bench/put-rate/{i:08}")).await;
        }
        anyhow::Ok(())
    })
}
