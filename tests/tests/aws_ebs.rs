//! The EBS direct APIs, driven by `aws ebs`, boto3 and coldsnap against
//! the real daemon: blocks listed, diffed and read from volumed snapshots,
//! and snapshots written block by block that restore like any other, even
//! when the upload outlasts gc's grace period on another host.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use volumed_tests::aws::AwsEndpoint;
use volumed_tests::ebs::EbsClient;
use volumed_tests::{TestDaemon, qemu_io, run_ok};

const BLOCK: u64 = 512 << 10;

/// Base64 SHA-256 of a file, as x-amz-Checksum carries it.
fn checksum(path: &Path) -> String {
    let out = run_ok(Command::new("sh").arg("-c").arg(format!(
        "openssl dgst -sha256 -binary '{}' | base64",
        path.display()
    )));
    out.trim().to_owned()
}

fn block_indices(v: &Value, list: &str) -> Vec<u64> {
    v[list]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["BlockIndex"].as_u64().unwrap())
        .collect()
}

fn snapshot(ep: &AwsEndpoint, vol: &str) -> String {
    let s = ep.daemon.vol_json(&["snapshot", "create", vol, "--wait"]);
    assert_eq!(s["state"], "completed", "{s}");
    s["id"].as_str().unwrap().to_owned()
}

#[test]
fn blocks_changed_blocks_and_block_reads_match_the_snapshots() {
    let ep = AwsEndpoint::start();
    ep.daemon.vol_ok(&["create", "data", "--size", "64M"]);
    ep.daemon.vol_ok(&["attach", "data"]);
    let uri = ep.daemon.uri("data");
    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 10M 512k",
            "write -P 0x33 20M 512k",
        ],
    );
    let a = snapshot(&ep, "data");
    // Three chunks written (two adjacent), one trimmed.
    qemu_io(
        &uri,
        &[
            "write -P 0x44 30M 1M",
            "write -P 0x55 40M 512k",
            "discard 10M 512k",
        ],
    );
    let b = snapshot(&ep, "data");

    let blocks = ep.aws_json(&["ebs", "list-snapshot-blocks", "--snapshot-id", &b]);
    assert_eq!(blocks["BlockSize"], BLOCK);
    assert_eq!(blocks["VolumeSize"], 1);
    let want: Vec<u64> = vec![0, 1, 40, 60, 61, 80];
    assert_eq!(block_indices(&blocks, "Blocks"), want);

    let changed = ep.aws_json(&[
        "ebs",
        "list-changed-blocks",
        "--first-snapshot-id",
        &a,
        "--second-snapshot-id",
        &b,
    ]);
    let diff = ep
        .daemon
        .vol_ok(&["snapshot", "diff", "--from", &a, &b, "--format", "ebs"]);
    let diff: Value = serde_json::from_str(&diff).unwrap();
    assert_eq!(
        block_indices(&changed, "ChangedBlocks"),
        block_indices(&diff, "ChangedBlocks")
    );
    assert_eq!(block_indices(&changed, "ChangedBlocks"), [20, 60, 61, 80]);
    let trimmed = &changed["ChangedBlocks"][0];
    assert!(
        trimmed["FirstBlockToken"].is_string() && trimmed["SecondBlockToken"].is_null(),
        "{trimmed}"
    );
    // Without a first snapshot: every block of the second.
    let all = ep.aws_json(&["ebs", "list-changed-blocks", "--second-snapshot-id", &b]);
    assert_eq!(block_indices(&all, "ChangedBlocks"), want);
    // Paged: maxResults is at least 100, so page with startingBlockIndex.
    let tail = ep.aws_json(&[
        "ebs",
        "list-snapshot-blocks",
        "--snapshot-id",
        &b,
        "--starting-block-index",
        "61",
    ]);
    assert_eq!(block_indices(&tail, "Blocks"), [61, 80]);

    // Read blocks; their checksums verify and their bytes are the pattern.
    let dir = tempfile::tempdir().unwrap();
    for (i, token, byte) in blocks["Blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["BlockIndex"].as_u64().unwrap(),
                b["BlockToken"].as_str().unwrap().to_owned(),
            )
        })
        .zip([0x11u8, 0x11, 0x33, 0x44, 0x44, 0x55])
        .map(|((i, t), p)| (i, t, p))
    {
        let out = dir.path().join(format!("block-{i}"));
        let r = ep.aws_json(&[
            "ebs",
            "get-snapshot-block",
            "--snapshot-id",
            &b,
            "--block-index",
            &i.to_string(),
            "--block-token",
            &token,
            out.to_str().unwrap(),
        ]);
        assert_eq!(r["DataLength"], BLOCK);
        assert_eq!(r["ChecksumAlgorithm"], "SHA256");
        assert_eq!(r["Checksum"].as_str().unwrap(), checksum(&out), "block {i}");
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(bytes.len() as u64, BLOCK);
        assert!(bytes.iter().all(|x| *x == byte), "block {i}");
    }

    // Bad input: EBS's errors.
    let t0 = blocks["Blocks"][0]["BlockToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = dir.path().join("x");
    let o = out.to_str().unwrap();
    let e = ep.aws_err(&[
        "ebs",
        "get-snapshot-block",
        "--snapshot-id",
        &b,
        "--block-index",
        "1",
        "--block-token",
        "0000",
        o,
    ]);
    assert!(e.contains("ValidationException"), "{e}");
    let e = ep.aws_err(&[
        "ebs",
        "get-snapshot-block",
        "--snapshot-id",
        &b,
        "--block-index",
        "5000",
        "--block-token",
        &t0,
        o,
    ]);
    assert!(
        e.contains("ValidationException") && e.contains("beyond"),
        "{e}"
    );
    let e = ep.aws_err(&[
        "ebs",
        "list-snapshot-blocks",
        "--snapshot-id",
        "snap-00000000000000000",
    ]);
    assert!(e.contains("ResourceNotFoundException"), "{e}");
    let e = ep.aws_err(&[
        "ebs",
        "list-snapshot-blocks",
        "--snapshot-id",
        &b,
        "--max-results",
        "5",
    ]);
    assert!(
        e.contains("ValidationException") || e.contains("MaxResults"),
        "{e}"
    );

    // Snapshots of other chunk sizes are refused with a clear error.
    ep.daemon
        .vol_ok(&["create", "big", "--size", "16M", "--chunk-size", "1M"]);
    ep.daemon.vol_ok(&["attach", "big"]);
    qemu_io(&ep.daemon.uri("big"), &["write -P 0x66 0 1M"]);
    let big = snapshot(&ep, "big");
    let e = ep.aws_err(&["ebs", "list-snapshot-blocks", "--snapshot-id", &big]);
    assert!(
        e.contains("ValidationException") && e.contains("524288"),
        "{e}"
    );
    let e = ep.aws_err(&[
        "ebs",
        "list-changed-blocks",
        "--first-snapshot-id",
        &a,
        "--second-snapshot-id",
        &big,
    ]);
    assert!(e.contains("ValidationException"), "{e}");
    ep.daemon.vol_ok(&["detach", "big"]);
    ep.daemon.vol_ok(&["detach", "data"]);
    ep.daemon.finish();
}

