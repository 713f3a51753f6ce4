//! Crash-consistent snapshot sets through the real daemon: the write-order
//! test (a set never splits two writes a client ordered; two independent
//! snapshots do), a failed capture and a crash leave no member behind,
//! also after a restart, and the quiesce hook runs around the barrier.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use volumed_tests::TestDaemon;
use volumed_tests::snapkit::{Store, image, rt};

/// Set snapshots taken mid-stream, and pairs of independent snapshots.
const ROUNDS: usize = 50;

/// Writes sequence numbers alternately to two volumes over NBD: `A[n]`,
/// then once it is acknowledged `B[n]`, then `A[n+1]`; so at any instant
/// `A - B` is 0 or 1. Runs until `STOP` exists; touches `GOING` once it
/// has written a while; prints the last n.
const WRITER: &str = r#"
import nbd, os, struct
a = nbd.NBD(); a.connect_uri(os.environ["A"])
b = nbd.NBD(); b.connect_uri(os.environ["B"])
pad = b"\0" * 4088
n = 0
while not os.path.exists(os.environ["STOP"]):
    n += 1
    a.pwrite(struct.pack("<Q", n) + pad, 0)
    b.pwrite(struct.pack("<Q", n) + pad, 0)
    if n == 200:
        open(os.environ["GOING"], "w").close()
print(n)
"#;

struct Writer {
    child: Child,
    stop: std::path::PathBuf,
}

impl Writer {
    fn start(d: &TestDaemon) -> Writer {
        let stop = d.dir.path().join("stop");
        let going = d.dir.path().join("going");
        let _ = std::fs::remove_file(&stop);
        let _ = std::fs::remove_file(&going);
        let child = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(WRITER)
            .env("A", d.unix_uri("a"))
            .env("B", d.unix_uri("b"))
            .env("STOP", &stop)
            .env("GOING", &going)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run /usr/bin/python3 (python3-libnbd)");
        wait_for_file(&going);
        Writer { child, stop }
    }

