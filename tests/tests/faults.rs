//! Faults between volumed and the S3 server, through a fault-injecting
//! proxy: for each kind (503 SlowDown, 500, connection reset, an answer that
//! never comes, a PUT done but its answer lost, a GET body cut short),
//! snapshots, restores with hydration, and gc either succeed with the right
//! content or end in `error` and succeed on retry, within bounded time; no
//! completed snapshot is ever wrong. The matrix is printed.

use std::time::{Duration, Instant};

use serde_json::Value;
use snapshot::Repo;
use snapshot::store::S3Store;
use volumed_tests::faults::{Fault, FaultProxy, Rule};
use volumed_tests::s3::{BUCKET, S3Server};
use volumed_tests::snapkit::{dump, fill_random, image};
use volumed_tests::{TestDaemon, qemu_io};

/// Each step must end within this, retries included: nothing hangs.
const BOUND: Duration = Duration::from_secs(120);

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Takes a snapshot; on `error`, clears the fault and takes another, which
/// must complete. Returns the outcome and the completed snapshot's id.
fn snapshot_step(d: &TestDaemon, proxy: &FaultProxy, repo: &Repo) -> (&'static str, String) {
    let t = Instant::now();
    let s = json_of(&d.vol(&["--json", "snapshot", "create", "v", "--wait"]));
    assert!(t.elapsed() < BOUND, "snapshot took {:?}", t.elapsed());
    let (outcome, s) = match s["state"].as_str() {
        Some("completed") => ("ok", s),
        Some("error") => {
            proxy.clear();
            let again = d.vol_json(&["snapshot", "create", "v", "--wait"]);
            assert_eq!(again["state"], "completed", "{again}");
            ("error, then ok on retry", again)
        }
        _ => panic!("snapshot: {s}"),
    };
    let id = s["id"].as_str().unwrap().to_owned();
    assert!(
        image(repo, &id) == dump(d, "v")[..],
        "completed snapshot {id} differs from the volume"
    );
    (outcome, id)
}

/// Restores with background hydration until complete; faults make fetches
/// fail and hydration retry them.
fn restore_step(
    d: &TestDaemon,
    proxy: &FaultProxy,
    repo: &Repo,
    id: &str,
    name: &str,
) -> &'static str {
    let t = Instant::now();
    let created = d.vol(&["--json", "create", name, "--from-snapshot", id]);
    let outcome = if created.status.success() {
        "ok"
    } else {
        // The manifest read itself failed: retry once the store behaves.
        proxy.clear();
        d.vol_ok(&["create", name, "--from-snapshot", id]);
        "error, then ok on retry"
    };
    let mut retried = false;
    loop {
        let v = d.vol_json(&["inspect", name]);
        match v["hydration"]["state"].as_str() {
            Some("complete") => break,
            Some("retrying") => retried = true,
            _ => {}
        }
        if t.elapsed() > Duration::from_secs(30) {
            // A fault with no limit keeps failing: the store heals.
            proxy.clear();
        }
        assert!(t.elapsed() < BOUND, "hydration stuck: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    d.vol_ok(&["attach", name]);
    assert!(dump(d, name) == image(repo, id), "restored {name} differs");
    if retried && outcome == "ok" {
        "fetches retried, ok"
    } else {
        outcome
    }
}

fn gc_step(d: &TestDaemon, proxy: &FaultProxy, old: &str) -> &'static str {
    d.vol_ok(&["snapshot", "delete", old]);
    let t = Instant::now();
    let r = d.vol(&["--json", "gc", "--grace", "0s"]);
    assert!(t.elapsed() < BOUND);
    if r.status.success() {
        return "ok";
    }
    proxy.clear();
    d.vol_ok(&["gc", "--grace", "0s"]);
    "error, then ok on retry"
}

