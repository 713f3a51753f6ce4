//! Power loss, not just `kill -9`: the crash test (`crash.rs`, 20 rounds)
//! and the crash matrix (`crash_matrix.rs`) again, with every daemon on the
//! test-only `powerloss-sim` I/O engine. That engine keeps each data file's
//! changes since its last sync in the daemon's memory, so a `kill -9`
//! loses exactly what was never synced, as a power cut would; on a real
//! engine the page cache keeps it and a missing sync goes unnoticed.
//!
//! Both files are compiled in here unchanged; only the engine differs. The
//! detach log and the dirty set are written and synced by the daemon
//! directly, not through the engine: what this proves for them is their
//! order against the data files' syncs (a log record only after its
//! chunk's data is synced), which is where the risk lies.

#[path = "crash.rs"]
mod crash;
#[path = "crash_matrix.rs"]
mod crash_matrix;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use volumed_tests::{TestDaemon, qemu_io};

/// Every daemon this test binary starts inherits the engine choice.
extern "C" fn select_the_powerloss_engine() {
    // SAFETY: runs from .init_array, before main and before any thread
    // exists, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("VOLUMED_IO_ENGINE", "powerloss-sim") };
}

#[used]
#[unsafe(link_section = ".init_array")]
static SELECT_THE_POWERLOSS_ENGINE: extern "C" fn() = select_the_powerloss_engine;

/// The model is really on: a write that was never flushed is gone after
/// `kill -9`, and one that was flushed is there. (On io_uring or the thread
/// pool both survive, from the page cache.)
#[test]
fn an_unflushed_write_is_lost_and_a_flushed_one_kept() {
    let mut d = TestDaemon::start();
    assert_eq!(d.vol_json(&["status"])["io_backend"], "powerloss-sim");
    d.vol_ok(&["create", "p", "--size", "8M"]);
    d.vol_ok(&["attach", "p"]);
    let script = r#"
import nbd, os, time
h = nbd.NBD(); h.connect_uri(os.environ['URI'])
h.pwrite(b'\x11' * 65536, 0)
h.flush()
h.pwrite(b'\x22' * 65536, 1 << 20)
h.pwrite(b'\x33' * 4096, 0)
# Read back before the crash: the unflushed writes are seen.
assert h.pread(4096, 0) == b'\x33' * 4096
assert h.pread(65536, 1 << 20) == b'\x22' * 65536
print('written', flush=True)
time.sleep(60)
"#;
    let mut writer = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .env("URI", d.uri("p"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(writer.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "written");
    // (No other client may look before the crash: qemu-io flushes when it
    // closes, and a flush covers every connection's writes.)
    let t = std::time::Instant::now();
    d.kill9();
    writer.kill().unwrap();
    writer.wait().unwrap();
    d.start_again();
    eprintln!("kill and restart took {:?}", t.elapsed());
    let after = qemu_io(&d.uri("p"), &["read -P 0x11 0 64k", "read -P 0 1M 64k"]);
    assert!(!after.contains("Pattern verification failed"), "{after}");
    d.finish_expecting(&[], &["previous run did not shut down cleanly"]);
}
