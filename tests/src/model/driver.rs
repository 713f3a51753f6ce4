//! The driver: carries out each step on the real daemon with real clients
//! (`vol`, qemu-io, boto3) and tells the model what the step did. Where the
//! daemon's timing decides between two right answers (a snapshot job that
//! may or may not have finished), both are accepted and the model follows
//! the one that happened; any other answer fails the run.

use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use snapshot::Repo;
use snapshot::store::LocalStore;

use super::op::{CHUNK, Delays, Op};
use super::state::{Content, EBS_GIB, Model, Phase};
use crate::ebs::EbsClient;
use crate::{TestDaemon, qemu_io};

/// The daemon under test and its clients.
pub struct Driver {
    pub daemon: TestDaemon,
    pub ebs: EbsClient,
    /// The daemon's store, read by the test. Opened once, before the daemon
    /// writes to it: opening a local store clears its temporary files,
    /// a live writer's included.
    pub repo: Repo,
    /// Holds the AWS credentials file.
    _creds: tempfile::TempDir,
    credentials: PathBuf,
    /// The AWS endpoint's port, the same in every run so the boto3 client
    /// keeps its endpoint.
    aws_port: u16,
    gc_grace_ms: u64,
    /// WARN lines the run has made legitimate so far (message substrings).
    pub warnings: Vec<String>,
}

impl Driver {
    pub fn start(delays: Delays, gc_grace_ms: u64) -> Self {
        let creds = tempfile::tempdir().expect("tempdir");
        let credentials = crate::aws::write_credentials(creds.path(), 0o600);
        let aws_port = crate::s3::free_port();
        let daemon = TestDaemon::unstarted();
        let repo = Repo::new(
            Arc::new(
                LocalStore::open(&daemon.data_dir().join("store")).expect("open the local store"),
            ),
            3,
        );
        let mut d = Driver {
            daemon,
            repo,
            ebs: EbsClient::start(&format!("http://127.0.0.1:{aws_port}")),
            _creds: creds,
            credentials,
            aws_port,
            gc_grace_ms,
            warnings: Vec::new(),
        };
        d.set_delays(delays);
        d.daemon.start_again();
        d
    }

    /// The daemon's environment for a run with `delays`.
    fn set_delays(&mut self, delays: Delays) {
        let env = [
            ("VOLUMED_FAILPOINTS", delays.failpoints()),
            ("VOLUMED_GC_GRACE", format!("{}ms", self.gc_grace_ms)),
            ("VOLUMED_AWS_LISTEN", format!("127.0.0.1:{}", self.aws_port)),
            (
                "VOLUMED_AWS_CREDENTIALS",
                self.credentials.display().to_string(),
            ),
        ];
        let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.daemon.set_env(&refs);
    }

    /// Runs `vol --json ARGS`.
    fn vol(&self, args: &[&str]) -> Output {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        self.daemon.vol(&full)
    }

    /// Carries out `op` and updates the model; returns what happened, for
    /// the run's log.
    pub fn apply(&mut self, op: &Op, model: &mut Model) -> String {
        match op {
            Op::Create {
                name,
                size,
                ephemeral,
                from,
            } => self.create(model, name, *size, *ephemeral, from.as_ref()),
            Op::Delete { name } => self.delete(model, name),
            Op::Attach { name } => {
                let v = self.daemon.vol_json(&["attach", name]);
                assert_eq!(v["uri"], self.daemon.uri(name), "attach answered {v}");
                model.volume_mut(name).attached = true;
                String::new()
            }
            Op::Detach { name } => {
                let v = self.daemon.vol_json(&["detach", name]);
                let ephemeral = model.volume(name).ephemeral;
                assert_eq!(v["deleted"], ephemeral, "detach answered {v}");
                model.detach(name);
                String::new()
            }
            Op::Write { name, writes } => {
                let cmds: Vec<String> = writes
                    .iter()
                    .map(|w| match w.pattern {
                        0 => format!("write -z {} {}", w.offset, w.len),
                        p => format!("write -P {p} {} {}", w.offset, w.len),
                    })
                    .chain(["flush".to_owned()])
                    .collect();
                let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
                qemu_io(&self.daemon.uri(name), &refs);
                for w in writes {
                    model.write(name, w.offset, w.len, w.pattern);
                }
                String::new()
            }
            Op::Snapshot { name } => self.snapshot(model, name),
            Op::SnapshotDelete { id } => self.delete_snapshot(model, id),
            Op::WaitSnapshot { id } => {
                let s = self.daemon.wait_snapshot_settled(id);
                format!("-> {}", s["state"])
            }
            Op::WaitHydrated { name } => {
                self.daemon.wait_hydrated(name);
                model.volume_mut(name).hydrates = false;
                String::new()
            }
            Op::Gc => {
                let r = self.daemon.vol_json(&["gc"]);
                // Whatever gc deleted, every completed snapshot must still
                // read back whole: check them all again.
                for s in model.snapshots.values_mut() {
                    s.verified = false;
                }
                format!(
                    "-> {} chunks deleted, {} pending snapshots seen, {} markers expired",
                    r["chunks_deleted"], r["pending_snapshots"], r["pending_expired"]
                )
            }
            Op::EbsStart => {
                let (id, status) = self
                    .ebs
                    .start_snapshot(EBS_GIB)
                    .unwrap_or_else(|e| panic!("StartSnapshot failed: {e}"));
                assert_eq!(status, "pending", "StartSnapshot of {id}");
                model.add_snapshot(&id, Content::Blocks(Default::default()), Phase::Open);
                format!("-> {id}")
            }
            Op::EbsPut { id, index, pattern } => {
                self.ebs
                    .put_block(id, *index, *pattern)
                    .unwrap_or_else(|e| panic!("PutSnapshotBlock {id} {index} failed: {e}"));
                model.put_block(id, *index, *pattern);
                String::new()
            }
            Op::EbsComplete { id } => self.complete(model, id),
            Op::Sleep { ms } => {
                std::thread::sleep(Duration::from_millis(*ms));
                String::new()
            }
            Op::Restart { delays } => {
                // Jobs the shutdown stops end `error` with a warning, and
                // store calls it cuts short (a marker's refresh, a hold's
                // release) warn that they were cancelled.
                let ids: Vec<String> = model
                    .snapshots
                    .iter()
                    .filter(|(_, s)| s.in_flight())
                    .map(|(id, _)| format!("snapshot={id}"))
                    .collect();
                for id in ids {
                    self.allow(&id);
                }
                self.allow("\": cancelled");
                model.interrupt();
                self.set_delays(*delays);
                self.daemon.restart();
                self.ebs.reset();
                String::new()
            }
            Op::Kill { delays } => {
                model.interrupt();
                self.daemon.kill9();
                self.allow("previous run did not shut down cleanly");
                self.allow("dropped fetched chunks that were never made durable");
                self.set_delays(*delays);
                self.daemon.start_again();
                self.ebs.reset();
                String::new()
            }
        }
    }

