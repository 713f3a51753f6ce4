//! VM images in: every format imported through qemu-nbd and our NBD client
//! equals `qemu-img convert -O raw` of the same image and stays sparse;
//! stdin streams; OVA; `--sha256`; jobs (list, inspect, events, cancel);
//! kill -9 mid-import resumes; hostile and broken images are refused in
//! one line and leave nothing behind.
//!
//! Images are 128 MiB (256 MiB for the resume test) with 60 % holes rather
//! than the issue's 2 GiB, to keep the suite's time on a small machine; the
//! bench (`benches/import.sh`) runs the full size.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use volumed_tests::{TestDaemon, run_ok};

const MIB: u64 = 1 << 20;

/// A raw image of `size` bytes: per MiB, 60 % holes, 30 % random data, 10 %
/// written zeros, and a 4 KiB island of data in some holes.
fn make_raw(path: &Path, size: u64, seed: u64) -> u64 {
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
    let mut data = 0;
    for i in 0..size / MIB {
        let r = next() % 10;
        let at = i * MIB;
        if r < 3 {
            let buf: Vec<u8> = (0..MIB / 8).flat_map(|_| next().to_le_bytes()).collect();
            f.write_at(&buf, at).unwrap();
            data += MIB;
        } else if r == 3 {
            f.write_at(&vec![0u8; MIB as usize], at).unwrap();
        } else if r == 4 {
            let buf: Vec<u8> = (0..512).flat_map(|_| next().to_le_bytes()).collect();
            f.write_at(&buf, at + 64 * 1024).unwrap();
            data += 4096;
        }
    }
    f.sync_all().unwrap();
    data
}

fn qemu_img(args: &[&str]) -> String {
    run_ok(Command::new("qemu-img").args(args))
}

fn convert(src: &Path, fmt: &str, opts: &[&str], dst: &Path) {
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
    args.extend_from_slice(opts);
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    args.extend([s, d]);
    qemu_img(&args);
}

/// `qemu-img convert -O raw` of an image in any format: the reference.
fn reference(img: &Path, fmt: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!(
        "{}.ref",
        img.file_name().unwrap().to_str().unwrap()
    ));
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        fmt,
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    out
}

fn sha256_file(p: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(p));
    out.split_whitespace().next().unwrap().to_owned()
}

/// The volume's bytes equal `reference` exactly, by qemu-img compare
/// over its NBD export; detaches it again.
fn assert_volume_equals(d: &TestDaemon, name: &str, reference: &Path) {
    d.vol_ok(&["attach", name]);
    let uri = d.unix_uri(name);
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(reference)
        .arg(&uri)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "volume '{name}' differs from {}: {}{}",
        reference.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d.vol_ok(&["detach", name]);
}

fn inspect(d: &TestDaemon, name: &str) -> Value {
    d.vol_json(&["inspect", name])
}

