//! EC2 VM import tasks with the real `aws` CLI and boto3 against the real
//! daemon, the images in a real S3 server (SeaweedFS) put there with
//! `aws s3 cp`: ImportSnapshot of VMDK, VHD, RAW, VHDX and QCOW2 restored
//! by CreateVolume and compared with `qemu-img convert -O raw`; Progress
//! and the absent SnapshotId while active; ClientToken; hostile images and
//! a missing key ending `deleted` with nothing left; cancel; a restart in
//! the middle; ImportImage of a two-disk OVA.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use volumed_tests::aws::{AwsEndpoint, aws_bin, client_env, ec2_code};
use volumed_tests::pki::Pki;
use volumed_tests::run_ok;
use volumed_tests::s3::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY};

const MIB: u64 = 1 << 20;
const INSTANCE: &str = "i-0123456789abcdef0";

/// An S3 server, and the daemon's endpoint reading its buckets.
struct Setup {
    ep: AwsEndpoint,
    s3: S3Server,
    dir: tempfile::TempDir,
    /// Restored volumes attached so far: each gets the next device.
    attached: std::cell::Cell<u8>,
}

fn setup(extra: &[(&str, &str)]) -> Setup {
    let s3 = S3Server::start();
    let endpoint = s3.endpoint();
    let mut env = vec![
        ("VOLUMED_TASKS_S3_ENDPOINT", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", "us-east-1"),
    ];
    env.extend_from_slice(extra);
    Setup {
        ep: AwsEndpoint::start_with_env(&env),
        s3,
        dir: tempfile::tempdir().unwrap(),
        attached: std::cell::Cell::new(0),
    }
}

impl Setup {
    /// `aws s3 cp FILE s3://volumed/KEY`, as a user puts an image.
    fn put(&self, file: &Path, key: &str) {
        let mut cmd = Command::new(aws_bin());
        client_env(&mut cmd, &self.s3.endpoint());
        cmd.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .args(["s3", "cp", "--only-show-errors"])
            .arg(file)
            .arg(format!("s3://{BUCKET}/{key}"));
        run_ok(&mut cmd);
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `aws ec2 import-snapshot` of `s3://volumed/KEY`.
    fn import(&self, format: &str, key: &str, extra: &[&str]) -> Value {
        let container = format!("Format={format},UserBucket={{S3Bucket={BUCKET},S3Key={key}}}");
        let mut args = vec!["ec2", "import-snapshot", "--disk-container", &container];
        args.extend_from_slice(extra);
        self.ep.aws_json(&args)
    }

    /// `aws ec2 import-snapshot` of a URL.
    fn import_url(&self, format: &str, url: &str) -> Value {
        let container = format!("Format={format},Url={url}");
        self.ep
            .aws_json(&["ec2", "import-snapshot", "--disk-container", &container])
    }

    fn describe(&self, id: &str) -> Value {
        let v = self.ep.aws_json(&[
            "ec2",
            "describe-import-snapshot-tasks",
            "--import-task-ids",
            id,
        ]);
        v["ImportSnapshotTasks"][0].clone()
    }

    /// Polls until the task is `completed` or `deleted`.
    fn wait(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let t = self.describe(id);
            let status = t["SnapshotTaskDetail"]["Status"]
                .as_str()
                .unwrap()
                .to_owned();
            if status == "completed" || status == "deleted" {
                return t;
            }
            assert!(Instant::now() < deadline, "task did not end: {t}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A volume made by `create-volume --snapshot-id`, attached; its NBD URI.
    fn restore(&self, snap: &str) -> String {
        let v = self.ep.aws_json(&[
            "ec2",
            "create-volume",
            "--availability-zone",
            "us-east-1a",
            "--snapshot-id",
            snap,
        ]);
        let vol = v["VolumeId"].as_str().unwrap().to_owned();
        let n = self.attached.get();
        self.attached.set(n + 1);
        let device = format!("/dev/sd{}", char::from(b'f' + n));
        self.ep.aws_json(&[
            "ec2",
            "attach-volume",
            "--volume-id",
            &vol,
            "--instance-id",
            INSTANCE,
            "--device",
            &device,
        ]);
        let v = self
            .ep
            .aws_json(&["ec2", "describe-volumes", "--volume-ids", &vol]);
        v["Volumes"][0]["Tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["Key"] == "volumed:nbd-uri")
            .map(|t| t["Value"].as_str().unwrap().to_owned())
            .expect("nbd-uri tag")
    }

    fn snapshot_count(&self) -> usize {
        self.ep
            .daemon
            .vol_json(&["snapshot", "list"])
            .as_array()
            .unwrap()
            .len()
    }

    fn finish(self) {
        self.ep.daemon.finish();
    }
}

/// A sparse raw image with data, zero and hole regions, from `seed`.
fn make_raw(path: &Path, size: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..size / MIB {
        match next() % 4 {
            0 | 1 => {
                let buf: Vec<u8> = (0..MIB / 8).flat_map(|_| next().to_le_bytes()).collect();
                f.write_at(&buf, i * MIB).unwrap();
            }
            2 => f.write_at(&[7u8; 4096], i * MIB + 8192).map(drop).unwrap(),
            _ => {}
        }
    }
}

fn qemu_img(args: &[&str]) -> String {
    run_ok(Command::new("qemu-img").args(args))
}

fn convert(src: &Path, fmt: &str, opts: &[&str], dst: &Path) {
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
    args.extend_from_slice(opts);
    args.extend([src.to_str().unwrap(), dst.to_str().unwrap()]);
    qemu_img(&args);
}

/// `qemu-img compare` of the image (in its format) and an NBD URI.
fn assert_same(img: &Path, fmt: &str, uri: &str) {
    qemu_img(&[
        "compare",
        "-f",
        fmt,
        "-F",
        "raw",
        img.to_str().unwrap(),
        uri,
    ]);
}

fn task_snapshot(t: &Value) -> String {
    t["SnapshotTaskDetail"]["SnapshotId"]
        .as_str()
        .unwrap_or_else(|| panic!("no SnapshotId: {t}"))
        .to_owned()
}

#[test]
fn every_format_imports_to_a_snapshot_equal_to_qemu_convert() {
    let s = setup(&[]);
    let raw = s.path("disk.raw");
    make_raw(&raw, 40 * MIB, 5);
    let cases = [
        (
            "VMDK",
            "vmdk",
            "vmdk",
            vec!["-o", "subformat=streamOptimized"],
        ),
        ("VHD", "vpc", "vhd", vec![]),
        ("RAW", "raw", "raw", vec![]),
        ("VHDX", "vhdx", "vhdx", vec![]),
        ("QCOW2", "qcow2", "qcow2", vec![]),
    ];
    for (aws_fmt, qemu_fmt, ext, opts) in cases {
        let img = s.path(&format!("disk.{ext}"));
        if ext != "raw" {
            convert(&raw, qemu_fmt, &opts, &img);
        }
        let key = format!("images/disk.{ext}");
        s.put(&img, &key);
        let t = s.import(aws_fmt, &key, &["--description", "from a bucket"]);
        let id = t["ImportTaskId"].as_str().unwrap().to_owned();
        assert!(
            id.starts_with("import-snap-") && id.len() == 29,
            "{aws_fmt}: {id}"
        );
        assert_eq!(t["Description"], "from a bucket");
        assert_eq!(t["SnapshotTaskDetail"]["UserBucket"]["S3Key"], key.as_str());
        let done = s.wait(&id);
        assert_eq!(
            done["SnapshotTaskDetail"]["Status"], "completed",
            "{aws_fmt}: {done}"
        );
        assert!(
            done["SnapshotTaskDetail"].get("StatusMessage").is_none(),
            "{done}"
        );
        let size = std::fs::metadata(&img).unwrap().len() as f64;
        assert_eq!(done["SnapshotTaskDetail"]["DiskImageSize"], size);
        let snap = task_snapshot(&done);
        let d =
            s.ep.aws_json(&["ec2", "describe-snapshots", "--snapshot-ids", &snap]);
        assert_eq!(d["Snapshots"][0]["State"], "completed");
        assert_eq!(
            d["Snapshots"][0]["Description"],
            format!("Created by AWS-VMImport service for {id}").as_str()
        );
        let uri = s.restore(&snap);
        assert_same(&img, qemu_fmt, &uri);
    }
    // No scratch volume is left: only the five restored ones.
    let names = s.ep.daemon.volume_names();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with("import-")), "{names:?}");
    // The tasks are listed, and the filter on their state finds them.
    let all = s.ep.aws_json(&[
        "ec2",
        "describe-import-snapshot-tasks",
        "--filters",
        "Name=task-state,Values=completed",
    ]);
    assert_eq!(all["ImportSnapshotTasks"].as_array().unwrap().len(), 5);
    // The waiter sees them completed.
    let ids: Vec<String> = all["ImportSnapshotTasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["ImportTaskId"].as_str().unwrap().to_owned())
        .collect();
    let mut args = vec!["ec2", "wait", "snapshot-imported", "--import-task-ids"];
    args.extend(ids.iter().map(String::as_str));
    s.ep.aws_json(&args);
    s.finish();
}

/// boto3 polls a task from its start: `active` with a numeric Progress and
/// no SnapshotId until `completed`; the same ClientToken gives the same
/// task; pagination covers every task once.
#[test]
fn boto3_sees_progress_tokens_and_pages() {
    let s = setup(&[("VOLUMED_FAILPOINTS", "import-window=400")]);
    let raw = s.path("disk.raw");
    make_raw(&raw, 64 * MIB, 9);
    s.put(&raw, "disk.raw");
    let out = s.ep.python(&format!(
        r#"
import time
ec2 = boto3.client("ec2")
c = {{"Format": "RAW", "UserBucket": {{"S3Bucket": "{BUCKET}", "S3Key": "disk.raw"}}}}
t = ec2.import_snapshot(DiskContainer=c, ClientToken="tok-1", RoleName="vmimport",
    TagSpecifications=[{{"ResourceType": "import-snapshot-task", "Tags": [{{"Key": "k", "Value": "v"}}]}}])
tid = t["ImportTaskId"]
again = ec2.import_snapshot(DiskContainer=c, ClientToken="tok-1")
assert again["ImportTaskId"] == tid, (again, tid)
assert t["Tags"] == [{{"Key": "k", "Value": "v"}}], t
active = 0
while True:
    d = ec2.describe_import_snapshot_tasks(ImportTaskIds=[tid])["ImportSnapshotTasks"][0]["SnapshotTaskDetail"]
    if d["Status"] != "active":
        break
    active += 1
    assert "SnapshotId" not in d, d
    assert 0 <= int(d["Progress"]) <= 100, d
    assert d["StatusMessage"] in ("pending", "downloading/converting", "converting"), d
    time.sleep(0.05)
assert d["Status"] == "completed", d
assert d["SnapshotId"].startswith("snap-"), d
assert "Progress" not in d, d
print(active, d["SnapshotId"])
# Two more tasks, then pages of one.
for n in (2, 3):
    ec2.import_snapshot(DiskContainer=c, ClientToken=f"tok-{{n}}")
seen = []
for page in ec2.get_paginator("describe_import_snapshot_tasks").paginate(PaginationConfig={{"PageSize": 1}}):
    seen += [t["ImportTaskId"] for t in page["ImportSnapshotTasks"]]
assert len(seen) == 3 and len(set(seen)) == 3, seen
"#
    ));
    let mut words = out.split_whitespace();
    let active: u32 = words.next().unwrap().parse().unwrap();
    assert!(active >= 1, "never saw the task active: {out}");
    let snap = words.next().unwrap().to_owned();
    assert_same(&raw, "raw", &s.restore(&snap));
    s.finish();
}

/// A truncated VMDK, a qcow2 with a backing file and a missing key: each
/// task ends `deleted` with a one-line `ClientError: ...`, and no snapshot
/// or volume is left.
#[test]
fn bad_sources_end_deleted_with_a_client_error_and_leave_nothing() {
    let s = setup(&[]);
    let raw = s.path("disk.raw");
    make_raw(&raw, 16 * MIB, 3);
    let vmdk = s.path("disk.vmdk");
    convert(&raw, "vmdk", &["-o", "subformat=streamOptimized"], &vmdk);
    let len = std::fs::metadata(&vmdk).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&vmdk).unwrap();
    f.set_len(len / 2).unwrap();
    s.put(&vmdk, "truncated.vmdk");
    let base = s.path("base.qcow2");
    convert(&raw, "qcow2", &[], &base);
    let overlay = s.path("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        overlay.to_str().unwrap(),
    ]);
    s.put(&overlay, "overlay.qcow2");
    let before = s.snapshot_count();
    let cases = [
        ("VMDK", "truncated.vmdk", ""),
        ("QCOW2", "overlay.qcow2", "backing"),
        (
            "RAW",
            "no/such.raw",
            "s3://volumed/no/such.raw does not exist",
        ),
    ];
    for (fmt, key, says) in cases {
        let t = s.import(fmt, key, &[]);
        let id = t["ImportTaskId"].as_str().unwrap().to_owned();
        let done = s.wait(&id);
        let d = &done["SnapshotTaskDetail"];
        assert_eq!(d["Status"], "deleted", "{key}: {done}");
        assert!(d.get("SnapshotId").is_none(), "{done}");
        let msg = d["StatusMessage"].as_str().unwrap();
        assert!(
            msg.starts_with("ClientError: ") && !msg.contains('\n'),
            "{msg}"
        );
        assert!(msg.contains(says), "{key}: {msg}");
    }
    // A bucket that does not exist, named in the message.
    let t = s.ep.aws_json(&[
        "ec2",
        "import-snapshot",
        "--disk-container",
        "Format=RAW,UserBucket={S3Bucket=no-such-bucket,S3Key=x.raw}",
    ]);
    let done = s.wait(t["ImportTaskId"].as_str().unwrap());
    let msg = done["SnapshotTaskDetail"]["StatusMessage"]
        .as_str()
        .unwrap();
    assert!(
        msg.starts_with("ClientError: ") && msg.contains("no-such-bucket"),
        "{msg}"
    );
    let deleted = s.ep.aws_json(&[
        "ec2",
        "describe-import-snapshot-tasks",
        "--filters",
        "Name=task-state,Values=deleted",
    ]);
    assert_eq!(deleted["ImportSnapshotTasks"].as_array().unwrap().len(), 4);
    assert_eq!(s.snapshot_count(), before);
    assert!(s.ep.daemon.volume_names().is_empty());
    // Refused before any task: bad format, plain http, a file with no
    // --import-dir, the legacy actions.
    let e = s.ep.aws_err(&[
        "ec2",
        "import-snapshot",
        "--disk-container",
        "Format=ISO,Url=s3://volumed/x.iso",
    ]);
    assert!(
        e.contains("InvalidParameterValue") && e.contains("Format"),
        "{e}"
    );
    let e = s.ep.aws_err(&[
        "ec2",
        "import-snapshot",
        "--disk-container",
        "Format=RAW,Url=http://example.com/x.raw",
    ]);
    assert!(
        e.contains("InvalidParameterValue") && e.contains("https://"),
        "{e}"
    );
    let e = s.ep.aws_err(&[
        "ec2",
        "import-snapshot",
        "--disk-container",
        &format!("Format=RAW,Url=file://{}", raw.display()),
    ]);
    assert!(e.contains("--import-dir"), "{e}");
    let e = s.ep.aws_err(&[
        "ec2",
        "import-snapshot",
        "--encrypted",
        "--disk-container",
        "Format=RAW,Url=s3://volumed/disk.raw",
    ]);
    assert!(
        e.contains("InvalidParameterValue") && e.contains("not encrypted"),
        "{e}"
    );
    let (status, body) = s.ep.ec2_raw("Action=ImportVolume&Version=2016-11-15");
    assert_eq!(status, 400);
    assert_eq!(ec2_code(&body), "UnsupportedOperation");
    assert!(body.contains("ImportSnapshot"), "{body}");
    s.finish();
}

/// CancelImportTask on a running import: `deleting`, then `deleted`, and
/// the partial work is gone.
#[test]
fn cancel_of_a_running_import_leaves_nothing() {
    // Each 32 MiB window of the copy held 1.5 s: the copy takes 6 s.
    let s = setup(&[("VOLUMED_FAILPOINTS", "import-window=1500")]);
    let raw = s.path("big.raw");
    make_raw(&raw, 128 * MIB, 11);
    s.put(&raw, "big.raw");
    let t = s.import("RAW", "big.raw", &[]);
    let id = t["ImportTaskId"].as_str().unwrap().to_owned();
    // Wait until it converts.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = s.describe(&id);
        assert_eq!(d["SnapshotTaskDetail"]["Status"], "active", "{d}");
        let p: u64 = d["SnapshotTaskDetail"]["Progress"]
            .as_str()
            .unwrap_or("0")
            .parse()
            .unwrap();
        if p > 45 {
            break;
        }
        assert!(Instant::now() < deadline, "{d}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = s.ep.aws_json(&[
        "ec2",
        "cancel-import-task",
        "--import-task-id",
        &id,
        "--cancel-reason",
        "changed my mind",
    ]);
    assert_eq!(c["ImportTaskId"], id.as_str());
    assert_eq!(c["PreviousState"], "active");
    assert_eq!(c["State"], "deleting");
    let done = s.wait(&id);
    assert_eq!(done["SnapshotTaskDetail"]["Status"], "deleted", "{done}");
    assert_eq!(
        done["SnapshotTaskDetail"]["StatusMessage"],
        "changed my mind"
    );
    assert_eq!(s.snapshot_count(), 0);
    assert!(s.ep.daemon.volume_names().is_empty());
    let e =
        s.ep.aws_err(&["ec2", "cancel-import-task", "--import-task-id", &id]);
    assert!(e.contains("IncorrectState"), "{e}");
    s.finish();
}

/// A restart in the middle of an import, clean (SIGTERM) and then a
/// kill -9: each time the task resumes from its checkpoint and completes
/// with the image's bytes.
#[test]
fn a_restart_mid_import_resumes_the_task() {
    let mut s = setup(&[("VOLUMED_FAILPOINTS", "import-window=1000")]);
    let raw = s.path("big.raw");
    make_raw(&raw, 128 * MIB, 13);
    let img = s.path("big.qcow2");
    convert(&raw, "qcow2", &[], &img);
    s.put(&img, "big.qcow2");
    for kill in [false, true] {
        let t = s.import("QCOW2", "big.qcow2", &[]);
        let id = t["ImportTaskId"].as_str().unwrap().to_owned();
        let job = format!("job-{}", &id["import-snap-".len() + 1..]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let j = s.ep.daemon.vol_json(&["job", "inspect", &job]);
            assert_eq!(j["state"], "running", "{j}");
            if j["bytes_done"].as_u64().unwrap_or(0) >= 48 * MIB {
                break;
            }
            assert!(Instant::now() < deadline, "{j}");
            std::thread::sleep(Duration::from_millis(50));
        }
        if kill {
            s.ep.daemon.kill9();
            s.ep.daemon.start_again();
        } else {
            s.ep.daemon.restart();
        }
        let st = s.ep.daemon.vol_json(&["status"]);
        s.ep.url = format!("http://{}", st["aws_listen"].as_str().unwrap());
        let done = s.wait(&id);
        assert_eq!(done["SnapshotTaskDetail"]["Status"], "completed", "{done}");
        let snap = task_snapshot(&done);
        assert_same(&img, "qcow2", &s.restore(&snap));
    }
    let log = s.ep.daemon.log();
    assert_eq!(log.matches("resuming an import task").count(), 2, "{log}");
    // Only the two restored volumes: no scratch volume is left.
    assert_eq!(s.ep.daemon.volume_names().len(), 2);
    s.ep.daemon
        .finish_expecting(&[], &["previous run did not shut down cleanly"]);
}

/// ImportImage of an OVA with two disks: one snapshot per disk, and an
/// image mapping `/dev/sda1` and `/dev/sdb` to them, in the OVF's order.
#[test]
fn import_image_of_a_two_disk_ova() {
    let s = setup(&[]);
    let (a, b) = (s.path("a.raw"), s.path("b.raw"));
    make_raw(&a, 32 * MIB, 21);
    make_raw(&b, 16 * MIB, 22);
    let opts = ["-o", "subformat=streamOptimized"];
    convert(&a, "vmdk", &opts, &s.path("disk-a.vmdk"));
    convert(&b, "vmdk", &opts, &s.path("disk-b.vmdk"));
    let ovf = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:href="disk-a.vmdk" ovf:id="file1"/>
    <File ovf:href="disk-b.vmdk" ovf:id="file2"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:capacity="33554432" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="16777216" ovf:diskId="vmdisk2" ovf:fileRef="file2" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm"><Info>A VM</Info></VirtualSystem>
</Envelope>
"#;
    std::fs::write(s.path("vm.ovf"), ovf).unwrap();
    let ova = s.path("vm.ova");
    run_ok(
        Command::new("tar")
            .current_dir(s.dir.path())
            .args(["--format=ustar", "-cf"])
            .arg(&ova)
            .args(["vm.ovf", "disk-a.vmdk", "disk-b.vmdk"]),
    );
    s.put(&ova, "vms/vm.ova");
    // ImportSnapshot takes one disk: this OVA has two.
    let t = s.import("OVA", "vms/vm.ova", &[]);
    let done = s.wait(t["ImportTaskId"].as_str().unwrap());
    let msg = done["SnapshotTaskDetail"]["StatusMessage"]
        .as_str()
        .unwrap();
    assert!(
        msg.contains("has 2 disks") && msg.contains("ImportImage"),
        "{msg}"
    );
    let t = s.ep.aws_json(&[
        "ec2",
        "import-image",
        "--description",
        "two disks",
        "--architecture",
        "x86_64",
        "--platform",
        "Linux",
        "--license-type",
        "BYOL",
        "--boot-mode",
        "uefi",
        "--disk-containers",
        &format!("Format=OVA,UserBucket={{S3Bucket={BUCKET},S3Key=vms/vm.ova}}"),
    ]);
    let id = t["ImportTaskId"].as_str().unwrap().to_owned();
    assert!(id.starts_with("import-ami-") && id.len() == 28, "{id}");
    assert!(t.get("ImageId").is_none(), "{t}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let v = s.ep.aws_json(&[
            "ec2",
            "describe-import-image-tasks",
            "--import-task-ids",
            &id,
        ]);
        let t = v["ImportImageTasks"][0].clone();
        if t["Status"] != "active" {
            break t;
        }
        assert!(Instant::now() < deadline, "{t}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(done["Status"], "completed", "{done}");
    assert_eq!(done["Platform"], "Linux");
    assert_eq!(done["LicenseType"], "BYOL");
    assert_eq!(done["BootMode"], "uefi");
    let details = done["SnapshotDetails"].as_array().unwrap();
    assert_eq!(details.len(), 2, "{done}");
    let snaps: Vec<&str> = details
        .iter()
        .map(|d| d["SnapshotId"].as_str().unwrap())
        .collect();
    assert_eq!(details[0]["DeviceName"], "/dev/sda1");
    assert_eq!(details[1]["DeviceName"], "/dev/sdb");
    let ami = done["ImageId"].as_str().unwrap();
    let img =
        s.ep.aws_json(&["ec2", "describe-images", "--image-ids", ami])["Images"][0].clone();
    assert_eq!(img["RootDeviceName"], "/dev/sda1");
    assert_eq!(img["Name"], id.as_str());
    let maps = img["BlockDeviceMappings"].as_array().unwrap();
    let by_dev = |dev: &str| {
        maps.iter()
            .find(|m| m["DeviceName"] == dev)
            .map(|m| m["Ebs"]["SnapshotId"].as_str().unwrap().to_owned())
    };
    assert_eq!(by_dev("/dev/sda1").as_deref(), Some(snaps[0]));
    assert_eq!(by_dev("/dev/sdb").as_deref(), Some(snaps[1]));
    assert_same(&s.path("disk-a.vmdk"), "vmdk", &s.restore(snaps[0]));
    assert_same(&s.path("disk-b.vmdk"), "vmdk", &s.restore(snaps[1]));
    // A DiskContainer may name a snapshot instead, under its DeviceName.
    let t = s.ep.aws_json(&[
        "ec2",
        "import-image",
        "--disk-containers",
        &format!("SnapshotId={},DeviceName=/dev/xvda", snaps[1]),
    ]);
    let id = t["ImportTaskId"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let v = s.ep.aws_json(&[
            "ec2",
            "describe-import-image-tasks",
            "--import-task-ids",
            &id,
        ]);
        let t = v["ImportImageTasks"][0].clone();
        if t["Status"] != "active" {
            break t;
        }
        assert!(Instant::now() < deadline, "{t}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(done["Status"], "completed", "{done}");
    let ami = done["ImageId"].as_str().unwrap();
    let img =
        s.ep.aws_json(&["ec2", "describe-images", "--image-ids", ami])["Images"][0].clone();
    assert_eq!(img["RootDeviceName"], "/dev/xvda");
    assert_eq!(img["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"], snaps[1]);
    s.finish();
}

/// An HTTPS server (Python's, with a throwaway CA's certificate) serving
/// the files of a directory; stopped when dropped.
struct HttpsServer {
    child: std::process::Child,
    port: u16,
}

impl HttpsServer {
    fn start(pki: &Pki, dir: &Path) -> Self {
        use std::io::BufRead;
        let script = r#"
import http.server, ssl, sys
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;
        let mut child = Command::new("python3")
            .current_dir(dir)
            .args(["-c", script])
            .arg(pki.path("server-cert.pem"))
            .arg(pki.path("server-key.pem"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start python3's https server");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the server's port");
        HttpsServer { child, port }
    }

    fn url(&self, name: &str) -> String {
        format!("https://localhost:{}/{name}", self.port)
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `https://` sources (trusted through SSL_CERT_FILE, capped in size) and
/// `file://` sources under an `--import-dir` (nothing outside it, not even
/// through a symbolic link), into an encrypted store, one under a named
/// key.
#[test]
fn https_and_file_sources() {
    let pki = Pki::new();
    let served = tempfile::tempdir().unwrap();
    let import_dir = tempfile::tempdir().unwrap();
    let ca = pki.path("ca-cert.pem").display().to_string();
    let dir = import_dir.path().display().to_string();
    let s = setup(&[
        ("SSL_CERT_FILE", ca.as_str()),
        ("VOLUMED_IMPORT_DIR", dir.as_str()),
        ("VOLUMED_IMPORT_URL_MAX_SIZE", "24M"),
        ("VOLUMED_STORE_ENCRYPTION", "on"),
    ]);
    let web = HttpsServer::start(&pki, served.path());
    let raw = s.path("disk.raw");
    make_raw(&raw, 16 * MIB, 31);
    let vhdx = served.path().join("disk.vhdx");
    convert(&raw, "vhdx", &[], &vhdx);
    make_raw(&served.path().join("big.raw"), 32 * MIB, 32);
    let qcow2 = import_dir.path().join("disk.qcow2");
    convert(&raw, "qcow2", &[], &qcow2);
    std::os::unix::fs::symlink("/etc/hostname", import_dir.path().join("escape.raw")).unwrap();

    let url = web.url("disk.vhdx");
    let t = s.import_url("VHDX", &url);
    assert_eq!(t["SnapshotTaskDetail"]["Url"], url.as_str());
    let done = s.wait(t["ImportTaskId"].as_str().unwrap());
    assert_eq!(done["SnapshotTaskDetail"]["Status"], "completed", "{done}");
    assert_same(&vhdx, "vhdx", &s.restore(&task_snapshot(&done)));

    let t = s.import_url("RAW", &web.url("big.raw"));
    let done = s.wait(t["ImportTaskId"].as_str().unwrap());
    let msg = done["SnapshotTaskDetail"]["StatusMessage"]
        .as_str()
        .unwrap();
    assert!(
        msg.starts_with("ClientError: ") && msg.contains("larger than the limit"),
        "{msg}"
    );
    let t = s.import_url("RAW", &web.url("missing.raw"));
    let done = s.wait(t["ImportTaskId"].as_str().unwrap());
    let msg = done["SnapshotTaskDetail"]["StatusMessage"]
        .as_str()
        .unwrap();
    assert!(msg.contains("HTTP 404"), "{msg}");

    // Encrypted under a named key, as CreateVolume's Encrypted/KmsKeyId.
    s.ep.daemon.vol_ok(&["key", "create", "imports"]);
    let container = format!("Format=QCOW2,Url=file://{}", qcow2.display());
    let t = s.ep.aws_json(&[
        "ec2",
        "import-snapshot",
        "--encrypted",
        "--kms-key-id",
        "alias/imports",
        "--disk-container",
        &container,
    ]);
    let done = s.wait(t["ImportTaskId"].as_str().unwrap());
    assert_eq!(done["SnapshotTaskDetail"]["Status"], "completed", "{done}");
    assert_eq!(done["SnapshotTaskDetail"]["Encrypted"], true, "{done}");
    let snap = task_snapshot(&done);
    let d =
        s.ep.aws_json(&["ec2", "describe-snapshots", "--snapshot-ids", &snap]);
    assert_eq!(d["Snapshots"][0]["Encrypted"], true, "{d}");
    let key = d["Snapshots"][0]["KmsKeyId"].as_str().unwrap();
    assert!(key.contains(":key/"), "{d}");
    assert_same(&qcow2, "qcow2", &s.restore(&snap));
    for outside in [
        "file:///etc/hostname".to_owned(),
        format!("file://{}/escape.raw", import_dir.path().display()),
    ] {
        let container = format!("Format=RAW,Url={outside}");
        let e =
            s.ep.aws_err(&["ec2", "import-snapshot", "--disk-container", &container]);
        assert!(e.contains("is not under an --import-dir"), "{e}");
    }
    drop(web);
    s.finish();
}

/// Credentials the S3 server refuses: the task ends `deleted`, the
/// message naming the object and the denial.
#[test]
fn denied_access_is_named() {
    let s = setup(&[("AWS_SECRET_ACCESS_KEY", "not-the-secret")]);
    let raw = s.path("disk.raw");
    make_raw(&raw, 4 * MIB, 41);
    s.put(&raw, "disk.raw");
    let t = s.import("RAW", "disk.raw", &[]);
    let done = s.wait(t["ImportTaskId"].as_str().unwrap());
    let msg = done["SnapshotTaskDetail"]["StatusMessage"]
        .as_str()
        .unwrap();
    assert!(
        msg.starts_with("ClientError: access to S3 object s3://volumed/disk.raw was denied"),
        "{msg}"
    );
    assert_eq!(s.snapshot_count(), 0);
    s.finish();
}