    /// Stops the writer; the last sequence number it wrote.
    fn stop(self) -> u64 {
        std::fs::write(&self.stop, b"").unwrap();
        let out = self.child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "writer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

fn wait_for_file(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn api_json(d: &TestDaemon, method: &str, path: &str, body: &Value) -> Value {
    let (status, out) = d.api(method, path, &body.to_string());
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {out}"
    );
    serde_json::from_str(&out).unwrap()
}

/// Two 1 MiB volumes with 64 KiB chunks, attached.
fn two_volumes(d: &TestDaemon) {
    for v in ["a", "b"] {
        d.vol_ok(&["create", v, "--size", "1M", "--chunk-size", "64K"]);
        d.vol_ok(&["attach", v]);
    }
}

fn wait_completed(d: &TestDaemon, id: &str) {
    let s = d.wait_snapshot_settled(id);
    assert_eq!(s["state"], "completed", "{s}");
}

/// The sequence number at the start of a snapshot's image.
fn seq(img: &[u8]) -> u64 {
    u64::from_le_bytes(img[..8].try_into().unwrap())
}

/// `A - B` is 0 or 1 in every pair that a single instant could show.
fn consistent(a: u64, b: u64) -> bool {
    a == b || a == b + 1
}

/// Pairs of (A, B) snapshot ids taken as sets while the writer runs.
fn set_pairs(d: &TestDaemon) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for i in 0..ROUNDS {
        let created = api_json(
            d,
            "POST",
            "/v1/snapshot-sets",
            &json!({"name": format!("round-{i}"), "volumes": ["a", "b"]}),
        );
        let snaps = created["snapshots"].as_array().unwrap();
        let id = |vol: &str| {
            snaps.iter().find(|s| s["volume"] == vol).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let pair = (id("a"), id("b"));
        assert_eq!(
            snaps[0]["created_at"], snaps[1]["created_at"],
            "one instant for every member"
        );
        wait_completed(d, &pair.0);
        wait_completed(d, &pair.1);
        pairs.push(pair);
    }
    pairs
}

/// Pairs of (A, B) snapshot ids taken one after the other.
fn independent_pairs(d: &TestDaemon) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for _ in 0..ROUNDS {
        let a = api_json(d, "POST", "/v1/volumes/a/snapshots", &json!({}));
        let b = api_json(d, "POST", "/v1/volumes/b/snapshots", &json!({}));
        let pair = (
            a["id"].as_str().unwrap().to_owned(),
            b["id"].as_str().unwrap().to_owned(),
        );
        wait_completed(d, &pair.0);
        wait_completed(d, &pair.1);
        pairs.push(pair);
    }
    pairs
}

/// The pairs whose restored images two consistent volumes could not show.
fn split_pairs(d: &TestDaemon, pairs: &[(String, String)]) -> Vec<(u64, u64)> {
    let repo = Store::Local.repo(d, "");
    pairs
        .iter()
        .map(|(a, b)| (seq(&image(&repo, a)), seq(&image(&repo, b))))
        .filter(|(a, b)| !consistent(*a, *b))
        .collect()
}

#[test]
fn a_set_never_splits_a_write_order() {
    let d = TestDaemon::start();
    two_volumes(&d);
    let w = Writer::start(&d);
    let pairs = set_pairs(&d);
    let last = w.stop();
    let split = split_pairs(&d, &pairs);
    assert!(split.is_empty(), "sets split the write order: {split:?}");
    // The snapshots were mid-stream: not all of one value.
    let repo = Store::Local.repo(&d, "");
    let first = seq(&image(&repo, &pairs[0].0));
    let final_a = seq(&image(&repo, &pairs[ROUNDS - 1].0));
    assert!(
        first >= 200 && final_a > first && final_a <= last,
        "{first} {final_a} {last}"
    );
    d.finish();
}

/// The same test with two independent snapshots of each pair: it must be
/// able to fail, or the test above would prove nothing.
#[test]
fn independent_snapshots_can_split_a_write_order() {
    let d = TestDaemon::start();
    two_volumes(&d);
    let w = Writer::start(&d);
    let pairs = independent_pairs(&d);
    w.stop();
    let split = split_pairs(&d, &pairs);
    eprintln!(
        "independent snapshots split the write order in {} of {ROUNDS} pairs: {:?}",
        split.len(),
        &split[..split.len().min(5)]
    );
    assert!(
        !split.is_empty(),
        "no pair of {ROUNDS} independent snapshots split the order: the write-order test has no teeth"
    );
    d.finish();
}

fn snapshot_ids(d: &TestDaemon) -> Vec<String> {
    d.vol_json(&["snapshot", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

fn sets(d: &TestDaemon) -> Vec<Value> {
    let (status, out) = d.api("GET", "/v1/snapshot-sets", "");
    assert_eq!(status, 200, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["sets"].as_array().unwrap().clone()
}

fn manifest_exists(d: &TestDaemon, id: &str) -> bool {
    let repo = Store::Local.repo(d, "");
    rt().block_on(repo.manifest_exists(&snapshot::SnapshotId::parse(id).unwrap()))
        .unwrap()
}

#[test]
fn a_failed_capture_leaves_no_member_also_after_restart() {
    let mut d = TestDaemon::start_with_env(&[("VOLUMED_FAILPOINTS", "snapshot-set-capture=eio@2")]);
    two_volumes(&d);
    let err = d.vol_err(&["snapshot", "create", "--set", "s", "a", "b"]);
    assert!(
        err.contains("capture of member 1 (volume 'b') failed"),
        "{err}"
    );
    assert!(snapshot_ids(&d).is_empty());
    let s = sets(&d);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0]["state"], "failed", "{s:?}");
    // The volumes' I/O and snapshot slots are free again.
    volumed_tests::qemu_io(&d.uri("a"), &["write -P 7 0 4k"]);
    d.set_env(&[]);
    d.restart();
    assert!(snapshot_ids(&d).is_empty(), "a failed set came back");
    assert_eq!(sets(&d)[0]["state"], "failed");
    let ok = d.vol_json(&["snapshot", "create", "--set", "again", "a", "b", "--wait"]);
    assert_eq!(ok["set"]["state"], "completed", "{ok}");
    assert_eq!(snapshot_ids(&d).len(), 2);
    d.finish_expecting(
        &[],
        &[
            "failpoint: injecting EIO",
            "snapshot set failed at its barrier",
        ],
    );
}

#[test]
fn a_set_cut_short_by_a_crash_leaves_nothing_after_restart() {
    // Killed after every member's manifest is in the store, before the
    // set is recorded completed: the restart removes all of them.
    let mut d = TestDaemon::start_with_env(&[("VOLUMED_FAILPOINTS", "snapshot-set-before-settle")]);
    two_volumes(&d);
    volumed_tests::qemu_io(&d.uri("a"), &["write -P 1 0 64k"]);
    volumed_tests::qemu_io(&d.uri("b"), &["write -P 2 0 64k"]);
    let created = d.vol_json(&["snapshot", "create", "--set", "s", "a", "b"]);
    let members: Vec<String> = created["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!d.wait_exit().success(), "the failpoint kills the daemon");
    assert!(
        members.iter().all(|m| manifest_exists(&d, m)),
        "both members reached the store before the crash"
    );
    d.set_env(&[]);
    d.start_again();
    let t = Instant::now();
    while !snapshot_ids(&d).is_empty() || members.iter().any(|m| manifest_exists(&d, m)) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "members of the interrupted set remain"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = sets(&d);
    assert_eq!(s[0]["state"], "failed");
    assert_eq!(s[0]["error"], "interrupted by a daemon restart");

    // Killed in the middle of the capture: the first member frozen, the
    // second not yet; nothing of the set exists after the restart.
    d.set_env(&[("VOLUMED_FAILPOINTS", "snapshot-set-after-capture")]);
    d.restart();
    let out = d.vol(&["snapshot", "create", "--set", "t", "a", "b"]);
    assert!(!out.status.success());
    assert!(!d.wait_exit().success());
    d.set_env(&[]);
    d.start_again();
    std::thread::sleep(Duration::from_millis(300));
    assert!(snapshot_ids(&d).is_empty());
    assert!(
        sets(&d).iter().all(|s| s["state"] == "failed"),
        "{:?}",
        sets(&d)
    );
    // The volumes still snapshot, and their data is whole.
    let ok = d.vol_json(&["snapshot", "create", "--set", "u", "a", "b", "--wait"]);
    assert_eq!(ok["set"]["state"], "completed", "{ok}");
    let repo = Store::Local.repo(&d, "");
    for s in ok["snapshots"].as_array().unwrap() {
        let img = image(&repo, s["id"].as_str().unwrap());
        let fill = if s["volume"] == "a" { 1 } else { 2 };
        assert!(img[..64 << 10].iter().all(|b| *b == fill));
    }
    d.finish_expecting(
        &[],
        &[
            "failpoint reached",
            "previous run did not shut down cleanly",
            "interrupted by a restart",
        ],
    );
}

#[test]
fn the_quiesce_hook_runs_around_the_barrier() {
    let d = TestDaemon::start();
    two_volumes(&d);
    let log = d.dir.path().join("hook.log");
    let hook = d.dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$2 $1\" >> {}\n", log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let hook_arg = hook.display().to_string();
    let ok = d.vol_json(&[
        "snapshot",
        "create",
        "--set",
        "q",
        "a",
        "b",
        "--quiesce-hook",
        &hook_arg,
        "--wait",
    ]);
    assert_eq!(ok["set"]["state"], "completed");
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let ua = d.unix_uri("a");
    let ub = d.unix_uri("b");
    assert_eq!(
        lines,
        [
            format!("quiesce {ua}"),
            format!("quiesce {ub}"),
            format!("unquiesce {ua}"),
            format!("unquiesce {ub}"),
        ],
        "quiesce before and unquiesce after, once per volume"
    );
    // A hook that cannot run fails the set, unless told to go on.
    let missing = d.dir.path().join("no-such-hook").display().to_string();
    let err = d.vol_err(&[
        "snapshot",
        "create",
        "--set",
        "m",
        "a",
        "b",
        "--quiesce-hook",
        &missing,
    ]);
    assert!(err.contains("quiesce hook"), "{err}");
    assert_eq!(snapshot_ids(&d).len(), 2, "the failed set made no snapshot");
    let ok = d.vol_json(&[
        "snapshot",
        "create",
        "--set",
        "m",
        "a",
        "b",
        "--quiesce-hook",
        &missing,
        "--ignore-quiesce-error",
        "--wait",
    ]);
    assert_eq!(ok["set"]["state"], "completed");
    d.finish_expecting(&[], &["quiesce hook failed", "unquiesce hook failed"]);
}
