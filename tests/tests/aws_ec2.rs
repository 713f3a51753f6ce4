//! The EC2 volume and snapshot API, driven by the real `aws` CLI (and
//! boto3 for paginators) against the real daemon, with the data checked
//! through NBD by qemu-img and nbdinfo.

use std::process::Command;

use serde_json::Value;
use volumed_tests::aws::{AwsEndpoint, ec2_code};
use volumed_tests::{nbdinfo_json, qemu_io, run_ok};

const INSTANCE_A: &str = "i-0123456789abcdef0";
const INSTANCE_B: &str = "i-0fedcba9876543210";

fn create(ep: &AwsEndpoint, extra: &[&str]) -> String {
    let mut args = vec!["ec2", "create-volume", "--size", "1"];
    args.extend_from_slice(extra);
    let v = ep.aws_json(&args);
    let id = v["VolumeId"].as_str().unwrap().to_owned();
    assert!(
        id.len() == 21 && id.starts_with("vol-") && id[4..].bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    id
}

/// The ids DescribeVolumes returns for these extra arguments, sorted.
fn ids(ep: &AwsEndpoint, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["ec2", "describe-volumes"];
    args.extend_from_slice(extra);
    let v = ep.aws_json(&args);
    let mut out: Vec<String> = v["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["VolumeId"].as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

fn sorted(mut v: Vec<&str>) -> Vec<String> {
    v.sort();
    v.into_iter().map(str::to_owned).collect()
}

fn tag(v: &Value, key: &str) -> Option<String> {
    v["Tags"]
        .as_array()?
        .iter()
        .find(|t| t["Key"] == key)
        .map(|t| t["Value"].as_str().unwrap().to_owned())
}

fn describe_one(ep: &AwsEndpoint, id: &str) -> Value {
    let v = ep.aws_json(&["ec2", "describe-volumes", "--volume-ids", id]);
    v["Volumes"][0].clone()
}

#[test]
fn volume_lifecycle_snapshots_restore_and_termination() {
    let ep = AwsEndpoint::start();
    let web = create(
        &ep,
        &[
            "--volume-type",
            "gp3",
            "--iops",
            "3000",
            "--throughput",
            "125",
            "--tag-specifications",
            "ResourceType=volume,Tags=[{Key=Name,Value=web},{Key=team,Value=a}]",
        ],
    );
    let db = create(&ep, &[]);
    // Created through the API, named by its id, visible to vol.
    let inspected = ep.daemon.vol_json(&["inspect", &web]);
    assert_eq!(inspected["volume_id"], web.as_str());
    assert_eq!(inspected["tags"]["Name"], "web");
    assert_eq!(inspected["size"], 1u64 << 30);
    let v = describe_one(&ep, &web);
    assert_eq!(v["State"], "available");
    assert_eq!(v["Size"], 1);
    assert_eq!(v["VolumeType"], "gp3");
    assert_eq!(v["Iops"], 3000);
    assert_eq!(v["AvailabilityZone"], "us-east-1a");

    ep.aws_json(&[
        "ec2",
        "create-tags",
        "--resources",
        &db,
        "--tags",
        "Key=team,Value=b",
        "Key=tier,Value=data",
    ]);
    let t = ep.aws_json(&[
        "ec2",
        "describe-tags",
        "--filters",
        &format!("Name=resource-id,Values={db}"),
    ]);
    assert_eq!(t["Tags"].as_array().unwrap().len(), 2, "{t}");

    // Attach both to instance A; wait for in-use as scripts do.
    let att = ep.aws_json(&[
        "ec2",
        "attach-volume",
        "--volume-id",
        &web,
        "--instance-id",
        INSTANCE_A,
        "--device",
        "/dev/sdf",
    ]);
    assert_eq!(att["State"], "attaching");
    assert_eq!(att["Device"], "/dev/sdf");
    ep.aws_json(&[
        "ec2",
        "attach-volume",
        "--volume-id",
        &db,
        "--instance-id",
        INSTANCE_A,
        "--device",
        "/dev/sdg",
    ]);
    ep.aws_json(&["ec2", "wait", "volume-in-use", "--volume-ids", &web, &db]);
    let v = describe_one(&ep, &web);
    assert_eq!(v["State"], "in-use");
    assert_eq!(v["Attachments"][0]["InstanceId"], INSTANCE_A);
    assert_eq!(v["Attachments"][0]["State"], "attached");
    assert_eq!(v["Attachments"][0]["DeleteOnTermination"], false);

    // The NBD URI from the tag works with real clients.
    let uri = tag(&v, "volumed:nbd-uri").expect("nbd-uri tag");
    assert_eq!(uri, ep.daemon.uri(&web));
    let info = nbdinfo_json(&uri);
    assert_eq!(info["exports"][0]["export-size"], 1u64 << 30);
    qemu_io(&uri, &["write -P 0xab 0 1M", "write -P 0xcd 512M 64k"]);
    let img =
        run_ok(Command::new("qemu-img").args(["info", "-f", "raw", "--output", "json", &uri]));
    assert!(img.contains("\"virtual-size\": 1073741824"), "{img}");

    // Each filter selects what it should.
    let both = sorted(vec![&web, &db]);
    assert_eq!(ids(&ep, &["--filters", "Name=status,Values=in-use"]), both);
    assert_eq!(
        ids(&ep, &["--filters", &format!("Name=volume-id,Values={web}")]),
        [web.as_str()]
    );
    assert_eq!(ids(&ep, &["--filters", "Name=size,Values=1"]), both);
    assert_eq!(
        ids(&ep, &["--filters", "Name=size,Values=2"]),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(&ep, &["--filters", "Name=tag:team,Values=b"]),
        [db.as_str()]
    );
    assert_eq!(
        ids(&ep, &["--filters", "Name=tag:Name,Values=w*"]),
        [web.as_str()]
    );
    assert_eq!(
        ids(&ep, &["--filters", "Name=tag-key,Values=tier"]),
        [db.as_str()]
    );
    assert_eq!(
        ids(
            &ep,
            &[
                "--filters",
                &format!("Name=attachment.instance-id,Values={INSTANCE_A}")
            ]
        ),
        both
    );
    assert_eq!(
        ids(
            &ep,
            &["--filters", "Name=attachment.status,Values=attached"]
        ),
        both
    );
    assert_eq!(
        ids(
            &ep,
            &[
                "--filters",
                "Name=attachment.delete-on-termination,Values=true"
            ]
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(
            &ep,
            &[
                "--filters",
                "Name=status,Values=in-use",
                "Name=tag:team,Values=a"
            ]
        ),
        [web.as_str()],
        "filters AND"
    );
    // The same names work for vol list --filter.
    let l = ep.daemon.vol_json(&[
        "list",
        "--filter",
        "tag:team=b",
        "--filter",
        "status=in-use",
    ]);
    assert_eq!(l.as_array().unwrap().len(), 1);
    assert_eq!(l[0]["volume_id"], db.as_str());

    // Snapshot, wait for it, restore it into a new volume with equal bytes.
    let snap = ep.aws_json(&[
        "ec2",
        "create-snapshot",
        "--volume-id",
        &web,
        "--description",
        "nightly",
        "--tag-specifications",
        "ResourceType=snapshot,Tags=[{Key=kind,Value=nightly}]",
    ]);
    let snap_id = snap["SnapshotId"].as_str().unwrap().to_owned();
    assert_eq!(snap_id.len(), 22, "{snap_id}");
    ep.aws_json(&[
        "ec2",
        "wait",
        "snapshot-completed",
        "--snapshot-ids",
        &snap_id,
    ]);
    let s = ep.aws_json(&["ec2", "describe-snapshots", "--owner-ids", "self"]);
    let s = s["Snapshots"].as_array().unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0]["SnapshotId"], snap_id.as_str());
    assert_eq!(s[0]["VolumeId"], web.as_str());
    assert_eq!(s[0]["State"], "completed");
    assert_eq!(s[0]["Description"], "nightly");
    assert_eq!(tag(&s[0], "kind").as_deref(), Some("nightly"));
    let none = ep.aws_json(&["ec2", "describe-snapshots", "--owner-ids", "amazon"]);
    assert!(none["Snapshots"].as_array().unwrap().is_empty());
    let f = ep.aws_json(&[
        "ec2",
        "describe-snapshots",
        "--filters",
        &format!("Name=volume-id,Values={web}"),
        "Name=status,Values=completed",
    ]);
    assert_eq!(f["Snapshots"].as_array().unwrap().len(), 1);

    let restored = create(&ep, &["--snapshot-id", &snap_id]);
    assert_eq!(describe_one(&ep, &restored)["SnapshotId"], snap_id.as_str());
    ep.aws_json(&[
        "ec2",
        "attach-volume",
        "--volume-id",
        &restored,
        "--instance-id",
        INSTANCE_B,
        "--device",
        "/dev/sdf",
    ]);
    let r_uri = tag(&describe_one(&ep, &restored), "volumed:nbd-uri").unwrap();
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &uri, &r_uri]));

    // Mark web DeleteOnTermination; terminating A deletes exactly web and
    // detaches db.
    ep.aws_json(&[
        "ec2",
        "modify-instance-attribute",
        "--instance-id",
        INSTANCE_A,
        "--block-device-mappings",
        r#"[{"DeviceName":"/dev/sdf","Ebs":{"DeleteOnTermination":true}}]"#,
    ]);
    assert_eq!(
        describe_one(&ep, &web)["Attachments"][0]["DeleteOnTermination"],
        true
    );
    assert_eq!(
        ids(
            &ep,
            &[
                "--filters",
                "Name=attachment.delete-on-termination,Values=true"
            ]
        ),
        [web.as_str()]
    );
    let t = ep.aws_json(&["ec2", "terminate-instances", "--instance-ids", INSTANCE_A]);
    assert_eq!(t["TerminatingInstances"][0]["InstanceId"], INSTANCE_A);
    assert_eq!(ids(&ep, &[]), sorted(vec![&db, &restored]));
    assert_eq!(describe_one(&ep, &db)["State"], "available");
    assert!(ep.daemon.vol(&["inspect", &web]).status.code() != Some(0));

    // Detach, delete, delete the snapshot.
    let d = ep.aws_json(&["ec2", "detach-volume", "--volume-id", &restored]);
    assert_eq!(d["State"], "detaching");
    ep.aws_json(&["ec2", "wait", "volume-available", "--volume-ids", &restored]);
    ep.aws_json(&["ec2", "delete-volume", "--volume-id", &restored]);
    ep.aws_json(&["ec2", "delete-volume", "--volume-id", &db]);
    ep.aws_json(&["ec2", "delete-snapshot", "--snapshot-id", &snap_id]);
    assert!(ids(&ep, &[]).is_empty());
    let s = ep.aws_json(&["ec2", "describe-snapshots", "--owner-ids", "self"]);
    assert!(s["Snapshots"].as_array().unwrap().is_empty());
    ep.daemon.finish();
}

