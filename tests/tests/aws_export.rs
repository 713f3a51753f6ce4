//! VM export through the EC2 endpoint, with the real `aws` CLI and boto3
//! against SeaweedFS as the S3 server: ExportImage in VMDK, RAW and VHD
//! (and QCOW2, ours) fetched back with `aws s3 cp` and compared with `qemu-img compare`;
//! DescribeExportImageTasks' states, filter and pages; ClientToken; a
//! missing bucket; CancelExportTask of a large export leaving no object and
//! no upload; CreateInstanceExportTask of a two-volume instance to an OVA.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use volumed_tests::aws::AwsEndpoint;
use volumed_tests::run_ok;
use volumed_tests::s3::{ACCESS_KEY, S3Server, SECRET_KEY};

const MIB: u64 = 1 << 20;
const BUCKET: &str = "exports";

/// A daemon whose tasks reach `s3`, and a bucket there to export into.
fn setup(s3: &S3Server) -> AwsEndpoint {
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let ep = AwsEndpoint::start_with_env(&env);
    s3_cli(s3, &["mb", &format!("s3://{BUCKET}")]);
    ep
}

/// `aws s3 ARGS` against SeaweedFS (its own key, not the endpoint's).
fn s3_cli(s3: &S3Server, args: &[&str]) -> String {
    let mut cmd = Command::new(volumed_tests::aws::aws_bin());
    cmd.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_PROFILE")
        .args(["--endpoint-url", &s3.endpoint()])
        .args(if args[0] == "s3api" {
            &[][..]
        } else {
            &["s3"][..]
        })
        .args(args);
    run_ok(&mut cmd)
}

