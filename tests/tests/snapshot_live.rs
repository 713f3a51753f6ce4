//! Invariant 2: a snapshot of a volume under write load holds exactly the
//! writes completed before it was requested, and none after.
//!
//! A writer stamps sequence numbers into random blocks, one write at a
//! time, as fast as it can, and logs when each completed. The snapshot
//! taken in the middle must equal the state after exactly the first N
//! writes, where N covers every write completed before the request was sent
//! and at most the one write in flight when its answer came back.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use snapshot::store::{LocalStore, S3Store};
use snapshot::{ObjectStore, Repo, SnapshotId};
use volumed_tests::TestDaemon;
use volumed_tests::s3::{BUCKET, S3Server};

const BS: usize = 4096;
const BLOCKS: usize = 16384;

const WRITER: &str = r#"
import struct, random, time, json
h = nbd.NBD(); h.connect_uri(URI)
rng = random.Random(1)
log = []
seq = 0
print('ready', flush=True)
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    seq += 1
    idx = rng.randrange(16384)
    h.pwrite(struct.pack('<QQ', seq, idx) * 256, idx * 4096)
    log.append((seq, idx, time.monotonic_ns()))
h.shutdown()
json.dump(log, open(sys.argv[2], 'w'))
"#;

fn monotonic_ns() -> u64 {
    let mut ts = libc_timespec::default();
    // SAFETY: clock_gettime writes into the struct we pass; CLOCK_MONOTONIC
    // is the clock Python's time.monotonic_ns reads.
    unsafe { clock_gettime(1, &mut ts) };
    ts.sec as u64 * 1_000_000_000 + ts.nsec as u64
}

#[repr(C)]
#[derive(Default)]
struct libc_timespec {
    sec: i64,
    nsec: i64,
}

unsafe extern "C" {
    fn clock_gettime(clock: i32, ts: *mut libc_timespec) -> i32;
}

fn point_in_time(s3: Option<&S3Server>) {
    let mut env: Vec<(&str, String)> = Vec::new();
    if let Some(s) = s3 {
        env = s.env();
        env.push(("VOLUMED_STORE", format!("s3://{BUCKET}/live")));
    }
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = TestDaemon::start_with_env(&refs);
    d.vol_ok(&["create", "v", "--size", "64M", "--chunk-size", "64K"]);
    d.vol_ok(&["attach", "v"]);
    let log_path = d.dir.path().join("writes.json");
    let mut writer = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!(
            "import nbd, os, sys\nURI = os.environ['URI']\n{WRITER}"
        ))
        .arg("4")
        .arg(&log_path)
        .env("URI", d.uri("v"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(writer.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = monotonic_ns();
    let started = d.vol_json(&["snapshot", "create", "v"]);
    let t1 = monotonic_ns();
    let id = started["id"].as_str().unwrap().to_owned();
    assert!(writer.wait().unwrap().success());

    assert_eq!(d.wait_snapshot_settled(&id)["state"], "completed");

    let store: Arc<dyn ObjectStore> = match s3 {
        None => Arc::new(LocalStore::open(&d.data_dir().join("store")).unwrap()),
        Some(s) => Arc::new(S3Store::new(s.settings("live"))),
    };
    let repo = Repo::new(store, 3);
    let img = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let m = repo
            .get_manifest(&SnapshotId::parse(&id).unwrap())
            .await
            .unwrap();
        let mut img = vec![0u8; m.header.size as usize];
        for (c, h) in m.hashed() {
            let data = repo.get_chunk(h).await.unwrap();
            let off = (*c * m.header.chunk_size) as usize;
            img[off..off + data.len()].copy_from_slice(&data);
        }
        img
    });

    let log: Vec<(u64, usize, u64)> =
        serde_json::from_slice(&std::fs::read(&log_path).unwrap()).unwrap();
    // N: the newest write the snapshot holds.
    let mut n = 0u64;
    for b in 0..BLOCKS {
        let block = &img[b * BS..(b + 1) * BS];
        if block.iter().any(|x| *x != 0) {
            let seq = u64::from_le_bytes(block[..8].try_into().unwrap());
            let idx = u64::from_le_bytes(block[8..16].try_into().unwrap());
            assert_eq!(idx as usize, b, "block {b} holds another block's write");
            n = n.max(seq);
        }
    }
    let done_before = log
        .iter()
        .filter(|(_, _, t)| *t < t0)
        .map(|(s, _, _)| *s)
        .max()
        .unwrap_or(0);
    let done_by_answer = log
        .iter()
        .filter(|(_, _, t)| *t < t1)
        .map(|(s, _, _)| *s)
        .max()
        .unwrap_or(0);
    assert!(
        n >= done_before,
        "snapshot misses writes completed before the request: n={n} < {done_before}"
    );
    assert!(
        n <= done_by_answer + 1,
        "snapshot holds writes issued after it: n={n} > {done_by_answer} + 1"
    );
    assert!(
        // Some writes after the instant, enough to prove overlap; on a
        // loaded 2-core machine the writer manages a few hundred at most.
        log.len() as u64 > n + 20,
        "the writer kept writing after the snapshot ({} writes, n={n})",
        log.len()
    );

    // Exactly the state after writes 1..=N.
    let mut expect = vec![0u64; BLOCKS];
    for (seq, idx, _) in log.iter().filter(|(s, _, _)| *s <= n) {
        expect[*idx] = *seq;
    }
    for (b, want) in expect.iter().enumerate() {
        let block = &img[b * BS..(b + 1) * BS];
        let got = if block.iter().all(|x| *x == 0) {
            0
        } else {
            u64::from_le_bytes(block[..8].try_into().unwrap())
        };
        assert_eq!(
            got, *want,
            "block {b}: snapshot has write {got}, the state after write {n} has {want}"
        );
        if got != 0 {
            let stamp: Vec<u8> = [got.to_le_bytes(), (b as u64).to_le_bytes()]
                .concat()
                .repeat(BS / 16);
            assert_eq!(block, stamp.as_slice(), "block {b} is torn");
        }
    }
    d.finish();
}

#[test]
fn point_in_time_under_writes_local() {
    point_in_time(None);
}

#[test]
fn point_in_time_under_writes_s3() {
    let s3 = S3Server::start();
    point_in_time(Some(&s3));
}
