//! Snapshot policies against the real daemon: scheduled runs and PBS
//! retention, protected snapshots, catch-up after downtime, two hosts on
//! one store, prune's dry run, and a prune killed halfway.
//!
//! Every daemon here runs with the test-only floor
//! `VOLUMED_TEST_POLICY_MIN_INTERVAL=1`, so a schedule may run every few
//! seconds.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use volumed_tests::TestDaemon;
use volumed_tests::snapkit::snap;

const FAST: (&str, &str) = ("VOLUMED_TEST_POLICY_MIN_INTERVAL", "1");

fn daemon() -> TestDaemon {
    TestDaemon::start_with_env(&[FAST])
}

/// The ids of the snapshots policy `p` made, oldest first.
fn policy_snapshots(d: &TestDaemon, p: &str) -> Vec<String> {
    let mut l: Vec<(String, String)> = d
        .vol_json(&["snapshot", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["labels"]["volumed:policy"] == p)
        .map(|s| {
            (
                s["created_at"].as_str().unwrap().to_owned(),
                s["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    l.sort();
    l.into_iter().map(|(_, id)| id).collect()
}

fn status(d: &TestDaemon, p: &str) -> Value {
    d.vol_json(&["policy", "inspect", p])["status"][0].clone()
}

/// Waits until policy `p` has run at least `n` times on `d`.
fn wait_runs(d: &TestDaemon, p: &str, n: u64) -> Value {
    let t = Instant::now();
    loop {
        let s = status(d, p);
        if s["runs"].as_u64().unwrap() >= n {
            return s;
        }
        assert!(t.elapsed() < Duration::from_secs(90), "{p}: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops the policy's schedule and lets a run in flight end.
fn disable(d: &TestDaemon, args: &[&str]) {
    let mut a = vec!["policy", "update"];
    a.extend_from_slice(args);
    a.push("--disabled");
    d.vol_ok(&a);
    std::thread::sleep(Duration::from_millis(1500));
}

#[test]
fn runs_keep_their_newest_never_manual_or_protected_ones() {
    let port = volumed_tests::s3::free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = TestDaemon::start_with_env(&[FAST, ("VOLUMED_METRICS_LISTEN", &listen)]);
    d.vol_ok(&["create", "v", "--size", "4M"]);
    d.vol_ok(&["attach", "v"]);
    let manual = snap(&d, "v")["id"].as_str().unwrap().to_owned();
    let spec = ["p", "--volume", "v", "--every", "2s", "--keep-last", "2"];
    let mut create = vec!["policy", "create"];
    create.extend_from_slice(&spec);
    d.vol_ok(&create);
    // The first run's snapshot is protected: it must survive every prune.
    wait_runs(&d, "p", 1);
    let first = policy_snapshots(&d, "p")[0].clone();
    d.vol_ok(&["snapshot", "protect", &first]);
    let err = d.vol_err(&["snapshot", "delete", &first]);
    assert!(err.contains("is protected"), "{err}");
    let s = wait_runs(&d, "p", 6);
    disable(&d, &spec);
    let s2 = status(&d, "p");
    assert_eq!(s2["failures"], 0, "{s2}");
    assert!(s["snapshots_pruned"].as_u64().unwrap() >= 2, "{s}");

    let all = policy_snapshots(&d, "p");
    assert_eq!(all.len(), 3, "the protected one and the 2 newest: {all:?}");
    assert_eq!(all[0], first);
    let listed: BTreeSet<String> = d
        .vol_json(&["snapshot", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(listed.contains(&manual), "the manual snapshot stays");
    let inspect = d.vol_json(&["snapshot", "inspect", &first]);
    assert_eq!(inspect["protected"], true);

    // The dry run names exactly what the prune then deletes.
    disable(
        &d,
        &["p", "--volume", "v", "--every", "2s", "--keep-last", "1"],
    );
    let dry = d.vol_json(&["prune", "--policy", "p", "--dry-run"]);
    let would: Vec<Value> = dry["schedules"][0]["removed"].as_array().unwrap().clone();
    assert_eq!(would, [Value::from(all[1].clone())], "{dry}");
    assert_eq!(policy_snapshots(&d, "p"), all, "a dry run deletes nothing");
    let text = d.vol_ok(&["prune", "--policy", "p", "--dry-run"]);
    assert_eq!(
        text.trim(),
        format!("would delete {} (policy p, schedule default)", all[1])
    );
    let done = d.vol_json(&["prune", "--policy", "p"]);
    assert_eq!(
        done["schedules"][0]["removed"],
        dry["schedules"][0]["removed"]
    );
    assert_eq!(policy_snapshots(&d, "p"), [all[0].clone(), all[2].clone()]);

    // A run whose prune cannot delete (the snapshot is exported) fails,
    // is counted, and `vol status` names the policy until a run succeeds.
    d.vol_ok(&["snapshot", "attach", &all[2]]);
    let out = d.vol(&["policy", "run-now", "p"]);
    assert!(!out.status.success());
    let st = d.vol_json(&["status"]);
    assert_eq!(st["failing_policies"], serde_json::json!(["p"]), "{st}");
    let s = status(&d, "p");
    assert_eq!(s["last_run"]["ok"], false, "{s}");
    assert!(
        s["last_run"]["error"]
            .as_str()
            .unwrap()
            .contains("attached"),
        "{s}"
    );
    let text = std::process::Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    let sample = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let l = r#"{policy="p",schedule="default"}"#;
    assert!(sample(&format!("volumed_policy_runs_total{l}")) >= 7.0);
    assert_eq!(sample(&format!("volumed_policy_failures_total{l}")), 1.0);
    assert_eq!(sample(&format!("volumed_policy_last_run_failed{l}")), 1.0);
    assert!(sample(&format!("volumed_policy_snapshots_pruned_total{l}")) >= 3.0);
    assert!(sample(&format!("volumed_policy_last_success_timestamp_seconds{l}")) > 1.7e9);
    d.vol_ok(&["snapshot", "detach", &all[2]]);
    d.vol_ok(&["policy", "run-now", "p"]);
    let st = d.vol_json(&["status"]);
    assert_eq!(st["failing_policies"], serde_json::json!([]));

    d.vol_ok(&["snapshot", "unprotect", &first]);
    d.vol_ok(&["snapshot", "delete", &first]);
    d.finish_expecting(&[], &["policy run failed"]);
}

#[test]
fn a_daemon_stopped_across_three_ticks_runs_once_at_start() {
    let mut d = daemon();
    d.vol_ok(&["create", "v", "--size", "4M"]);
    // Bad policies get one line each and leave nothing behind.
    for (args, want) in [
        (
            &["--every", "6s", "--schedule", "* * * * *"][..],
            "cannot be used with",
        ),
        (&["--schedule", "61 * * * *"][..], "cron expression"),
        (&["--schedule", "cron(0 0 1 * 1 *)"][..], "needs ?"),
        (&["--every", "6s", "--keep-within", "0s"][..], "keep-within"),
        (
            &["--every", "6s", "--keep-last", "5000"][..],
            "at most 1000",
        ),
        (
            &["--every", "6s", "--tag", "volumed:policy=x"][..],
            "set by volumed",
        ),
    ] {
        let mut a = vec!["policy", "create", "bad", "--volume", "v"];
        a.extend_from_slice(args);
        let e = d.vol_err(&a);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    let e = d.vol_err(&["policy", "inspect", "bad"]);
    assert!(e.contains("policy 'bad' not found"), "{e}");
    d.vol_ok(&["policy", "create", "p", "--volume", "v", "--every", "6s"]);
    let e = d.vol_err(&["policy", "create", "p", "--volume", "v", "--every", "6s"]);
    assert!(e.contains("already exists"), "{e}");
    let before = wait_runs(&d, "p", 1)["runs"].as_u64().unwrap();
    let made = policy_snapshots(&d, "p").len();
    d.stop();
    std::thread::sleep(Duration::from_secs(20));
    d.start_again();
    let s = wait_runs(&d, "p", before + 1);
    assert_eq!(s["runs"].as_u64().unwrap(), before + 1, "{s}");
    assert_eq!(s["last_run"]["trigger"], "catch-up", "{s}");
    assert!(s["last_run"]["missed"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(policy_snapshots(&d, "p").len(), made + 1);
    let next = s["next_run"].as_str().unwrap();
    assert!(next > s["last_run"]["started_at"].as_str().unwrap(), "{s}");
    d.finish();
}

#[test]
fn two_daemons_on_one_store_do_not_both_prune() {
    let a = daemon();
    let store = format!("file://{}", a.data_dir().join("store").display());
    let b = TestDaemon::start_with_env(&[FAST, ("VOLUMED_STORE", &store)]);
    for (d, v) in [(&a, "va"), (&b, "vb")] {
        d.vol_ok(&["create", v, "--size", "4M", "--tag", "backup=yes"]);
    }
    let spec = [
        "p",
        "--select",
        "tag:backup=yes",
        "--every",
        "3s",
        "--keep-last",
        "2",
    ];
    let mut create = vec!["policy", "create"];
    create.extend_from_slice(&spec);
    a.vol_ok(&create);
    b.vol_ok(&create);
    wait_runs(&a, "p", 5);
    wait_runs(&b, "p", 5);
    disable(&a, &spec);
    disable(&b, &spec);
    let (sa, sb) = (status(&a, "p"), status(&b, "p"));
    let n = |s: &Value, k: &str| s[k].as_u64().unwrap();
    for s in [&sa, &sb] {
        assert_eq!(n(s, "failures"), 0, "{s}");
        assert_eq!(
            n(s, "prunes") + n(s, "prunes_claimed_elsewhere"),
            n(s, "runs"),
            "every scheduled run pruned or found its slot claimed: {s}"
        );
    }
    assert!(
        n(&sa, "prunes_claimed_elsewhere") + n(&sb, "prunes_claimed_elsewhere") >= 3,
        "slots both ran were pruned by one of them: {sa} {sb}"
    );
    // Every claim in the store names one host.
    let claims = a.data_dir().join("store").join("claims");
    let mut slots = 0;
    for scope in std::fs::read_dir(&claims).unwrap() {
        for slot in std::fs::read_dir(scope.unwrap().path()).unwrap() {
            let holder = std::fs::read_to_string(slot.unwrap().path()).unwrap();
            assert!(!holder.is_empty());
            slots += 1;
        }
    }
    assert!(slots >= 5, "{slots} claims");
    // Retention holds per volume across both hosts' snapshots.
    a.vol_ok(&["prune", "--policy", "p"]);
    let all = a.vol_json(&["snapshot", "list"]);
    for v in ["va", "vb"] {
        let of_v = all
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["volume"] == v && s["labels"]["volumed:policy"] == "p")
            .count();
        assert_eq!(of_v, 2, "{v}: {all}");
    }
    b.finish();
    a.finish();
}

#[test]
fn kill9_in_the_middle_of_a_prune_leaves_snapshots_whole_or_gone() {
    let mut d = daemon();
    d.vol_ok(&["create", "v", "--size", "8M"]);
    d.vol_ok(&["attach", "v"]);
    let spec = ["p", "--volume", "v", "--every", "1h", "--keep-last", "5"];
    let mut create = vec!["policy", "create"];
    create.extend_from_slice(&spec);
    d.vol_ok(&create);
    for i in 0..4 {
        volumed_tests::snapkit::fill_random(&d, "v", 1 + i % 2);
        d.vol_ok(&["policy", "run-now", "p"]);
    }
    let before = policy_snapshots(&d, "p");
    assert_eq!(before.len(), 4);
    d.vol_ok(&[
        "policy",
        "update",
        "p",
        "--volume",
        "v",
        "--every",
        "1h",
        "--keep-last",
        "1",
    ]);
    d.stop();
    d.set_env(&[FAST, ("VOLUMED_FAILPOINTS", "prune-after-delete")]);
    d.start_again();
    let out = d.vol(&["prune", "--policy", "p"]);
    assert!(!out.status.success(), "the daemon died mid-prune");
    d.wait_exit();
    d.set_env(&[FAST]);
    d.start_again();
    let left = policy_snapshots(&d, "p");
    assert_eq!(left.len(), 3, "one deleted before the kill: {left:?}");
    for id in &left {
        let r = d.vol_json(&["snapshot", "verify", id]);
        assert_eq!(r["ok"], true, "{id}: {r}");
    }
    d.vol_ok(&["prune", "--policy", "p"]);
    let left = policy_snapshots(&d, "p");
    assert_eq!(left, [before[3].clone()]);
    let r = d.vol_json(&["snapshot", "verify", &left[0]]);
    assert_eq!(r["ok"], true, "{r}");
    d.finish_expecting(
        &[],
        &["previous run did not shut down cleanly", "failpoint"],
    );
}

#[test]
fn a_dlm_policy_keeps_its_count_and_adds_its_tags() {
    use volumed_tests::aws::AwsEndpoint;
    let ep = AwsEndpoint::start_with_env(&[FAST]);
    let create = |tags: &str| {
        let mut a = vec!["ec2", "create-volume", "--size", "1"];
        let spec = format!("ResourceType=volume,Tags=[{tags}]");
        if !tags.is_empty() {
            a.extend(["--tag-specifications", &spec]);
        }
        ep.aws_json(&a)["VolumeId"].as_str().unwrap().to_owned()
    };
    let tagged = create("{Key=backup,Value=daily}");
    let other = create("");
    let details = r#"{"PolicyType":"EBS_SNAPSHOT_MANAGEMENT","ResourceTypes":["VOLUME"],
        "TargetTags":[{"Key":"backup","Value":"daily"}],
        "Schedules":[{"Name":"daily","CopyTags":true,"TagsToAdd":[{"Key":"made-by","Value":"dlm"}],
          "CreateRule":{"Interval":24,"IntervalUnit":"HOURS","Times":["03:00"]},
          "RetainRule":{"Count":3}}]}"#;
    let role = "arn:aws:iam::000000000000:role/AWSDataLifecycleManagerDefaultRole";
    let created = ep.aws_json(&[
        "dlm",
        "create-lifecycle-policy",
        "--execution-role-arn",
        role,
        "--description",
        "daily backups",
        "--state",
        "ENABLED",
        "--policy-details",
        details,
    ]);
    let id = created["PolicyId"].as_str().unwrap().to_owned();
    assert!(id.starts_with("policy-"), "{created}");
    let got = ep.aws_json(&["dlm", "get-lifecycle-policy", "--policy-id", &id]);
    assert_eq!(got["Policy"]["State"], "ENABLED", "{got}");
    assert_eq!(got["Policy"]["PolicyDetails"]["RetainRule"], Value::Null);
    assert_eq!(
        got["Policy"]["PolicyDetails"]["Schedules"][0]["RetainRule"]["Count"],
        3
    );
    let all = ep.aws_json(&["dlm", "get-lifecycle-policies"]);
    assert_eq!(all["Policies"][0]["PolicyId"], id.as_str(), "{all}");
    // The list's filters: resource type, target tags, tags to add.
    let listed = |args: &[&str]| {
        let mut a = vec!["dlm", "get-lifecycle-policies"];
        a.extend_from_slice(args);
        ep.aws_json(&a)["Policies"].as_array().unwrap().len()
    };
    assert_eq!(listed(&["--resource-types", "VOLUME"]), 1);
    assert_eq!(listed(&["--resource-types", "INSTANCE"]), 0);
    assert_eq!(listed(&["--target-tags", "backup=daily"]), 1);
    assert_eq!(listed(&["--target-tags", "backup=weekly"]), 0);
    assert_eq!(listed(&["--tags-to-add", "made-by=dlm"]), 1);
    assert_eq!(listed(&["--tags-to-add", "made-by=hand"]), 0);
    let native = ep.daemon.vol_json(&["policy", "inspect", &id]);
    assert_eq!(native["source"], "dlm");
    assert_eq!(native["volumes_now"], serde_json::json!([tagged.clone()]));
    assert!(
        native["status"][0]["next_run"]
            .as_str()
            .unwrap()
            .ends_with("03:00:00Z"),
        "{native}"
    );

    for _ in 0..5 {
        ep.daemon.vol_ok(&["policy", "run-now", &id]);
    }
    let snaps = ep.aws_json(&["ec2", "describe-snapshots", "--owner-ids", "self"]);
    let snaps = snaps["Snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 3, "{snaps:?}");
    for s in snaps {
        assert_eq!(s["VolumeId"], tagged.as_str(), "{s}");
        let tag = |k: &str| {
            s["Tags"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["Key"] == k)
                .map(|t| t["Value"].as_str().unwrap().to_owned())
        };
        assert_eq!(tag("made-by").as_deref(), Some("dlm"), "{s}");
        assert_eq!(tag("backup").as_deref(), Some("daily"), "copied: {s}");
        assert_eq!(
            tag("aws:dlm:lifecycle-policy-id").as_deref(),
            Some(id.as_str())
        );
        assert_eq!(
            tag("aws:dlm:lifecycle-schedule-name").as_deref(),
            Some("daily")
        );
    }
    let _ = other;

    let refused = ep.aws_err(&[
        "dlm",
        "create-lifecycle-policy",
        "--execution-role-arn",
        role,
        "--description",
        "fast restore",
        "--state",
        "ENABLED",
        "--policy-details",
        r#"{"PolicyType":"EBS_SNAPSHOT_MANAGEMENT","ResourceTypes":["VOLUME"],
            "TargetTags":[{"Key":"a","Value":"b"}],
            "Schedules":[{"Name":"s","CreateRule":{"Interval":12,"IntervalUnit":"HOURS"},
              "RetainRule":{"Count":1},"FastRestoreRule":{"Count":1,"AvailabilityZones":["us-east-1a"]}}]}"#,
    ]);
    assert!(
        refused.contains("FastRestoreRule is not supported"),
        "{refused}"
    );

    ep.aws_json(&[
        "dlm",
        "update-lifecycle-policy",
        "--policy-id",
        &id,
        "--state",
        "DISABLED",
    ]);
    let got = ep.aws_json(&["dlm", "get-lifecycle-policy", "--policy-id", &id]);
    assert_eq!(got["Policy"]["State"], "DISABLED");
    ep.aws_json(&["dlm", "delete-lifecycle-policy", "--policy-id", &id]);
    let gone = ep.aws_err(&["dlm", "get-lifecycle-policy", "--policy-id", &id]);
    assert!(gone.contains("ResourceNotFoundException"), "{gone}");
    ep.daemon.finish();
}

/// The store goes down: `vol snapshot list` still lists this host's
/// snapshots from its records, protection unknown, with one warning line
/// on stderr; a delete still refuses, since it cannot check protection.
#[test]
fn snapshot_list_works_while_the_store_is_down_s3() {
    let mut store = volumed_tests::snapkit::Store::s3();
    let d = store.daemon("listout");
    d.vol_ok(&["create", "v", "--size", "4M"]);
    d.vol_ok(&["attach", "v"]);
    let a = snap(&d, "v")["id"].as_str().unwrap().to_owned();
    let b = snap(&d, "v")["id"].as_str().unwrap().to_owned();
    d.vol_ok(&["snapshot", "protect", &a]);
    let up = d.vol_json(&["snapshot", "list"]);
    assert_eq!(up[0]["protected"], true, "{up}");
    assert!(up[0].get("protection_unknown").is_none(), "{up}");

    let volumed_tests::snapkit::Store::S3(server) = &mut store else {
        unreachable!()
    };
    server.stop();
    let out = d.vol(&["--json", "snapshot", "list"]);
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [a.as_str(), b.as_str()], "{listed}");
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["protection_unknown"] == true),
        "{listed}"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("warning: snapshot protection unknown"),
        "{stderr}"
    );
    // The table too.
    let table = d.vol(&["snapshot", "list"]);
    assert!(table.status.success(), "{table:?}");
    assert!(String::from_utf8_lossy(&table.stdout).contains(&b));
    let inspect = d.vol_json(&["snapshot", "inspect", &a]);
    assert_eq!(inspect["protection_unknown"], true, "{inspect}");
    // Deletes cannot check protection: refused, nothing lost.
    d.vol_err(&["snapshot", "delete", &a]);
    d.vol_err(&["snapshot", "delete", &b]);

    server.start_again();
    let back = d.vol_json(&["snapshot", "list"]);
    assert_eq!(back.as_array().unwrap().len(), 2, "{back}");
    assert_eq!(back[0]["protected"], true, "{back}");
    d.vol_ok(&["snapshot", "unprotect", &a]);
    d.finish_expecting(
        &[],
        &[
            "store operation failed; retrying",
            "cannot list the store",
            "snapshot protection unknown",
        ],
    );
}

/// A policy's snapshot given EC2 tags, then pruned: nothing the endpoint
/// answers knows it, and the sweep the prune wakes forgets its EC2
/// attributes (the `aws_snapshots` tree shrinks by it) while a live
/// snapshot's stay.
#[test]
fn a_pruned_snapshot_loses_its_ec2_attributes() {
    let ep = volumed_tests::aws::AwsEndpoint::start();
    let d = &ep.daemon;
    d.vol_ok(&["create", "v", "--size", "4M"]);
    d.vol_ok(&[
        "policy",
        "create",
        "p",
        "--volume",
        "v",
        "--every",
        "1h",
        "--keep-last",
        "1",
    ]);
    d.vol_ok(&["policy", "run-now", "p"]);
    let first = policy_snapshots(d, "p");
    assert_eq!(first.len(), 1);
    let manual = snap(d, "v")["id"].as_str().unwrap().to_owned();
    for id in [&first[0], &manual] {
        ep.aws_json(&[
            "ec2",
            "create-tags",
            "--resources",
            id,
            "--tags",
            "Key=team,Value=storage",
        ]);
    }
    let tagged = |id: &str| {
        let t = ep.aws_json(&[
            "ec2",
            "describe-tags",
            "--filters",
            &format!("Name=resource-id,Values={id}"),
            "Name=key,Values=team",
        ]);
        t["Tags"].as_array().unwrap().len()
    };
    assert_eq!(tagged(&first[0]), 1);

    ep.daemon.vol_ok(&["policy", "run-now", "p"]);
    let now = policy_snapshots(&ep.daemon, "p");
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], first[0], "the older one was pruned");
    assert_eq!(tagged(&first[0]), 0);
    assert_eq!(tagged(&manual), 1);
    let d = ep.aws_err(&["ec2", "describe-snapshots", "--snapshot-ids", &first[0]]);
    assert!(d.contains("InvalidSnapshot.NotFound"), "{d}");

    // The prune wakes the endpoint's sweep.
    let deadline = Instant::now() + Duration::from_secs(20);
    let line = loop {
        let log = ep.daemon.log();
        if let Some(l) = log
            .lines()
            .find(|l| l.contains("forgot the EC2 attributes of deleted snapshots"))
        {
            break l.to_owned();
        }
        assert!(Instant::now() < deadline, "no sweep logged:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    };
    // The pruned snapshot's record went; the manual one's stays.
    assert!(
        line.contains("removed=1") && line.contains("kept=1"),
        "{line}"
    );
    ep.daemon.vol_ok(&["snapshot", "delete", &manual]);
    ep.daemon.finish();
}