#[test]
fn direct_writes_make_normal_snapshots_with_parents_and_checks() {
    let ep = AwsEndpoint::start();
    let out = ep.python(
        r#"
import base64, hashlib, botocore.exceptions
ebs = boto3.client("ebs")
ec2 = boto3.client("ec2")
BS = 524288
def b64(d): return base64.b64encode(hashlib.sha256(d).digest()).decode()
def put(sid, i, data, checksum=None, length=None):
    return ebs.put_snapshot_block(SnapshotId=sid, BlockIndex=i, BlockData=data, DataLength=length or len(data),
                                  Checksum=checksum or b64(data), ChecksumAlgorithm="SHA256")
def code(f):
    try:
        f()
        return "OK"
    except ebs.exceptions.ClientError as e:
        return e.response["Error"]["Code"]
    except botocore.exceptions.ParamValidationError:
        return "client-side"
s = ebs.start_snapshot(VolumeSize=1, Description="base", Tags=[{"Key": "src", "Value": "boto3"}], ClientToken="tok-1")
sid = s["SnapshotId"]
assert s["Status"] == "pending" and s["BlockSize"] == BS, s
assert ebs.start_snapshot(VolumeSize=1, Description="base", Tags=[{"Key": "src", "Value": "boto3"}], ClientToken="tok-1")["SnapshotId"] == sid
print("conflict", code(lambda: ebs.start_snapshot(VolumeSize=2, ClientToken="tok-1")))
pend = ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]
print("pending", pend["State"])
a, b = bytes([0xa1]) * BS, bytes([0xb2]) * BS
digests = []
for i, d in ((0, a), (5, b), (2047, a)):
    r = put(sid, i, d)
    assert r["Checksum"] == b64(d)
print("badsum", code(lambda: put(sid, 1, a, checksum=b64(b))))
print("short", code(lambda: put(sid, 1, a[:4096])))
print("beyond", code(lambda: put(sid, 2048, a)))
print("count", code(lambda: ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=4)))
agg = base64.b64encode(hashlib.sha256(b"".join(hashlib.sha256(d).digest() for d in (a, b, a))).digest()).decode()
print("badagg", code(lambda: ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=3, Checksum=b64(b"x"), ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")))
r = ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=3, Checksum=agg, ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")
print("complete", r["Status"])
print("after", code(lambda: put(sid, 1, a)))
d = ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]
print("described", d["State"], d["VolumeSize"], d["Description"], d["Tags"][0]["Value"])
c = ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=sid)
cid = c["SnapshotId"]
put(cid, 5, bytes(BS))
put(cid, 7, b)
ebs.complete_snapshot(SnapshotId=cid, ChangedBlocksCount=2)
changed = ebs.list_changed_blocks(FirstSnapshotId=sid, SecondSnapshotId=cid)["ChangedBlocks"]
print("changed", [x["BlockIndex"] for x in changed])
print("ids", sid, cid)
print("noparent", code(lambda: ebs.start_snapshot(VolumeSize=1, ParentSnapshotId="snap-00000000000000000")))
print("size0", code(lambda: ebs.start_snapshot(VolumeSize=100000)))
"#,
    );
    let line = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .unwrap_or_else(|| panic!("{k} missing in {out}"))
            .to_owned()
    };
    assert_eq!(line("conflict"), "ConflictException");
    assert_eq!(line("pending"), "pending");
    assert_eq!(line("badsum"), "ValidationException");
    assert_eq!(line("short"), "ValidationException");
    assert_eq!(line("beyond"), "ValidationException");
    assert_eq!(line("count"), "ValidationException");
    assert_eq!(line("badagg"), "ValidationException");
    assert_eq!(line("complete"), "completed");
    assert_eq!(line("after"), "ValidationException");
    assert_eq!(line("described"), "completed 1 base boto3");
    assert_eq!(line("changed"), "[5, 7]");
    assert_eq!(line("noparent"), "ResourceNotFoundException");
    assert_eq!(line("size0"), "ValidationException");
    let ids = line("ids");
    let (sid, cid) = ids.split_once(' ').unwrap();

    // Both restore like any snapshot: the child has the parent's block 0
    // and 2047, zeros at 5, its own block 7.
    for (name, id) in [("base", sid), ("child", cid)] {
        ep.daemon.vol_ok(&["create", name, "--from-snapshot", id]);
        ep.daemon.vol_ok(&["attach", name]);
    }
    qemu_io(
        &ep.daemon.uri("base"),
        &[
            "read -P 0xa1 0 512k",
            "read -P 0 512k 2M",
            "read -P 0xb2 2560k 512k",
            "read -P 0xa1 1073217536 512k",
        ],
    );
    qemu_io(
        &ep.daemon.uri("child"),
        &[
            "read -P 0xa1 0 512k",
            "read -P 0 2560k 512k",
            "read -P 0xb2 3584k 512k",
            "read -P 0xa1 1073217536 512k",
        ],
    );
    // The snapshot is deduplicated: blocks 0 and 2047 are one object.
    let s = ep.daemon.vol_json(&["snapshot", "inspect", sid]);
    assert_eq!(s["chunk_size"], BLOCK);
    assert_eq!(s["logical_bytes"], 3 * BLOCK);
    let v = ep.daemon.vol_json(&["snapshot", "verify", sid]);
    assert_eq!(
        (v["ok"].as_bool(), v["objects"].as_u64()),
        (Some(true), Some(2)),
        "{v}"
    );
    for name in ["base", "child"] {
        ep.daemon.vol_ok(&["detach", name]);
    }
    ep.daemon.finish();
}

