//! Instances laid out from images, driven by the real `aws` CLI and boto3
//! (their waiters included) and by `vol`: the root's bytes equal its
//! snapshot at once (coldsnap and qemu read them), instance-store devices
//! of the table's size that come back empty after a stop, the
//! DeleteOnTermination defaults, launch overrides, terminate deleting
//! exactly the right volumes, a crash in the middle of a launch, and bad
//! launches refused with EC2's codes and nothing changed.

use std::process::Command;

use serde_json::{Value, json};
use volumed_tests::aws::{AwsEndpoint, ec2_code};
use volumed_tests::snapkit::fill_random;
use volumed_tests::{TestDaemon, nbd_py, run_ok};

/// A 1 GiB volume with 8 MiB of random data at its start, snapshotted
/// (through EC2); returns the snapshot id.
fn root_snapshot(ep: &AwsEndpoint) -> String {
    let d = &ep.daemon;
    d.vol_ok(&["create", "golden", "--size", "1G"]);
    d.vol_ok(&["attach", "golden"]);
    fill_random(d, "golden", 8);
    d.vol_ok(&["detach", "golden"]);
    let vid = d.vol_json(&["inspect", "golden"])["volume_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let s = ep.aws_json(&["ec2", "create-snapshot", "--volume-id", &vid]);
    let id = s["SnapshotId"].as_str().unwrap().to_owned();
    ep.aws_json(&["ec2", "wait", "snapshot-completed", "--snapshot-ids", &id]);
    id
}

fn register(ep: &AwsEndpoint, name: &str, snap: &str) -> String {
    let bdm = json!([
        {"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap}},
        {"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"},
    ]);
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
    let id = r["ImageId"].as_str().unwrap().to_owned();
    ep.aws_json(&["ec2", "wait", "image-available", "--image-ids", &id]);
    id
}

fn describe(ep: &AwsEndpoint, id: &str) -> Value {
    let r = ep.aws_json(&["ec2", "describe-instances", "--instance-ids", id]);
    r["Reservations"][0]["Instances"][0].clone()
}

/// Device name -> (volume id, DeleteOnTermination) of an instance's EBS
/// devices as DescribeInstances shows them.
fn ebs_devices(i: &Value) -> Vec<(String, String, bool)> {
    i["BlockDeviceMappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["DeviceName"].as_str().unwrap().to_owned(),
                m["Ebs"]["VolumeId"].as_str().unwrap().to_owned(),
                m["Ebs"]["DeleteOnTermination"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn volume_names(d: &TestDaemon) -> Vec<String> {
    let mut v = d.volume_names();
    v.sort();
    v
}

/// The instance-store volume of `instance`'s `ephemeralN`.
fn store_volume(instance: &str, n: u32) -> String {
    format!("{instance}-ephemeral{n}")
}

fn sha256_of_file(p: &std::path::Path, len: u64) -> String {
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("head -c {len} '{}' | sha256sum", p.display())),
    );
    out.split_whitespace().next().unwrap().to_owned()
}

#[test]
fn launch_stop_start_and_terminate() {
    let ep = AwsEndpoint::start();
    let d = &ep.daemon;
    let snap = root_snapshot(&ep);
    let ami = register(&ep, "web image", &snap);

    let r = ep.aws_json(&[
        "ec2",
        "run-instances",
        "--image-id",
        &ami,
        "--instance-type",
        "m5d.large",
        "--count",
        "1",
        "--tag-specifications",
        "ResourceType=instance,Tags=[{Key=Name,Value=web}]",
    ]);
    let id = r["Instances"][0]["InstanceId"].as_str().unwrap().to_owned();
    assert_eq!(r["Instances"][0]["State"]["Name"], "pending");
    ep.aws_json(&["ec2", "wait", "instance-running", "--instance-ids", &id]);
    let i = describe(&ep, &id);
    assert_eq!(i["State"], json!({"Code": 16, "Name": "running"}));
    assert_eq!(i["InstanceType"], "m5d.large");
    assert_eq!(i["RootDeviceName"], "/dev/sda1");
    assert_eq!(i["Tags"], json!([{"Key": "Name", "Value": "web"}]));
    // EBS devices only, as EC2 shows them; the root deleted on termination.
    let devs = ebs_devices(&i);
    assert_eq!(devs.len(), 1, "{i}");
    let (dev, root, dot) = &devs[0];
    assert_eq!((dev.as_str(), *dot), ("/dev/sda1", true));

    // The root reads as its snapshot at once: coldsnap's copy of the
    // snapshot and qemu-img's read of the root's NBD export agree.
    let dir = tempfile::tempdir().unwrap();
    let want = dir.path().join("snap.img");
    let down = ep.coldsnap(&["download", "--no-progress", &snap, want.to_str().unwrap()]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let got = dir.path().join("root.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(d.uri(root))
            .arg(&got),
    );
    assert_eq!(
        sha256_of_file(&want, 1 << 30),
        sha256_of_file(&got, 1 << 30)
    );

    // The instance-store device: the type's size (m5d.large: 75 GiB), not
    // an EBS volume.
    let eph = store_volume(&id, 0);
    let v = d.vol_json(&["inspect", &eph]);
    assert_eq!(v["size"], 75u64 << 30);
    assert_eq!(v["ephemeral"], true);
    let listed = ep.aws_json(&["ec2", "describe-volumes"]);
    let ids: Vec<&str> = listed["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["VolumeId"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&root.as_str()) && !ids.contains(&eph.as_str()),
        "{ids:?}"
    );
    let rv = ep.aws_json(&["ec2", "describe-volumes", "--volume-ids", root]);
    assert_eq!(
        rv["Volumes"][0]["Attachments"][0]["InstanceId"],
        id.as_str()
    );
    assert_eq!(
        rv["Volumes"][0]["Attachments"][0]["DeleteOnTermination"],
        true
    );

    // A data volume attached after launch: DeleteOnTermination false.
    let data = ep.aws_json(&["ec2", "create-volume", "--size", "1"]);
    let data = data["VolumeId"].as_str().unwrap().to_owned();
    ep.aws_json(&[
        "ec2",
        "attach-volume",
        "--volume-id",
        &data,
        "--instance-id",
        &id,
        "--device",
        "/dev/sdf",
    ]);
    let devs = ebs_devices(&describe(&ep, &id));
    assert!(
        devs.contains(&("/dev/sdf".into(), data.clone(), false)),
        "{devs:?}"
    );

    // boto3 and its waiters: data on the root and the instance store, a
    // stop (instance store discarded), a start (it comes back empty).
    nbd_py(
        &d.uri(root),
        "h = nbd.NBD(); h.connect_uri(URI); h.pwrite(b'R' * 4096, 1 << 29); h.flush()",
    );
    nbd_py(
        &d.uri(&eph),
        "h = nbd.NBD(); h.connect_uri(URI); h.pwrite(b'E' * 4096, 0); h.flush()",
    );
    let out = ep.python(&format!(
        r#"
ec2 = boto3.client("ec2")
ec2.stop_instances(InstanceIds=["{id}"])
ec2.get_waiter("instance_stopped").wait(InstanceIds=["{id}"], WaiterConfig={{"Delay": 1}})
print(ec2.describe_instances(InstanceIds=["{id}"])["Reservations"][0]["Instances"][0]["State"]["Name"])
ec2.start_instances(InstanceIds=["{id}"])
ec2.get_waiter("instance_running").wait(InstanceIds=["{id}"], WaiterConfig={{"Delay": 1}})
ec2.reboot_instances(InstanceIds=["{id}"])
print(ec2.describe_instances(InstanceIds=["{id}"])["Reservations"][0]["Instances"][0]["State"]["Name"])
"#
    ));
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["stopped", "running"]
    );
    let read = |uri: &str, off: u64| {
        nbd_py(
            uri,
            &format!(
                "h = nbd.NBD(); h.connect_uri(URI); sys.stdout.write(h.pread(4096, {off}).hex())"
            ),
        )
    };
    assert_eq!(
        read(&d.uri(&eph), 0),
        "00".repeat(4096),
        "instance store comes back empty"
    );
    assert_eq!(
        read(&d.uri(root), 1 << 29),
        "52".repeat(4096),
        "the root keeps its data"
    );

    // Terminate: the root (DeleteOnTermination) and the instance store go;
    // the data volume attached later stays, available.
    let before = volume_names(d);
    ep.python(&format!(
        r#"
ec2 = boto3.client("ec2")
ec2.terminate_instances(InstanceIds=["{id}"])
ec2.get_waiter("instance_terminated").wait(InstanceIds=["{id}"], WaiterConfig={{"Delay": 1}})
"#
    ));
    let after = volume_names(d);
    let gone: Vec<&String> = before.iter().filter(|v| !after.contains(v)).collect();
    let mut want_gone = [root.clone(), eph.clone()];
    want_gone.sort();
    assert_eq!(gone, want_gone.iter().collect::<Vec<_>>());
    let dv = ep.aws_json(&["ec2", "describe-volumes", "--volume-ids", &data]);
    assert_eq!(dv["Volumes"][0]["State"], "available");
    // Still listed for an hour, terminated.
    let i = describe(&ep, &id);
    assert_eq!(i["State"], json!({"Code": 48, "Name": "terminated"}));
    d.vol_ok(&["delete", &data]);
    ep.daemon.assert_log_clean(&[], &[]);
}

#[test]
fn launch_overrides_merge_by_device() {
    let ep = AwsEndpoint::start();
    let d = &ep.daemon;
    let snap = root_snapshot(&ep);
    let ami = register(&ep, "base", &snap);
    let image_before = ep.aws_json(&["ec2", "describe-images", "--image-ids", &ami]);
    let bdm = json!([
        {"DeviceName": "/dev/sdb", "NoDevice": ""},
        {"DeviceName": "/dev/sdf", "Ebs": {"VolumeSize": 2}},
        {"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 3, "DeleteOnTermination": false}},
    ]);
    let r = ep.aws_json(&[
        "ec2",
        "run-instances",
        "--image-id",
        &ami,
        "--instance-type",
        "m5d.large",
        "--count",
        "1",
        "--block-device-mappings",
        &bdm.to_string(),
    ]);
    let id = r["Instances"][0]["InstanceId"].as_str().unwrap().to_owned();
    ep.aws_json(&["ec2", "wait", "instance-running", "--instance-ids", &id]);
    let devs = ebs_devices(&describe(&ep, &id));
    assert_eq!(devs.len(), 2, "{devs:?}");
    let root = devs.iter().find(|d| d.0 == "/dev/sda1").unwrap();
    let new = devs.iter().find(|d| d.0 == "/dev/sdf").unwrap();
    assert!(!root.2, "the launch's DeleteOnTermination wins");
    assert!(new.2, "a volume added at launch is deleted on termination");
    assert_eq!(d.vol_json(&["inspect", &root.1])["size"], 3u64 << 30);
    assert_eq!(d.vol_json(&["inspect", &new.1])["size"], 2u64 << 30);
    assert!(
        d.vol(&["inspect", &store_volume(&id, 0)]).status.code() != Some(0),
        "NoDevice dropped the instance store"
    );
    let image_after = ep.aws_json(&["ec2", "describe-images", "--image-ids", &ami]);
    assert_eq!(
        image_before, image_after,
        "a launch never changes its image"
    );

    // `vol instance inspect --qemu` boots the root: qemu-io reads it
    // through the -blockdev options it prints.
    let qemu = d.vol_ok(&["instance", "inspect", "--qemu", &id]);
    let root_opts = qemu
        .lines()
        .find(|l| l.starts_with("-blockdev ") && l.contains("node-name=sda1"))
        .unwrap()
        .trim_start_matches("-blockdev ")
        .to_owned();
    assert!(root_opts.contains("reconnect-delay="), "{root_opts}");
    let out =
        run_ok(Command::new("qemu-io").args(["--image-opts", &root_opts, "-c", "read -v 0 16"]));
    let first = nbd_py(
        &d.uri(&root.1),
        "h = nbd.NBD(); h.connect_uri(URI); sys.stdout.write(h.pread(16, 0).hex())",
    );
    let shown: String = out
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .take(16)
        .collect();
    assert_eq!(shown, first);
    let xml = d.vol_ok(&["instance", "inspect", "--libvirt", &id]);
    let parsed = run_ok(Command::new("python3").arg("-c").arg(
        "import sys, xml.etree.ElementTree as E; r = E.fromstring('<disks>' + sys.argv[1] + '</disks>'); print(len(r.findall('disk/source/reconnect')), r.find('disk/target').get('dev'))",
    ).arg(&xml));
    assert_eq!(parsed.trim(), "2 sda", "{xml}");

    // vol sees the same instance; terminate through vol.
    let listed = d.vol_json(&["instance", "list"]);
    assert_eq!(listed[0]["id"], id.as_str());
    d.vol_ok(&["instance", "terminate", &id]);
    let names = volume_names(d);
    assert!(
        names.contains(&root.1),
        "root kept: DeleteOnTermination false"
    );
    assert!(!names.contains(&new.1));
    d.vol_ok(&["delete", &root.1]);
    ep.daemon.assert_log_clean(&[], &[]);
}

#[test]
fn bad_launches_change_nothing() {
    let ep = AwsEndpoint::start();
    let d = &ep.daemon;
    // A 2 GiB root snapshot, so a 1 GiB root is a shrink.
    d.vol_ok(&["create", "big", "--size", "2G"]);
    let s = d.vol_json(&["snapshot", "create", "big", "--wait"]);
    let snap = s["id"].as_str().unwrap().to_owned();
    let ami = register(&ep, "big", &snap);
    let volumes = volume_names(d);
    let code = |args: &[&str]| {
        let mut full = vec!["ec2"];
        full.extend_from_slice(args);
        let err = ep.aws_err(&full);
        assert_eq!(volume_names(d), volumes, "{args:?} changed the volumes");
        assert!(
            d.vol_json(&["instance", "list"])
                .as_array()
                .unwrap()
                .is_empty()
        );
        err
    };
    let run = |extra: &[&str]| {
        let mut a = vec!["run-instances", "--count", "1"];
        a.extend_from_slice(extra);
        code(&a)
    };
    let e = run(&["--image-id", "ami-0123456789abcdef0"]);
    assert!(e.contains("InvalidAMIID.NotFound"), "{e}");
    let e = run(&["--image-id", "ami-nope"]);
    assert!(e.contains("InvalidAMIID.Malformed"), "{e}");
    let e = run(&["--image-id", &ami, "--instance-type", "x9.huge"]);
    assert!(e.contains("InvalidParameterValue"), "{e}");
    let e = run(&[
        "--image-id",
        &ami,
        "--block-device-mappings",
        r#"[{"DeviceName":"/dev/sda1","Ebs":{"VolumeSize":1}}]"#,
    ]);
    assert!(
        e.contains("InvalidBlockDeviceMapping") && e.contains("smaller than snapshot"),
        "{e}"
    );
    let e = run(&[
        "--image-id",
        &ami,
        "--block-device-mappings",
        r#"[{"DeviceName":"/dev/sdc","VirtualName":"ephemeral0","Ebs":{"VolumeSize":1}}]"#,
    ]);
    assert!(e.contains("InvalidBlockDeviceMapping"), "{e}");
    let e = run(&[
        "--image-id",
        &ami,
        "--block-device-mappings",
        r#"[{"DeviceName":"bogus","Ebs":{"VolumeSize":1}}]"#,
    ]);
    assert!(e.contains("InvalidBlockDeviceMapping"), "{e}");
    let e = run(&[
        "--image-id",
        &ami,
        "--block-device-mappings",
        r#"[{"DeviceName":"/dev/sdg","Ebs":{}}]"#,
    ]);
    assert!(e.contains("InvalidBlockDeviceMapping"), "{e}");
    let e = run(&[
        "--image-id",
        &ami,
        "--block-device-mappings",
        r#"[{"DeviceName":"/dev/sda1","NoDevice":""}]"#,
    ]);
    assert!(e.contains("InvalidBlockDeviceMapping"), "{e}");
    let (status, body) = ep.ec2_raw(&format!(
        "Action=RunInstances&Version=2016-11-15&ImageId={ami}&MinCount=3&MaxCount=2"
    ));
    assert_eq!(
        (status, ec2_code(&body)),
        (400, "InvalidParameterValue"),
        "{body}"
    );
    let e = code(&["stop-instances", "--instance-ids", "i-0123456789abcdef0"]);
    assert!(e.contains("InvalidInstanceID.NotFound"), "{e}");
    let e = code(&["start-instances", "--instance-ids", "i-bad"]);
    assert!(e.contains("InvalidInstanceID.Malformed"), "{e}");
    ep.daemon.assert_log_clean(&[], &["launch failed"]);
}

#[test]
fn a_crash_between_two_volume_creations_leaves_no_orphan() {
    let mut d = TestDaemon::start();
    d.vol_ok(&["create", "golden", "--size", "64M"]);
    let s = d.vol_json(&["snapshot", "create", "golden", "--wait"]);
    let snap = s["id"].as_str().unwrap().to_owned();
    let root = format!("/dev/sda1={snap}");
    let ami = d.vol_ok(&[
        "image",
        "register",
        "golden",
        "--root",
        &root,
        "-b",
        "/dev/sdb=ephemeral0",
        "-b",
        "/dev/sdf=:1",
    ]);
    let ami = ami.trim().to_owned();
    let volumes = volume_names(&d);
    let dirs = d.volume_dirs().len();
    d.set_env(&[("VOLUMED_FAILPOINTS", "launch-after-volume")]);
    d.restart();
    let out = d.vol(&["instance", "run", &ami, "--type", "m5d.large"]);
    assert!(!out.status.success());
    assert!(
        !d.wait_exit().success(),
        "the failpoint kills the daemon after the first volume"
    );
    assert!(
        d.volume_dirs().len() > dirs,
        "the first volume was made before the crash"
    );
    d.set_env(&[]);
    d.start_again();
    let t = std::time::Instant::now();
    while volume_names(&d) != volumes || d.volume_dirs().len() != dirs {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "the launch's volumes remain: {:?}",
            volume_names(&d)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        d.vol_json(&["instance", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    // The launch works once the daemon is whole.
    let id = d.vol_ok(&["instance", "run", &ami, "--type", "m5d.large"]);
    let i = d.vol_json(&["instance", "inspect", id.trim()]);
    assert_eq!(i["state"], "running");
    assert_eq!(i["devices"].as_array().unwrap().len(), 3);
    d.finish_expecting(
        &[],
        &[
            "failpoint reached",
            "previous run did not shut down cleanly",
            // The second launch's root may finish hydrating as the daemon
            // stops; the stop cancels the hold's release, retried at start.
            "could not release the store hold; will retry at next start",
        ],
    );
}