/// The keys under `prefix` in the bucket.
fn objects(s3: &S3Server, prefix: &str) -> Vec<String> {
    let out = s3_cli(
        s3,
        &[
            "s3api",
            "list-objects-v2",
            "--bucket",
            BUCKET,
            "--prefix",
            prefix,
            "--output",
            "json",
        ],
    );
    if out.trim().is_empty() {
        return Vec::new();
    }
    let v: Value = serde_json::from_str(&out).unwrap();
    v["Contents"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|o| o["Key"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Multipart uploads in progress in the bucket.
fn uploads(s3: &S3Server) -> usize {
    let out = s3_cli(
        s3,
        &[
            "s3api",
            "list-multipart-uploads",
            "--bucket",
            BUCKET,
            "--output",
            "json",
        ],
    );
    if out.trim().is_empty() {
        return 0;
    }
    let v: Value = serde_json::from_str(&out).unwrap();
    v["Uploads"].as_array().map_or(0, Vec::len)
}

/// A raw image of `size` bytes: stretches of data, zeros and holes.
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
        if next() % 3 == 0 {
            let buf: Vec<u8> = (0..MIB / 8).flat_map(|_| next().to_le_bytes()).collect();
            f.write_at(&buf, i * MIB).unwrap();
        }
    }
}

/// Imports `raw` as volume `name` with a snapshot; returns the snapshot.
fn imported_snapshot(ep: &AwsEndpoint, raw: &Path, name: &str) -> String {
    let d = &ep.daemon;
    d.vol_json(&["import", raw.to_str().unwrap(), name, "--snapshot"]);
    let list = d.vol_json(&["snapshot", "list", "--volume", name]);
    let snap = list[0]["id"].as_str().unwrap().to_owned();
    d.wait_snapshot_settled(&snap);
    snap
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
    let id = r["ImageId"].as_str().unwrap().to_owned();
    ep.aws_json(&["ec2", "wait", "image-available", "--image-ids", &id]);
    id
}

fn image_task(ep: &AwsEndpoint, id: &str) -> Value {
    let v = ep.aws_json(&[
        "ec2",
        "describe-export-image-tasks",
        "--export-image-task-ids",
        id,
    ]);
    v["ExportImageTasks"][0].clone()
}

/// Polls an image task until it leaves `active`; checks on the way that
/// `Progress` is a whole number below 100.
fn wait_image_task(ep: &AwsEndpoint, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let t = image_task(ep, id);
        match t["Status"].as_str().unwrap() {
            "active" | "deleting" => {
                if let Some(p) = t["Progress"].as_str() {
                    let n: u64 = p.parse().unwrap_or_else(|_| panic!("Progress {p:?}"));
                    assert!(n < 100, "{t}");
                }
            }
            _ => return t,
        }
        assert!(Instant::now() < deadline, "export task stuck: {t}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn qemu_compare(fmt: &str, got: &Path, want: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fmt, "-F", "raw"])
        .arg(got)
        .arg(want)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{fmt}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fetch(s3: &S3Server, key: &str, to: &Path) {
    s3_cli(
        s3,
        &[
            "cp",
            "--quiet",
            &format!("s3://{BUCKET}/{key}"),
            to.to_str().unwrap(),
        ],
    );
}

#[test]
fn export_image_to_a_bucket_in_each_format() {
    let s3 = S3Server::start();
    let ep = setup(&s3);
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    make_raw(&raw, 48 * MIB, 7);
    let snap = imported_snapshot(&ep, &raw, "golden");
    let ami = register(
        &ep,
        "golden",
        &json!([{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap}}]),
    );
    let snaps_before = ep.daemon.vol_json(&["snapshot", "list"]);
    let mut ids = Vec::new();
    for (fmt, qemu, ext) in [
        ("VMDK", "vmdk", "vmdk"),
        ("RAW", "raw", "raw"),
        ("VHD", "vpc", "vhd"),
        // Ours, beyond AWS's three.
        ("QCOW2", "qcow2", "qcow2"),
    ] {
        let r = ep.aws_json(&[
            "ec2",
            "export-image",
            "--image-id",
            &ami,
            "--disk-image-format",
            fmt,
            "--s3-export-location",
            &format!("S3Bucket={BUCKET},S3Prefix=out/"),
            "--description",
            "golden image",
            "--client-token",
            &format!("token-{fmt}"),
            "--role-name",
            "vmimport",
        ]);
        let id = r["ExportImageTaskId"].as_str().unwrap().to_owned();
        assert!(id.starts_with("export-ami-") && id.len() == 28, "{r}");
        assert_eq!(r["ImageId"], ami.as_str());
        assert_eq!(r["DiskImageFormat"], fmt);
        assert_eq!(r["S3ExportLocation"]["S3Bucket"], BUCKET);
        assert!(
            ["active", "completed"].contains(&r["Status"].as_str().unwrap()),
            "{r}"
        );
        // The same ClientToken gives the same task.
        let again = ep.aws_json(&[
            "ec2",
            "export-image",
            "--image-id",
            &ami,
            "--disk-image-format",
            fmt,
            "--s3-export-location",
            &format!("S3Bucket={BUCKET},S3Prefix=out/"),
            "--client-token",
            &format!("token-{fmt}"),
        ]);
        assert_eq!(again["ExportImageTaskId"], id.as_str());
        let t = wait_image_task(&ep, &id);
        assert_eq!(t["Status"], "completed", "{t}");
        assert!(t.get("StatusMessage").is_none(), "{t}");
        let key = format!("out/{id}.{ext}");
        assert!(objects(&s3, "out/").contains(&key), "{key}");
        let got = dir.path().join(format!("got.{ext}"));
        fetch(&s3, &key, &got);
        if fmt == "VMDK" {
            let info = run_ok(
                Command::new("qemu-img")
                    .args(["info", "--output=json"])
                    .arg(&got),
            );
            assert!(info.contains("streamOptimized"), "{info}");
        }
        qemu_compare(qemu, &got, &raw);
        std::fs::remove_file(&got).unwrap();
        ids.push(id);
    }
    // An image's export takes no snapshot: the image's is read.
    assert_eq!(ep.daemon.vol_json(&["snapshot", "list"]), snaps_before);

    // A missing bucket ends `deleted`, the reason naming it.
    let r = ep.aws_json(&[
        "ec2",
        "export-image",
        "--image-id",
        &ami,
        "--disk-image-format",
        "RAW",
        "--s3-export-location",
        "S3Bucket=no-such-bucket",
    ]);
    let bad = r["ExportImageTaskId"].as_str().unwrap().to_owned();
    let t = wait_image_task(&ep, &bad);
    assert_eq!(t["Status"], "deleted", "{t}");
    let msg = t["StatusMessage"].as_str().unwrap();
    assert!(
        msg.starts_with("ClientError: ") && msg.contains("no-such-bucket"),
        "{msg}"
    );

    // Filters and pages, with boto3.
    let out = ep.python(
        r#"
ec2 = boto3.client("ec2")
seen, token = [], None
while True:
    kw = {"MaxResults": 1}
    if token:
        kw["NextToken"] = token
    page = ec2.describe_export_image_tasks(**kw)
    assert len(page["ExportImageTasks"]) <= 1, page
    seen += [t["ExportImageTaskId"] for t in page["ExportImageTasks"]]
    token = page.get("NextToken")
    if not token:
        break
done = ec2.describe_export_image_tasks(Filters=[{"Name": "task-state", "Values": ["completed"]}])
failed = ec2.describe_export_image_tasks(Filters=[{"Name": "task-state", "Values": ["deleted"]}])
print(json.dumps({"seen": sorted(seen),
    "done": sorted(t["ExportImageTaskId"] for t in done["ExportImageTasks"]),
    "failed": [t["ExportImageTaskId"] for t in failed["ExportImageTasks"]]}))
"#,
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let mut all = ids.clone();
    all.push(bad.clone());
    all.sort();
    let mut done = ids.clone();
    done.sort();
    assert_eq!(v["seen"], json!(all));
    assert_eq!(v["done"], json!(done));
    assert_eq!(v["failed"], json!([bad]));

    // Bad input gets EC2's codes.
    let e = ep.aws_err(&[
        "ec2",
        "export-image",
        "--image-id",
        &ami,
        "--disk-image-format",
        "VHDX",
        "--s3-export-location",
        &format!("S3Bucket={BUCKET}"),
    ]);
    assert!(e.contains("InvalidParameterValue"), "{e}");
    let e = ep.aws_err(&[
        "ec2",
        "export-image",
        "--image-id",
        "ami-0123456789abcdef0",
        "--disk-image-format",
        "RAW",
        "--s3-export-location",
        &format!("S3Bucket={BUCKET}"),
    ]);
    assert!(e.contains("InvalidAMIID.NotFound"), "{e}");
    let e = ep.aws_err(&[
        "ec2",
        "describe-export-image-tasks",
        "--export-image-task-ids",
        "export-ami-0123456789abcdef0",
    ]);
    assert!(e.contains("InvalidExportTaskID.NotFound"), "{e}");
    ep.daemon.finish();
}

/// Starts a RAW export of `ami` under `prefix` and waits until its first
/// bytes are on their way; returns the task id.
fn start_large_export(ep: &AwsEndpoint, s3: &S3Server, ami: &str, prefix: &str) -> String {
    let r = ep.aws_json(&[
        "ec2",
        "export-image",
        "--image-id",
        ami,
        "--disk-image-format",
        "RAW",
        "--s3-export-location",
        &format!("S3Bucket={BUCKET},S3Prefix={prefix}"),
    ]);
    let id = r["ExportImageTaskId"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = image_task(ep, &id);
        assert_eq!(t["Status"], "active", "finished too early: {t}");
        if t["Progress"].as_str().is_some_and(|p| p != "0") {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(uploads(s3) >= 1, "the export's upload is in progress");
    id
}

#[test]
fn cancel_and_restart_remove_the_partial_upload() {
    let s3 = S3Server::start();
    let mut ep = setup(&s3);
    let d = &ep.daemon;
    // A large sparse disk: its export is mostly zeros and takes a while.
    d.vol_ok(&["create", "big", "--size", "4G"]);
    let snap = d.vol_json(&["snapshot", "create", "big", "--wait"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ami = register(
        &ep,
        "big",
        &json!([{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap}}]),
    );
    let id = start_large_export(&ep, &s3, &ami, "big/");
    let c = ep.aws_json(&["ec2", "cancel-export-task", "--export-task-id", &id]);
    assert!(c.is_null(), "{c}");
    let t = wait_image_task(&ep, &id);
    assert_eq!(t["Status"], "deleted", "{t}");
    assert!(objects(&s3, "big/").is_empty(), "a partial object was left");
    assert_eq!(uploads(&s3), 0, "the multipart upload was not aborted");
    // Cancelling again is refused: the task has ended.
    let e = ep.aws_err(&["ec2", "cancel-export-task", "--export-task-id", &id]);
    assert!(e.contains("IncorrectState"), "{e}");

    // A crash in the middle: the export is not resumed; the next start
    // ends it with the reason and aborts its upload. Tasks are kept across
    // the restart.
    let cancelled = id;
    let id = start_large_export(&ep, &s3, &ami, "crash/");
    ep.daemon.kill9();
    ep.daemon.start_again();
    let st = ep.daemon.vol_json(&["status"]);
    ep.url = format!("http://{}", st["aws_listen"].as_str().unwrap());
    let t = wait_image_task(&ep, &id);
    assert_eq!(t["Status"], "deleted", "{t}");
    let msg = t["StatusMessage"].as_str().unwrap();
    assert!(
        msg.contains("interrupted by a restart") && msg.contains("partial upload was removed"),
        "{msg}"
    );
    assert!(
        objects(&s3, "crash/").is_empty(),
        "a partial object was left"
    );
    assert_eq!(uploads(&s3), 0, "the multipart upload was not aborted");
    let t = image_task(&ep, &cancelled);
    assert_eq!(t["Status"], "deleted", "{t}");
    assert_eq!(t["StatusMessage"], "Canceled by request", "{t}");
    ep.daemon
        .finish_expecting(&[], &["previous run did not shut down cleanly"]);
}

#[test]
fn instance_export_to_an_ova() {
    let s3 = S3Server::start();
    let ep = setup(&s3);
    let d = &ep.daemon;
    let dir = tempfile::tempdir().unwrap();
    let root_raw = dir.path().join("root.raw");
    let data_raw = dir.path().join("data.raw");
    make_raw(&root_raw, 32 * MIB, 3);
    make_raw(&data_raw, 16 * MIB, 5);
    let root = imported_snapshot(&ep, &root_raw, "root-src");
    let data = imported_snapshot(&ep, &data_raw, "data-src");
    let ami = register(
        &ep,
        "two-disks",
        &json!([
            {"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": root}},
            {"DeviceName": "/dev/sdb", "Ebs": {"SnapshotId": data}},
        ]),
    );
    let r = ep.aws_json(&[
        "ec2",
        "run-instances",
        "--image-id",
        &ami,
        "--instance-type",
        "m5.large",
        "--count",
        "1",
    ]);
    let inst = r["Instances"][0]["InstanceId"].as_str().unwrap().to_owned();
    ep.aws_json(&["ec2", "wait", "instance-running", "--instance-ids", &inst]);
    let snaps_before = d.vol_json(&["snapshot", "list"]).as_array().unwrap().len();
    let r = ep.aws_json(&[
        "ec2",
        "create-instance-export-task",
        "--instance-id",
        &inst,
        "--target-environment",
        "vmware",
        "--export-to-s3-task",
        &format!("DiskImageFormat=VMDK,ContainerFormat=ova,S3Bucket={BUCKET},S3Prefix=vms/"),
        "--description",
        "two disks",
    ]);
    let t = &r["ExportTask"];
    let id = t["ExportTaskId"].as_str().unwrap().to_owned();
    assert!(id.starts_with("export-i-") && id.len() == 26, "{t}");
    assert_eq!(t["InstanceExportDetails"]["InstanceId"], inst.as_str());
    assert_eq!(t["InstanceExportDetails"]["TargetEnvironment"], "vmware");
    let key = format!("vms/{id}.ova");
    assert_eq!(t["ExportToS3Task"]["S3Key"], key.as_str());
    let deadline = Instant::now() + Duration::from_secs(120);
    let t = loop {
        let v = ep.aws_json(&["ec2", "describe-export-tasks", "--export-task-ids", &id]);
        let t = v["ExportTasks"][0].clone();
        if t["State"] != "active" {
            break t;
        }
        assert!(Instant::now() < deadline, "stuck: {t}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(t["State"], "completed", "{t}");
    let ova = dir.path().join("vm.ova");
    fetch(&s3, &key, &ova);
    let list = run_ok(Command::new("tar").arg("-tf").arg(&ova));
    let names: Vec<&str> = list.lines().collect();
    let want = [
        format!("{id}.ovf"),
        format!("{id}-disk1.vmdk"),
        format!("{id}-disk2.vmdk"),
    ];
    assert_eq!(names, want.iter().map(String::as_str).collect::<Vec<_>>());
    let out: PathBuf = dir.path().join("x");
    std::fs::create_dir(&out).unwrap();
    run_ok(Command::new("tar").arg("-xf").arg(&ova).arg("-C").arg(&out));
    let ovf = std::fs::read_to_string(out.join(&want[0])).unwrap();
    assert!(ovf.contains(&want[1]) && ovf.contains(&want[2]), "{ovf}");
    qemu_compare("vmdk", &out.join(&want[1]), &root_raw);
    qemu_compare("vmdk", &out.join(&want[2]), &data_raw);
    // The snapshots taken of the instance's volumes are gone again.
    assert_eq!(
        d.vol_json(&["snapshot", "list"]).as_array().unwrap().len(),
        snaps_before
    );
    // Without ova, only the root disk, named by the task.
    let r = ep.aws_json(&[
        "ec2",
        "create-instance-export-task",
        "--instance-id",
        &inst,
        "--target-environment",
        "citrix",
        "--export-to-s3-task",
        &format!("DiskImageFormat=VHD,S3Bucket={BUCKET},S3Prefix=vms/"),
    ]);
    let id2 = r["ExportTask"]["ExportTaskId"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = ep.aws_json(&["ec2", "describe-export-tasks"]);
        let t = v["ExportTasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["ExportTaskId"] == id2.as_str())
            .unwrap()
            .clone();
        if t["State"] == "completed" {
            break;
        }
        assert_eq!(t["State"], "active", "{t}");
        assert!(Instant::now() < deadline, "stuck: {t}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let vhd = dir.path().join("root.vhd");
    fetch(&s3, &format!("vms/{id2}.vhd"), &vhd);
    qemu_compare("vpc", &vhd, &root_raw);
    let e = ep.aws_err(&[
        "ec2",
        "create-instance-export-task",
        "--instance-id",
        &inst,
        "--target-environment",
        "vmware",
        "--export-to-s3-task",
        &format!("DiskImageFormat=RAW,ContainerFormat=ova,S3Bucket={BUCKET}"),
    ]);
    assert!(e.contains("InvalidParameterValue"), "{e}");
    ep.daemon.finish();
}

#[test]
fn access_denied_ends_the_task_with_the_reason() {
    let s3 = S3Server::start();
    // The daemon's tasks sign with a secret SeaweedFS does not know.
    let mut env = s3.env();
    for (k, v) in &mut env {
        if *k == "AWS_SECRET_ACCESS_KEY" {
            *v = "not-the-secret".into();
        }
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let ep = AwsEndpoint::start_with_env(&env);
    s3_cli(&s3, &["mb", &format!("s3://{BUCKET}")]);
    let d = &ep.daemon;
    d.vol_ok(&["create", "small", "--size", "8M"]);
    let snap = d.vol_json(&["snapshot", "create", "small", "--wait"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ami = register(
        &ep,
        "small",
        &json!([{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap}}]),
    );
    let r = ep.aws_json(&[
        "ec2",
        "export-image",
        "--image-id",
        &ami,
        "--disk-image-format",
        "VMDK",
        "--s3-export-location",
        &format!("S3Bucket={BUCKET},S3Prefix=denied/"),
    ]);
    let id = r["ExportImageTaskId"].as_str().unwrap().to_owned();
    let t = wait_image_task(&ep, &id);
    assert_eq!(t["Status"], "deleted", "{t}");
    let msg = t["StatusMessage"].as_str().unwrap();
    assert!(
        msg.starts_with("ClientError: access to S3 object s3://exports/denied/")
            && msg.contains("denied ("),
        "{msg}"
    );
    assert!(objects(&s3, "denied/").is_empty());
    ep.daemon.finish();
}
