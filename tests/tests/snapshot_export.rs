//! `vol snapshot attach`: snapshots served read-only over NBD, with
//! dirty-bitmap contexts against other snapshots, checked with nbdinfo,
//! nbdcopy, qemu-io and libnbd on both stores.

use std::process::Command;

use serde_json::Value;

use volumed_tests::snapkit::{Store, dump, image, snap, u};
use volumed_tests::{TestDaemon, nbd_py, nbdinfo_json, qemu_io, run_ok};

const CHUNK: u64 = 512 << 10;

/// `nbdinfo --json --map=CONTEXT`: (offset, length, type) runs.
fn map(uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let out = run_ok(Command::new("nbdinfo").args(["--json", &format!("--map={context}"), uri]));
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| (u(&e["offset"]), u(&e["length"]), u(&e["type"])))
        .collect()
}

/// The ranges a map marks with bit 0 (dirty), adjacent ones merged.
fn dirty(runs: &[(u64, u64, u64)]) -> Vec<(u64, u64)> {
    merge(runs.iter().filter(|r| r.2 & 1 != 0).map(|r| (r.0, r.1)))
}

fn merge(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (off, len) in ranges {
        match out.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// What `vol snapshot diff` lists, data and zero extents alike, merged.
fn cli_diff(d: &TestDaemon, from: &str, to: &str) -> Vec<(u64, u64)> {
    let v = d.vol_json(&["snapshot", "diff", "--from", from, to]);
    merge(
        v["extents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (u(&e["offset"]), u(&e["length"]))),
    )
}

fn nbdcopy(uri: &str, path: &std::path::Path) -> Vec<u8> {
    let _ = std::fs::remove_file(path);
    run_ok(Command::new("nbdcopy").arg(uri).arg(path));
    std::fs::read(path).unwrap()
}

fn attach(d: &TestDaemon, id: &str) -> String {
    let s = d.vol_json(&["snapshot", "attach", id]);
    let e = &s["export"];
    assert!(
        e["uri"].as_str().unwrap().ends_with(&format!("/{id}")),
        "{s}"
    );
    assert!(
        e["unix_uri"]
            .as_str()
            .unwrap()
            .starts_with(&format!("nbd+unix:///{id}?socket="))
    );
    assert!(e["attached_at"].as_str().unwrap().ends_with('Z'));
    e["uri"].as_str().unwrap().to_owned()
}

fn exports_listed(d: &TestDaemon) -> String {
    run_ok(Command::new("nbdinfo").args(["--list", &d.uri("")]))
}

fn reads_bitmaps_and_incrementals(store: Store) {
    let d = store.daemon("export");
    d.vol_ok(&["create", "data", "--size", "64M"]);
    d.vol_ok(&["attach", "data"]);
    let live = d.uri("data");
    qemu_io(&live, &["write -P 0x01 0 4M", "write -P 0x02 10M 512k"]);
    let a = snap(&d, "data");
    let a_id = a["id"].as_str().unwrap();
    // Three chunks written (16 and 17 adjacent, and 30), one that held data
    // trimmed (20).
    qemu_io(
        &live,
        &[
            "write -P 0x03 8M 1M",
            "write -P 0x04 15M 4k",
            "discard 10M 512k",
        ],
    );
    let b = snap(&d, "data");
    let b_id = b["id"].as_str().unwrap();
    let at_b = dump(&d, "data");

    assert!(d.vol_json(&["snapshot", "inspect", b_id])["export"].is_null());
    let uri = attach(&d, b_id);
    // Attaching again is a no-op with the same answer; plain output is the URI.
    assert_eq!(d.vol_ok(&["snapshot", "attach", b_id]).trim(), uri);
    assert_eq!(
        d.vol_json(&["snapshot", "inspect", b_id])["export"]["uri"],
        uri.as_str()
    );

    let info = nbdinfo_json(&uri);
    let e = &info["exports"][0];
    assert_eq!(e["is_read_only"], true, "{info}");
    assert_eq!(e["can_multi_conn"], true, "{info}");
    assert_eq!(e["can_trim"], false, "{info}");
    assert_eq!(u(&e["export-size"]), 64 << 20);
    assert!(exports_listed(&d).contains(b_id));

    // Writes are refused: by qemu, which sees a read-only export, and by
    // the server, for a client that sends them anyway.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || text.contains("Permission denied"),
        "{text}"
    );
    let errnos = nbd_py(
        &uri,
        r#"
import errno
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(URI)
for op in (lambda: h.pwrite(b"x" * 4096, 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)):
    try:
        op()
        print("ok")
    except nbd.Error as e:
        print(errno.errorcode.get(e.errno, e.errno))
h.flush()
print(len(h.pread(4096, 0)))
"#,
    );
    assert_eq!(
        errnos.split_whitespace().collect::<Vec<_>>(),
        ["EPERM", "EPERM", "EPERM", "4096"]
    );

    // The live volume keeps being written while the export is read; the
    // export is B's bytes.
    qemu_io(&live, &["write -P 0x09 0 8M"]);
    let mut writer = Command::new("fio")
        .args(["--name=live", "--ioengine=nbd", &format!("--uri={live}")])
        .args(["--rw=randwrite", "--bs=64k", "--iodepth=4", "--size=64M"])
        .args(["--time_based", "--runtime=3", "--output=/dev/null"])
        .spawn()
        .unwrap();
    let exported = nbdcopy(&uri, &d.dir.path().join("b.img"));
    assert!(writer.wait().unwrap().success());
    assert!(
        exported == at_b,
        "the export is not the volume's bytes at B"
    );
    assert!(exported == image(&store.repo(&d, "export"), b_id));

    // base:allocation: zero chunks are holes; data chunks are data.
    let alloc = map(&uri, "base:allocation");
    let holes: Vec<(u64, u64)> = merge(alloc.iter().filter(|r| r.2 == 3).map(|r| (r.0, r.1)));
    assert!(holes.contains(&(18 * CHUNK, 12 * CHUNK)), "{alloc:?}");
    assert!(alloc.iter().all(|r| r.2 == 0 || r.2 == 3), "{alloc:?}");

    // The dirty bitmap against A is exactly the CLI's diff, under both names.
    let want = cli_diff(&d, a_id, b_id);
    assert_eq!(
        want,
        vec![
            (16 * CHUNK, 2 * CHUNK),
            (20 * CHUNK, CHUNK),
            (30 * CHUNK, CHUNK)
        ]
    );
    assert_eq!(
        dirty(&map(&uri, &format!("qemu:dirty-bitmap:{a_id}"))),
        want
    );
    assert_eq!(
        dirty(&map(&uri, &format!("x-volumed:changed:{a_id}"))),
        want
    );
    // Against itself, nothing changed.
    assert!(dirty(&map(&uri, &format!("qemu:dirty-bitmap:{b_id}"))).is_empty());

    // LIST_META_CONTEXT with the namespace lists the volume's other
    // snapshots; an unknown snapshot is no context at all.
    let listed = nbd_py(
        &uri,
        r#"
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(URI)
for q in ("qemu:dirty-bitmap:", "x-volumed:", "qemu:dirty-bitmap:snap-404"):
    h.clear_meta_contexts()
    h.add_meta_context(q)
    names = []
    h.opt_list_meta_context(lambda name: names.append(name) or 0)
    print(q, ",".join(sorted(names)))
h.opt_abort()
"#,
    );
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(
        lines[0],
        format!("qemu:dirty-bitmap: qemu:dirty-bitmap:{a_id}"),
        "{listed}"
    );
    assert_eq!(
        lines[1],
        format!("x-volumed: x-volumed:changed:{a_id}"),
        "{listed}"
    );
    assert_eq!(lines[2].trim(), "qemu:dirty-bitmap:snap-404", "{listed}");

    // An incremental backup round trip, the way NBD backup tools make one:
    // a full copy of A from A's export, then only the ranges B's bitmap
    // against A marks, read from B's export, written over it.
    let a_uri = attach(&d, a_id);
    let backup = d.dir.path().join("backup.img");
    nbdcopy(&a_uri, &backup);
    let copied = nbd_py(
        &uri,
        &format!(
            r#"
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:{a_id}")
h.connect_uri(URI)
size = h.get_size()
dirty = []
end = [0]
def cb(meta, off, entries, err):
    pos = off
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1:
            dirty.append((pos, entries[i]))
        pos += entries[i]
    end[0] = pos
    return 0
off = 0
while off < size:
    h.block_status(min(size - off, 1 << 30), off, cb)
    off = end[0]
n = 0
with open("{backup}", "r+b") as f:
    for (o, l) in dirty:
        f.seek(o)
        f.write(h.pread(l, o))
        n += l
print(n)
"#,
            backup = backup.display()
        ),
    );
    assert_eq!(copied.trim(), (4 * CHUNK).to_string());
    assert!(
        std::fs::read(&backup).unwrap() == at_b,
        "A + B's changed extents is not B"
    );

    // Detach: the export is gone from OPT_LIST and refuses connections.
    d.vol_ok(&["snapshot", "detach", a_id]);
    d.vol_ok(&["snapshot", "detach", b_id]);
    assert!(!exports_listed(&d).contains(b_id));
    let out = Command::new("nbdinfo").arg(&uri).output().unwrap();
    assert!(!out.status.success());
    assert!(d.vol_json(&["snapshot", "inspect", b_id])["export"].is_null());
    d.finish_expecting(&[], &[]);
}

#[test]
fn reads_bitmaps_and_incrementals_local() {
    reads_bitmaps_and_incrementals(Store::Local);
}

#[test]
fn reads_bitmaps_and_incrementals_s3() {
    reads_bitmaps_and_incrementals(Store::s3());
}

/// The hold: delete refused, gc on another host keeps the chunks, the
/// export survives a restart, another host exports this host's snapshot.
#[test]
fn held_across_delete_gc_restart_and_hosts() {
    let store = Store::Local;
    let mut d = store.daemon("held");
    d.vol_ok(&["create", "data", "--size", "16M"]);
    d.vol_ok(&["attach", "data"]);
    volumed_tests::snapkit::fill_random(&d, "data", 16);
    let a = snap(&d, "data");
    let a_id = a["id"].as_str().unwrap();
    let at_a = dump(&d, "data");
    let uri = attach(&d, a_id);

    let e = d.vol_err(&["snapshot", "delete", a_id]);
    assert_eq!(
        e,
        format!("error: snapshot '{a_id}' is attached; detach it first")
    );

    // Another host sees the same snapshot and exports it too.
    let other = store.daemon_sharing("held", &d);
    let other_uri = attach(&other, a_id);
    assert!(nbdcopy(&other_uri, &other.dir.path().join("a.img")) == at_a);
    other.vol_ok(&["snapshot", "detach", a_id]);

    // It deletes the snapshot (not exported there) and collects garbage
    // with no grace: the hold of the first host keeps every chunk.
    d.vol_ok(&["detach", "data"]);
    d.vol_ok(&["delete", "data"]);
    other.vol_ok(&["snapshot", "delete", a_id]);
    let gc = other.vol_json(&["gc", "--grace", "0s"]);
    assert!(gc.is_object(), "{gc}");
    assert!(
        nbdcopy(&uri, &d.dir.path().join("a.img")) == at_a,
        "gc took chunks an export needs"
    );

    // SIGTERM and start: the export is back, same bytes.
    d.restart();
    assert!(exports_listed(&d).contains(a_id));
    assert!(nbdcopy(&uri, &d.dir.path().join("a2.img")) == at_a);
    d.vol_ok(&["snapshot", "detach", a_id]);
    assert!(!exports_listed(&d).contains(a_id));
    other.finish();
    d.finish();
}

/// A chunk object damaged in the store fails only the requests that touch
/// it; the rest of the export reads.
#[test]
fn damaged_chunk_fails_only_its_requests() {
    let store = Store::Local;
    let d = store.daemon("damaged");
    d.vol_ok(&["create", "data", "--size", "4M"]);
    d.vol_ok(&["attach", "data"]);
    qemu_io(
        &d.uri("data"),
        &[
            "write -P 0x11 0 512k",
            "write -P 0x22 512k 512k",
            "write -P 0x33 1M 512k",
        ],
    );
    let a = snap(&d, "data");
    let a_id = a["id"].as_str().unwrap();
    // Damage chunk 1's object before anything reads it through the cache.
    let repo = store.repo(&d, "damaged");
    let hash = volumed_tests::snapkit::rt().block_on(async {
        let m = repo
            .get_manifest(&snapshot::SnapshotId::parse(a_id).unwrap())
            .await
            .unwrap();
        m.get(1).unwrap()
    });
    let path = d
        .data_dir()
        .join("store")
        .join(snapshot::keys::chunk_key(&hash));
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let uri = attach(&d, a_id);
    let out = nbd_py(
        &uri,
        r#"
import errno
h = nbd.NBD()
h.connect_uri(URI)
for off in (0, 512 * 1024, 1024 * 1024, 600 * 1024):
    try:
        d = h.pread(4096, off)
        print(d[0])
    except nbd.Error as e:
        print(errno.errorcode.get(e.errno, e.errno))
"#,
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["17", "EIO", "51", "EIO"]
    );
    d.finish_expecting(
        &["cannot read a chunk of an exported snapshot", "I/O failed"],
        &[],
    );
}

#[test]
fn bad_requests_get_one_line_errors() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "data", "--size", "4M"]);
    d.vol_ok(&["attach", "data"]);
    qemu_io(&d.uri("data"), &["write 0 4k"]);
    let a = snap(&d, "data");
    let a_id = a["id"].as_str().unwrap();
    let e = d.vol_err(&["snapshot", "attach", "snap-404"]);
    assert_eq!(e, "error: snapshot 'snap-404' not found");
    let e = d.vol_err(&["snapshot", "attach", "not-an-id"]);
    assert!(e.contains("invalid snapshot id"), "{e}");
    let e = d.vol_err(&["snapshot", "detach", a_id]);
    assert_eq!(e, format!("error: snapshot '{a_id}' is not attached"));
    let (status, body) = d.api("POST", "/v1/snapshots/snap-/attach", "");
    assert_eq!(status, 404, "{body}");
    // A snapshot id is never a volume's export: the volume is untouched.
    let (status, _) = d.api("POST", "/v1/snapshots/data/attach", "");
    assert_eq!(status, 404);
    assert_eq!(d.vol_json(&["inspect", "data"])["state"], "attached");
    d.finish();
}

