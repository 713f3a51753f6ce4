//! A manifest PUT that reached the store but whose every reply was lost:
//! the retries give up with a transient error, and the snapshot job looks
//! the manifest up before declaring `error`. It is there and equal to what
//! was built, so the snapshot is `completed`, its content is right, and
//! the next snapshot is incremental on it.

use snapshot::Repo;
use snapshot::store::S3Store;
use volumed_tests::faults::{Fault, FaultProxy, Rule};
use volumed_tests::s3::{BUCKET, S3Server};
use volumed_tests::snapkit::{dump, fill_random, image};
use volumed_tests::{TestDaemon, qemu_io};

#[test]
fn a_lost_manifest_reply_is_settled_by_the_store() {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(&s3.endpoint());
    let mut env = s3.env();
    env.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL", proxy.endpoint()));
    env.push(("VOLUMED_STORE", format!("s3://{BUCKET}/lost")));
    env.push(("VOLUMED_S3_OPERATION_TIMEOUT", "6".into()));
    env.push(("VOLUMED_S3_ATTEMPT_TIMEOUT", "2".into()));
    env.push(("VOLUMED_S3_MAX_ATTEMPTS", "2".into()));
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = TestDaemon::start_with_env(&refs);
    let repo = Repo::new(std::sync::Arc::new(S3Store::new(s3.settings("lost"))), 3);

    d.vol_ok(&["create", "v", "--size", "16M"]);
    d.vol_ok(&["attach", "v"]);
    fill_random(&d, "v", 8);

    // Every manifest PUT is done by the server, and its reply lost.
    proxy.set(Rule {
        method: Some("PUT"),
        path_contains: Some("/manifests/"),
        ..Rule::new(Fault::LostResponse)
    });
    let s = d.vol_json(&["snapshot", "create", "v", "--wait"]);
    assert!(proxy.injected() >= 1, "the manifest PUT was never faulted");
    assert_eq!(s["state"], "completed", "{s}");
    assert!(
        d.log().contains("the manifest write's reply was lost"),
        "the job never had to settle the lost reply"
    );
    let first = s["id"].as_str().unwrap().to_owned();
    assert!(
        image(&repo, &first) == dump(&d, "v"),
        "snapshot content differs"
    );
    proxy.clear();

    qemu_io(&d.uri("v"), &["write -P 0x5a 1M 4k"]);
    let next = d.vol_json(&["snapshot", "create", "v", "--wait"]);
    assert_eq!(next["state"], "completed", "{next}");
    assert_eq!(next["parent"], first.as_str(), "{next}");
    assert_eq!(next["changed_chunks"], 1, "not incremental: {next}");
    let second = next["id"].as_str().unwrap();
    assert!(
        image(&repo, second) == dump(&d, "v"),
        "incremental content differs"
    );
    d.finish_expecting(
        &[],
        &[
            "the manifest write's reply was lost, but the manifest is in the store",
            "store operation failed; retrying op=\"put_if_absent\" key=\"manifests/",
        ],
    );
}
