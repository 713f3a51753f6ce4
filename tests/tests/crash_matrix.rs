//! The crash matrix: volumed killed at each stage that writes state, then
//! restarted, and invariants 1 to 4 checked.
//!
//! - Named points (`VOLUMED_FAILPOINTS`): right before and right after a
//!   snapshot's manifest write, in the middle of gc's sweep, during a
//!   restored volume's flush between the data sync and the detach log, and
//!   right after a background hydration fetch. (Writes and FLUSH under
//!   kill -9: `crash.rs`; snapshot uploads: `snapshots.rs`; an ephemeral
//!   volume's removal and create/delete: `ephemeral.rs`.)
//! - Random points: kill -9 at a random moment during a snapshot's upload,
//!   during hydration, and during gc, `VOLUMED_CRASH_ROUNDS` rounds each
//!   (20 by default; `scripts/crash-long` runs more).

use std::process::{Command, Stdio};
use std::time::Duration;

use volumed_tests::snapkit::{Store, dump, fill_random, image, snap};
use volumed_tests::{TestDaemon, qemu_io};

fn rounds() -> u64 {
    std::env::var("VOLUMED_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20)
}

/// A small xorshift; the seed is printed so a failing round can be rerun.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let seed = std::env::var("VOLUMED_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        println!("crash matrix seed: VOLUMED_CRASH_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn with_failpoints(d: &mut TestDaemon, points: &str) {
    if points.is_empty() {
        d.set_env(&[]);
    } else {
        d.set_env(&[("VOLUMED_FAILPOINTS", points)]);
    }
}

/// Restarts `d` armed to die at `point`, runs `action` (which reaches it),
/// waits for the death, and starts `d` again unarmed. Returns what
/// `action` returned.
fn crash_at<T>(d: &mut TestDaemon, point: &str, action: impl FnOnce(&TestDaemon) -> T) -> T {
    with_failpoints(d, point);
    d.restart();
    let out = action(d);
    d.wait_exit();
    with_failpoints(d, "");
    d.start_again();
    out
}