/// `qemu:dirty-bitmap:LAST` on a live volume's export: the chunks written
/// since its last completed snapshot, what a live incremental backup reads.
#[test]
fn live_volume_bitmap_against_its_last_snapshot() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "data", "--size", "16M"]);
    d.vol_ok(&["attach", "data"]);
    let uri = d.uri("data");
    // No snapshot yet: no LAST to compare with.
    let listed = |uri: &str| {
        nbd_py(
            uri,
            r#"
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(URI)
h.add_meta_context("qemu:dirty-bitmap:")
names = []
h.opt_list_meta_context(lambda name: names.append(name) or 0)
print(",".join(names))
h.opt_abort()
"#,
        )
    };
    assert_eq!(listed(&uri).trim(), "");
    qemu_io(&uri, &["write -P 0x01 0 4M"]);
    let a = snap(&d, "data");
    assert_eq!(listed(&uri).trim(), "qemu:dirty-bitmap:LAST");
    let last = "qemu:dirty-bitmap:LAST";
    assert!(dirty(&map(&uri, last)).is_empty());

    // Chunks 2 and 3 (one write across them), chunk 6 (data) trimmed, and
    // chunk 20 (never written) trimmed: no change at all.
    qemu_io(
        &uri,
        &[
            "write -P 0x02 1100k 600k",
            "discard 3M 512k",
            "discard 10M 512k",
        ],
    );
    let want = vec![(2 * CHUNK, 2 * CHUNK), (6 * CHUNK, CHUNK)];
    assert_eq!(dirty(&map(&uri, last)), want);
    assert_eq!(dirty(&map(&uri, "x-volumed:changed:LAST")), want);
    // The next snapshot is the new LAST: nothing changed since.
    let b = snap(&d, "data");
    assert!(dirty(&map(&uri, last)).is_empty());
    // What the bitmap said is what the two snapshots' diff says.
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    assert_eq!(cli_diff(&d, a_id, b_id), want);
    d.finish();
}
