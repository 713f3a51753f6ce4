//! Unit tests of `child::spawn`: a child outlives the short-lived thread
//! that asked for it, limits reach the child, nothing spawns past it.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::*;

/// How long a child must stay alive after the thread that asked for it
/// exited. The control test below sees the signal of a dead forking thread
/// arrive within milliseconds.
const OUTLIVES: Duration = Duration::from_secs(1);

/// The premise: a child armed and forked on a short-lived thread is killed
/// when that thread exits, while the process lives. This is what the
/// spawner thread exists to prevent, and it shows the next test can fail.
#[test]
fn the_signal_follows_the_thread_that_forked() {
    let mut child = std::thread::spawn(|| {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("60");
        arm(&mut cmd, None);
        cmd.spawn().unwrap()
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child outlived the thread that forked it");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
}

/// Through `spawn`, the thread that asks may exit at once: the child lives
/// on as long as the process does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_outlives_the_thread_that_asked_for_it() {
    let rt = tokio::runtime::Handle::current();
    let mut child = std::thread::spawn(move || {
        let mut cmd = Command::new("sleep");
        cmd.arg("60").kill_on_drop(true);
        rt.block_on(spawn(cmd, None))
    })
    .join()
    .unwrap()
    .unwrap();
    let t = Instant::now();
    while t.elapsed() < OUTLIVES {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("the child died with its asking thread: {s}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().await.unwrap();
}

/// The limits reach the child: what `qemu-img info` runs under.
#[tokio::test]
async fn limits_are_set_in_the_child() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ulimit -v; ulimit -t; ulimit -c"])
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let limits = Limits {
        address_space: 1 << 30,
        cpu_secs: 10,
    };
    let out = spawn(cmd, Some(limits))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", out.status);
    // ulimit -v counts KiB.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1048576\n10\n0\n");
}

#[tokio::test]
async fn a_missing_program_is_not_found() {
    let err = spawn(Command::new("/nonexistent/volumed-test"), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    assert!(
        output_if_ok(Command::new("/nonexistent/volumed-test"))
            .await
            .is_none()
    );
    assert_eq!(output_if_ok(Command::new("true")).await, Some(Vec::new()));
}

/// No child is started past [`spawn`]: outside this file and tests, a
/// source file that builds a `Command` never spawns, runs or waits for it
/// itself.
#[test]
fn every_child_goes_through_spawn() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut bad = Vec::new();
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".rs")
                || name == "child.rs"
                || name == "tests.rs"
                || name.ends_with("_tests.rs")
            {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            // Unit tests at the end of a file may run what they like.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            if !(code.contains("Command::new(") || code.contains("process::Command")) {
                continue;
            }
            for call in [".spawn()", ".output()", ".status()", "spawn_with("] {
                if code.contains(call) {
                    bad.push(format!("{} calls {call}", p.display()));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "start children through child::spawn: {bad:?}"
    );
}