fn wait_job(d: &TestDaemon, id: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let j = d.vol_json(&["job", "inspect", id]);
        if j["state"] != "running" {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} still running: {j}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_format_imports_equal_and_sparse() {
    let d = TestDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    let data = make_raw(&raw, 128 * MIB, 7);
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        ("raw", "raw", vec![]),
        ("qcow2", "qcow2", vec![]),
        ("vmdk", "vmdk", vec!["-o", "subformat=streamOptimized"]),
        ("vhdx", "vhdx", vec![]),
        ("vhd-dynamic", "vpc", vec![]),
        (
            "vhd-fixed",
            "vpc",
            vec!["-o", "subformat=fixed,force_size=on"],
        ),
    ];
    let chunk = 512 * 1024u64;
    for (label, fmt, opts) in &cases {
        let img = dir.path().join(format!("img.{label}"));
        if *label == "raw" {
            std::fs::copy(&raw, &img).unwrap();
            // A copy is not sparse; make it so again.
            run_ok(Command::new("fallocate").arg("-d").arg(&img));
        } else {
            convert(&raw, fmt, opts, &img);
        }
        let want = reference(&img, fmt, dir.path());
        let name = format!("v-{label}");
        // Detected from the header: no --format.
        let v: Value =
            serde_json::from_str(&d.vol_ok(&["--json", "import", img.to_str().unwrap(), &name]))
                .unwrap();
        assert_eq!(v["name"], name.as_str());
        assert_eq!(v["state"], "available", "{label}: {v}");
        let size = std::fs::metadata(&want).unwrap().len();
        assert_eq!(
            v["size"].as_u64().unwrap(),
            size.next_multiple_of(512),
            "{label}"
        );
        // At most the image's data plus one chunk per extent of data (each
        // data MiB and island touches at most two chunks more than its bytes).
        let alloc = v["allocated_bytes"].as_u64().unwrap();
        let extents = 128 * 2;
        assert!(
            alloc <= data + extents * chunk,
            "{label}: {alloc} allocated for {data} bytes of data"
        );
        assert!(
            alloc >= data - data / 10,
            "{label}: {alloc} allocated for {data}"
        );
        assert_volume_equals(&d, &name, &want);
    }
    // The job list shows them, completed, with their formats.
    let jobs = d.vol_json(&["job", "list"]);
    let jobs = jobs["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), cases.len());
    for j in jobs {
        assert_eq!(j["state"], "completed", "{j}");
        assert_eq!(j["bytes_done"], j["bytes_total"], "{j}");
        assert_eq!(j["kind"], "import");
    }
    let formats: Vec<&str> = jobs.iter().map(|j| j["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["raw", "qcow2", "vmdk", "vhdx", "vpc", "vpc"]);
    // The table for people.
    let table = d.vol_ok(&["job", "list"]);
    assert!(
        table.starts_with("ID") && table.contains("completed"),
        "{table}"
    );
    d.finish();
}

#[test]
fn sha256_right_and_wrong_and_snapshot() {
    let d = TestDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    make_raw(&raw, 64 * MIB, 11);
    let img = dir.path().join("img.qcow2");
    convert(&raw, "qcow2", &[], &img);
    let hash = sha256_file(&raw);
    let p = img.to_str().unwrap();
    let wrong = "0".repeat(64);
    let err = d.vol_err(&["import", p, "bad", "--sha256", &wrong]);
    assert!(
        err.contains("sha256 mismatch") && err.contains(&hash),
        "{err}"
    );
    assert!(!d.volume_names().contains(&"bad".to_owned()));
    assert_eq!(d.volume_dirs().len(), 0, "the failed import left files");
    let v = d.vol_json(&[
        "import",
        p,
        "good",
        "--sha256",
        &hash,
        "--snapshot",
        "--label",
        "k=v",
    ]);
    assert_eq!(v["state"], "available");
    let jobs = d.vol_json(&["job", "list"]);
    let last = jobs["jobs"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["sha256"], hash.as_str());
    let snap = last["snapshot"].as_str().expect("a snapshot id").to_owned();
    let s = d.wait_snapshot_settled(&snap);
    assert_eq!(s["state"], "completed", "{s}");
    assert_eq!(s["labels"]["k"], "v");
    // The same image again, snapshotted: dedup uploads nothing new.
    d.vol_json(&["import", p, "again", "--snapshot"]);
    let jobs = d.vol_json(&["job", "list"]);
    let last = jobs["jobs"].as_array().unwrap().last().unwrap().clone();
    let s2 = d.wait_snapshot_settled(last["snapshot"].as_str().unwrap());
    assert_eq!(s2["state"], "completed");
    assert_eq!(s2["uploaded_bytes"], 0, "{s2}");
    assert_volume_equals(&d, "good", &raw);
    d.finish();
}

/// `cat img | vol import - v`, through a pipe, and a zstd stream.
#[test]
fn stdin_imports_are_equal_and_sparse() {
    let d = TestDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    let data = make_raw(&raw, 64 * MIB + 1000, 5);
    let zst = dir.path().join("base.raw.zst");
    run_ok(
        Command::new("zstd")
            .args(["-q", "-f", "-o"])
            .arg(&zst)
            .arg(&raw),
    );
    let hash = sha256_file(&raw);
    for (name, producer) in [
        ("s-cat", vec!["cat".to_owned(), raw.display().to_string()]),
        (
            "s-zstd",
            vec!["zstd".to_owned(), "-dc".into(), zst.display().to_string()],
        ),
    ] {
        let mut prod = Command::new(&producer[0])
            .args(&producer[1..])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Command::new(volumed_tests::vol_bin())
            .arg("--socket")
            .arg(d.socket())
            .args(["--json", "import", "-", name, "--sha256", &hash])
            .stdin(prod.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(prod.wait().unwrap().success());
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["state"], "available");
        // The stream's length, rounded up to a sector.
        assert_eq!(
            v["size"].as_u64().unwrap(),
            (64 * MIB + 1000).next_multiple_of(512)
        );
        let alloc = v["allocated_bytes"].as_u64().unwrap();
        assert!(
            alloc <= data + 256 * 512 * 1024,
            "{name}: {alloc} for {data}"
        );
        // The reference is the stream padded to the volume's size.
        let padded = dir.path().join("padded.raw");
        std::fs::copy(&raw, &padded).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&padded)
            .unwrap();
        f.set_len((64 * MIB + 1000).next_multiple_of(512)).unwrap();
        assert_volume_equals(&d, name, &padded);
    }
    // An empty stream and a wrong hash: one line, nothing left.
    let mut child = Command::new(volumed_tests::vol_bin())
        .arg("--socket")
        .arg(d.socket())
        .args(["import", "-", "empty"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("empty") && err.trim().lines().count() == 1,
        "{err}"
    );
    let mut child = Command::new(volumed_tests::vol_bin())
        .arg("--socket")
        .arg(d.socket())
        .args(["import", "-", "wrong", "--sha256", &"a".repeat(64)])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&[1u8; 4096]).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sha256 mismatch"), "{err}");
    let names = d.volume_names();
    assert_eq!(names, ["s-cat", "s-zstd"]);
    d.finish();
}

/// An OVA built with tar from an OVF and two stream-optimized VMDKs.
#[test]
fn ova_gives_one_volume_per_disk_in_order() {
    let d = TestDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    make_raw(&a, 32 * MIB, 21);
    make_raw(&b, 48 * MIB, 22);
    convert(
        &a,
        "vmdk",
        &["-o", "subformat=streamOptimized"],
        &dir.path().join("disk-a.vmdk"),
    );
    convert(
        &b,
        "vmdk",
        &["-o", "subformat=streamOptimized"],
        &dir.path().join("disk-b.vmdk"),
    );
    // The OVF lists disk b first: the volumes follow the OVF's order.
    let ovf = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:href="disk-a.vmdk" ovf:id="file1"/>
    <File ovf:href="disk-b.vmdk" ovf:id="file2"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:capacity="50331648" ovf:diskId="vmdisk2" ovf:fileRef="file2" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="33554432" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm"><Info>A VM</Info></VirtualSystem>
</Envelope>
"#;
    std::fs::write(dir.path().join("vm.ovf"), ovf).unwrap();
    let ova = dir.path().join("vm.ova");
    run_ok(
        Command::new("tar")
            .current_dir(dir.path())
            .args(["--format=ustar", "-cf"])
            .arg(&ova)
            .args(["vm.ovf", "disk-a.vmdk", "disk-b.vmdk"]),
    );
    let list = d.vol_json(&["import", ova.to_str().unwrap(), "app"]);
    let vols = list["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2, "{list}");
    assert_eq!(vols[0]["name"], "app");
    assert_eq!(vols[1]["name"], "app-1");
    assert_eq!(vols[0]["size"], 48 * MIB);
    assert_eq!(vols[1]["size"], 32 * MIB);
    assert_volume_equals(&d, "app", &b);
    assert_volume_equals(&d, "app-1", &a);
    d.finish();
}

/// kill -9 at about half of a file import; after the restart the job goes
/// on from its checkpoint and the bytes are equal.
#[test]
fn kill9_mid_import_resumes_from_the_checkpoint() {
    kill_mid_import(&[("VOLUMED_FAILPOINTS", "import-window=150")]);
}

/// The same under the power-loss engine, where kill -9 also loses every
/// write not yet synced: a checkpoint recorded before the flush of the
/// bytes it covers had completed would resume past lost data, and the
/// volume's bytes would differ from the image's (checked: with the flush
/// taken out, this test fails and the kill -9 one above still passes).
#[test]
fn power_loss_mid_import_resumes_from_a_synced_checkpoint() {
    kill_mid_import(&[
        ("VOLUMED_FAILPOINTS", "import-window=150"),
        ("VOLUMED_IO_ENGINE", "powerloss-sim"),
    ]);
}

fn kill_mid_import(env: &[(&str, &str)]) {
    let mut d = TestDaemon::start_with_env(env);
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    make_raw(&raw, 256 * MIB, 3);
    let img = dir.path().join("img.qcow2");
    convert(&raw, "qcow2", &[], &img);
    let hash = sha256_file(&raw);
    let id = d
        .vol_ok(&[
            "import",
            img.to_str().unwrap(),
            "big",
            "--no-wait",
            "--sha256",
            &hash,
        ])
        .trim()
        .to_owned();
    assert!(id.starts_with("job-"), "{id}");
    // Half-filled, the volume is not available.
    assert_eq!(inspect(&d, "big")["state"], "importing");
    let err = d.vol_err(&["attach", "big"]);
    assert!(err.contains("being imported"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = d.vol_json(&["job", "inspect", &id]);
        assert_eq!(j["state"], "running", "{j}");
        if j["bytes_done"].as_u64().unwrap() >= 128 * MIB {
            break;
        }
        assert!(Instant::now() < deadline, "import too slow: {j}");
        std::thread::sleep(Duration::from_millis(50));
    }
    kill9_and_check_decoders(&mut d, &img, &id);
    d.set_env(&[]);
    d.start_again();
    let j = wait_job(&d, &id, Duration::from_secs(120));
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(j["sha256"], hash.as_str());
    assert!(
        d.log().contains("resuming an import"),
        "the job did not resume"
    );
    assert_eq!(inspect(&d, "big")["state"], "available");
    assert_volume_equals(&d, "big", &raw);
    d.finish_expecting(&[], &["previous run did not shut down cleanly"]);
}

/// kill -9 of a daemon whose import reads `img` through qemu-nbd: the
/// decoder dies with it, and only its socket is left behind.
fn kill9_and_check_decoders(d: &mut TestDaemon, img: &Path, job: &str) {
    let serving = |p: &volumed_tests::procs::Proc| {
        p.cmdline.starts_with("qemu-nbd ") && p.cmdline.contains(img.to_str().unwrap())
    };
    let before = d.daemon_children();
    assert!(
        before.iter().any(serving),
        "no qemu-nbd served the image before the kill: {before:?}"
    );
    d.kill9();
    let left = d.survivors();
    assert!(
        !left.iter().any(serving),
        "the import's qemu-nbd outlived the daemon killed with -9: {left:?}"
    );
    assert!(left.is_empty(), "{left:?}");
    let socket = d.data_dir().join("jobs").join(job).join("nbd.sock");
    assert!(
        socket.exists(),
        "the killed run left no socket at {socket:?}"
    );
}

/// An import killed with the daemon whose image is gone by the restart:
/// its decoder died with the daemon (nothing holds the deleted image
/// open), and the restart removes the stale socket before it finds that
/// the import cannot resume.
#[test]
fn kill9_mid_import_leaves_no_decoder_and_no_stale_socket() {
    let mut d = TestDaemon::start_with_env(&[("VOLUMED_FAILPOINTS", "import-window=500")]);
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    make_raw(&raw, 64 * MIB, 5);
    let img = dir.path().join("img.qcow2");
    convert(&raw, "qcow2", &[], &img);
    let id = d
        .vol_ok(&["import", img.to_str().unwrap(), "gone", "--no-wait"])
        .trim()
        .to_owned();
    // Killed once the decoder serves: its socket exists (qemu-nbd makes it
    // a moment after it starts).
    let socket = d.data_dir().join("jobs").join(&id).join("nbd.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(socket.exists()
        && d.daemon_children()
            .iter()
            .any(|p| p.cmdline.starts_with("qemu-nbd ")))
    {
        assert!(Instant::now() < deadline, "no qemu-nbd started");
        std::thread::sleep(Duration::from_millis(10));
    }
    kill9_and_check_decoders(&mut d, &img, &id);
    std::fs::remove_file(&img).unwrap();
    d.set_env(&[]);
    d.start_again();
    let j = wait_job(&d, &id, Duration::from_secs(30));
    assert_eq!(j["state"], "error", "{j}");
    assert!(
        j["error"].as_str().unwrap().contains("could not resume"),
        "{j}"
    );
    let left: Vec<_> = std::fs::read_dir(d.data_dir().join("jobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "stale job work entries: {left:?}");
    assert!(
        d.log()
            .contains("removed what earlier runs left in the job work directory"),
        "{}",
        d.log()
    );
    assert!(d.volume_names().is_empty());
    d.finish_expecting(&[], &["previous run did not shut down cleanly"]);
}

/// A stream import cut by kill -9 is rolled back at the restart.
#[test]
fn kill9_mid_stream_import_rolls_back() {
    let mut d = TestDaemon::start();
    let mut child = Command::new(volumed_tests::vol_bin())
        .arg("--socket")
        .arg(d.socket())
        .args(["import", "-", "piped"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&vec![7u8; 8 << 20]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.volume_names().contains(&"piped".to_owned()) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(inspect(&d, "piped")["state"], "importing");
    d.kill9();
    drop(stdin);
    let _ = child.wait();
    d.start_again();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = d.vol_json(&["job", "list"]);
        let j = &jobs["jobs"][0];
        if j["state"] == "error" {
            assert!(
                j["error"].as_str().unwrap().contains("cannot resume"),
                "{j}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{j}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.volume_names().is_empty());
    assert_eq!(d.volume_dirs().len(), 0);
    d.finish_expecting(&[], &["previous run did not shut down cleanly"]);
}

#[test]
fn cancel_and_events() {
    let d = TestDaemon::start_with_env(&[("VOLUMED_FAILPOINTS", "import-window=200")]);
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    make_raw(&raw, 128 * MIB, 9);
    let id = d
        .vol_ok(&[
            "import",
            raw.to_str().unwrap(),
            "c",
            "--no-wait",
            "--format",
            "raw",
        ])
        .trim()
        .to_owned();
    // The event stream ends with the final state.
    let ev = d.vol_json(&["job", "cancel", &id]);
    assert_eq!(ev["id"], id.as_str());
    let (status, body) = d.api("GET", &format!("/v1/jobs/{id}/events"), "");
    assert_eq!(status, 200);
    // Chunked transfer: the JSON lines are among the chunk sizes.
    let lines: Vec<Value> = body
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty(), "{body}");
    assert_eq!(lines.last().unwrap()["state"], "cancelled", "{body}");
    let j = wait_job(&d, &id, Duration::from_secs(30));
    assert_eq!(j["state"], "cancelled");
    assert!(d.volume_names().is_empty());
    let err = d.vol_err(&["job", "cancel", &id]);
    assert!(err.contains("already ended"), "{err}");
    let err = d.vol_err(&["job", "inspect", "job-00000000000000ff"]);
    assert!(err.contains("not found"), "{err}");
    let err = d.vol_err(&["job", "inspect", "../x"]);
    assert!(err.contains("invalid job id"), "{err}");
    d.finish();
}

#[test]
fn hostile_and_broken_images_are_refused() {
    let d = TestDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).display().to_string();
    // qcow2 backed by /etc/passwd.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        &s("backed.qcow2"),
        "1M",
    ]);
    // qcow2 with an external data file.
    qemu_img(&["create", "-q", "-f", "raw", &s("df.raw"), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s("df.raw")),
        &s("df.qcow2"),
        "1M",
    ]);
    // A VMDK descriptor whose extent is /etc/shadow (and one with ../).
    std::fs::write(
        p("shadow.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\nRW 2048 FLAT \"/etc/shadow\" 0\n",
    )
    .unwrap();
    std::fs::write(
        p("up.vmdk"),
        "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"../x.raw\" 0\n",
    )
    .unwrap();
    // An encrypted qcow2.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=pw",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        &s("enc.qcow2"),
        "1M",
    ]);
    // A truncated qcow2 with data in it.
    let raw = p("data.raw");
    make_raw(&raw, 16 * MIB, 13);
    convert(&raw, "qcow2", &[], &p("full.qcow2"));
    let full = std::fs::read(p("full.qcow2")).unwrap();
    std::fs::write(p("trunc.qcow2"), &full[..full.len() / 2]).unwrap();
    // Not an image at all.
    std::fs::write(p("text.txt"), "just some text\n".repeat(100)).unwrap();
    d.vol_ok(&["create", "taken", "--size", "1M"]);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![s("backed.qcow2"), "a".into()],
            "backing file (/etc/passwd)",
        ),
        (vec![s("df.qcow2"), "a".into()], "external data file"),
        (
            vec![s("shadow.vmdk"), "a".into()],
            "\"/etc/shadow\" is outside the image",
        ),
        (vec![s("up.vmdk"), "a".into()], "outside the image"),
        (vec![s("enc.qcow2"), "a".into()], "encrypted"),
        (vec![s("trunc.qcow2"), "a".into()], "truncated or damaged"),
        (
            vec![s("text.txt"), "a".into(), "--format".into(), "vmdk".into()],
            "not a valid vmdk image",
        ),
        (vec![s("missing.qcow2"), "a".into()], "No such file"),
        (
            vec![s("full.qcow2"), "taken".into()],
            "volume 'taken' already exists",
        ),
        (
            vec![dir.path().display().to_string(), "a".into()],
            "not a regular file",
        ),
    ];
    for (args, want) in &cases {
        let mut full_args = vec!["import"];
        full_args.extend(args.iter().map(String::as_str));
        let err = d.vol_err(&full_args);
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(d.volume_names(), ["taken"], "{args:?} left a volume");
        assert_eq!(d.volume_dirs().len(), 1, "{args:?} left files");
    }
    // A qcow2 given as raw imports its raw bytes, not what qemu would read.
    let v = d.vol_json(&["import", &s("full.qcow2"), "asraw", "--format", "raw"]);
    assert_eq!(
        v["size"].as_u64().unwrap(),
        (full.len() as u64).next_multiple_of(512)
    );
    let padded = p("padded");
    std::fs::write(&padded, &full).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&padded)
        .unwrap()
        .set_len((full.len() as u64).next_multiple_of(512))
        .unwrap();
    assert_volume_equals(&d, "asraw", &padded);
    // Bad requests through the API.
    let (st, body) = d.api(
        "POST",
        "/v1/imports",
        r#"{"source":"relative.img","name":"x"}"#,
    );
    assert_eq!(st, 400, "{body}");
    let (st, body) = d.api(
        "POST",
        "/v1/imports",
        r#"{"source":"/x","name":"x","format":"iso"}"#,
    );
    assert_eq!(st, 400, "{body}");
    let (st, _) = d.api("POST", "/v1/imports/stream", "");
    assert_eq!(st, 400);
    let err = d.vol_err(&["import", &s("full.qcow2"), "x", "--sha256", "abc"]);
    assert!(err.contains("invalid sha256"), "{err}");
    // The daemon is unharmed, and reports the qemu tools it runs.
    let st = d.vol_json(&["status"]);
    assert!(
        st["image_tools"]
            .as_str()
            .unwrap()
            .starts_with("qemu-utils "),
        "{st}"
    );
    d.finish();
}

/// `vol export` of a snapshot to each format: qemu-img compare against the
/// snapshot's bytes says identical; VMDK is stream-optimized; raw is sparse
/// and `vol export SNAP -` hashes like the imported image. An attached
/// volume under writes exports point-in-time.
#[test]
fn export_to_every_format() {
    let d = TestDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    let data = make_raw(&raw, 64 * MIB, 17);
    let hash = sha256_file(&raw);
    d.vol_json(&["import", raw.to_str().unwrap(), "src", "--snapshot"]);
    let jobs = d.vol_json(&["job", "list"]);
    let snap = jobs["jobs"][0]["snapshot"].as_str().unwrap().to_owned();
    d.wait_snapshot_settled(&snap);
    for (fmt, extra) in [
        ("raw", vec![]),
        ("qcow2", vec!["--compress"]),
        ("vmdk", vec![]),
        ("vhdx", vec![]),
        ("vpc", vec![]),
    ] {
        let out = dir.path().join(format!("out.{fmt}"));
        let mut args = vec![
            "--json",
            "export",
            &snap,
            out.to_str().unwrap(),
            "--format",
            fmt,
        ];
        args.extend(extra.iter().copied());
        let j: Value = serde_json::from_str(&d.vol_ok(&args)).unwrap();
        assert_eq!(j["state"], "completed", "{fmt}: {j}");
        let info: Value = serde_json::from_str(&qemu_img(&[
            "info",
            "--output=json",
            "-f",
            fmt,
            out.to_str().unwrap(),
        ]))
        .unwrap();
        if fmt == "vmdk" {
            assert_eq!(
                info["format-specific"]["data"]["create-type"],
                "streamOptimized"
            );
        }
        if fmt == "qcow2" {
            assert_eq!(info["format-specific"]["data"]["compression-type"], "zstd");
        }
        let cmp = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", fmt])
            .arg(&raw)
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "{fmt}: {}{}",
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        );
        if fmt == "raw" {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&out).unwrap();
            assert_eq!(m.len(), 64 * MIB);
            assert!(
                m.blocks() * 512 <= data + 64 * 512 * 1024,
                "not sparse: {}",
                m.blocks() * 512
            );
            assert_eq!(sha256_file(&out), hash);
        }
    }
    // Raw to stdout.
    let out = Command::new(volumed_tests::vol_bin())
        .arg("--socket")
        .arg(d.socket())
        .args(["export", &snap, "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut sha = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sha.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let s = String::from_utf8(sha.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(s.split_whitespace().next().unwrap(), hash);
    // Bad exports: one line each.
    let existing = dir.path().join("out.raw");
    for (args, want) in [
        (vec!["export", &snap, existing.to_str().unwrap()], "exists"),
        (
            vec!["export", "snap-doesnotexist", "/tmp/x.raw"],
            "not found",
        ),
        (vec!["export", &snap, "-", "--format", "qcow2"], "stdout"),
        (
            vec![
                "export",
                &snap,
                "/tmp/x.vmdk",
                "--format",
                "vmdk",
                "--compress",
            ],
            "qcow2 exports only",
        ),
        (vec!["export", "nosuchvolume", "/tmp/x.raw"], "not found"),
    ] {
        let err = d.vol_err(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A volume's export deletes the snapshot it took unless asked to keep
    // it, and gives the file to who asked; the job list shows the snapshot
    // read and the volume it came from.
    let count = |d: &TestDaemon| {
        d.vol_json(&["snapshot", "list", "--volume", "src"])
            .as_array()
            .unwrap()
            .len()
    };
    let snaps_before = count(&d);
    let plain = dir.path().join("plain.raw");
    let j = d.vol_json(&["export", "src", plain.to_str().unwrap()]);
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(j["snapshot_kept"], false, "{j}");
    assert_eq!(
        count(&d),
        snaps_before,
        "the export's snapshot was left behind"
    );
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    assert!(
        j["owner"]
            .as_str()
            .unwrap()
            .starts_with(&format!("uid={uid} ")),
        "{j}"
    );
    assert_eq!(sha256_file(&plain), hash);
    let list = d.vol(&["job", "list"]);
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    let taken = j["snapshot"].as_str().unwrap();
    assert!(list.contains(&format!("{taken} (of src)")), "{list}");
    // Job ids are dense.
    let ids: Vec<String> = d.vol_json(&["job", "list"])["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect();
    let want: Vec<String> = (1..=ids.len()).map(|n| format!("job-{n:016x}")).collect();
    assert_eq!(ids, want);
    // An attached volume under writes: the export is its snapshot's instant.
    d.vol_ok(&["attach", "src"]);
    let uri = d.unix_uri("src");
    let before = dir.path().join("before.raw");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri,
        before.to_str().unwrap(),
    ]);
    let writer = Command::new("fio")
        .args([
            "--name=w",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=64k",
            "--size=64M",
            "--time_based",
            "--runtime=8",
            "--iodepth=4",
        ])
        .arg(format!("--uri={uri}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The export starts once fio is writing (its writes fill holes, so the
    // volume's allocation grows).
    let alloc0 = inspect(&d, "src")["allocated_bytes"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while inspect(&d, "src")["allocated_bytes"].as_u64().unwrap() == alloc0 {
        assert!(Instant::now() < deadline, "fio did not start writing");
        std::thread::sleep(Duration::from_millis(50));
    }
    let live = dir.path().join("live.raw");
    let j = d.vol_json(&["export", "src", live.to_str().unwrap(), "--keep-snapshot"]);
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(j["snapshot_kept"], true, "{j}");
    let mut writer = writer;
    writer.wait().unwrap();
    // What the export holds is the snapshot it took, read back another way
    // (a volume restored from it), and not the volume after the writes
    // that went on.
    let taken = j["snapshot"].as_str().unwrap().to_owned();
    d.vol_ok(&["create", "restored", "--from-snapshot", &taken]);
    assert_volume_equals(&d, "restored", &live);
    let after = dir.path().join("after.raw");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri,
        after.to_str().unwrap(),
    ]);
    assert_ne!(
        sha256_file(&live),
        sha256_file(&after),
        "writes after the instant leaked in"
    );
    assert_ne!(
        sha256_file(&live),
        sha256_file(&before),
        "fio wrote nothing before the snapshot"
    );
    d.vol_ok(&["detach", "src"]);
    d.finish();
}

/// An export is given to the user who asked: the daemon reads the control
/// socket's peer credentials (`SO_PEERCRED`) and, running as root here,
/// makes the file theirs instead of leaving it 0600 to itself.
#[test]
fn an_exported_file_belongs_to_who_asked() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let d = TestDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    d.vol_ok(&["create", "v", "--size", "8M"]);
    // Let user 65534 reach the socket (the data dir stays not writable by
    // others, as the daemon requires).
    let perm = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    perm(&d.data_dir(), 0o711).unwrap();
    perm(&d.socket(), 0o666).unwrap();
    let dest = dir.path().join("v.raw");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(volumed_tests::vol_bin())
        .arg("--socket")
        .arg(d.socket())
        .args(["--json", "export", "v"])
        .arg(&dest)
        .env_remove("VOLUMED_SOCKET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        j["owner"]
            .as_str()
            .unwrap()
            .starts_with("uid=65534 gid=65534 mode=0600"),
        "{j}"
    );
    let m = std::fs::metadata(&dest).unwrap();
    assert_eq!((m.uid(), m.gid()), (65534, 65534));
    perm(&d.socket(), 0o600).unwrap();
    perm(&d.data_dir(), 0o700).unwrap();
    d.finish();
}
