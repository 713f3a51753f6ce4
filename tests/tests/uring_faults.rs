//! A failed `io_uring_enter` in the real daemon under 64 requests in
//! flight: every request ends with its own result or an error, never
//! another request's, and the daemon serves on (on its thread pool).
//!
//! `VOLUMED_FAILPOINTS=io-uring-enter-error=N` fails the ring's N-th enter
//! as a kernel error would, before the kernel consumed anything.

use volumed_tests::{TestDaemon, nbd_py};

/// 1024 distinct 4 KiB blocks written with 64 in flight, a flush, then all
/// read back with 64 in flight. Prints `ok=<writes done> failed=<writes
/// refused> wrong=<blocks holding anything but zeros or their own data>`.
const SCRIPT: &str = r#"
BS = 4096
N = 1024
def blk(i):
    return (b'U%07d' % i) * (BS // 8)
h = nbd.NBD(); h.connect_uri(URI)
def run(start):
    done, failed, inflight, i = {}, set(), {}, 0
    while i < N or inflight:
        while i < N and len(inflight) < 64:
            c, extra = start(i)
            inflight[c] = (i, extra); i += 1
        h.poll(-1)
        for c in list(inflight):
            try:
                if h.aio_command_completed(c):
                    j, extra = inflight.pop(c); done[j] = extra
            except nbd.Error:
                j, _ = inflight.pop(c); failed.add(j)
    return done, failed
writes, wfailed = run(lambda i: (h.aio_pwrite(blk(i), i * BS), None))
h.flush()
def read(i):
    b = nbd.Buffer(BS)
    return h.aio_pread(b, i * BS), b
reads, rfailed = run(read)
wrong = 0
for i, b in reads.items():
    got = b.to_bytearray()
    if i in writes:
        wrong += got != blk(i)
    else:
        wrong += got != blk(i) and got != bytearray(BS)
print('ok=%d failed=%d readfailed=%d wrong=%d' % (len(writes), len(wfailed), len(rfailed), wrong))
"#;

#[test]
fn a_failed_enter_under_64_in_flight_mixes_no_results() {
    let mut d = TestDaemon::start_with_env(&[
        ("VOLUMED_IO_ENGINE", "uring"),
        ("VOLUMED_FAILPOINTS", "io-uring-enter-error=300"),
    ]);
    assert_eq!(d.vol_json(&["status"])["io_backend"], "io_uring");
    d.vol_ok(&["create", "u", "--size", "8M"]);
    d.vol_ok(&["attach", "u"]);
    let out = nbd_py(&d.uri("u"), SCRIPT);
    println!("{out}");
    let log = d.log();
    let hit = log.lines().find(|l| l.contains("io_uring_enter failed"));
    println!("{}", hit.expect("the failpoint was hit"));
    // Ops the ring never submitted ran on the thread pool: nothing failed.
    assert_eq!(out.trim(), "ok=1024 failed=0 readfailed=0 wrong=0");
    // And it keeps serving, across a restart on a healthy ring.
    d.set_env(&[("VOLUMED_IO_ENGINE", "uring")]);
    d.restart();
    let out = nbd_py(&d.uri("u"), SCRIPT);
    assert_eq!(out.trim(), "ok=1024 failed=0 readfailed=0 wrong=0");
    d.finish_expecting(&["io_uring_enter failed"], &[]);
}