fn start_snapshot(d: &TestDaemon, vol: &str) -> String {
    d.vol_json(&["snapshot", "create", vol])["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn verify_all(d: &TestDaemon) {
    for s in d.vol_json(&["snapshot", "list"]).as_array().unwrap() {
        if s["state"] == "completed" {
            let id = s["id"].as_str().unwrap();
            let v = d.vol_json(&["snapshot", "verify", id]);
            assert_eq!(v["ok"], true, "{v}");
        }
    }
}

/// Warnings every kill leaves: the failpoint's own notice, the next start's
/// notice of the unclean shutdown, and restored chunks dropped because they
/// were fetched but never made durable (they are fetched again).
const WARNINGS: &[&str] = &[
    "failpoint reached: killing the daemon",
    "previous run did not shut down cleanly",
    "dropped fetched chunks that were never made durable",
];

#[test]
fn named_points() {
    let store = Store::Local;
    let mut d = TestDaemon::start();
    let repo = store.repo(&d, "");
    d.vol_ok(&["create", "v", "--size", "16M"]);
    d.vol_ok(&["attach", "v"]);
    fill_random(&d, "v", 8);
    let base = snap(&d, "v")["id"].as_str().unwrap().to_owned();

    // Before the manifest: the snapshot never existed; the next one carries
    // its changes and is right.
    qemu_io(&d.uri("v"), &["write -P 0x11 1M 4k"]);
    let want = dump(&d, "v");
    let id = crash_at(&mut d, "snapshot-before-manifest", |d| {
        start_snapshot(d, "v")
    });
    assert_eq!(d.wait_snapshot_settled(&id)["state"], "error");
    let next = snap(&d, "v");
    assert_eq!(next["parent"], base.as_str());
    assert!(image(&repo, next["id"].as_str().unwrap()) == want);

    // After the manifest: the snapshot exists and is settled completed.
    qemu_io(&d.uri("v"), &["write -P 0x22 2M 4k"]);
    let want = dump(&d, "v");
    let id = crash_at(&mut d, "snapshot-after-manifest", |d| {
        start_snapshot(d, "v")
    });
    assert_eq!(d.wait_snapshot_settled(&id)["state"], "completed");
    assert!(image(&repo, &id) == want);

    // Mid-gc: gc again finishes the job; every snapshot still verifies.
    for i in 0..4 {
        qemu_io(
            &d.uri("v"),
            &[&format!("write -P {} {}M 1M", 0x40 + i, i * 2)],
        );
        snap(&d, "v");
    }
    for s in d
        .vol_json(&["snapshot", "list"])
        .as_array()
        .unwrap()
        .iter()
        .take(3)
    {
        d.vol_ok(&["snapshot", "delete", s["id"].as_str().unwrap()]);
    }
    crash_at(&mut d, "gc-mid-sweep", |d| d.vol(&["gc", "--grace", "0s"]));
    verify_all(&d);
    let r = d.vol_json(&["gc", "--grace", "0s"]);
    assert_eq!(
        r["chunks_seen"].as_u64().unwrap() - r["chunks_deleted"].as_u64().unwrap(),
        r["chunks_referenced"].as_u64().unwrap(),
        "gc after the crash finished the sweep: {r}"
    );
    verify_all(&d);

    // A restored volume's flush dies between the data sync and the detach
    // log: the flush never completed, so its write may be lost, but every
    // other byte is the snapshot's.
    let latest = snap(&d, "v")["id"].as_str().unwrap().to_owned();
    let snap_img = image(&repo, &latest);
    d.vol_ok(&["create", "r", "--from-snapshot", &latest, "--no-hydrate"]);
    d.vol_ok(&["attach", "r"]);
    with_failpoints(&mut d, "flush-before-log");
    d.restart();
    let _ = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x77 5M 4k",
            "-c",
            "flush",
            &d.uri("r"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    d.wait_exit();
    with_failpoints(&mut d, "");
    d.start_again();
    let got = dump(&d, "r");
    let written = 5 << 20;
    assert!(
        got[..written] == snap_img[..written]
            && got[written + 4096..] == snap_img[written + 4096..],
        "bytes outside the unflushed write changed"
    );
    let block = &got[written..written + 4096];
    assert!(
        block == &snap_img[written..written + 4096] || block.iter().all(|b| *b == 0x77),
        "the unflushed write is torn"
    );

    // Right after a hydration fetch: hydration resumes, the content is right.
    crash_at(&mut d, "hydrate-after-fetch", |d| {
        d.vol(&["create", "h", "--from-snapshot", &latest])
    });
    // The record is written before hydration starts, so the volume is there.
    d.wait_hydrated("h");
    d.vol_ok(&["attach", "h"]);
    assert!(dump(&d, "h") == snap_img);
    d.finish_expecting(&[], WARNINGS);
}

#[test]
fn random_points() {
    let store = Store::Local;
    let mut rng = Rng::seeded();
    let mut d = TestDaemon::start();
    let repo = store.repo(&d, "");
    d.vol_ok(&["create", "v", "--size", "32M"]);
    d.vol_ok(&["attach", "v"]);
    fill_random(&d, "v", 32);
    let src = snap(&d, "v")["id"].as_str().unwrap().to_owned();
    let src_img = image(&repo, &src);
    let n = rounds();
    let mut outcomes = [0u64; 2];

    // During a snapshot's upload.
    for round in 0..n {
        qemu_io(
            &d.uri("v"),
            &[&format!(
                "write -P {} {}k 64k",
                round % 200 + 1,
                rng.below(500) * 64
            )],
        );
        let want = dump(&d, "v");
        let id = start_snapshot(&d, "v");
        std::thread::sleep(Duration::from_millis(rng.below(60)));
        d.kill9();
        d.start_again();
        match d.wait_snapshot_settled(&id)["state"].as_str().unwrap() {
            "completed" => {
                outcomes[0] += 1;
                assert!(image(&repo, &id) == want, "round {round}");
            }
            _ => {
                outcomes[1] += 1;
                let next = snap(&d, "v");
                assert!(
                    image(&repo, next["id"].as_str().unwrap()) == want,
                    "round {round}"
                );
            }
        }
    }
    println!(
        "snapshot kills: {} completed, {} error then retried",
        outcomes[0], outcomes[1]
    );

    // During hydration (slowed so the kill lands inside it).
    with_failpoints(&mut d, "hydrate-chunk=20");
    d.restart();
    for round in 0..n {
        let name = format!("h{round}");
        d.vol_ok(&["create", &name, "--from-snapshot", &src]);
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        d.kill9();
        d.start_again();
        d.wait_hydrated(&name);
        d.vol_ok(&["attach", &name]);
        assert!(dump(&d, &name) == src_img, "round {round}");
        d.vol_ok(&["detach", &name]);
        d.vol_ok(&["delete", &name]);
    }
    with_failpoints(&mut d, "");
    d.restart();

    // During gc.
    for round in 0..n {
        qemu_io(
            &d.uri("v"),
            &[&format!(
                "write -P {} {}M 2M",
                round % 200 + 1,
                rng.below(15) * 2
            )],
        );
        let newest = snap(&d, "v")["id"].as_str().unwrap().to_owned();
        let list = d.vol_json(&["snapshot", "list"]);
        let oldest = list
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .find(|id| *id != src)
            .unwrap();
        d.vol_ok(&["snapshot", "delete", &oldest]);
        let mut gc = Command::new(volumed_tests::vol_bin())
            .args([
                "--socket",
                d.socket().to_str().unwrap(),
                "gc",
                "--grace",
                "0s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(40)));
        d.kill9();
        let _ = gc.wait();
        d.start_again();
        for id in [&src, &newest] {
            let v = d.vol_json(&["snapshot", "verify", id]);
            assert_eq!(v["ok"], true, "round {round}: {v}");
        }
    }
    let r = d.vol_json(&["gc", "--grace", "0s"]);
    println!("after {n} gc kills, a full gc: {r}");
    verify_all(&d);
    d.finish_expecting(&[], WARNINGS);
}
