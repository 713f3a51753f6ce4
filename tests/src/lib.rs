//! Harness for the integration tests: starts the real `volumed` binary on a
//! temporary data dir, drives it with the real `vol` binary, and talks to it
//! with real NBD clients (libnbd's Python bindings, qemu-img, qemu-io,
//! nbdinfo). Nothing here stands in for the daemon.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use procs::{Group, Proc};

pub mod aws;
pub mod ebs;
pub mod faults;
pub mod model;
pub mod pki;
pub mod procs;
pub mod raw;
pub mod s3;
pub mod snapkit;

/// The directory holding `volumed` and `vol`, built once per test process so
/// the tests never run a stale binary.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/<test> -> target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The same selection scripts/test builds: `-p` would resolve
        // dependency features differently and build everything twice.
        cmd.args(["build", "--quiet", "--workspace", "--bins"]);
        // What cargo set for this test binary: build scripts (ring's, cc's)
        // rerun when these differ, so passing them on would rebuild their
        // crates here and again at the next build from a shell.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || k.starts_with("CARGO_BIN_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "OUT_DIR",
                ]
                .contains(&k.as_ref())
            {
                cmd.env_remove(k.as_ref());
            }
        }
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building volumed and vol failed");
        dir
    })
}

pub fn volumed_bin() -> PathBuf {
    bin_dir().join("volumed")
}

pub fn vol_bin() -> PathBuf {
    bin_dir().join("vol")
}

/// A running daemon on its own data dir and NBD port.
///
/// Each run of the daemon leads a process group of its own, so every
/// process it starts is attributable to this test: `finish` and `Drop` fail
/// the test if any of them is still alive once the daemon is gone.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// The NBD TCP port; 0 until the first start picks one, then kept so a
    /// restart serves the same URIs.
    pub nbd_port: u16,
    env: Vec<(String, String)>,
    runs: usize,
    /// The process group of each run, the current one last.
    groups: Vec<Group>,
}

impl TestDaemon {
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    pub fn start_with_env(env: &[(&str, &str)]) -> Self {
        let mut d = Self::unstarted();
        d.set_env(env);
        d.spawn();
        d
    }

