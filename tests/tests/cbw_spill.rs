//! Copy-before-write beyond its memory bound spills to a file in the
//! volume's directory: a snapshot of a 2 GiB volume that is completely
//! overwritten while its upload is held back keeps the daemon's RSS under
//! 256 MiB, the snapshot is still exactly the volume at its instant, and
//! the spill file is gone once the snapshot ends.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use snapshot::store::LocalStore;
use snapshot::{Repo, SnapshotId};
use volumed_tests::TestDaemon;
use volumed_tests::snapkit::rt;

const CHUNK: u64 = 4 << 20;
const CHUNKS: u64 = 512;
const RSS_LIMIT_KIB: u64 = 256 << 10;

/// Writes every chunk with `struct.pack('<QQ', gen, chunk)` repeated.
const FILL: &str = r#"
import struct
gen = int(sys.argv[1])
h = nbd.NBD(); h.connect_uri(URI)
for c in range(512):
    h.pwrite(struct.pack('<QQ', gen, c) * (4194304 // 16), c * 4194304)
h.flush()
h.shutdown()
print('filled')
"#;

fn fill(d: &TestDaemon, generation: u64) {
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!(
            "import nbd, os, sys\nURI = os.environ['URI']\n{FILL}"
        ))
        .arg(generation.to_string())
        .env("URI", d.unix_uri("big"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pattern(generation: u64, chunk: u64) -> Vec<u8> {
    let mut unit = generation.to_le_bytes().to_vec();
    unit.extend_from_slice(&chunk.to_le_bytes());
    unit.repeat((CHUNK / 16) as usize)
}

fn daemon_pid(d: &TestDaemon) -> u32 {
    let out = Command::new("pgrep")
        .args(["-f", "--"])
        .arg(format!("--data-dir {}", d.data_dir().display()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("the daemon's pid")
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn overwritten_during_a_slow_upload_spills_and_stays_point_in_time() {
    // Each chunk upload waits 400 ms first: 16 at a time, 512 chunks, so
    // the upload takes over 12 s and the overwrite lands during it.
    let d = TestDaemon::start_with_env(&[("VOLUMED_FAILPOINTS", "snapshot-chunk-upload=400")]);
    d.vol_ok(&["create", "big", "--size", "2G", "--chunk-size", "4M"]);
    d.vol_ok(&["attach", "big"]);
    let pid = daemon_pid(&d);
    let peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (Arc::clone(&peak), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(25));
            }
        })
    };

    fill(&d, 1);
    let before_kib = peak.load(Ordering::Relaxed);

    let s = d.vol_json(&["snapshot", "create", "big"]);
    let id = s["id"].as_str().unwrap().to_owned();
    let t = Instant::now();
    fill(&d, 2);
    let overwrite = t.elapsed();
    let during = d.vol_json(&["snapshot", "inspect", &id]);
    assert_eq!(
        during["state"], "pending",
        "the upload ended before the overwrite did ({overwrite:?}): {during}"
    );
    let dir = d.volume_dirs().pop().unwrap();
    assert!(dir.join("cbw.spill").exists(), "nothing spilled");

    let done = d.wait_snapshot_settled(&id);
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak_kib = peak.load(Ordering::Relaxed);
    eprintln!(
        "overwrite of 2 GiB took {overwrite:?}; snapshot took {:?}; daemon RSS peak {} MiB \
         (filling without a snapshot: {} MiB)",
        t.elapsed(),
        peak_kib / 1024,
        before_kib / 1024
    );
    assert_eq!(done["state"], "completed", "{done}");
    assert!(
        peak_kib < RSS_LIMIT_KIB,
        "daemon RSS peaked at {} MiB",
        peak_kib / 1024
    );
    assert!(!dir.join("cbw.spill").exists(), "spill file left behind");

    // The snapshot is generation 1 everywhere: the volume at its instant.
    let repo = Repo::new(
        Arc::new(LocalStore::open(&d.data_dir().join("store")).unwrap()),
        3,
    );
    rt().block_on(async {
        let m = repo
            .get_manifest(&SnapshotId::parse(&id).unwrap())
            .await
            .unwrap();
        assert_eq!(m.hashed().len() as u64, CHUNKS);
        for (c, h) in m.hashed() {
            let data = repo.get_chunk(h).await.unwrap();
            assert!(data == pattern(1, *c), "chunk {c} is not the instant's");
        }
    });
    d.finish();
}
