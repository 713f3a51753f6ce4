//! The data path with real clients: every NBD command, bulk copies, fio
//! verification, a real ext4 filesystem, and BLOCK_STATUS from the map.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use volumed_tests::{TestDaemon, nbd_py, nbdinfo_json, qemu_io, run_ok};

#[test]
fn nbdinfo_shows_every_feature() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "f", "--size", "1G", "--chunk-size", "1M"]);
    d.vol_ok(&["attach", "f"]);
    let info = nbdinfo_json(&d.uri("f"));
    let e = &info["exports"][0];
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_df",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag}: {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["contexts"], serde_json::json!(["base:allocation"]));
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 1 << 20);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(info["protocol"], "newstyle-fixed");
    d.finish();
}

/// Each command through libnbd, with structured replies and
/// base:allocation, checking BLOCK_STATUS after every change.
#[test]
fn every_command_and_block_status() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "c", "--size", "8M", "--chunk-size", "64K"]);
    d.vol_ok(&["attach", "c"]);
    let out = nbd_py(
        &d.uri("c"),
        r#"
CS = 65536
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(URI)
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)

def status(off, length, flags=0):
    got = []
    def cb(meta, offset, entries, err):
        assert meta == nbd.CONTEXT_BASE_ALLOCATION
        got.extend(zip(entries[0::2], entries[1::2]))
    h.block_status(length, off, cb, flags)
    return got

HOLE = nbd.STATE_HOLE | nbd.STATE_ZERO
# A new volume is one hole, and reads as zeros without touching disk.
assert status(0, 8 << 20) == [(8 << 20, HOLE)], status(0, 8 << 20)
assert h.pread(CS * 2, 0) == bytearray(CS * 2)

# WRITE (and FUA) allocate their chunks.
h.pwrite(b'\xab' * 100, CS + 10)
h.pwrite(b'\xcd' * CS, 3 * CS, nbd.CMD_FLAG_FUA)
assert status(0, 5 * CS) == [(CS, HOLE), (CS, 0), (CS, HOLE), (CS, 0), (CS, HOLE)], status(0, 5 * CS)
assert h.pread(100, CS + 10) == b'\xab' * 100
assert h.pread(10, CS) == bytearray(10)
# REQ_ONE: a single extent.
assert len(status(0, 5 * CS, nbd.CMD_FLAG_REQ_ONE)) == 1
# A read spanning data and holes, with and without DF.
whole = h.pread(5 * CS, 0)
assert whole[3 * CS:4 * CS] == b'\xcd' * CS and whole[CS + 10:CS + 110] == b'\xab' * 100
chunks = []
def chunk(sub, off, st, err):
    chunks.append((off, st, bytes(sub)))
    return 0
h.pread_structured(5 * CS, 0, chunk)
assert any(st == nbd.READ_HOLE for _, st, _ in chunks), "holes come back as OFFSET_HOLE"
chunks.clear()
h.pread_structured(5 * CS, 0, chunk, nbd.CMD_FLAG_DF)
assert len(chunks) == 1 and chunks[0][1] == nbd.READ_DATA and chunks[0][2] == whole, "DF: one data chunk"

# TRIM of a whole chunk makes it a hole; a partial trim zeroes in place.
h.trim(CS, 3 * CS)
assert status(3 * CS, CS) == [(CS, HOLE)]
assert h.pread(CS, 3 * CS) == bytearray(CS)
h.pwrite(b'\x11' * (2 * CS), 4 * CS)
h.trim(100, 4 * CS + 50)
assert h.pread(150, 4 * CS) == b'\x11' * 50 + bytearray(100)
assert status(4 * CS, CS) == [(CS, 0)], ("a partly trimmed chunk stays allocated", status(4 * CS, CS))

# WRITE_ZEROES punches whole chunks, unless NO_HOLE; FAST_ZERO is honoured.
h.zero(CS, 5 * CS)
assert status(5 * CS, CS) == [(CS, HOLE)]
h.zero(CS, 5 * CS, nbd.CMD_FLAG_NO_HOLE)
assert status(5 * CS, CS) == [(CS, 0)], "NO_HOLE keeps the range allocated"
assert h.pread(CS, 5 * CS) == bytearray(CS)
h.pwrite(b'\x22' * CS, 6 * CS)
h.zero(CS, 6 * CS, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
assert h.pread(CS, 6 * CS) == bytearray(CS)

# CACHE and FLUSH.
h.cache(4 * CS, 0)
h.flush()

# Out of range and bad flags come back as errors, and the session goes on.
for bad in (lambda: h.pread(512, (8 << 20) - 256),
            lambda: h.zero(1024, (8 << 20) - 512),
            lambda: h.trim(1024, (8 << 20) - 512)):
    try:
        bad()
        raise SystemExit("out-of-range request succeeded")
    except nbd.Error:
        pass
h.set_strict_mode(0)
try:
    h.block_status(CS, 0, lambda *a: 0, 0x40)
    raise SystemExit("unknown flag accepted")
except nbd.Error as e:
    assert e.errno == 'EINVAL', e
assert h.pread(100, CS + 10) == b'\xab' * 100
h.shutdown()
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
    // qemu-img map reads the same allocation through qemu's client.
    let map =
        run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &d.uri("c")]));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert!(data.contains(&(4 * 65536, 2 * 65536)), "{map}");
    d.finish();
}

