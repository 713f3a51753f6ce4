//! The recycle bin against the real daemon: rules through the Recycle Bin
//! API (awscli), deletes through EC2 and `vol`, restores that read the
//! original bytes, protection refused on every delete path, and expiry
//! followed by gc reclaiming exactly what only the binned snapshot held;
//! the same for images (DeregisterImage, ListImagesInRecycleBin,
//! RestoreImageFromRecycleBin, `vol bin`), seen from a second host too.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use snapshot::{ChunkHash, SnapshotId, keys};
use volumed_tests::aws::AwsEndpoint;
use volumed_tests::snapkit::{Store, fill_random, rt, snap};
use volumed_tests::{qemu_io, run_ok};

const INSTANCE: &str = "i-0123456789abcdef0";

fn tag(v: &Value, key: &str) -> Option<String> {
    v["Tags"]
        .as_array()?
        .iter()
        .find(|t| t["Key"] == key)
        .map(|t| t["Value"].as_str().unwrap().to_owned())
}

fn attach(ep: &AwsEndpoint, id: &str, dev: &str) -> String {
    ep.aws_json(&[
        "ec2",
        "attach-volume",
        "--volume-id",
        id,
        "--instance-id",
        INSTANCE,
        "--device",
        dev,
    ]);
    let v = ep.aws_json(&["ec2", "describe-volumes", "--volume-ids", id]);
    tag(&v["Volumes"][0], "volumed:nbd-uri").unwrap()
}

