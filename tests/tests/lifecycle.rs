//! The volume lifecycle through the real `vol` binary: human and JSON output,
//! the EBS-like state rules, attachments that survive a restart, and a
//! volume's record left to its volume alone when snapshot jobs end.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use volumed_tests::snapkit::{Store, dump, image};
use volumed_tests::{TestDaemon, nbdinfo_json, qemu_io, run_ok};

/// The JSON fields DESIGN.md promises for a volume.
const VOLUME_FIELDS: [&str; 7] = [
    "name",
    "size",
    "chunk_size",
    "ephemeral",
    "state",
    "uri",
    "source_snapshot",
];

fn assert_volume_fields(v: &Value) {
    for f in VOLUME_FIELDS {
        assert!(v.get(f).is_some(), "volume JSON lacks {f}: {v}");
    }
}

#[test]
fn lifecycle_human_and_json() {
    let d = TestDaemon::start();

    let out = d.vol_ok(&["create", "data", "--size", "10G"]);
    assert_eq!(
        out.trim(),
        "created volume 'data': 10 GiB, chunk size 512 KiB"
    );
    let v = d.vol_json(&["create", "logs", "--size", "512K", "--chunk-size", "64K"]);
    assert_volume_fields(&v);
    assert_eq!(v["size"], 512 << 10);
    assert_eq!(v["chunk_size"], 64 << 10);
    assert_eq!(v["state"], "available");
    assert_eq!(v["uri"], Value::Null);
    assert_eq!(v["ephemeral"], false);
    assert_eq!(v["source_snapshot"], Value::Null);

    let table = d.vol_ok(&["list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("SIZE") && lines[0].contains("STATE"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("data ")
            && lines[1].contains("10 GiB")
            && lines[1].contains("available")
    );
    assert!(lines[2].starts_with("logs ") && lines[2].contains("512 KiB"));

    // attach prints exactly the URI.
    let uri = d.vol_ok(&["attach", "data", "--instance", "i-0abc"]);
    assert_eq!(uri.trim_end(), d.uri("data"));
    let v = d.vol_json(&["inspect", "data"]);
    assert_volume_fields(&v);
    assert_eq!(v["state"], "attached");
    assert_eq!(v["uri"], d.uri("data"));
    assert_eq!(v["unix_uri"], d.unix_uri("data"));
    assert_eq!(v["instance"], "i-0abc");
    let human = d.vol_ok(&["inspect", "data"]);
    assert!(
        human.contains("state:") && human.contains("attached") && human.contains("i-0abc"),
        "{human}"
    );

    let j = d.vol_json(&["attach", "logs"]);
    assert_eq!(j["uri"], d.uri("logs"));
    assert_eq!(j["unix_uri"], d.unix_uri("logs"));

    // Listing in JSON is one document: an array of volumes.
    assert_eq!(d.volume_names(), ["data", "logs"]);

    // Grow while attached: new NBD connections see the new size.
    assert_eq!(
        nbdinfo_json(&d.uri("data"))["exports"][0]["export-size"],
        10u64 << 30
    );
    let v = d.vol_json(&["modify", "data", "--size", "12GiB"]);
    assert_eq!(v["size"], 12u64 << 30);
    assert_eq!(
        nbdinfo_json(&d.uri("data"))["exports"][0]["export-size"],
        12u64 << 30
    );
    let out = d.vol_ok(&["modify", "data", "--ephemeral", "true"]);
    assert!(out.contains("ephemeral true"), "{out}");
    d.vol_ok(&["modify", "data", "--ephemeral", "false"]);

    let out = d.vol_ok(&["detach", "data"]);
    assert_eq!(out.trim(), "detached volume 'data'");
    let j = d.vol_json(&["detach", "logs"]);
    assert_eq!(j["deleted"], false);
    assert_eq!(j["volume"]["state"], "available");
    assert_eq!(j["volume"]["uri"], Value::Null);

    assert_eq!(
        d.vol_ok(&["delete", "data"]).trim(),
        "deleted volume 'data'"
    );
    let j = d.vol_json(&["delete", "logs"]);
    assert_eq!(j["deleted"], true);
    assert_eq!(d.vol_json(&["list"]), serde_json::json!([]));
    assert!(
        d.volume_dirs().is_empty(),
        "data files left: {:?}",
        d.volume_dirs()
    );
    d.finish();
}

#[test]
fn attachment_survives_restart_and_kill() {
    let mut d = TestDaemon::start();
    d.vol_ok(&["create", "boot", "--size", "1G"]);
    d.vol_ok(&["create", "idle", "--size", "1G"]);
    d.vol_ok(&["attach", "boot", "--instance", "vm-7"]);

    d.restart();
    let v = d.vol_json(&["inspect", "boot"]);
    assert_eq!(v["state"], "attached");
    assert_eq!(v["instance"], "vm-7");
    assert_eq!(
        nbdinfo_json(&d.uri("boot"))["exports"][0]["export-size"],
        1u64 << 30
    );
    assert_eq!(d.vol_json(&["inspect", "idle"])["state"], "available");

    // A completed API call survives kill -9 too.
    d.vol_ok(&["attach", "idle"]);
    d.kill9();
    d.start_again();
    assert_eq!(d.vol_json(&["inspect", "idle"])["state"], "attached");
    assert!(d.log().contains("previous run did not shut down cleanly"));
    d.finish_expecting(&[], &["previous run did not shut down cleanly"]);
}

#[test]
fn re_attach_same_instance_is_idempotent_other_instance_refused() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "v", "--size", "1M"]);
    d.vol_ok(&["attach", "v", "--instance", "a"]);
    d.vol_ok(&["attach", "v", "--instance", "a"]);
    let err = d.vol_err(&["attach", "v", "--instance", "b"]);
    assert_eq!(err, "error: volume 'v' is already attached to instance a");
    d.finish();
}

