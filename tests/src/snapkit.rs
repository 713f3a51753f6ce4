//! Helpers shared by the snapshot and restore tests: the store a daemon
//! uses (local directory or the S3 test server), snapshots read back
//! through the `snapshot` crate, and volumes read and filled over NBD.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use snapshot::store::{LocalStore, S3Store};
use snapshot::{ObjectStore, Repo, SnapshotId};

use crate::s3::S3Server;
use crate::{TestDaemon, run_ok};

/// Where the daemon under test keeps its snapshots.
pub enum Store {
    Local,
    S3(S3Server),
}

impl Store {
    pub fn s3() -> Self {
        Store::S3(S3Server::start())
    }

    pub fn env(&self, prefix: &str) -> Vec<(&'static str, String)> {
        match self {
            Store::Local => vec![],
            Store::S3(s) => {
                let mut env = s.env();
                env.push((
                    "VOLUMED_STORE",
                    format!("s3://{}/{prefix}", crate::s3::BUCKET),
                ));
                // Outage tests must end in seconds, not minutes.
                env.push(("VOLUMED_S3_OPERATION_TIMEOUT", "6".into()));
                env.push(("VOLUMED_S3_ATTEMPT_TIMEOUT", "2".into()));
                env.push(("VOLUMED_S3_MAX_ATTEMPTS", "2".into()));
                env
            }
        }
    }

    pub fn daemon(&self, prefix: &str) -> TestDaemon {
        let env = self.env(prefix);
        let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        TestDaemon::start_with_env(&refs)
    }

    /// A second host: its own data dir and port, the same store as `other`.
    pub fn daemon_sharing(&self, prefix: &str, other: &TestDaemon) -> TestDaemon {
        let mut env = self.env(prefix);
        if let Store::Local = self {
            env.push((
                "VOLUMED_STORE",
                format!("file://{}", other.data_dir().join("store").display()),
            ));
        }
        let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        TestDaemon::start_with_env(&refs)
    }

    /// Makes every object now in `d`'s store at least `age` old to gc, as
    /// if that much time had passed since `written`, the last write that
    /// must look old. A local store's object times are its files' mtimes,
    /// so they move back by `age` and nothing waits. An S3 server stamps
    /// Last-Modified itself, in whole seconds, so there this sleeps until
    /// `age` and one second of that rounding have passed since `written`.
    pub fn age_objects(&self, d: &TestDaemon, written: Instant, age: Duration) {
        match self {
            Store::Local => backdate_files(&d.data_dir().join("store"), age),
            Store::S3(_) => {
                let until = written + age + Duration::from_secs(1);
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
            }
        }
    }

    /// The same store, opened by the test to read snapshots back.
    pub fn repo(&self, d: &TestDaemon, prefix: &str) -> Repo {
        let store: Arc<dyn ObjectStore> = match self {
            Store::Local => Arc::new(LocalStore::open(&d.data_dir().join("store")).unwrap()),
            Store::S3(s) => Arc::new(S3Store::new(s.settings(prefix))),
        };
        Repo::new(store, 3)
    }
}

/// Moves the mtime of every file under `dir` back by `by`.
fn backdate_files(dir: &Path, by: Duration) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            backdate_files(&path, by);
            continue;
        }
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        let modified = file.metadata().unwrap().modified().unwrap();
        let earlier = modified.checked_sub(by).unwrap_or(SystemTime::UNIX_EPOCH);
        file.set_modified(earlier).unwrap();
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A snapshot's full image, rebuilt from its manifest and chunk objects.
pub fn image(repo: &Repo, id: &str) -> Vec<u8> {
    rt().block_on(async {
        let m = repo
            .get_manifest(&SnapshotId::parse(id).unwrap())
            .await
            .unwrap();
        let cs = m.header.chunk_size;
        let mut img = vec![0u8; m.header.size as usize];
        for (c, h) in m.hashed() {
            let data = repo.get_chunk(h).await.unwrap();
            let off = (c * cs) as usize;
            img[off..off + data.len()].copy_from_slice(&data);
        }
        img
    })
}

/// The volume's bytes over NBD.
pub fn dump(d: &TestDaemon, name: &str) -> Vec<u8> {
    let path = d.dir.path().join(format!("{name}.dump"));
    let _ = std::fs::remove_file(&path);
    run_ok(Command::new("nbdcopy").arg(d.uri(name)).arg(&path));
    std::fs::read(&path).unwrap()
}

pub fn fill_random(d: &TestDaemon, name: &str, mib: usize) {
    let src = d.dir.path().join("random.img");
    run_ok(
        Command::new("head")
            .arg("-c")
            .arg(format!("{mib}M"))
            .arg("/dev/urandom")
            .stdout(std::fs::File::create(&src).unwrap()),
    );
    run_ok(Command::new("nbdcopy").arg(&src).arg(d.uri(name)));
}

pub fn snap(d: &TestDaemon, vol: &str) -> Value {
    let s = d.vol_json(&["snapshot", "create", vol, "--wait"]);
    assert_eq!(s["state"], "completed", "{s}");
    s
}

pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap()
}