#[test]
fn coldsnap_uploads_an_image_and_downloads_a_snapshot() {
    let ep = AwsEndpoint::start();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    // 1 GiB with holes: data at the start, in the middle and at the end.
    run_ok(Command::new("truncate").args(["-s", "1G"]).arg(&image));
    for (seek_k, count_k) in [(0, 1536), (300 * 1024 + 100, 700), (1024 * 1024 - 512, 512)] {
        run_ok(
            Command::new("dd")
                .args(["if=/dev/urandom", "bs=1K", "conv=notrunc", "status=none"])
                .arg(format!("of={}", image.display()))
                .arg(format!("seek={seek_k}"))
                .arg(format!("count={count_k}")),
        );
    }
    let up = ep.coldsnap(&[
        "upload",
        "--wait",
        "--no-progress",
        "--omit-zero-blocks",
        image.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&up.stdout);
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(up.status.success(), "coldsnap upload: {stdout} {stderr}");
    let id = stdout
        .split_whitespace()
        .find(|w| w.starts_with("snap-"))
        .unwrap_or_else(|| panic!("no snapshot id in {stdout}"))
        .to_owned();
    ep.daemon
        .vol_ok(&["create", "restored", "--from-snapshot", &id]);
    ep.daemon.vol_ok(&["attach", "restored"]);
    let uri = ep.daemon.uri("restored");
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&image)
            .arg(&uri),
    );
    let s = ep.daemon.vol_json(&["snapshot", "inspect", &id]);
    assert!(
        s["logical_bytes"].as_u64().unwrap() <= 6 << 20,
        "holes are not stored: {s}"
    );

    // A snapshot taken by volumed downloads to the volume's bytes.
    qemu_io(&uri, &["write -P 0x77 100M 3M"]);
    let snap = ep
        .daemon
        .vol_json(&["snapshot", "create", "restored", "--wait"]);
    let snap_id = snap["id"].as_str().unwrap();
    let out = dir.path().join("download.img");
    let down = ep.coldsnap(&["download", "--no-progress", snap_id, out.to_str().unwrap()]);
    assert!(
        down.status.success(),
        "coldsnap download: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&out)
            .arg(&uri),
    );
    ep.daemon.vol_ok(&["detach", "restored"]);
    ep.daemon.finish();
}