#[test]
fn huge_volume_is_instant_and_sparse() {
    let d = TestDaemon::start();
    let v = d.vol_json(&["create", "huge", "--size", "64T"]);
    // Nothing allocated: 64 TiB exceeds this disk, so the files are sparse.
    assert_eq!(v["size"], 64u64 << 40);
    assert_eq!(v["allocated_bytes"], 0);
    d.vol_ok(&["attach", "huge"]);
    assert_eq!(
        nbdinfo_json(&d.uri("huge"))["exports"][0]["export-size"],
        64u64 << 40
    );
    d.finish();
}

/// `n` bytes of a pattern no two runs of a test share, for volumes whose
/// content must be told apart.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// Writes `bytes` at the start of attached volume `name` with nbdcopy.
fn copy_in(d: &TestDaemon, name: &str, bytes: &[u8]) {
    let src = d.dir.path().join(format!("{name}.in"));
    std::fs::write(&src, bytes).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(d.uri(name)));
}

/// Issue 24, first path, exactly as reported: a snapshot job that outlives
/// its volume must leave the next volume of that name alone. The old job
/// completes after `a` was deleted and created again; then the daemon is
/// killed and started: the new `a`, its size, attachment and 16 MiB must
/// all be there, and the snapshot must hold the old bytes.
#[test]
fn a_snapshot_outliving_its_volume_leaves_the_next_one_of_its_name_alone() {
    let mut d =
        TestDaemon::start_with_env(&[("VOLUMED_FAILPOINTS", "snapshot-before-manifest=4000")]);
    let repo = Store::Local.repo(&d, "");
    let (old, new) = (noise(16 << 20, 1), noise(16 << 20, 2));
    d.vol_ok(&["create", "a", "--size", "64M"]);
    d.vol_ok(&["attach", "a"]);
    copy_in(&d, "a", &old);
    d.vol_ok(&["detach", "a"]);
    let s = d.vol_json(&["snapshot", "create", "a"]);
    assert_eq!(s["state"], "pending", "{s}");
    let id = s["id"].as_str().unwrap().to_owned();
    d.vol_ok(&["delete", "a"]);
    d.vol_ok(&["create", "a", "--size", "128M"]);
    d.vol_ok(&["attach", "a"]);
    copy_in(&d, "a", &new);
    let done = d.wait_snapshot_settled(&id);
    assert_eq!(done["state"], "completed", "{done}");
    let mut want_old = old.clone();
    want_old.resize(64 << 20, 0);
    assert!(
        image(&repo, &id) == want_old,
        "the snapshot is not the old volume"
    );

    d.kill9();
    d.set_env(&[]);
    d.start_again();
    let out = d.vol(&["--json", "inspect", "a"]);
    assert!(
        out.status.success(),
        "the second volume 'a' is gone after the restart ({}); the daemon said:\n{}",
        String::from_utf8_lossy(&out.stderr).trim(),
        d.log()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains("finishing a delete"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["size"].as_u64(), v["state"].as_str()),
        (Some(128 << 20), Some("attached")),
        "{v}"
    );
    let mut want_new = new;
    want_new.resize(128 << 20, 0);
    assert!(
        dump(&d, "a") == want_new,
        "the second volume's bytes changed"
    );
    assert!(image(&repo, &id) == want_old, "the snapshot changed");
    d.finish_expecting(&[], &["previous run did not shut down cleanly"]);
}