fn snapshot_ids(ep: &AwsEndpoint) -> Vec<String> {
    let v = ep.aws_json(&["ec2", "describe-snapshots", "--owner-ids", "self"]);
    v["Snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["SnapshotId"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn rbin_rule_delete_list_restore_and_the_bytes_come_back() {
    let ep = AwsEndpoint::start();
    let vol = ep.aws_json(&["ec2", "create-volume", "--size", "1"])["VolumeId"]
        .as_str()
        .unwrap()
        .to_owned();
    let uri = attach(&ep, &vol, "/dev/sdf");
    qemu_io(&uri, &["write -P 0x5a 0 3M", "write -P 0xa5 100M 1M"]);

    let rule = ep.aws_json(&[
        "rbin",
        "create-rule",
        "--resource-type",
        "EBS_SNAPSHOT",
        "--retention-period",
        "RetentionPeriodValue=1,RetentionPeriodUnit=DAYS",
        "--resource-tags",
        "ResourceTagKey=kind,ResourceTagValue=nightly",
        "--description",
        "nightly snapshots",
    ]);
    let rule_id = rule["Identifier"].as_str().unwrap().to_owned();
    assert_eq!(rule["Status"], "available", "{rule}");
    let listed = ep.aws_json(&["rbin", "list-rules", "--resource-type", "EBS_SNAPSHOT"]);
    assert_eq!(
        listed["Rules"][0]["Identifier"],
        rule_id.as_str(),
        "{listed}"
    );
    let got = ep.aws_json(&["rbin", "get-rule", "--identifier", &rule_id]);
    assert_eq!(got["RetentionPeriod"]["RetentionPeriodValue"], 1, "{got}");
    assert_eq!(got["ResourceTags"][0]["ResourceTagValue"], "nightly");
    // The same rule, as vol shows it.
    let native = ep.daemon.vol_json(&["bin", "rule", "list"]);
    assert_eq!(native["rules"][0]["retention"], 86400, "{native}");

    let snap = |tags: &str| {
        let s = ep.aws_json(&[
            "ec2",
            "create-snapshot",
            "--volume-id",
            &vol,
            "--tag-specifications",
            &format!("ResourceType=snapshot,Tags=[{tags}]"),
        ]);
        let id = s["SnapshotId"].as_str().unwrap().to_owned();
        ep.aws_json(&["ec2", "wait", "snapshot-completed", "--snapshot-ids", &id]);
        id
    };
    let kept = snap("{Key=kind,Value=nightly}");
    let other = snap("{Key=kind,Value=adhoc}");

    // Deleted under the rule: gone from the listing, in the bin.
    ep.aws_json(&["ec2", "delete-snapshot", "--snapshot-id", &kept]);
    assert_eq!(snapshot_ids(&ep), std::slice::from_ref(&other));
    let bin = ep.aws_json(&["ec2", "list-snapshots-in-recycle-bin"]);
    let items = bin["Snapshots"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{bin}");
    assert_eq!(items[0]["SnapshotId"], kept.as_str());
    assert_eq!(items[0]["VolumeId"], vol.as_str());
    assert!(
        items[0]["RecycleBinExitTime"].as_str().unwrap()
            > items[0]["RecycleBinEnterTime"].as_str().unwrap()
    );
    let native = ep.daemon.vol_json(&["bin", "list"]);
    assert_eq!(native["entries"][0]["state"], "recoverable", "{native}");
    // Not matching the rule: deleted for good.
    ep.aws_json(&["ec2", "delete-snapshot", "--snapshot-id", &other]);
    assert!(snapshot_ids(&ep).is_empty());
    let bin = ep.aws_json(&["ec2", "list-snapshots-in-recycle-bin"]);
    assert_eq!(bin["Snapshots"].as_array().unwrap().len(), 1, "{bin}");

    let r = ep.aws_json(&[
        "ec2",
        "restore-snapshot-from-recycle-bin",
        "--snapshot-id",
        &kept,
    ]);
    assert_eq!(r["SnapshotId"], kept.as_str(), "{r}");
    assert_eq!(r["State"], "completed", "{r}");
    assert_eq!(snapshot_ids(&ep), std::slice::from_ref(&kept));
    let s = ep.aws_json(&["ec2", "describe-snapshots", "--snapshot-ids", &kept]);
    assert_eq!(tag(&s["Snapshots"][0], "kind").as_deref(), Some("nightly"));
    let bin = ep.aws_json(&["ec2", "list-snapshots-in-recycle-bin"]);
    assert!(bin["Snapshots"].as_array().unwrap().is_empty(), "{bin}");
    let again = ep.aws_err(&[
        "ec2",
        "restore-snapshot-from-recycle-bin",
        "--snapshot-id",
        &kept,
    ]);
    assert!(again.contains("InvalidSnapshot.NotFound"), "{again}");

    let restored = ep.aws_json(&[
        "ec2",
        "create-volume",
        "--size",
        "1",
        "--snapshot-id",
        &kept,
    ])["VolumeId"]
        .as_str()
        .unwrap()
        .to_owned();
    let r_uri = attach(&ep, &restored, "/dev/sdg");
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &uri, &r_uri]));

    // Protected: EC2's delete is refused too, and nothing moves.
    ep.daemon.vol_ok(&["snapshot", "protect", &kept]);
    let err = ep.aws_err(&["ec2", "delete-snapshot", "--snapshot-id", &kept]);
    assert!(
        err.contains("IncorrectState") && err.contains("protected"),
        "{err}"
    );
    assert_eq!(snapshot_ids(&ep), std::slice::from_ref(&kept));
    ep.daemon.vol_ok(&["snapshot", "unprotect", &kept]);

    // No image was deregistered: an empty image bin, and not found.
    let imgs = ep.aws_json(&["ec2", "list-images-in-recycle-bin"]);
    assert!(
        imgs["Images"].as_array().is_none_or(Vec::is_empty),
        "{imgs}"
    );
    let e = ep.aws_err(&[
        "ec2",
        "restore-image-from-recycle-bin",
        "--image-id",
        "ami-0123456789abcdef0",
    ]);
    assert!(e.contains("InvalidAMIID.NotFound"), "{e}");

    let upd = ep.aws_json(&[
        "rbin",
        "update-rule",
        "--identifier",
        &rule_id,
        "--retention-period",
        "RetentionPeriodValue=2,RetentionPeriodUnit=DAYS",
    ]);
    assert_eq!(upd["RetentionPeriod"]["RetentionPeriodValue"], 2, "{upd}");
    let bad = ep.aws_err(&[
        "rbin",
        "create-rule",
        "--resource-type",
        "EBS_SNAPSHOT",
        "--retention-period",
        "RetentionPeriodValue=400,RetentionPeriodUnit=DAYS",
    ]);
    assert!(bad.contains("ValidationException"), "{bad}");
    ep.aws_json(&["rbin", "delete-rule", "--identifier", &rule_id]);
    let listed = ep.aws_json(&["rbin", "list-rules", "--resource-type", "EBS_SNAPSHOT"]);
    assert!(listed["Rules"].as_array().unwrap().is_empty(), "{listed}");
    let gone = ep.aws_err(&["rbin", "get-rule", "--identifier", &rule_id]);
    assert!(gone.contains("ResourceNotFoundException"), "{gone}");
    ep.daemon.finish();
}

