//! The record of changed chunks survives a clean restart, so the next
//! snapshot reads only what changed; after `kill -9` it is not trusted and
//! the next snapshot reads every chunk holding data.

use volumed_tests::snapkit::{fill_random, snap, u};
use volumed_tests::{TestDaemon, qemu_io};

#[test]
fn changed_chunks_survive_sigterm_but_not_kill9() {
    let mut d = TestDaemon::start();
    d.vol_ok(&["create", "data", "--size", "64M"]);
    d.vol_ok(&["attach", "data"]);
    // 16 MiB of data: 32 chunks of 512 KiB.
    fill_random(&d, "data", 16);
    let full = snap(&d, "data");
    assert_eq!(u(&full["changed_chunks"]), 32, "{full}");

    // Two chunks change, then a clean restart.
    qemu_io(
        &d.uri("data"),
        &["write -P 0x41 1M 512k", "write -P 0x42 8M 4k"],
    );
    d.restart();
    let inc = snap(&d, "data");
    assert_eq!(u(&inc["changed_chunks"]), 2, "{inc}");
    assert_eq!(inc["parent"], full["id"]);

    // The saved set is used once: another clean restart with no writes
    // changes nothing.
    d.restart();
    let none = snap(&d, "data");
    assert_eq!(u(&none["changed_chunks"]), 0, "{none}");

    // After kill -9 nothing proves what changed: every data chunk is read,
    // and the snapshot still holds the volume's bytes.
    qemu_io(&d.uri("data"), &["write -P 0x43 12M 4k"]);
    d.kill9();
    d.start_again();
    let after_crash = snap(&d, "data");
    assert_eq!(u(&after_crash["changed_chunks"]), 32, "{after_crash}");
    d.finish_expecting(&[], &["previous run did not shut down cleanly"]);
}
