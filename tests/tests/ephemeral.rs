//! Ephemeral volumes (invariant 5): gone, data and catalog entry, once
//! detached, even when the daemon dies in the middle of removing them.

use volumed_tests::{TestDaemon, qemu_io};

#[test]
fn detach_deletes_an_ephemeral_volume() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "keep", "--size", "8M"]);
    d.vol_ok(&["create", "scratch", "--size", "8M", "--ephemeral"]);
    d.vol_ok(&["attach", "scratch"]);
    qemu_io(&d.uri("scratch"), &["write -P 0xee 0 4M"]);
    assert_eq!(d.volume_dirs().len(), 2);

    let out = d.vol_ok(&["detach", "scratch"]);
    assert_eq!(
        out.trim(),
        "detached volume 'scratch'; it was ephemeral and is deleted"
    );
    let names = d.volume_names();
    assert_eq!(names, ["keep"]);
    assert_eq!(d.volume_dirs().len(), 1, "the scratch data files are gone");
    assert_eq!(
        d.vol_err(&["inspect", "scratch"]),
        "error: volume 'scratch' not found"
    );

    // A new volume under the same name starts empty.
    d.vol_ok(&["create", "scratch", "--size", "8M", "--ephemeral"]);
    d.vol_ok(&["attach", "scratch"]);
    qemu_io(&d.uri("scratch"), &["read -P 0 0 4M"]);
    let j = d.vol_json(&["detach", "scratch"]);
    assert_eq!(j["deleted"], true);
    d.finish();
}

#[test]
fn attached_ephemeral_volume_survives_restart_then_goes_on_detach() {
    let mut d = TestDaemon::start();
    d.vol_ok(&["create", "tmp", "--size", "8M", "--ephemeral"]);
    d.vol_ok(&["attach", "tmp", "--instance", "vm-1"]);
    qemu_io(&d.uri("tmp"), &["write -P 0x42 0 1M"]);
    d.restart();
    let v = d.vol_json(&["inspect", "tmp"]);
    assert_eq!(
        (v["state"].as_str(), v["ephemeral"].as_bool()),
        (Some("attached"), Some(true))
    );
    qemu_io(&d.uri("tmp"), &["read -P 0x42 0 1M"]);
    d.vol_ok(&["detach", "tmp"]);
    assert!(d.volume_dirs().is_empty());
    d.restart();
    assert_eq!(d.vol_json(&["list"]), serde_json::json!([]));
    d.finish();
}

#[test]
fn modify_toggles_delete_on_detach() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "a", "--size", "1M", "--ephemeral"]);
    d.vol_ok(&["modify", "a", "--ephemeral", "false"]);
    d.vol_ok(&["attach", "a"]);
    assert_eq!(d.vol_json(&["detach", "a"])["deleted"], false);
    d.vol_ok(&["modify", "a", "--ephemeral", "true"]);
    d.vol_ok(&["attach", "a"]);
    assert_eq!(d.vol_json(&["detach", "a"])["deleted"], true);
    d.finish();
}

/// Warnings a failpoint's kill leaves: its own notice, and the next start's
/// notice of the unclean shutdown.
const KILLED: &[&str] = &[
    "failpoint reached: killing the daemon",
    "previous run did not shut down cleanly",
];

/// The daemon is killed at each step of an ephemeral volume's removal; the
/// restart finishes it: no orphaned data files, no entry without files.
#[test]
fn crash_during_ephemeral_removal_is_finished_on_restart() {
    for point in ["delete-after-mark", "delete-after-files"] {
        let mut d = TestDaemon::start_with_env(&[("VOLUMED_FAILPOINTS", point)]);
        d.vol_ok(&["create", "other", "--size", "4M"]);
        d.vol_ok(&["attach", "other"]);
        qemu_io(&d.uri("other"), &["write -P 0x33 0 1M"]);
        d.vol_ok(&["create", "eph", "--size", "4M", "--ephemeral"]);
        d.vol_ok(&["attach", "eph"]);
        qemu_io(&d.uri("eph"), &["write -P 0x44 0 1M"]);
        // The daemon dies inside the detach, so vol reports a failure.
        let out = d.vol(&["detach", "eph"]);
        assert!(
            !out.status.success(),
            "{point}: detach should have been cut short"
        );
        let status = d.wait_exit();
        assert!(!status.success(), "{point}: daemon should have been killed");

        d.set_env(&[]);
        d.start_again();
        let names = d.volume_names();
        assert_eq!(names, ["other"], "{point}");
        assert_eq!(
            d.volume_dirs().len(),
            1,
            "{point}: orphaned files {:?}",
            d.volume_dirs()
        );
        // The other volume kept its data and its attachment.
        qemu_io(&d.uri("other"), &["read -P 0x33 0 1M"]);
        d.finish_expecting(&[], KILLED);
    }
}

/// Killed between creating a volume's files and recording it: the restart
/// removes the orphaned files and the name is free.
#[test]
fn crash_during_create_leaves_no_orphan() {
    let mut d = TestDaemon::start_with_env(&[("VOLUMED_FAILPOINTS", "create-after-files")]);
    assert!(!d.vol(&["create", "half", "--size", "4M"]).status.success());
    d.wait_exit();
    assert_eq!(
        d.volume_dirs().len(),
        1,
        "the files were created before the crash"
    );
    d.set_env(&[]);
    d.start_again();
    assert!(
        d.volume_dirs().is_empty(),
        "orphan not removed: {:?}",
        d.volume_dirs()
    );
    assert_eq!(d.vol_json(&["list"]), serde_json::json!([]));
    d.vol_ok(&["create", "half", "--size", "4M"]);
    d.finish_expecting(&[], &[KILLED, &["removing orphaned volume data"]].concat());
}