/// Issue 24, third path: an EBS direct upload held open past gc's grace
/// period while `vol gc` runs on a second daemon sharing the store, then
/// completed: every block put before and after the gc is in the snapshot,
/// read back by GetSnapshotBlock and by a restore compared byte for byte.
#[test]
fn a_direct_upload_outlasting_the_grace_period_survives_gc_on_another_host() {
    let grace = Duration::from_secs(2);
    let ep = AwsEndpoint::start_with_env(&[("VOLUMED_GC_GRACE", "2s")]);
    // Host B shares A's store directory. It starts before the upload, as
    // opening a local store clears temporary files, a live writer's too.
    let store = format!("file://{}", ep.daemon.data_dir().join("store").display());
    let b = TestDaemon::start_with_env(&[("VOLUMED_STORE", &store), ("VOLUMED_GC_GRACE", "2s")]);
    let mut ebs = EbsClient::start(&ep.url);
    let (id, status) = ebs.start_snapshot(1).unwrap();
    assert_eq!(status, "pending");
    let blocks = [(0u64, 0xa1u8), (3, 0xb2), (2047, 0xc3)];
    for (i, byte) in blocks {
        ebs.put_block(&id, i, byte).unwrap();
    }
    // Longer than the grace period, with nothing but the upload's own
    // claim keeping its blocks.
    std::thread::sleep(grace + Duration::from_secs(1));
    let gc = b.vol_json(&["gc"]);
    eprintln!("gc on host B during the upload: {gc}");
    ebs.put_block(&id, 5, 0xd4).unwrap();
    assert_eq!(ebs.complete(&id, 4).unwrap(), "completed");
    let d = &ep.daemon;
    let s = d.wait_snapshot_settled(&id);
    assert_eq!(s["state"], "completed", "{s}");

    let want: BTreeMap<u64, Option<u8>> = blocks
        .iter()
        .chain(&[(5, 0xd4)])
        .map(|(i, b)| (*i, Some(*b)))
        .collect();
    let got = ebs.read_blocks(&id).unwrap_or_else(|e| {
        panic!("the completed snapshot's blocks cannot be read after gc on host B ({gc}): {e}")
    });
    assert_eq!(got, want, "blocks read back (index -> byte)");
    let v = b.vol(&["--json", "snapshot", "verify", &id]);
    let report: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(report["ok"], true, "host B verifies the snapshot: {report}");

    // Restored on host A, the volume is the blocks put over zeros.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("model.img");
    run_ok(Command::new("truncate").args(["-s", "1G"]).arg(&image));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    for (i, b) in &want {
        use std::io::{Seek, SeekFrom, Write};
        f.seek(SeekFrom::Start(i * BLOCK)).unwrap();
        f.write_all(&vec![b.unwrap(); BLOCK as usize]).unwrap();
    }
    drop(f);
    d.vol_ok(&["create", "r", "--from-snapshot", &id]);
    d.vol_ok(&["attach", "r"]);
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&image)
            .arg(d.uri("r")),
    );
    d.vol_ok(&["detach", "r"]);
    b.finish();
    ep.daemon.finish();
}