    /// A data dir with no daemon yet: `set_env`, then `start_again`.
    pub fn unstarted() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("volumed-test-")
            .tempdir()
            .expect("tempdir");
        TestDaemon {
            dir,
            child: None,
            nbd_port: 0,
            env: Vec::new(),
            runs: 0,
            groups: Vec::new(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket(&self) -> PathBuf {
        self.data_dir().join("volumed.sock")
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.data_dir().join("nbd.sock")
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.dir.path().join(format!("volumed-{run}.log"))
    }

    /// Replaces the extra environment of the next start (failpoints).
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.runs += 1;
        let log = std::fs::File::create(self.log_path(self.runs)).expect("log file");
        let mut cmd = Command::new(volumed_bin());
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .arg("--nbd-listen")
            .arg(format!("127.0.0.1:{}", self.nbd_port))
            .env("RUST_LOG", "info")
            .env_remove("VOLUMED_SOCKET")
            .env_remove("VOLUMED_STORE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // Its own process group: what the daemon forks stays attributable
        // to this test after the daemon is gone. Out of the terminal's
        // group, a Ctrl-C no longer reaches it, so it dies with the test
        // thread that started it instead (every test starts and drops its
        // daemons on its own thread).
        cmd.process_group(0);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches
        // no memory; it runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let kill = libc::SIGKILL as libc::c_ulong;
                if libc::prctl(libc::PR_SET_PDEATHSIG, kill, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn volumed");
        self.groups.push(Group::of_leader(child.id() as i32));
        self.child = Some(child);
        self.wait_ready();
        if self.nbd_port == 0 {
            let st = self.vol_json(&["status"]);
            let addr: std::net::SocketAddr = st["nbd_listen"].as_str().unwrap().parse().unwrap();
            self.nbd_port = addr.port();
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("volumed exited during start ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "volumed did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait; asserts a clean exit (status 0).
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_timeout(&mut child, Duration::from_secs(30)).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("volumed did not stop on SIGTERM:\n{}", self.log())
        });
        assert!(
            status.success(),
            "volumed exited with {status} on SIGTERM:\n{}",
            self.log()
        );
    }

    /// `kill -9`: no flush, no clean-shutdown record.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits for a daemon that is expected to die by itself (a failpoint).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        wait_timeout(&mut child, Duration::from_secs(30)).expect("daemon did not exit")
    }

    pub fn start_again(&mut self) {
        self.spawn();
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Every run's log, concatenated.
    pub fn log(&self) -> String {
        (1..=self.runs)
            .map(|r| std::fs::read_to_string(self.log_path(r)).unwrap_or_default())
            .collect()
    }

    /// Fails on ERROR and WARN lines in the daemon's log that the test did
    /// not expect: an ERROR line must contain one of `errors`, a WARN line
    /// one of `warnings` (message substrings, as specific as the test can
    /// make them).
    pub fn assert_log_clean(&self, errors: &[&str], warnings: &[&str]) {
        let log = self.log();
        let unexpected = |level: &str, allowed: &[&str]| -> Vec<String> {
            log.lines()
                .filter(|l| l.contains(level) && !allowed.iter().any(|a| l.contains(a)))
                .map(str::to_owned)
                .collect()
        };
        let bad = [
            unexpected(" ERROR ", errors),
            unexpected(" WARN ", warnings),
        ]
        .concat();
        assert!(
            bad.is_empty(),
            "unexpected ERROR or WARN lines in the daemon log:\n{}",
            bad.join("\n")
        );
    }

    /// The pid of the running daemon.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Live processes the running daemon started (its process group but
    /// itself), e.g. an import's qemu-nbd.
    pub fn daemon_children(&self) -> Vec<Proc> {
        procs::members(&self.groups[self.groups.len() - 1..], self.pid())
    }

    /// Processes that any run of the daemon started and that are still
    /// alive once [`procs::GRACE`] has passed (polled; empty at once when
    /// there are none). Meaningful once the daemon is stopped or killed:
    /// the running daemon's own children are counted too.
    pub fn survivors(&self) -> Vec<Proc> {
        procs::wait_gone(&self.groups, self.pid())
    }

    /// Fails if a process the daemon started outlived it, naming each by
    /// its command line; the survivors are killed first so they do not
    /// outlive the test too.
    pub fn assert_no_survivors(&self) {
        let left = self.survivors();
        if left.is_empty() {
            return;
        }
        kill_all(&left);
        panic!("{}", survivors_message(&left));
    }

    /// Stops the daemon cleanly and checks its log: the end of most tests.
    pub fn finish(self) {
        self.finish_expecting(&[], &[]);
    }

    /// As `finish`, allowing ERROR lines that contain one of `errors` and
    /// WARN lines that contain one of `warnings`.
    pub fn finish_expecting(mut self, errors: &[&str], warnings: &[&str]) {
        self.stop();
        self.assert_no_survivors();
        self.assert_log_clean(errors, warnings);
    }

    /// Polls `vol snapshot inspect` until snapshot `id` is no longer
    /// pending; returns that last inspection. Panics after a minute.
    pub fn wait_snapshot_settled(&self, id: &str) -> Value {
        let t = Instant::now();
        loop {
            let s = self.vol_json(&["snapshot", "inspect", id]);
            if s["state"] != "pending" {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "snapshot {id} stayed pending: {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `vol inspect` until volume `name`'s hydration is complete;
    /// returns that last inspection. Panics after two minutes.
    pub fn wait_hydrated(&self, name: &str) -> Value {
        let t = Instant::now();
        loop {
            let v = self.vol_json(&["inspect", name]);
            if v["hydration"]["state"] == "complete" {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "{name} not hydrated: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn vol(&self, args: &[&str]) -> Output {
        Command::new(vol_bin())
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .env_remove("VOLUMED_SOCKET")
            .output()
            .expect("run vol")
    }

    /// Runs `vol`, asserts success, returns stdout.
    pub fn vol_ok(&self, args: &[&str]) -> String {
        let out = self.vol(args);
        assert!(
            out.status.success(),
            "vol {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    pub fn vol_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.vol_ok(&full);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("vol {args:?} printed invalid JSON ({e}): {out}"))
    }

    /// Names of the volumes `vol --json list` reports, in order.
    pub fn volume_names(&self) -> Vec<String> {
        let list = self.vol_json(&["list"]);
        list.as_array()
            .expect("a JSON array")
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Runs `vol`, asserts failure with exactly one stderr line, returns it.
    pub fn vol_err(&self, args: &[&str]) -> String {
        let out = self.vol(args);
        assert!(!out.status.success(), "vol {args:?} should have failed");
        let err = String::from_utf8(out.stderr).expect("utf-8 stderr");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "vol {args:?}: expected one error line, got: {err}"
        );
        assert!(err.starts_with("error: "), "vol {args:?}: {err}");
        err.trim_end().to_owned()
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.nbd_port, name)
    }

    pub fn unix_uri(&self, name: &str) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            name,
            self.nbd_socket().display()
        )
    }

    /// A raw HTTP request on the control socket: (status, body).
    pub fn api(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = UnixStream::connect(self.socket()).expect("connect control socket");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: volumed\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = Vec::new();
        // A reset here once hid what the daemon had said, or that it died.
        // A reset after the whole answer (axum closing a `Connection:
        // close` socket) loses nothing.
        if let Err(e) = s.read_to_end(&mut resp)
            && !complete_http_answer(&resp)
        {
            panic!(
                "{method} {path}: reading the answer failed: {e}, after {:?}; the daemon's log:\n{}",
                String::from_utf8_lossy(&resp),
                self.log()
            );
        }
        let resp = String::from_utf8_lossy(&resp).into_owned();
        let status = resp
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("HTTP status line");
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// Paths under the volumes directory (one per volume).
    pub fn volume_dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(self.data_dir().join("volumes"))
            .map(|rd| rd.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for TestDaemon {
    /// Kills a daemon still running, then fails the test (unless it is
    /// failing already) if anything the daemon started outlives it.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let left = self.survivors();
        if left.is_empty() {
            return;
        }
        kill_all(&left);
        if std::thread::panicking() {
            eprintln!("{}", survivors_message(&left));
        } else {
            panic!("{}", survivors_message(&left));
        }
    }
}

fn survivors_message(left: &[Proc]) -> String {
    let list: Vec<String> = left.iter().map(Proc::to_string).collect();
    format!(
        "{} process(es) the daemon started outlived it by {:?} (killed now):\n{}",
        left.len(),
        procs::GRACE,
        list.join("\n")
    )
}

/// SIGKILL to each of `left`: processes this test's daemon started.
fn kill_all(left: &[Proc]) {
    for p in left {
        // SAFETY: kill only sends a signal.
        unsafe { libc::kill(p.pid, libc::SIGKILL) };
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().ok().flatten() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a Python script with libnbd's bindings (Debian's python3, which can
/// import `nbd`, unlike a pyenv one). `URI` is in the environment; the script
/// prints what the test checks. Panics with the script's stderr on failure.
pub fn nbd_py(uri: &str, script: &str) -> String {
    let out = nbd_py_output(uri, script);
    assert!(
        out.status.success(),
        "python nbd script failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        script
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn nbd_py_output(uri: &str, script: &str) -> Output {
    let prelude = "import nbd, os, sys\nURI = os.environ['URI']\n";
    Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!("{prelude}{script}"))
        .env("URI", uri)
        .output()
        .expect("run /usr/bin/python3 (python3-libnbd)")
}

/// Runs a command, asserts success, returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn nbdinfo_json(uri: &str) -> Value {
    let out = run_ok(Command::new("nbdinfo").args(["--json", uri]));
    serde_json::from_str(&out).expect("nbdinfo --json output")
}

/// `qemu-io -f raw URI -c ...`, asserting success and no "error" in output.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run_ok(&mut c);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("error"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

/// Whether `resp` holds an HTTP answer's head and all the body its
/// `content-length` announces.
fn complete_http_answer(resp: &[u8]) -> bool {
    let Some(end) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&resp[..end]).to_ascii_lowercase();
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|len| resp.len() - (end + 4) >= len)
}
