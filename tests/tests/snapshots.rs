//! Snapshots of live volumes, against the local store and a real
//! S3-compatible server. Every check reads the snapshot back through the
//! `snapshot` crate and compares it byte for byte with the volume.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use volumed_tests::snapkit::{Store, dump, fill_random, image, snap, u};
use volumed_tests::{qemu_io, run_ok};

/// Full, then incremental, then dedup across volumes, then zeros.
fn full_incremental_dedup(store: Store) {
    let d = store.daemon("incr");
    let repo = store.repo(&d, "incr");
    d.vol_ok(&["create", "data", "--size", "1G"]);
    d.vol_ok(&["attach", "data"]);
    fill_random(&d, "data", 1024);

    let full = snap(&d, "data");
    assert_eq!(u(&full["changed_chunks"]), 2048);
    assert_eq!(u(&full["logical_bytes"]), 1 << 30);
    assert!(
        u(&full["uploaded_bytes"]) >= 1 << 30,
        "random data is stored raw: {full}"
    );
    assert_eq!(full["parent"], Value::Null);
    let before = dump(&d, "data");
    assert!(
        image(&repo, full["id"].as_str().unwrap()) == before,
        "full snapshot differs from the volume"
    );

    // Change three chunks (one partly, two fully).
    qemu_io(
        &d.uri("data"),
        &[
            "write -P 0x11 4k 8k",
            "write -P 0x22 100M 512k",
            "write -P 0x33 1023M 512k",
        ],
    );
    let inc = snap(&d, "data");
    assert_eq!(u(&inc["changed_chunks"]), 3, "{inc}");
    assert!(
        u(&inc["uploaded_bytes"]) <= 3 * (512 << 10) + 3 * 64,
        "{inc}"
    );
    assert_eq!(inc["parent"], full["id"]);
    let after = dump(&d, "data");
    assert!(
        image(&repo, inc["id"].as_str().unwrap()) == after,
        "incremental snapshot differs from the volume"
    );
    assert!(
        image(&repo, full["id"].as_str().unwrap()) == before,
        "the full snapshot is unchanged"
    );

    // Nothing changed: nothing read, nothing uploaded.
    let none = snap(&d, "data");
    assert_eq!(
        (u(&none["changed_chunks"]), u(&none["uploaded_bytes"])),
        (0, 0)
    );

    // Another volume with the same bytes uploads nothing new.
    d.vol_ok(&["create", "twin", "--size", "1G"]);
    d.vol_ok(&["attach", "twin"]);
    let src = d.dir.path().join("data.dump");
    run_ok(Command::new("nbdcopy").arg(&src).arg(d.uri("twin")));
    let twin = snap(&d, "twin");
    assert_eq!(u(&twin["changed_chunks"]), 2048);
    assert_eq!(
        u(&twin["uploaded_bytes"]),
        0,
        "every chunk was already in the store: {twin}"
    );

    // All-zero volumes upload nothing, whether never written or written zeros.
    d.vol_ok(&["create", "empty", "--size", "1G"]);
    d.vol_ok(&["create", "zeros", "--size", "64M"]);
    d.vol_ok(&["attach", "zeros"]);
    qemu_io(&d.uri("zeros"), &["write -P 0 0 64M"]);
    for v in ["empty", "zeros"] {
        let s = snap(&d, v);
        assert_eq!(
            (u(&s["uploaded_bytes"]), u(&s["logical_bytes"])),
            (0, 0),
            "{s}"
        );
        assert!(
            image(&repo, s["id"].as_str().unwrap())
                .iter()
                .all(|b| *b == 0)
        );
    }

    // The list and inspect agree, labels included.
    let labelled = d.vol_json(&[
        "snapshot",
        "create",
        "data",
        "--label",
        "env=prod",
        "--label",
        "tier=gold",
        "--wait",
    ]);
    let got = d.vol_json(&["snapshot", "inspect", labelled["id"].as_str().unwrap()]);
    assert_eq!(
        got["labels"],
        serde_json::json!({"env": "prod", "tier": "gold"})
    );
    let list = d.vol_json(&["snapshot", "list", "--volume", "data"]);
    assert_eq!(list.as_array().unwrap().len(), 4);
    assert!(d.vol_ok(&["snapshot", "list"]).contains("completed"));
    d.finish();
}

#[test]
fn full_incremental_dedup_local() {
    full_incremental_dedup(Store::Local);
}

#[test]
fn full_incremental_dedup_s3() {
    full_incremental_dedup(Store::s3());
}

/// A kill -9 in the middle of an upload: the snapshot is settled at
/// restart (error, or completed if its manifest got there), and the next
/// snapshot is complete and right.
fn kill9_mid_upload(store: Store) {
    let mut d = store.daemon("kill");
    let repo = store.repo(&d, "kill");
    d.vol_ok(&["create", "v", "--size", "256M"]);
    d.vol_ok(&["attach", "v"]);
    fill_random(&d, "v", 256);
    let started = d.vol_json(&["snapshot", "create", "v"]);
    std::thread::sleep(Duration::from_millis(200));
    d.kill9();
    d.start_again();
    let id = started["id"].as_str().unwrap();
    let settled = d.wait_snapshot_settled(id)["state"].clone();
    assert!(settled == "error" || settled == "completed", "{settled}");
    if settled == "completed" {
        assert!(image(&repo, id) == dump(&d, "v"));
    }
    qemu_io(&d.uri("v"), &["write -P 0x5a 1M 64k"]);
    let next = snap(&d, "v");
    assert!(
        image(&repo, next["id"].as_str().unwrap()) == dump(&d, "v"),
        "the snapshot after the crash is right"
    );
    d.finish_expecting(&[], &["previous run did not shut down cleanly"]);
}

#[test]
fn kill9_mid_upload_local() {
    kill9_mid_upload(Store::Local);
}

#[test]
fn kill9_mid_upload_s3() {
    kill9_mid_upload(Store::s3());
}

/// The store goes down in the middle of a snapshot: it ends `error`, its
/// changes are carried into the next one, which is complete and right once
/// the store is back.
#[test]
fn store_outage_mid_snapshot_s3() {
    let mut store = Store::s3();
    let d = store.daemon("outage");
    let repo = store.repo(&d, "outage");
    d.vol_ok(&["create", "v", "--size", "256M"]);
    d.vol_ok(&["attach", "v"]);
    fill_random(&d, "v", 256);
    let Store::S3(server) = &mut store else {
        unreachable!()
    };
    let started = d.vol_json(&["snapshot", "create", "v"]);
    server.stop();
    let id = started["id"].as_str().unwrap();
    assert_eq!(d.wait_snapshot_settled(id)["state"], "error");
    let failed = d.vol_json(&["snapshot", "inspect", id]);
    assert!(!failed["error"].as_str().unwrap().is_empty(), "{failed}");
    let out = d.vol(&["snapshot", "create", "v", "--wait"]);
    assert!(
        !out.status.success(),
        "a snapshot with the store down must fail"
    );

    server.start_again();
    let next = snap(&d, "v");
    assert_eq!(
        u(&next["changed_chunks"]),
        512,
        "the failed snapshots' changes are carried: {next}"
    );
    assert!(image(&repo, next["id"].as_str().unwrap()) == dump(&d, "v"));
    // The store's outage is retried, then fails the snapshot, whose marker
    // may be left behind if it was written before the store went down.
    d.finish_expecting(
        &[],
        &[
            "store operation failed; retrying",
            "snapshot failed; its changes go to the next one",
            "could not remove the snapshot's marker",
        ],
    );
}