/// Rounds of `attach_and_detach_racing_a_snapshot_completion_keep_the_attachment`.
const RACE_ROUNDS: usize = 30;

/// Issue 24, first path, second form: attach and detach answered while a
/// snapshot of the volume completes. Each round starts a snapshot (held
/// 300 ms before its manifest) and toggles the attachment over the control
/// API as fast as it answers until the snapshot has settled; then the
/// volume's state and export must be what the last answer said, and stay
/// so across kill -9.
#[test]
fn attach_and_detach_racing_a_snapshot_completion_keep_the_attachment() {
    let mut d =
        TestDaemon::start_with_env(&[("VOLUMED_FAILPOINTS", "snapshot-before-manifest=300")]);
    d.vol_ok(&["create", "v", "--size", "8M", "--chunk-size", "64K"]);
    d.vol_ok(&["attach", "v"]);
    let mut attached = true;
    for round in 0..RACE_ROUNDS {
        if attached {
            qemu_io(
                &d.uri("v"),
                &[&format!("write -P {} 0 64k", round + 1), "flush"],
            );
        }
        let s = d.vol_json(&["snapshot", "create", "v"]);
        let id = s["id"].as_str().unwrap().to_owned();
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(250));
        let mut toggles = 0;
        loop {
            let verb = if attached { "detach" } else { "attach" };
            let (code, body) = d.api("POST", &format!("/v1/volumes/v/{verb}"), "{}");
            assert_eq!(
                code, 200,
                "round {round}, toggle {toggles}: {verb} refused: {body}"
            );
            attached = !attached;
            toggles += 1;
            let (_, s) = d.api("GET", &format!("/v1/snapshots/{id}"), "");
            let s: Value = serde_json::from_str(&s).unwrap();
            if s["state"] != "pending" {
                assert_eq!(s["state"], "completed", "{s}");
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{s}");
        }
        assert_attachment(&d, attached, &format!("round {round} ({toggles} toggles)"));
    }
    d.kill9();
    d.start_again();
    assert_attachment(&d, attached, "after kill -9");
    d.finish_expecting(&[], &["previous run did not shut down cleanly"]);
}

/// Volume `v` is attached (recorded and exported) exactly when `attached`.
fn assert_attachment(d: &TestDaemon, attached: bool, when: &str) {
    let v = d.vol_json(&["inspect", "v"]);
    let want = if attached { "attached" } else { "available" };
    assert_eq!(
        v["state"], want,
        "{when}: the last answer left v {want}: {v}"
    );
    let served = Command::new("nbdinfo")
        .arg(d.uri("v"))
        .output()
        .unwrap()
        .status
        .success();
    assert_eq!(
        served, attached,
        "{when}: v is {want}, and exported: {served}"
    );
}
