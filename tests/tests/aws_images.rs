//! Images through the EC2 endpoint with the real `aws` CLI and boto3:
//! RegisterImage with its mappings given back as given, DescribeImages'
//! filters and owners, tags, a snapshot in use refused, DeregisterImage
//! with its snapshots, CreateImage of a two-volume instance while fio
//! writes both, CreateSnapshots, and bad input with EC2's codes.

use std::process::Command;

use serde_json::{Value, json};
use volumed_tests::aws::{AwsEndpoint, ec2_code};
use volumed_tests::run_ok;
use volumed_tests::snapkit::{Store, image};

/// A snapshot of a new `size` volume named `name` (nothing written).
fn snapshot_of_new_volume(ep: &AwsEndpoint, name: &str, size: &str) -> String {
    let d = &ep.daemon;
    d.vol_ok(&["create", name, "--size", size]);
    let s = d.vol_json(&["snapshot", "create", name, "--wait"]);
    s["id"].as_str().unwrap().to_owned()
}

fn image_ids(ep: &AwsEndpoint, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["ec2", "describe-images"];
    args.extend_from_slice(extra);
    let v = ep.aws_json(&args);
    let mut out: Vec<String> = v["Images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["ImageId"].as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

fn register(ep: &AwsEndpoint, name: &str, bdm: &Value) -> String {
    let r = ep.aws_json(&[
        "ec2",
        "register-image",
        "--name",
        name,
        "--root-device-name",
        "/dev/sda1",
        "--block-device-mappings",
        &bdm.to_string(),
    ]);
    r["ImageId"].as_str().unwrap().to_owned()
}

#[test]
fn register_describe_tag_and_deregister() {
    let ep = AwsEndpoint::start();
    let root = snapshot_of_new_volume(&ep, "root", "64M");
    let data = snapshot_of_new_volume(&ep, "data", "64M");
    let bdm = json!([
        {"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": root}},
        {"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"},
        {"DeviceName": "/dev/sdc", "Ebs": {"SnapshotId": data, "VolumeSize": 2, "DeleteOnTermination": false, "VolumeType": "gp3"}},
        {"DeviceName": "/dev/sdd", "NoDevice": ""},
    ]);
    let a = register(&ep, "web-1", &bdm);
    assert!(a.starts_with("ami-") && a.len() == 21, "{a}");
    ep.aws_json(&["ec2", "wait", "image-available", "--image-ids", &a]);
    let img = ep.aws_json(&["ec2", "describe-images", "--image-ids", &a])["Images"][0].clone();
    assert_eq!(img["Name"], "web-1");
    assert_eq!(img["State"], "available");
    assert_eq!(img["OwnerId"], "000000000000");
    assert_eq!(img["RootDeviceType"], "ebs");
    assert_eq!(img["RootDeviceName"], "/dev/sda1");
    // The mappings as given (and every EBS one unencrypted).
    let mut given = bdm.clone();
    for m in given.as_array_mut().unwrap() {
        if let Some(e) = m.get_mut("Ebs") {
            e["Encrypted"] = json!(false);
        }
    }
    assert_eq!(img["BlockDeviceMappings"], given);

    let b = register(
        &ep,
        "web-2",
        &json!([{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": root}}]),
    );
    ep.aws_json(&[
        "ec2",
        "create-tags",
        "--resources",
        &a,
        "--tags",
        "Key=team,Value=web",
    ]);
    let both = {
        let mut v = vec![a.clone(), b.clone()];
        v.sort();
        v
    };
    assert_eq!(image_ids(&ep, &[]), both);
    assert_eq!(image_ids(&ep, &["--owners", "self"]), both);
    assert!(image_ids(&ep, &["--owners", "amazon"]).is_empty());
    let f = |filter: &str| image_ids(&ep, &["--filters", filter]);
    assert_eq!(
        f(&format!(
            "Name=block-device-mapping.snapshot-id,Values={data}"
        )),
        [a.as_str()]
    );
    assert_eq!(
        f(&format!(
            "Name=block-device-mapping.snapshot-id,Values={root}"
        )),
        both
    );
    assert_eq!(
        f("Name=block-device-mapping.device-name,Values=/dev/sdb"),
        [a.as_str()]
    );
    assert_eq!(f("Name=name,Values=web-*"), both);
    assert_eq!(f("Name=name,Values=web-2"), [b.as_str()]);
    assert_eq!(f("Name=state,Values=available"), both);
    assert_eq!(f(&format!("Name=image-id,Values={b}")), [b.as_str()]);
    assert_eq!(f("Name=tag:team,Values=web"), [a.as_str()]);
    assert_eq!(f("Name=tag-key,Values=team"), [a.as_str()]);
    let tags = ep.aws_json(&[
        "ec2",
        "describe-tags",
        "--filters",
        "Name=resource-type,Values=image",
    ]);
    assert_eq!(tags["Tags"][0]["ResourceId"], a.as_str());
    // Paged with boto3's paginator.
    let out = ep.python(
        r#"
ec2 = boto3.client("ec2")
ids = [i["ImageId"] for p in ec2.get_paginator("describe_images").paginate(Owners=["self"], PaginationConfig={"PageSize": 5}) for i in p["Images"]]
print(len(ids), len(set(ids)))
"#,
    );
    assert_eq!(out.trim(), "2 2");

    // A snapshot a registered image uses cannot be deleted (AWS's code).
    let e = ep.aws_err(&["ec2", "delete-snapshot", "--snapshot-id", &data]);
    assert!(e.contains("InvalidSnapshot.InUse") && e.contains(&a), "{e}");
    assert!(ep.daemon.vol(&["snapshot", "delete", &root]).status.code() != Some(0));
    assert_eq!(
        ep.daemon
            .vol_json(&["snapshot", "list"])
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Deregistering with its snapshots: the one another image uses stays.
    let r = ep.aws_json(&[
        "ec2",
        "deregister-image",
        "--image-id",
        &a,
        "--delete-associated-snapshots",
    ]);
    let mut results: Vec<(String, String)> = r["DeleteSnapshotResults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["SnapshotId"].as_str().unwrap().into(),
                x["ReturnCode"].as_str().unwrap().into(),
            )
        })
        .collect();
    results.sort();
    let mut want = vec![
        (root.clone(), "skipped".to_owned()),
        (data.clone(), "success".to_owned()),
    ];
    want.sort();
    assert_eq!(results, want);
    assert_eq!(image_ids(&ep, &[]), [b.as_str()]);
    let snaps = ep.daemon.vol_json(&["snapshot", "list"]);
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    ep.aws_json(&["ec2", "deregister-image", "--image-id", &b]);
    // Not in use any more.
    ep.aws_json(&["ec2", "delete-snapshot", "--snapshot-id", &root]);
    ep.daemon.assert_log_clean(&[], &[]);
}

#[test]
fn bad_registrations_change_nothing() {
    let ep = AwsEndpoint::start();
    let root = snapshot_of_new_volume(&ep, "root", "2G");
    let ok = register(
        &ep,
        "taken",
        &json!([{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": root}}]),
    );
    let reg = |name: &str, bdm: Value, extra: &[&str]| {
        let bdm = bdm.to_string();
        let mut args = vec![
            "ec2",
            "register-image",
            "--name",
            name,
            "--root-device-name",
            "/dev/sda1",
            "--block-device-mappings",
            &bdm,
        ];
        args.extend_from_slice(extra);
        let e = ep.aws_err(&args);
        assert_eq!(image_ids(&ep, &[]), [ok.as_str()], "{name}: {e}");
        e
    };
    let root_ebs = json!({"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": root}});
    let e = reg(
        "a-1",
        json!([root_ebs, {"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0", "Ebs": {"VolumeSize": 1}}]),
        &[],
    );
    assert!(e.contains("InvalidBlockDeviceMapping"), "{e}");
    let e = reg(
        "a-2",
        json!([{"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"}]),
        &[],
    );
    assert!(
        e.contains("InvalidBlockDeviceMapping") && e.contains("root"),
        "{e}"
    );
    let e = reg(
        "a-3",
        json!([{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": "snap-0123456789abcdef0"}}]),
        &[],
    );
    assert!(e.contains("InvalidSnapshot.NotFound"), "{e}");
    let e = reg(
        "a-4",
        json!([{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": root, "VolumeSize": 1}}]),
        &[],
    );
    assert!(
        e.contains("InvalidBlockDeviceMapping") && e.contains("expect size >= 2GB"),
        "{e}"
    );
    let e = reg(
        "a-5",
        json!([root_ebs, {"DeviceName": "/dev/nope", "VirtualName": "ephemeral0"}]),
        &[],
    );
    assert!(
        e.contains("InvalidBlockDeviceMapping") && e.contains("Invalid device name"),
        "{e}"
    );
    let e = reg(
        "a-6",
        json!([root_ebs, {"DeviceName": "/dev/sdb", "VirtualName": "ephemeral99"}]),
        &[],
    );
    assert!(e.contains("InvalidBlockDeviceMapping"), "{e}");
    let e = reg("a-7", json!([root_ebs, root_ebs]), &[]);
    assert!(
        e.contains("InvalidBlockDeviceMapping") && e.contains("multiple times"),
        "{e}"
    );
    let e = reg("taken", json!([root_ebs]), &[]);
    assert!(e.contains("InvalidAMIName.Duplicate"), "{e}");
    let e = reg("bad|name", json!([root_ebs]), &[]);
    assert!(e.contains("InvalidAMIName.Malformed"), "{e}");
    let e = reg("a-8", json!([root_ebs]), &["--architecture", "sparc"]);
    assert!(e.contains("InvalidParameterValue"), "{e}");
    let (status, body) = ep.ec2_raw("Action=RegisterImage&Version=2016-11-15&Name=s3-backed&ImageLocation=bucket%2Fimage.manifest.xml");
    assert_eq!(
        (status, ec2_code(&body)),
        (400, "UnsupportedOperation"),
        "{body}"
    );
    let (_, body) = ep.ec2_raw(&format!(
        "Action=RegisterImage&Version=2016-11-15&Name=enc&RootDeviceName=%2Fdev%2Fsda1&BlockDeviceMapping.1.DeviceName=%2Fdev%2Fsda1&BlockDeviceMapping.1.Ebs.SnapshotId={root}&BlockDeviceMapping.1.Ebs.KmsKeyId=alias%2Fteam"
    ));
    assert_eq!(ec2_code(&body), "InvalidParameterDependency", "{body}");
    let e = ep.aws_err(&[
        "ec2",
        "describe-images",
        "--image-ids",
        "ami-0123456789abcdef0",
    ]);
    assert!(e.contains("InvalidAMIID.NotFound"), "{e}");
    let e = ep.aws_err(&["ec2", "describe-images", "--image-ids", "ami-xyz"]);
    assert!(e.contains("InvalidAMIID.Malformed"), "{e}");
    let e = ep.aws_err(&[
        "ec2",
        "deregister-image",
        "--image-id",
        "ami-0123456789abcdef0",
    ]);
    assert!(e.contains("InvalidAMIID.NotFound"), "{e}");
    assert_eq!(image_ids(&ep, &[]), [ok]);
    ep.daemon.assert_log_clean(&[], &[]);
}

/// fio writing both volumes of an instance (random 4 KiB writes over
/// NBD) for `secs`, as a child the test waits for.
fn fio(uris: &[String], secs: u32) -> std::process::Child {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=global",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--time_based",
        &format!("--runtime={secs}"),
    ]);
    for (n, u) in uris.iter().enumerate() {
        cmd.arg(format!("--name=dev{n}"))
            .arg(format!("--uri={u}"))
            .arg("--size=64M");
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run fio")
}

#[test]
fn create_image_of_a_busy_instance_and_create_snapshots() {
    let ep = AwsEndpoint::start();
    let d = &ep.daemon;
    let root = snapshot_of_new_volume(&ep, "golden", "64M");
    let ami = register(
        &ep,
        "base",
        &json!([
            {"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": root}},
            {"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"},
            {"DeviceName": "/dev/sdf", "Ebs": {"VolumeSize": 1}},
        ]),
    );
    let r = ep.aws_json(&[
        "ec2",
        "run-instances",
        "--image-id",
        &ami,
        "--instance-type",
        "m5d.large",
        "--count",
        "1",
    ]);
    let id = r["Instances"][0]["InstanceId"].as_str().unwrap().to_owned();
    ep.aws_json(&["ec2", "wait", "instance-running", "--instance-ids", &id]);
    let inst = ep.aws_json(&["ec2", "describe-instances", "--instance-ids", &id]);
    let vols: Vec<(String, String)> =
        inst["Reservations"][0]["Instances"][0]["BlockDeviceMappings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["DeviceName"].as_str().unwrap().into(),
                    m["Ebs"]["VolumeId"].as_str().unwrap().into(),
                )
            })
            .collect();
    assert_eq!(vols.len(), 2);
    ep.aws_json(&[
        "ec2",
        "create-tags",
        "--resources",
        &vols[0].1,
        &vols[1].1,
        "--tags",
        "Key=Name,Value=disk",
    ]);

    // CreateImage while fio writes both EBS volumes: one set snapshot.
    let uris: Vec<String> = vols.iter().map(|(_, v)| d.uri(v)).collect();
    let load = fio(&uris, 4);
    std::thread::sleep(std::time::Duration::from_millis(800));
    let c = ep.aws_json(&[
        "ec2",
        "create-image",
        "--instance-id",
        &id,
        "--name",
        "captured",
        "--no-reboot",
    ]);
    let captured = c["ImageId"].as_str().unwrap().to_owned();
    let out = load.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio failed during the barrier: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ep.aws_json(&["ec2", "wait", "image-available", "--image-ids", &captured]);
    let img =
        ep.aws_json(&["ec2", "describe-images", "--image-ids", &captured])["Images"][0].clone();
    assert_eq!(img["SourceInstanceId"], id.as_str());
    let maps = img["BlockDeviceMappings"].as_array().unwrap();
    let snap_of = |dev: &str| {
        maps.iter().find(|m| m["DeviceName"] == dev).unwrap()["Ebs"]["SnapshotId"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        maps.iter().find(|m| m["DeviceName"] == "/dev/sdb").unwrap()["VirtualName"],
        "ephemeral0"
    );
    let (s1, s2) = (snap_of("/dev/sda1"), snap_of("/dev/sdf"));
    let snaps = ep.aws_json(&["ec2", "describe-snapshots", "--snapshot-ids", &s1, &s2]);
    let snaps = snaps["Snapshots"].as_array().unwrap();
    assert!(snaps.iter().all(|s| s["State"] == "completed"));
    assert_eq!(snaps[0]["StartTime"], snaps[1]["StartTime"], "one instant");
    let set_tag = |s: &Value| {
        s["Tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["Key"] == "volumed:snapshot-set")
            .map(|t| t["Value"].clone())
    };
    assert!(set_tag(&snaps[0]).is_some() && set_tag(&snaps[0]) == set_tag(&snaps[1]));
    assert!(
        snaps[0]["Description"]
            .as_str()
            .unwrap()
            .starts_with(&format!("Created by CreateImage({id})"))
    );

    // Launching the captured image gives volumes with the snapshots' bytes.
    let r = ep.aws_json(&[
        "ec2",
        "run-instances",
        "--image-id",
        &captured,
        "--instance-type",
        "t3.micro",
        "--count",
        "1",
    ]);
    let id2 = r["Instances"][0]["InstanceId"].as_str().unwrap().to_owned();
    ep.aws_json(&["ec2", "wait", "instance-running", "--instance-ids", &id2]);
    let inst2 = ep.aws_json(&["ec2", "describe-instances", "--instance-ids", &id2]);
    let repo = Store::Local.repo(d, "");
    for m in inst2["Reservations"][0]["Instances"][0]["BlockDeviceMappings"]
        .as_array()
        .unwrap()
    {
        let dev = m["DeviceName"].as_str().unwrap();
        let vol = m["Ebs"]["VolumeId"].as_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let got = dir.path().join("v.img");
        run_ok(Command::new("nbdcopy").arg(d.uri(vol)).arg(&got));
        let got = std::fs::read(&got).unwrap();
        let want = image(&repo, &snap_of(dev));
        assert!(
            got.len() >= want.len() && got[..want.len()] == want[..],
            "{dev} differs from its snapshot"
        );
    }

    // CreateSnapshots without the boot volume, tags copied from it.
    let r = ep.aws_json(&[
        "ec2",
        "create-snapshots",
        "--instance-specification",
        &format!("InstanceId={id},ExcludeBootVolume=true"),
        "--copy-tags-from-source",
        "volume",
        "--description",
        "nightly",
    ]);
    let made = r["Snapshots"].as_array().unwrap();
    assert_eq!(made.len(), 1, "{r}");
    assert_eq!(
        made[0]["VolumeId"],
        vols.iter()
            .find(|(d, _)| d == "/dev/sdf")
            .unwrap()
            .1
            .as_str()
    );
    let sid = made[0]["SnapshotId"].as_str().unwrap();
    ep.aws_json(&["ec2", "wait", "snapshot-completed", "--snapshot-ids", sid]);
    let s =
        ep.aws_json(&["ec2", "describe-snapshots", "--snapshot-ids", sid])["Snapshots"][0].clone();
    let tags = s["Tags"].as_array().unwrap();
    assert!(
        tags.contains(&json!({"Key": "Name", "Value": "disk"})),
        "{s}"
    );
    assert_eq!(s["Description"], "nightly");
    // Every EBS volume, one StartTime.
    let r = ep.aws_json(&[
        "ec2",
        "create-snapshots",
        "--instance-specification",
        &format!("InstanceId={id}"),
    ]);
    let made = r["Snapshots"].as_array().unwrap();
    assert_eq!(made.len(), 2);
    assert_eq!(made[0]["StartTime"], made[1]["StartTime"]);
    let e = ep.aws_err(&[
        "ec2",
        "create-snapshots",
        "--instance-specification",
        "InstanceId=i-0123456789abcdef0",
    ]);
    assert!(e.contains("InvalidInstanceID.NotFound"), "{e}");
    let e = ep.aws_err(&[
        "ec2",
        "create-snapshots",
        "--instance-specification",
        &format!("InstanceId={id},ExcludeDataVolumeIds={}", vols[0].1),
    ]);
    assert!(
        e.contains("InvalidParameterValue"),
        "root may not be excluded by id: {e}"
    );
    let e = ep.aws_err(&[
        "ec2",
        "create-image",
        "--instance-id",
        &id,
        "--name",
        "captured",
    ]);
    assert!(e.contains("InvalidAMIName.Duplicate"), "{e}");
    ep.daemon.assert_log_clean(&[], &[]);
}
