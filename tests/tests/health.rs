//! A failed sync latches: the volume refuses every request (EIO) until a
//! detach and attach reopen it, `vol inspect` says why, snapshots of it are
//! refused, and other volumes are untouched. The failure is injected with
//! the `volume-sync` failpoint on the second flush of the daemon's run.

use volumed_tests::TestDaemon;

const SCRIPT: &str = r#"
def attempt(f):
    try:
        f()
        return 'ok'
    except nbd.Error as e:
        import errno
        n = e.errno
        return 'errno=%s' % (errno.errorcode.get(n, n) if isinstance(n, int) else n)
h = nbd.NBD(); h.connect_uri(URI)
h.pwrite(b'A' * 65536, 0)
h.flush()                      # the first flush of the run: passes
h.pwrite(b'B' * 65536, 65536)
print('flush', attempt(h.flush))
print('flush_again', attempt(h.flush))
print('read', attempt(lambda: h.pread(4096, 0)))
print('write', attempt(lambda: h.pwrite(b'C' * 4096, 0)))
h.shutdown()
"#;

const OTHER: &str = r#"
h = nbd.NBD(); h.connect_uri(URI)
h.pwrite(b'Z' * 65536, 0)
h.flush()
assert h.pread(65536, 0) == b'Z' * 65536
print('other ok')
h.shutdown()
"#;

#[test]
fn a_failed_sync_latches_until_reopened() {
    let d = TestDaemon::start_with_env(&[("VOLUMED_FAILPOINTS", "volume-sync=eio@2")]);
    for v in ["bad", "good"] {
        d.vol_ok(&["create", v, "--size", "16M"]);
        d.vol_ok(&["attach", v]);
    }
    let out = volumed_tests::nbd_py(&d.unix_uri("bad"), SCRIPT);
    let eio = "errno=EIO";
    for step in ["flush", "flush_again", "read", "write"] {
        assert!(
            out.lines().any(|l| l == format!("{step} {eio}")),
            "{step} should fail with EIO:\n{out}"
        );
    }

    // BLOCK_STATUS too: the chunk map of a failed volume is not trusted.
    let map = std::process::Command::new("nbdinfo")
        .arg("--map")
        .arg(d.unix_uri("bad"))
        .output()
        .unwrap();
    assert!(
        !map.status.success(),
        "block status on a failed volume answered: {}",
        String::from_utf8_lossy(&map.stdout)
    );

    // Another volume keeps working (its flush is past the injected one).
    assert!(volumed_tests::nbd_py(&d.unix_uri("good"), OTHER).contains("other ok"));

    let v = d.vol_json(&["inspect", "bad"]);
    assert_eq!(v["health"], "failed", "{v}");
    let reason = v["health_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("fdatasync failed"), "{v}");
    assert_eq!(d.vol_json(&["inspect", "good"])["health"], "ok");
    let table = d.vol_ok(&["list"]);
    assert!(
        table.contains("HEALTH") && table.contains("failed"),
        "{table}"
    );

    let err = d.vol_err(&["snapshot", "create", "bad"]);
    assert!(err.contains("failed") && err.contains("detach"), "{err}");
    d.vol_ok(&["snapshot", "create", "good", "--wait"]);

    // Detach and attach reopen it from its files.
    d.vol_ok(&["detach", "bad"]);
    assert_eq!(d.vol_json(&["inspect", "bad"])["health"], "ok");
    d.vol_ok(&["attach", "bad"]);
    let check = r#"
h = nbd.NBD(); h.connect_uri(URI)
assert h.pread(65536, 0) == b'A' * 65536, 'flushed data lost'
h.pwrite(b'D' * 4096, 0)
h.flush()
print('reopened ok')
h.shutdown()
"#;
    assert!(volumed_tests::nbd_py(&d.unix_uri("bad"), check).contains("reopened ok"));
    let s = d.vol_json(&["snapshot", "create", "bad", "--wait"]);
    assert_eq!(s["state"], "completed", "{s}");
    d.finish_expecting(
        &[
            "I/O failure: the volume refuses every request",
            "I/O failed",
        ],
        &["failpoint: injecting EIO", "request failed"],
    );
}