    /// From now on, WARN lines containing `what` are expected.
    fn allow(&mut self, what: &str) {
        if !self.warnings.iter().any(|w| w == what) {
            self.warnings.push(what.to_owned());
        }
    }

    fn create(
        &self,
        model: &mut Model,
        name: &str,
        size: u64,
        ephemeral: bool,
        from: Option<&(String, bool)>,
    ) -> String {
        let size_arg = size.to_string();
        let mut args = vec!["create", name, "--size", &size_arg];
        let chunk_arg = CHUNK.to_string();
        match from {
            Some((id, hydrate)) => {
                args.extend(["--from-snapshot", id]);
                if !hydrate {
                    args.push("--no-hydrate");
                }
            }
            None => args.extend(["--chunk-size", &chunk_arg]),
        }
        if ephemeral {
            args.push("--ephemeral");
        }
        let out = self.vol(&args);
        if model.volumes.contains_key(name) {
            return refused(&out, &args, "already exists");
        }
        let v = succeeded(&out, &args);
        assert_eq!(
            (v["name"].as_str(), v["size"].as_u64()),
            (Some(name), Some(size)),
            "create answered {v}"
        );
        model.create(
            name,
            size,
            CHUNK,
            ephemeral,
            from.map(|(id, h)| (id.as_str(), *h)),
        );
        String::new()
    }

    fn delete(&self, model: &mut Model, name: &str) -> String {
        let args = ["delete", name];
        let out = self.vol(&args);
        match model.volumes.get(name) {
            None => refused(&out, &args, "not found"),
            Some(v) if v.attached => refused(&out, &args, "is attached; detach it first"),
            Some(_) => {
                succeeded(&out, &args);
                model.volumes.remove(name);
                String::new()
            }
        }
    }

    fn snapshot(&self, model: &mut Model, name: &str) -> String {
        let args = ["snapshot", "create", name];
        let out = self.vol(&args);
        if !out.status.success() && model.snapshot_running(name) {
            // A job of this name may still run; it may also have ended
            // since the model last looked, so success is as right.
            return refused(&out, &args, "in progress");
        }
        let s = succeeded(&out, &args);
        let id = s["id"].as_str().expect("a snapshot id").to_owned();
        assert_eq!(s["state"], "pending", "snapshot create answered {s}");
        model.snapshot(name, &id);
        format!("-> {id}")
    }

    fn delete_snapshot(&self, model: &mut Model, id: &str) -> String {
        let args = ["snapshot", "delete", id];
        let out = self.vol(&args);
        if !out.status.success() && model.snapshots[id].phase == Phase::Pending {
            return refused(&out, &args, "in progress");
        }
        succeeded(&out, &args);
        model.snapshots.remove(id);
        String::new()
    }

    fn complete(&mut self, model: &mut Model, id: &str) -> String {
        let Content::Blocks(blocks) = &model.snapshots[id].content else {
            panic!("{id} is not an EBS direct snapshot")
        };
        let status = self
            .ebs
            .complete(id, blocks.len() as u64)
            .unwrap_or_else(|e| panic!("CompleteSnapshot {id} failed: {e}"));
        let s = model.snapshot_mut(id);
        s.phase = match status.as_str() {
            "completed" => Phase::Completed,
            "pending" => Phase::Pending,
            other => panic!("CompleteSnapshot {id} answered status {other:?}"),
        };
        format!("-> {status}")
    }
}

/// The JSON of a `vol` call that must have succeeded.
fn succeeded(out: &Output, args: &[&str]) -> Value {
    assert!(
        out.status.success(),
        "vol {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "vol {args:?} printed invalid JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A `vol` call that must have been refused with one line saying `why`;
/// that line, for the run's log.
fn refused(out: &Output, args: &[&str], why: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.trim_end().lines().count() == 1 && err.contains(why),
        "vol {args:?} should have been refused ({why}), got {}: {err}",
        out.status
    );
    format!("-> refused: {}", err.trim_end())
}
