//! The volume lifecycle through the real `vol` binary: human and JSON output,
//! the EBS-like state rules, and attachments that survive a restart.

use serde_json::Value;
use volumed_tests::{TestDaemon, nbdinfo_json};

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