fn chunks(repo: &snapshot::Repo, id: &str) -> BTreeSet<ChunkHash> {
    rt().block_on(async {
        let m = repo
            .get_manifest(&SnapshotId::parse(id).unwrap())
            .await
            .unwrap();
        m.hashed().iter().map(|(_, h)| *h).collect()
    })
}

fn stored(repo: &snapshot::Repo, h: &ChunkHash) -> bool {
    rt().block_on(repo.store().exists(&keys::chunk_key(h)))
        .unwrap()
}

#[test]
fn an_expired_bin_entry_is_gone_and_gc_reclaims_only_its_chunks_local() {
    expiry(Store::Local);
}

#[test]
fn an_expired_bin_entry_is_gone_and_gc_reclaims_only_its_chunks_s3() {
    expiry(Store::s3());
}

fn expiry(store: Store) {
    let d = store.daemon("bin");
    let repo = store.repo(&d, "bin");
    d.vol_ok(&["create", "v", "--size", "8M", "--chunk-size", "64K"]);
    d.vol_ok(&["attach", "v"]);
    fill_random(&d, "v", 2);
    let a = snap(&d, "v")["id"].as_str().unwrap().to_owned();
    fill_random(&d, "v", 1);
    let b = snap(&d, "v")["id"].as_str().unwrap().to_owned();
    let only_b: Vec<ChunkHash> = chunks(&repo, &b)
        .difference(&chunks(&repo, &a))
        .copied()
        .collect();
    assert!(!only_b.is_empty());

    d.vol_ok(&["bin", "rule", "create", "--retention", "4s"]);
    d.vol_ok(&["snapshot", "delete", &b]);
    let listed = d.vol_json(&["bin", "list"]);
    assert_eq!(listed["entries"][0]["id"], b.as_str(), "{listed}");
    let ids: Vec<Value> = d
        .vol_json(&["snapshot", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].clone())
        .collect();
    assert_eq!(ids, [Value::from(a.clone())]);

    // In the bin, its chunks outlive gc.
    let r = d.vol_json(&["gc", "--grace", "0s"]);
    assert_eq!(r["bin_honoured"], 1, "{r}");
    assert!(only_b.iter().all(|h| stored(&repo, h)));

    std::thread::sleep(Duration::from_secs(5));
    let err = d.vol_err(&["bin", "restore", &b]);
    assert!(err.contains("past its retention"), "{err}");
    let r = d.vol_json(&["gc", "--grace", "0s"]);
    assert_eq!(r["bin_expired"], 1, "{r}");
    assert!(
        only_b.iter().all(|h| !stored(&repo, h)),
        "its unique chunks are gone"
    );
    assert!(
        d.vol_json(&["bin", "list"])["entries"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let v = d.vol_json(&["snapshot", "verify", &a]);
    assert_eq!(v["ok"], true, "{v}");
    d.finish();
}

fn image_ids(ep: &AwsEndpoint) -> Vec<String> {
    let v = ep.aws_json(&["ec2", "describe-images", "--owners", "self"]);
    v["Images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["ImageId"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn rbin_image_rule_deregister_list_restore_and_the_bytes_come_back() {
    let ep = AwsEndpoint::start();
    let vol = ep.aws_json(&["ec2", "create-volume", "--size", "1"])["VolumeId"]
        .as_str()
        .unwrap()
        .to_owned();
    let uri = attach(&ep, &vol, "/dev/sdf");
    qemu_io(&uri, &["write -P 0x3c 0 2M", "write -P 0xc3 200M 1M"]);
    let snap = || {
        let s = ep.aws_json(&["ec2", "create-snapshot", "--volume-id", &vol]);
        let id = s["SnapshotId"].as_str().unwrap().to_owned();
        ep.aws_json(&["ec2", "wait", "snapshot-completed", "--snapshot-ids", &id]);
        id
    };
    let root = snap();
    let data = snap();
    let bdm = serde_json::json!([
        {"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": root}},
        {"DeviceName": "/dev/sdb", "Ebs": {"SnapshotId": data, "VolumeSize": 2}},
        {"DeviceName": "/dev/sdc", "VirtualName": "ephemeral0"},
    ]);
    let ami = ep.aws_json(&[
        "ec2",
        "register-image",
        "--name",
        "golden-1",
        "--description",
        "the golden image",
        "--root-device-name",
        "/dev/sda1",
        "--block-device-mappings",
        &bdm.to_string(),
    ])["ImageId"]
        .as_str()
        .unwrap()
        .to_owned();
    ep.aws_json(&["ec2", "wait", "image-available", "--image-ids", &ami]);
    let before = ep.aws_json(&["ec2", "describe-images", "--image-ids", &ami])["Images"][0].clone();

    let rule = ep.aws_json(&[
        "rbin",
        "create-rule",
        "--resource-type",
        "EC2_IMAGE",
        "--retention-period",
        "RetentionPeriodValue=3,RetentionPeriodUnit=DAYS",
    ]);
    assert_eq!(rule["ResourceType"], "EC2_IMAGE", "{rule}");

    // Deregistered under the rule: gone from DescribeImages, in the bin,
    // its snapshots kept and not deletable.
    let r = ep.aws_json(&[
        "ec2",
        "deregister-image",
        "--image-id",
        &ami,
        "--delete-associated-snapshots",
    ]);
    let codes: Vec<&str> = r["DeleteSnapshotResults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["ReturnCode"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["skipped", "skipped"], "{r}");
    assert!(image_ids(&ep).is_empty());
    let gone = ep.aws_err(&["ec2", "describe-images", "--image-ids", &ami]);
    assert!(gone.contains("InvalidAMIID.NotFound"), "{gone}");
    let bin = ep.aws_json(&["ec2", "list-images-in-recycle-bin"]);
    let items = bin["Images"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{bin}");
    assert_eq!(items[0]["ImageId"], ami.as_str());
    assert_eq!(items[0]["Name"], "golden-1");
    assert_eq!(items[0]["Description"], "the golden image");
    let enter = items[0]["RecycleBinEnterTime"].as_str().unwrap();
    let exit = items[0]["RecycleBinExitTime"].as_str().unwrap();
    assert!(exit > enter, "{bin}");
    let by_id = ep.aws_json(&["ec2", "list-images-in-recycle-bin", "--image-ids", &ami]);
    assert_eq!(by_id["Images"].as_array().unwrap().len(), 1, "{by_id}");
    // Not a snapshot in the bin.
    let snaps = ep.aws_json(&["ec2", "list-snapshots-in-recycle-bin"]);
    assert!(snaps["Snapshots"].as_array().unwrap().is_empty(), "{snaps}");
    let mut listed = snapshot_ids(&ep);
    listed.sort();
    let mut want = vec![root.clone(), data.clone()];
    want.sort();
    assert_eq!(listed, want, "its snapshots stay");
    for s in [&root, &data] {
        let e = ep.aws_err(&["ec2", "delete-snapshot", "--snapshot-id", s]);
        assert!(
            e.contains("InvalidSnapshot.InUse") && e.contains(&ami),
            "{e}"
        );
    }
    let native = ep.daemon.vol_json(&["bin", "list"]);
    assert_eq!(native["entries"][0]["resource"], "image", "{native}");
    assert_eq!(native["entries"][0]["state"], "recoverable", "{native}");
    assert_eq!(native["entries"][0]["name"], "golden-1", "{native}");

    // Restored: the same id and mappings, and its root's bytes.
    let r = ep.aws_json(&["ec2", "restore-image-from-recycle-bin", "--image-id", &ami]);
    assert_eq!(r["Return"], true, "{r}");
    assert_eq!(image_ids(&ep), std::slice::from_ref(&ami));
    let after = ep.aws_json(&["ec2", "describe-images", "--image-ids", &ami])["Images"][0].clone();
    assert_eq!(after["State"], "available", "{after}");
    assert_eq!(after["BlockDeviceMappings"], before["BlockDeviceMappings"]);
    assert_eq!(after["Name"], before["Name"]);
    let bin = ep.aws_json(&["ec2", "list-images-in-recycle-bin"]);
    assert!(bin["Images"].as_array().is_none_or(Vec::is_empty), "{bin}");
    let again = ep.aws_err(&["ec2", "restore-image-from-recycle-bin", "--image-id", &ami]);
    assert!(again.contains("InvalidAMIID.NotFound"), "{again}");
    let restored = ep.aws_json(&[
        "ec2",
        "create-volume",
        "--size",
        "1",
        "--snapshot-id",
        &root,
    ])["VolumeId"]
        .as_str()
        .unwrap()
        .to_owned();
    let r_uri = attach(&ep, &restored, "/dev/sdg");
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &uri, &r_uri]));

    // Without a matching rule, deregistering is for good again.
    let rule_id = rule["Identifier"].as_str().unwrap();
    ep.aws_json(&["rbin", "delete-rule", "--identifier", rule_id]);
    ep.aws_json(&["ec2", "deregister-image", "--image-id", &ami]);
    assert!(image_ids(&ep).is_empty());
    let bin = ep.aws_json(&["ec2", "list-images-in-recycle-bin"]);
    assert!(bin["Images"].as_array().is_none_or(Vec::is_empty), "{bin}");
    ep.aws_json(&["ec2", "delete-snapshot", "--snapshot-id", &data]);
    ep.daemon.finish();
}

/// `vol bin` for images, with a second host on the same store: it lists
/// the binned image and refuses to delete its snapshot; after the
/// retention `vol gc --grace 0s` deletes the image with the snapshot only
/// it used, and reclaims exactly that snapshot's chunks.
#[test]
fn an_expired_image_goes_with_its_snapshots_and_gc_reclaims_their_chunks() {
    image_expiry(Store::Local);
}

#[test]
fn an_expired_image_goes_with_its_snapshots_and_gc_reclaims_their_chunks_s3() {
    image_expiry(Store::s3());
}

fn image_expiry(store: Store) {
    let d = store.daemon("binimg");
    let e = store.daemon_sharing("binimg", &d);
    let repo = store.repo(&d, "binimg");
    d.vol_ok(&["create", "v", "--size", "8M", "--chunk-size", "64K"]);
    d.vol_ok(&["attach", "v"]);
    fill_random(&d, "v", 2);
    let r = snap(&d, "v")["id"].as_str().unwrap().to_owned();
    fill_random(&d, "v", 2);
    let o = snap(&d, "v")["id"].as_str().unwrap().to_owned();
    let only_r: Vec<ChunkHash> = chunks(&repo, &r)
        .difference(&chunks(&repo, &o))
        .copied()
        .collect();
    assert!(!only_r.is_empty());
    let ami = d
        .vol_ok(&[
            "image",
            "register",
            "web",
            "--root",
            &format!("/dev/xvda={r}"),
        ])
        .trim()
        .to_owned();

    d.vol_ok(&[
        "bin",
        "rule",
        "create",
        "--resource",
        "image",
        "--retention",
        "6s",
    ]);
    d.vol_ok(&["image", "deregister", &ami]);
    let images = d.vol_json(&["image", "list"]);
    assert!(images.as_array().unwrap().is_empty(), "{images}");
    for host in [&d, &e] {
        let listed = host.vol_json(&["bin", "list"]);
        assert_eq!(listed["entries"][0]["id"], ami.as_str(), "{listed}");
        assert_eq!(listed["entries"][0]["resource"], "image", "{listed}");
        let err = host.vol_err(&["snapshot", "delete", &r]);
        assert!(err.contains("in use") && err.contains(&ami), "{err}");
    }
    // A restore and a second deregistration: the record makes the round trip.
    let back = d.vol_json(&["bin", "restore", &ami]);
    assert_eq!(back["id"], ami.as_str(), "{back}");
    assert_eq!(d.vol_json(&["image", "inspect", &ami])["name"], "web");
    d.vol_ok(&["image", "deregister", &ami]);

    // In the bin, gc keeps every chunk of its snapshot.
    let g = d.vol_json(&["gc", "--grace", "0s"]);
    assert_eq!(g["images_expired"], 0, "{g}");
    assert!(only_r.iter().all(|h| stored(&repo, h)));

    std::thread::sleep(Duration::from_secs(7));
    let err = d.vol_err(&["bin", "restore", &ami]);
    assert!(err.contains("past its retention"), "{err}");
    // Any host may end it: the second one does.
    let g = e.vol_json(&["gc", "--grace", "0s"]);
    assert_eq!(g["images_expired"], 1, "{g}");
    assert_eq!(g["image_snapshots_deleted"], 1, "{g}");
    assert!(
        only_r.iter().all(|h| !stored(&repo, h)),
        "the chunks only its snapshot held are gone"
    );
    let left: Vec<Value> = d
        .vol_json(&["snapshot", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].clone())
        .collect();
    assert_eq!(left, [Value::from(o.clone())]);
    for host in [&d, &e] {
        let listed = host.vol_json(&["bin", "list"]);
        assert!(listed["entries"].as_array().unwrap().is_empty(), "{listed}");
    }
    let v = d.vol_json(&["snapshot", "verify", &o]);
    assert_eq!(v["ok"], true, "{v}");
    e.finish();
    d.finish();
}

/// Rule locks and a rule's own tags through awscli: a locked rule (and one
/// within its unlock delay) cannot be deleted, shortened or narrowed, by
/// rbin or by `vol`; tags are set, listed and removed by ARN.
#[test]
fn rbin_rule_locks_and_tags() {
    let ep = AwsEndpoint::start();
    let rule = ep.aws_json(&[
        "rbin",
        "create-rule",
        "--resource-type",
        "EBS_SNAPSHOT",
        "--retention-period",
        "RetentionPeriodValue=7,RetentionPeriodUnit=DAYS",
        "--lock-configuration",
        "UnlockDelay={UnlockDelayValue=7,UnlockDelayUnit=DAYS}",
    ]);
    let id = rule["Identifier"].as_str().unwrap().to_owned();
    let arn = rule["RuleArn"].as_str().unwrap().to_owned();
    assert_eq!(rule["LockState"], "locked", "{rule}");
    assert_eq!(
        rule["LockConfiguration"]["UnlockDelay"]["UnlockDelayValue"], 7,
        "{rule}"
    );
    let conflict = |args: &[&str]| {
        let e = ep.aws_err(args);
        assert!(e.contains("ConflictException"), "{args:?}: {e}");
    };
    conflict(&["rbin", "delete-rule", "--identifier", &id]);
    let shorter = [
        "rbin",
        "update-rule",
        "--identifier",
        &id,
        "--retention-period",
        "RetentionPeriodValue=1,RetentionPeriodUnit=DAYS",
    ];
    conflict(&shorter);
    conflict(&[
        "rbin",
        "update-rule",
        "--identifier",
        &id,
        "--exclude-resource-tags",
        "ResourceTagKey=scratch",
    ]);
    let longer = ep.aws_json(&[
        "rbin",
        "update-rule",
        "--identifier",
        &id,
        "--retention-period",
        "RetentionPeriodValue=14,RetentionPeriodUnit=DAYS",
        "--description",
        "kept two weeks",
    ]);
    assert_eq!(
        longer["RetentionPeriod"]["RetentionPeriodValue"], 14,
        "{longer}"
    );
    let e = ep.daemon.vol_err(&["bin", "rule", "delete", &id]);
    assert!(e.contains("locked"), "{e}");
    let native = ep.daemon.vol_json(&["bin", "rule", "list"]);
    assert_eq!(native["rules"][0]["lock_state"], "locked", "{native}");
    let count = |state: &str| {
        ep.aws_json(&[
            "rbin",
            "list-rules",
            "--resource-type",
            "EBS_SNAPSHOT",
            "--lock-state",
            state,
        ])["Rules"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!((count("locked"), count("unlocked")), (1, 0));

    // Unlocked: still held for the unlock delay.
    let u = ep.aws_json(&["rbin", "unlock-rule", "--identifier", &id]);
    assert_eq!(u["LockState"], "pending_unlock", "{u}");
    assert!(
        u["LockEndTime"].is_string() || u["LockEndTime"].is_number(),
        "{u}"
    );
    conflict(&["rbin", "unlock-rule", "--identifier", &id]);
    conflict(&["rbin", "delete-rule", "--identifier", &id]);
    conflict(&shorter);
    assert_eq!(count("pending_unlock"), 1);
    let l = ep.aws_json(&[
        "rbin",
        "lock-rule",
        "--identifier",
        &id,
        "--lock-configuration",
        "UnlockDelay={UnlockDelayValue=30,UnlockDelayUnit=DAYS}",
    ]);
    assert_eq!(l["LockState"], "locked", "{l}");
    // Only a region-level rule without exclusions can be locked.
    let tagged = ep.aws_json(&[
        "rbin",
        "create-rule",
        "--resource-type",
        "EC2_IMAGE",
        "--retention-period",
        "RetentionPeriodValue=1,RetentionPeriodUnit=DAYS",
        "--resource-tags",
        "ResourceTagKey=env,ResourceTagValue=prod",
    ]);
    let tagged_id = tagged["Identifier"].as_str().unwrap().to_owned();
    let e = ep.aws_err(&[
        "rbin",
        "lock-rule",
        "--identifier",
        &tagged_id,
        "--lock-configuration",
        "UnlockDelay={UnlockDelayValue=7,UnlockDelayUnit=DAYS}",
    ]);
    assert!(e.contains("ValidationException"), "{e}");

    // A rule's own tags, by ARN; a locked rule takes them too.
    ep.aws_json(&[
        "rbin",
        "tag-resource",
        "--resource-arn",
        &arn,
        "--tags",
        "Key=team,Value=storage",
        "Key=cost,Value=backup",
    ]);
    let tags = ep.aws_json(&["rbin", "list-tags-for-resource", "--resource-arn", &arn]);
    let mut keys: Vec<&str> = tags["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["Key"].as_str().unwrap())
        .collect();
    keys.sort();
    assert_eq!(keys, ["cost", "team"], "{tags}");
    ep.aws_json(&[
        "rbin",
        "untag-resource",
        "--resource-arn",
        &arn,
        "--tag-keys",
        "cost",
    ]);
    let tags = ep.aws_json(&["rbin", "list-tags-for-resource", "--resource-arn", &arn]);
    assert_eq!(tags["Tags"].as_array().unwrap().len(), 1, "{tags}");
    assert_eq!(tags["Tags"][0]["Key"], "team", "{tags}");
    let got = ep.aws_json(&["rbin", "get-rule", "--identifier", &id]);
    assert_eq!(got["LockState"], "locked", "{got}");
    let missing = arn.replace(&id, "0123456789a");
    let e = ep.aws_err(&["rbin", "list-tags-for-resource", "--resource-arn", &missing]);
    assert!(e.contains("ResourceNotFoundException"), "{e}");
    ep.aws_json(&["rbin", "delete-rule", "--identifier", &tagged_id]);

    // The same natively.
    let d = &ep.daemon;
    let n = d.vol_json(&[
        "bin",
        "rule",
        "create",
        "--resource",
        "image",
        "--retention",
        "3d",
    ]);
    let nid = n["id"].as_str().unwrap();
    let e = d.vol_err(&["bin", "rule", "lock", nid, "--unlock-delay-days", "3"]);
    assert!(e.contains("7 to 30"), "{e}");
    let l = d.vol_json(&["bin", "rule", "lock", nid, "--unlock-delay-days", "7"]);
    assert_eq!(l["lock_state"], "locked", "{l}");
    let e = d.vol_err(&["bin", "rule", "delete", nid]);
    assert!(e.contains("locked"), "{e}");
    let u = d.vol_json(&["bin", "rule", "unlock", nid]);
    assert_eq!(u["lock_state"], "pending_unlock", "{u}");
    let e = d.vol_err(&["bin", "rule", "delete", nid]);
    assert!(e.contains("pending_unlock"), "{e}");
    ep.daemon.finish();
}

/// The daemon killed in the middle of each move of an image: into the bin
/// (entry written, record not yet removed), out of it (record written,
/// entry not yet removed), and at expiry (its snapshot deleted, entry not
/// yet removed). Each leaves the image whole in one place or the other,
/// and doing it again finishes.
#[test]
fn a_kill_mid_image_move_leaves_it_whole_and_a_retry_finishes() {
    let mut d = volumed_tests::TestDaemon::start();
    d.vol_ok(&["create", "v", "--size", "4M", "--chunk-size", "64K"]);
    d.vol_ok(&["attach", "v"]);
    fill_random(&d, "v", 1);
    let r = snap(&d, "v")["id"].as_str().unwrap().to_owned();
    let ami = d
        .vol_ok(&[
            "image",
            "register",
            "web",
            "--root",
            &format!("/dev/xvda={r}"),
        ])
        .trim()
        .to_owned();
    let long = d.vol_json(&[
        "bin",
        "rule",
        "create",
        "--resource",
        "image",
        "--retention",
        "1h",
    ]);
    let images = |d: &volumed_tests::TestDaemon| -> Vec<String> {
        d.vol_json(&["image", "list"])
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let binned = |d: &volumed_tests::TestDaemon| -> usize {
        d.vol_json(&["bin", "list"])["entries"]
            .as_array()
            .unwrap()
            .len()
    };
    let crash_at = |d: &mut volumed_tests::TestDaemon, point: &str, args: &[&str]| {
        d.set_env(&[("VOLUMED_FAILPOINTS", point)]);
        d.restart();
        assert!(!d.vol(args).status.success(), "{args:?}");
        assert!(!d.wait_exit().success(), "{point} kills the daemon");
        d.set_env(&[]);
        d.start_again();
    };

    // Into the bin: still registered, its stray entry not listed.
    crash_at(
        &mut d,
        "image-bin-after-entry",
        &["image", "deregister", &ami],
    );
    assert_eq!(images(&d), std::slice::from_ref(&ami));
    assert_eq!(binned(&d), 0);
    d.vol_ok(&["image", "deregister", &ami]);
    assert!(images(&d).is_empty());
    assert_eq!(binned(&d), 1);

    // Out of it: registered again; a second restore finishes the move.
    crash_at(
        &mut d,
        "image-restore-after-record",
        &["bin", "restore", &ami],
    );
    assert_eq!(images(&d), std::slice::from_ref(&ami));
    assert_eq!(binned(&d), 0);
    let e = d.vol_err(&["bin", "restore", &ami]);
    assert!(e.contains("does not exist in the Recycle Bin"), "{e}");

    // At expiry: the snapshot went, the entry stayed; the next gc ends it.
    d.vol_ok(&["bin", "rule", "delete", long["id"].as_str().unwrap()]);
    d.vol_ok(&[
        "bin",
        "rule",
        "create",
        "--resource",
        "image",
        "--retention",
        "2s",
    ]);
    d.vol_ok(&["image", "deregister", &ami]);
    std::thread::sleep(Duration::from_secs(3));
    crash_at(
        &mut d,
        "image-expire-after-snapshot",
        &["gc", "--grace", "0s"],
    );
    let snaps = d.vol_json(&["snapshot", "list"]);
    assert!(snaps.as_array().unwrap().is_empty(), "{snaps}");
    assert_eq!(binned(&d), 1, "the entry outlives its snapshot");
    let g = d.vol_json(&["gc", "--grace", "0s"]);
    assert_eq!(g["images_expired"], 1, "{g}");
    assert_eq!(g["image_snapshots_deleted"], 0, "{g}");
    assert_eq!(binned(&d), 0);
    assert!(images(&d).is_empty());
    d.finish_expecting(
        &[],
        &[
            "failpoint reached",
            "previous run did not shut down cleanly",
        ],
    );
}