#[test]
fn volumes_made_with_vol_are_visible_with_their_ids_and_tags() {
    let ep = AwsEndpoint::start();
    ep.daemon.vol_ok(&[
        "create",
        "data",
        "--size",
        "64M",
        "--tag",
        "env=dev",
        "--tag",
        "Name=data",
    ]);
    let v = ep.daemon.vol_json(&["inspect", "data"]);
    let id = v["volume_id"].as_str().unwrap().to_owned();
    assert_eq!(v["tags"]["env"], "dev");
    let d = describe_one(&ep, &id);
    assert_eq!(d["Size"], 1, "64 MiB rounds up to 1 GiB");
    assert_eq!(tag(&d, "env").as_deref(), Some("dev"));
    ep.daemon.vol_ok(&["tag", "data", "env=prod", "owner=me"]);
    ep.daemon.vol_ok(&["untag", "data", "Name"]);
    let v = ep.daemon.vol_json(&["inspect", "data"]);
    assert_eq!(v["tags"], serde_json::json!({"env": "prod", "owner": "me"}));
    assert_eq!(v["attachment"], Value::Null);
    ep.daemon
        .vol_ok(&["attach", "data", "--instance", INSTANCE_B]);
    let v = ep.daemon.vol_json(&["inspect", "data"]);
    assert_eq!(v["attachment"]["instance"], INSTANCE_B);
    assert_eq!(v["attachment"]["delete_on_termination"], false);
    assert_eq!(
        ep.daemon
            .vol_json(&["list", "--filter", "attachment.status=attached"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        ep.daemon
            .vol_json(&["list", "--filter", "tag:env=dev"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // Bad tags and filters: one line, nothing changed.
    let e = ep.daemon.vol_err(&["tag", "data", "volumed:nbd-uri=x"]);
    assert!(e.contains("reserved"), "{e}");
    let e = ep.daemon.vol_err(&["list", "--filter", "colour=red"]);
    assert!(e.contains("unknown filter"), "{e}");
    let e = ep
        .daemon
        .vol_err(&["create", "more", "--size", "1M", "--tag", "aws:x=1"]);
    assert!(e.contains("reserved"), "{e}");
    assert!(ep.daemon.vol(&["inspect", "more"]).status.code() != Some(0));
    assert_eq!(
        ep.daemon.vol_json(&["inspect", "data"])["tags"]["env"],
        "prod"
    );
    ep.daemon.vol_ok(&["detach", "data"]);
    ep.daemon.finish();
}

#[test]
fn bad_input_gets_ec2_errors_and_changes_nothing() {
    let ep = AwsEndpoint::start();
    let id = create(&ep, &[]);
    ep.aws_json(&[
        "ec2",
        "attach-volume",
        "--volume-id",
        &id,
        "--instance-id",
        INSTANCE_A,
        "--device",
        "/dev/sdf",
    ]);
    let before = ep.daemon.vol_json(&["inspect", &id]);

    let cases: &[(&str, &str)] = &[
        ("Action=LaunchRockets&Version=2016-11-15", "InvalidAction"),
        ("Version=2016-11-15", "MissingParameter"),
        (
            "Action=AttachVolume&Version=2016-11-15&VolumeId=VOL",
            "MissingParameter",
        ),
        ("Action=CreateVolume&Version=2016-11-15", "MissingParameter"),
        (
            "Action=CreateVolume&Version=2016-11-15&Size=0",
            "InvalidParameterValue",
        ),
        (
            "Action=CreateVolume&Version=2016-11-15&Size=ten",
            "InvalidParameterValue",
        ),
        (
            "Action=CreateVolume&Version=2016-11-15&Size=1&VolumeType=floppy",
            "InvalidParameterValue",
        ),
        (
            "Action=CreateVolume&Version=2016-11-15&Size=1&Colour=red",
            "UnknownParameter",
        ),
        (
            "Action=CreateVolume&Version=2016-11-15&SnapshotId=snap-00000000000000000",
            "InvalidSnapshot.NotFound",
        ),
        (
            "Action=CreateVolume&Version=2016-11-15&SnapshotId=snap-NOPE",
            "InvalidSnapshotID.Malformed",
        ),
        (
            "Action=DescribeVolumes&Version=2016-11-15&VolumeId.1=vol-nope",
            "InvalidVolumeID.Malformed",
        ),
        (
            "Action=DescribeVolumes&Version=2016-11-15&VolumeId.1=vol-00000000000000000",
            "InvalidVolume.NotFound",
        ),
        (
            "Action=DescribeVolumes&Version=2016-11-15&Filter.1.Name=colour&Filter.1.Value.1=red",
            "InvalidParameterValue",
        ),
        (
            "Action=DescribeVolumes&Version=2016-11-15&MaxResults=1",
            "InvalidParameterValue",
        ),
        (
            "Action=DescribeVolumes&Version=2016-11-15&NextToken=",
            "InvalidParameterValue",
        ),
        (
            "Action=DescribeVolumes&Version=2009-01-01",
            "InvalidParameterValue",
        ),
        (
            "Action=DeleteVolume&Version=2016-11-15&VolumeId=VOL",
            "VolumeInUse",
        ),
        (
            "Action=AttachVolume&Version=2016-11-15&VolumeId=VOL&InstanceId=i-0fedcba9876543210&Device=/dev/sdh",
            "VolumeInUse",
        ),
        (
            "Action=AttachVolume&Version=2016-11-15&VolumeId=VOL&InstanceId=instance-1&Device=/dev/sdh",
            "InvalidInstanceID.Malformed",
        ),
        (
            "Action=DetachVolume&Version=2016-11-15&VolumeId=VOL&InstanceId=i-0fedcba9876543210",
            "InvalidAttachment.NotFound",
        ),
        (
            "Action=ModifyVolume&Version=2016-11-15&VolumeId=VOL&Size=0",
            "InvalidParameterValue",
        ),
        (
            "Action=CreateTags&Version=2016-11-15&ResourceId.1=VOL&ResourceId.2=vol-00000000000000000&Tag.1.Key=k&Tag.1.Value=v",
            "InvalidVolume.NotFound",
        ),
        (
            "Action=CreateTags&Version=2016-11-15&ResourceId.1=VOL&Tag.1.Key=volumed:nbd-uri&Tag.1.Value=v",
            "InvalidParameterValue",
        ),
        (
            "Action=CreateTags&Version=2016-11-15&ResourceId.1=i-0123456789abcdef0&Tag.1.Key=k",
            "InvalidInstanceID.NotFound",
        ),
        (
            "Action=CreateTags&Version=2016-11-15&ResourceId.1=eni-0123456789abcdef0&Tag.1.Key=k",
            "InvalidID",
        ),
        (
            "Action=CreateSnapshot&Version=2016-11-15&VolumeId=vol-00000000000000000",
            "InvalidVolume.NotFound",
        ),
        (
            "Action=DeleteSnapshot&Version=2016-11-15&SnapshotId=snap-00000000000000000",
            "InvalidSnapshot.NotFound",
        ),
        (
            "Action=TerminateInstances&Version=2016-11-15&InstanceId.1=i-0123456789abcdef0&InstanceId.2=i-00000000000000000",
            "InvalidInstanceID.NotFound",
        ),
        (
            "Action=ModifyInstanceAttribute&Version=2016-11-15&InstanceId=i-0123456789abcdef0&BlockDeviceMapping.1.DeviceName=/dev/sdz&BlockDeviceMapping.1.Ebs.DeleteOnTermination=true",
            "InvalidInstanceAttributeValue",
        ),
        (
            "Action=ModifyInstanceAttribute&Version=2016-11-15&InstanceId=i-0123456789abcdef0&DisableApiTermination.Value=true",
            "UnknownParameter",
        ),
        (
            "Action=DescribeVolumes&Version=2016-11-15&DryRun=true",
            "DryRunOperation",
        ),
    ];
    for (form, code) in cases {
        let form = form.replace("VOL", &id);
        let (status, body) = ep.ec2_raw(&form);
        assert_eq!(ec2_code(&body), *code, "{form}: {status} {body}");
        assert!(status >= 400, "{form}: {status}");
        assert!(body.contains("<RequestID>"), "{body}");
    }
    // The CLI sees the same codes.
    let e = ep.aws_err(&[
        "ec2",
        "detach-volume",
        "--volume-id",
        "vol-00000000000000000",
    ]);
    assert!(e.contains("InvalidVolume.NotFound"), "{e}");
    let e = ep.aws_err(&["ec2", "modify-volume", "--volume-id", &id, "--size", "0"]);
    assert!(e.contains("InvalidParameterValue"), "{e}");

    // Nothing changed: same volume, same attachment, no tags, only it.
    let after = ep.daemon.vol_json(&["inspect", &id]);
    assert_eq!(after["attachment"], before["attachment"]);
    assert_eq!(after["tags"], before["tags"]);
    assert_eq!(after["size"], before["size"]);
    assert_eq!(ids(&ep, &[]), [id.as_str()]);
    ep.aws_json(&["ec2", "detach-volume", "--volume-id", &id]);
    let (_, body) = ep.ec2_raw(&format!(
        "Action=DetachVolume&Version=2016-11-15&VolumeId={id}"
    ));
    assert_eq!(ec2_code(&body), "IncorrectState", "{body}");
    ep.daemon.finish();
}

#[test]
fn boto3_paginators_see_every_volume_exactly_once() {
    let ep = AwsEndpoint::start();
    let out = ep.python(
        r#"
ec2 = boto3.client("ec2")
made = set()
for i in range(250):
    made.add(ec2.create_volume(Size=1, AvailabilityZone="us-east-1a",
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "n", "Value": str(i)}]}])["VolumeId"])
assert len(made) == 250
for size in (7, 100, 500):
    seen = []
    pages = 0
    for page in ec2.get_paginator("describe_volumes").paginate(PaginationConfig={"PageSize": size}):
        pages += 1
        seen.extend(v["VolumeId"] for v in page["Volumes"])
    assert sorted(seen) == sorted(made), (size, len(seen))
    assert len(seen) == len(set(seen)), size
    assert pages == -(-250 // size), (size, pages)
seen = []
for page in ec2.get_paginator("describe_tags").paginate(PaginationConfig={"PageSize": 60}):
    seen.extend(t["ResourceId"] for t in page["Tags"])
assert sorted(seen) == sorted(made)
odd = [v["VolumeId"] for p in ec2.get_paginator("describe_volumes").paginate(
    Filters=[{"Name": "tag:n", "Values": ["1?"]}], PaginationConfig={"PageSize": 5}) for v in p["Volumes"]]
assert len(odd) == 10, odd
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
    ep.daemon.finish();
}