#[test]
fn qemu_io_zero_discard_read() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "q", "--size", "64M"]);
    d.vol_ok(&["attach", "q"]);
    let u = d.uri("q");
    qemu_io(
        &u,
        &[
            "write -P 0x61 0 8M",
            "write -z 1M 1M",
            "discard 4M 2M",
            "write -z -u 6M 1M",
        ],
    );
    qemu_io(
        &u,
        &[
            "read -P 0x61 0 1M",
            "read -P 0 1M 1M",
            "read -P 0x61 2M 2M",
            "read -P 0 4M 3M",
            "read -P 0x61 7M 1M",
        ],
    );
    qemu_io(&u, &["read -P 0 8M 56M"]);
    d.finish();
}

fn random_file(path: &Path, mib: usize) {
    run_ok(
        Command::new("head")
            .arg("-c")
            .arg(format!("{mib}M"))
            .arg("/dev/urandom")
            .stdout(std::fs::File::create(path).unwrap()),
    );
}

fn cmp(a: &Path, b: &Path) {
    run_ok(Command::new("cmp").arg(a).arg(b));
}

#[test]
fn nbdcopy_one_gib_in_and_out() {
    let d = TestDaemon::start();
    let tmp = d.dir.path();
    let src = tmp.join("src.img");
    random_file(&src, 1024);
    d.vol_ok(&["create", "big", "--size", "1G"]);
    d.vol_ok(&["attach", "big"]);
    let u = d.uri("big");

    run_ok(Command::new("nbdcopy").arg(&src).arg(&u));
    let out = tmp.join("out.img");
    run_ok(Command::new("nbdcopy").arg(&u).arg(&out));
    cmp(&src, &out);
    std::fs::remove_file(&out).unwrap();

    // Many connections and requests in flight, over the Unix socket too.
    random_file(&src, 1024);
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=64"])
            .arg(&src)
            .arg(&u),
    );
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=64"])
            .arg(d.unix_uri("big"))
            .arg(&out),
    );
    cmp(&src, &out);
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&u),
    );
    d.finish();
}

#[test]
fn fio_randwrite_qd32_verifies() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "fio", "--size", "256M"]);
    d.vol_ok(&["attach", "fio"]);
    let out = run_ok(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", d.uri("fio")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=64M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let json: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 64u64 << 20);
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 64 << 20,
        "verify read everything back"
    );
    d.finish();
}

/// qemu-storage-daemon exports the volume (its NBD client) as a FUSE file,
/// which is looped and mounted: a real ext4 on a volumed volume.
struct Fuse {
    child: Child,
    file: std::path::PathBuf,
}

impl Fuse {
    fn start(port: u16, export: &str, file: &Path) -> Self {
        std::fs::write(file, b"").unwrap();
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=nbd,node-name=n0,server.type=inet,server.host=127.0.0.1,server.port={port},export={export}"))
            .arg("--export")
            .arg(format!("type=fuse,id=e0,node-name=n0,mountpoint={},writable=on", file.display()))
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(file).map(|m| m.len()).unwrap_or(0) == 0 {
            assert!(Instant::now() < deadline, "FUSE export did not appear");
            std::thread::sleep(Duration::from_millis(50));
        }
        Fuse {
            child,
            file: file.to_owned(),
        }
    }

    fn stop(mut self) {
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap();
        // qemu unmounts on SIGTERM; this only covers a qemu that did not.
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.file)
            .stderr(Stdio::null())
            .status();
    }
}

fn sh(script: &str) -> String {
    run_ok(Command::new("sh").arg("-ec").arg(script))
}

#[test]
fn ext4_on_a_volume() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "fs", "--size", "512M"]);
    d.vol_ok(&["attach", "fs"]);
    let tmp = d.dir.path();
    let img = tmp.join("disk.img");
    let mnt = tmp.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (img_s, mnt_s) = (img.display().to_string(), mnt.display().to_string());

    let fuse = Fuse::start(d.nbd_port, "fs", &img);
    sh(&format!(
        "mkfs.ext4 -q -F {img_s}; mount -o loop {img_s} {mnt_s}; \
         mkdir {mnt_s}/dir; for i in $(seq 1 50); do echo file $i > {mnt_s}/dir/f$i; done; \
         head -c 64M /dev/urandom > {mnt_s}/blob; sha256sum {mnt_s}/blob | cut -d' ' -f1 > {tmp}/blob.sum; \
         umount {mnt_s}; e2fsck -fn {img_s}",
        tmp = tmp.display()
    ));
    fuse.stop();

    d.vol_ok(&["detach", "fs"]);
    d.vol_ok(&["attach", "fs"]);
    let fuse = Fuse::start(d.nbd_port, "fs", &img);
    let out = sh(&format!(
        "e2fsck -fn {img_s} >/dev/null; mount -o loop {img_s} {mnt_s}; cat {mnt_s}/dir/f37; \
         test \"$(sha256sum {mnt_s}/blob | cut -d' ' -f1)\" = \"$(cat {tmp}/blob.sum)\" && echo blob ok; \
         rm {mnt_s}/blob; fstrim -v {mnt_s} || true; umount {mnt_s}; e2fsck -fn {img_s} >/dev/null && echo fsck ok",
        tmp = tmp.display()
    ));
    fuse.stop();
    assert!(
        out.contains("file 37") && out.contains("blob ok") && out.contains("fsck ok"),
        "{out}"
    );
    d.finish();
}