#[test]
fn fault_matrix() {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(&s3.endpoint());
    let mut env = s3.env();
    env.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL", proxy.endpoint()));
    env.push(("VOLUMED_STORE", format!("s3://{BUCKET}/faults")));
    env.push(("VOLUMED_S3_OPERATION_TIMEOUT", "6".into()));
    env.push(("VOLUMED_S3_ATTEMPT_TIMEOUT", "2".into()));
    env.push(("VOLUMED_S3_MAX_ATTEMPTS", "2".into()));
    env.push(("VOLUMED_CACHE_SIZE", "0".into()));
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = TestDaemon::start_with_env(&refs);
    let repo = Repo::new(std::sync::Arc::new(S3Store::new(s3.settings("faults"))), 3);

    d.vol_ok(&["create", "v", "--size", "32M"]);
    d.vol_ok(&["attach", "v"]);
    fill_random(&d, "v", 16);
    let (_, mut last) = snapshot_step(&d, &proxy, &repo);

    let mut rows = Vec::new();
    for (i, fault) in Fault::ALL.into_iter().enumerate() {
        // New content for this round: 4 chunks of a fresh pattern.
        qemu_io(
            &d.uri("v"),
            &[&format!("write -P {} {}M 2M", 0x30 + i, 20 + (i % 4) * 2)],
        );
        proxy.set(Rule {
            method: Some("PUT"),
            path_contains: Some("/chunks/"),
            every: 2,
            limit: Some(3),
            ..Rule::new(fault)
        });
        let (snap, id) = snapshot_step(&d, &proxy, &repo);
        proxy.set(Rule {
            method: Some("PUT"),
            path_contains: Some("/manifests/"),
            every: 1,
            limit: Some(1),
            ..Rule::new(fault)
        });
        qemu_io(&d.uri("v"), &[&format!("write -P {} 1M 4k", 0x60 + i)]);
        let (manifest, id2) = snapshot_step(&d, &proxy, &repo);
        proxy.set(Rule {
            method: Some("GET"),
            path_contains: Some("/chunks/"),
            every: 3,
            limit: Some(4),
            ..Rule::new(fault)
        });
        // The store fails every chunk PUT: the snapshot must end `error`
        // (bounded by the timeouts and retries), then succeed on retry.
        qemu_io(&d.uri("v"), &[&format!("write -P {} 2M 4k", 0x90 + i)]);
        proxy.set(Rule {
            method: Some("PUT"),
            path_contains: Some("/chunks/"),
            ..Rule::new(fault)
        });
        // A lost answer to a PUT that was done leaves the object there: the
        // retry finds it and the snapshot completes. A PUT's answer has no
        // body to cut short.
        let (down, _) = snapshot_step(&d, &proxy, &repo);
        if matches!(fault, Fault::LostResponse | Fault::TruncatedBody) {
            assert_eq!(down, "ok");
        } else {
            assert_ne!(down, "ok", "a snapshot completed with its store failing");
        }
        let restore = restore_step(&d, &proxy, &repo, &id, &format!("r{i}"));
        proxy.set(Rule {
            method: Some("DELETE"),
            every: 2,
            limit: Some(2),
            ..Rule::new(fault)
        });
        let gc = gc_step(&d, &proxy, &last);
        proxy.clear();
        // gc left every live snapshot whole.
        for s in [&id, &id2] {
            let v = d.vol_json(&["snapshot", "verify", s]);
            assert_eq!(v["ok"], true, "after gc under {fault:?}: {v}");
        }
        rows.push((fault, snap, manifest, down, restore, gc));
        last = id2;
    }
    assert!(proxy.injected() > 0);
    println!(
        "\nfault matrix ({} faults injected, {} requests forwarded):",
        proxy.injected(),
        proxy.forwarded()
    );
    println!(
        "{:<15} {:<24} {:<24} {:<24} {:<24} {:<24}",
        "fault",
        "snapshot: chunk PUTs",
        "snapshot: manifest PUT",
        "snapshot: every PUT",
        "restore: chunk GETs",
        "gc: DELETEs"
    );
    for (f, a, b, c, r, g) in &rows {
        println!(
            "{:<15} {a:<24} {b:<24} {c:<24} {r:<24} {g:<24}",
            format!("{f:?}")
        );
    }
    d.finish_expecting(
        &[
            "retrying",
            "failed",
            "could not",
            "snapshot failed",
            "cannot fetch",
            "I/O failed",
            "hydrat",
            "control API request failed",
        ],
        // Each injected fault is retried, a snapshot whose store keeps
        // failing ends in error, and hydration retries failed fetches.
        &[
            "store operation failed; retrying",
            "snapshot failed; its changes go to the next one",
            "some chunks could not be hydrated; retrying",
        ],
    );
}
