//! Ephemeral volumes (invariant 5): gone, data and catalog entry, once
//! detached, even when the daemon dies in the middle of removing them; on
//! an encrypted host, never readable from the data directory at all.

use std::path::{Path, PathBuf};
use std::process::Command;

use volumed_tests::{TestDaemon, qemu_io, run_ok};

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

/// What the test writes through NBD and then looks for on the host's disk.
const MARKER: &[u8] = b"VOLUMED-EPHEMERAL-SHRED-MARKER";

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file()
                && std::fs::read(e.path())
                    .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                found.push(e.path());
            }
        }
    }
    found
}

fn read_all(d: &TestDaemon, name: &str) -> Vec<u8> {
    let out = d.dir.path().join(format!("{name}.out"));
    let _ = std::fs::remove_file(&out);
    run_ok(Command::new("nbdcopy").arg(d.uri(name)).arg(&out));
    std::fs::read(&out).unwrap()
}

/// On an encrypted host a scratch volume's data file is encrypted under a
/// key only the daemon's memory holds: a marker written through NBD (in
/// aligned and unaligned pieces) reads back exactly, yet is in no file of
/// the data directory, attached, after `kill -9` (which loses the key: the
/// volume comes back reading zeros), or after detach.
#[test]
fn an_encrypted_hosts_scratch_data_is_never_readable_on_disk() {
    const SIZE: usize = 4 << 20;
    let mut d = TestDaemon::start_with_env(&[("VOLUMED_STORE_ENCRYPTION", "on")]);
    d.vol_ok(&["create", "scratch", "--size", "4M", "--ephemeral"]);
    d.vol_ok(&["attach", "scratch", "--instance", "vm-1"]);
    assert_eq!(d.vol_json(&["inspect", "scratch"])["memory_key"], true);
    let mut want: Vec<u8> = MARKER.iter().cycle().take(SIZE).copied().collect();
    let src = d.dir.path().join("marker.img");
    std::fs::write(&src, &want).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(d.uri("scratch")));
    std::fs::remove_file(&src).unwrap();
    // Pieces that start or end inside a 512-byte sector, a zeroing and a
    // trim with unaligned edges, and an aligned trim.
    qemu_io(
        &d.uri("scratch"),
        &[
            "write -P 0x5a 1000 3000",
            "write -z 9000 1500",
            "discard 70000 200000",
            "discard 1048576 1048576",
            "flush",
        ],
    );
    want[1000..4000].fill(0x5a);
    want[9000..10500].fill(0);
    want[70000..270000].fill(0);
    want[1 << 20..2 << 20].fill(0);
    assert!(
        read_all(&d, "scratch") == want,
        "the volume reads back what was written"
    );
    assert_eq!(
        files_containing(&d.data_dir(), MARKER),
        Vec::<PathBuf>::new()
    );
    // The search works: a persistent volume's file (plain, see
    // security.md) shows what was written to it.
    d.vol_ok(&["create", "kept", "--size", "1M"]);
    d.vol_ok(&["attach", "kept"]);
    let control = b"VOLUMED-PERSISTENT-CONTROL".repeat(40);
    let src = d.dir.path().join("control.img");
    std::fs::write(&src, &control).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(d.uri("kept")));
    std::fs::remove_file(&src).unwrap();
    assert_eq!(
        files_containing(&d.data_dir(), b"VOLUMED-PERSISTENT-CONTROL").len(),
        1
    );
    assert!(
        d.vol_err(&["modify", "scratch", "--ephemeral", "false"])
            .contains("key held only in memory"),
    );
    d.kill9();
    assert_eq!(
        files_containing(&d.data_dir(), MARKER),
        Vec::<PathBuf>::new()
    );
    d.start_again();
    let v = d.vol_json(&["inspect", "scratch"]);
    assert_eq!(v["state"], "attached");
    qemu_io(&d.uri("scratch"), &["read -P 0 0 4M"]);

    // Written again under the new run's key and snapshotted; a clean
    // restart (which saves an empty dirty set) ends that key too, and the
    // next snapshot holds the zeros, not its parent's chunks.
    let src = d.dir.path().join("marker.img");
    std::fs::write(&src, &want).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(d.uri("scratch")));
    assert!(read_all(&d, "scratch") == want);
    d.vol_ok(&["snapshot", "create", "scratch", "--wait"]);
    d.restart();
    qemu_io(&d.uri("scratch"), &["read -P 0 0 4M"]);
    let after = d.vol_json(&["snapshot", "create", "scratch", "--wait"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    d.vol_ok(&["create", "back", "--from-snapshot", &after]);
    d.vol_ok(&["attach", "back"]);
    qemu_io(&d.uri("back"), &["read -P 0 0 4M"]);

    // Written once more, then detached: nothing left.
    run_ok(Command::new("nbdcopy").arg(&src).arg(d.uri("scratch")));
    std::fs::remove_file(&src).unwrap();
    assert!(read_all(&d, "scratch") == want);
    d.vol_ok(&["detach", "scratch"]);
    assert_eq!(d.volume_names(), ["back", "kept"]);
    assert_eq!(d.volume_dirs().len(), 2);
    assert_eq!(
        files_containing(&d.data_dir(), MARKER),
        Vec::<PathBuf>::new()
    );
    d.finish_expecting(
        &[],
        &[
            "previous run did not shut down cleanly",
            "held only in memory by the last run",
        ],
    );
}
