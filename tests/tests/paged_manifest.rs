//! Format-2 manifests through the real daemon: a snapshot after a small
//! write stores one new page and names its parent's others; a volume
//! restored from a manifest too large to keep whole reads it lazily, page
//! by page, and its snapshots, diffs, exports and gc work on pages; and a
//! format-1 manifest written by the old encoder still restores.

use std::collections::BTreeSet;

use snapshot::{Manifest, ManifestHeader, ManifestRoot, Repo, SnapshotId, StoredManifest};
use volumed_tests::qemu_io;
use volumed_tests::snapkit::{Store, dump, rt, snap, u};

/// 64 KiB chunks: a page of 8192 entries covers 512 MiB of volume.
const CHUNK: u64 = 64 << 10;
const PAGE_BYTES: u64 = 8192 * CHUNK;

fn pages(repo: &Repo) -> BTreeSet<String> {
    rt().block_on(repo.store().list("pages/"))
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

fn root(repo: &Repo, id: &str) -> ManifestRoot {
    match rt()
        .block_on(repo.get_stored(&SnapshotId::parse(id).unwrap()))
        .unwrap()
    {
        StoredManifest::V2(r) => r,
        StoredManifest::V1(_) => panic!("{id} was written in format 1"),
    }
}

fn id(s: &serde_json::Value) -> String {
    s["id"].as_str().unwrap().to_owned()
}

/// One 4 KiB write into each of the first `n` pages, at chunk 2 of the
/// page, with byte `p + 1` for page `p`.
fn write_pages(uri: &str, n: u64) {
    let cmds: Vec<String> = (0..n)
        .map(|p| format!("write -P {} {} 4k", p + 1, p * PAGE_BYTES + 2 * CHUNK))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(uri, &refs);
}

/// qemu-io on a read-only export.
fn qemu_io_read_only(uri: &str, cmds: &[&str]) {
    let mut c = std::process::Command::new("qemu-io");
    c.args(["-r", "-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = volumed_tests::run_ok(c.arg(uri));
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("error"),
        "qemu-io {cmds:?}: {out}"
    );
}

#[test]
fn a_small_write_stores_one_page_and_names_the_rest() {
    let store = Store::Local;
    let d = store.daemon("pm");
    let repo = store.repo(&d, "pm");
    d.vol_ok(&["create", "data", "--size", "2G", "--chunk-size", "64K"]);
    d.vol_ok(&["attach", "data"]);
    let uri = d.uri("data");
    write_pages(&uri, 4);
    let a = id(&snap(&d, "data"));
    assert_eq!(pages(&repo).len(), 4, "one page per 512 MiB holding data");

    qemu_io(
        &uri,
        &[&format!("write -P 0x55 {} 4k", 2 * PAGE_BYTES + 9 * CHUNK)],
    );
    let before = pages(&repo);
    let bs = snap(&d, "data");
    let b = id(&bs);
    let after = pages(&repo);
    assert_eq!(after.len(), 5, "exactly one new page: {after:?}");
    assert!(after.is_superset(&before));
    let (ra, rb) = (root(&repo, &a), root(&repo, &b));
    for p in [0, 1, 3] {
        assert_eq!(ra.page(p), rb.page(p), "page {p} is the parent's");
    }
    assert_ne!(ra.page(2), rb.page(2));
    // The upload: one chunk (4 KiB of a pattern in 64 KiB, compressed) and
    // one page of two entries; the root is not counted.
    assert!(u(&bs["uploaded_bytes"]) < 16 << 10, "{bs}");
    assert_eq!(u(&bs["logical_bytes"]), 5 * CHUNK, "{bs}");

    // A snapshot with nothing changed stores nothing new.
    let c = id(&snap(&d, "data"));
    assert_eq!(pages(&repo), after);
    assert_eq!(root(&repo, &c).pages(), rb.pages());

    // Restored whole (few pages: the base keeps them all), it reads back.
    d.vol_ok(&["create", "copy", "--from-snapshot", &b, "--wait"]);
    d.vol_ok(&["attach", "copy"]);
    assert!(dump(&d, "copy") == dump(&d, "data"));
    d.finish();
}

/// A page of the parent gone from the store (damage, or an operator's
/// mistake): the snapshot that needed it ends `error` naming the parent,
/// and the next one is a full snapshot that completes.
#[test]
fn a_missing_parent_page_makes_the_next_snapshot_full() {
    let store = Store::Local;
    let d = store.daemon("gone");
    let repo = store.repo(&d, "gone");
    d.vol_ok(&["create", "data", "--size", "2G", "--chunk-size", "64K"]);
    d.vol_ok(&["attach", "data"]);
    let uri = d.uri("data");
    write_pages(&uri, 3);
    let a = id(&snap(&d, "data"));
    let name = root(&repo, &a).page(1).unwrap();
    rt().block_on(repo.store().delete(&snapshot::keys::page_key(&name)))
        .unwrap();
    qemu_io(
        &uri,
        &[&format!("write -P 0x44 {} 4k", PAGE_BYTES + 5 * CHUNK)],
    );
    let started = d.vol_json(&["snapshot", "create", "data"]);
    let failed = d.wait_snapshot_settled(started["id"].as_str().unwrap());
    assert_eq!(failed["state"], "error", "{failed}");
    let err = failed["error"].as_str().unwrap();
    assert!(
        err.contains(&format!("parent snapshot {a} unusable")) && err.contains("missing"),
        "{err}"
    );
    let full = snap(&d, "data");
    assert_eq!(u(&full["logical_bytes"]), 4 * CHUNK, "{full}");
    let v = d.vol_json(&["snapshot", "verify", &id(&full)]);
    assert_eq!(v["ok"], true, "{v}");
    d.finish_expecting(&[], &["snapshot failed"]);
}

/// 40 pages hold data: more than a restored base keeps whole, so it reads
/// the root and fetches pages on demand.
#[test]
fn a_large_base_is_read_by_pages() {
    const PAGES: u64 = 40;
    let store = Store::Local;
    let d = store.daemon("lazy");
    let repo = store.repo(&d, "lazy");
    d.vol_ok(&["create", "big", "--size", "32G", "--chunk-size", "64K"]);
    d.vol_ok(&["attach", "big"]);
    write_pages(&d.uri("big"), PAGES);
    let s = id(&snap(&d, "big"));
    assert_eq!(root(&repo, &s).pages().len() as u64, PAGES);

    let v = d.vol_json(&["create", "r", "--from-snapshot", &s, "--no-hydrate"]);
    // Every chunk of a page holding data starts Base.
    assert_eq!(u(&v["hydration"]["total_bytes"]), PAGES * PAGE_BYTES, "{v}");
    let local = std::fs::read(
        d.volume_dirs()
            .iter()
            .map(|p| p.join("base.manifest"))
            .find(|p| {
                std::fs::read(p).is_ok_and(|b| {
                    StoredManifest::decode(&b).is_ok_and(|m| m.header().id == s.as_str())
                })
            })
            .expect("the restored volume keeps its base manifest"),
    )
    .unwrap();
    assert!(
        matches!(
            StoredManifest::decode(&local).unwrap(),
            StoredManifest::V2(_)
        ),
        "a large base keeps the root only"
    );
    d.vol_ok(&["attach", "r"]);
    let uri = d.uri("r");
    // Written bytes, zero chunks inside a page holding data, and a page
    // that is all zero.
    qemu_io(
        &uri,
        &[
            &format!("read -P 1 {} 4k", 2 * CHUNK),
            &format!("read -P 0 {} 60k", 2 * CHUNK + 4096),
            "read -P 0 0 128k",
            &format!("read -P 37 {} 4k", 36 * PAGE_BYTES + 2 * CHUNK),
            &format!("read -P 0 {} 64k", 36 * PAGE_BYTES + 100 * CHUNK),
            &format!("read -P 0 {} 64k", 50 * PAGE_BYTES),
        ],
    );
    let v = d.vol_json(&["inspect", "r"]);
    assert!(
        u(&v["hydration"]["hydrated_bytes"]) >= 3 * CHUNK,
        "zero chunks read leave the base too: {v}"
    );

    // The restored volume's first snapshot names its source's pages but
    // the one it changed.
    let before = pages(&repo);
    qemu_io(&uri, &[&format!("write -P 0x77 {} 4k", 5 * PAGE_BYTES)]);
    let r1 = id(&snap(&d, "r"));
    assert_eq!(pages(&repo).len(), before.len() + 1);
    let (rs, rr) = (root(&repo, &s), root(&repo, &r1));
    let shared = rr
        .pages()
        .iter()
        .filter(|(p, n)| rs.page(*p) == Some(*n))
        .count() as u64;
    assert_eq!(shared, PAGES - 1);

    // Diff across pages: only the changed chunk.
    let diff = d.vol_json(&["snapshot", "diff", "--from", &s, &r1]);
    let ext = diff["extents"].as_array().unwrap();
    assert_eq!(ext.len(), 1, "{diff}");
    assert_eq!(u(&ext[0]["offset"]), 5 * PAGE_BYTES);
    assert_eq!(u(&ext[0]["length"]), CHUNK);

    // A read-only export of the new snapshot reads by pages too.
    let x = d.vol_json(&["snapshot", "attach", &r1]);
    let xuri = x["export"]["uri"].as_str().unwrap().to_owned();
    qemu_io_read_only(
        &xuri,
        &[
            &format!("read -P 0x77 {} 4k", 5 * PAGE_BYTES),
            &format!("read -P 6 {} 4k", 5 * PAGE_BYTES + 2 * CHUNK),
            &format!("read -P 0 {} 4k", 45 * PAGE_BYTES),
        ],
    );
    d.vol_ok(&["snapshot", "detach", &r1]);

    // The source deleted and gc with no grace: the hold and r1 keep its
    // pages, and the restored volume still reads its base.
    d.vol_ok(&["snapshot", "delete", &s]);
    let g = d.vol_json(&["gc", "--grace", "0s"]);
    assert_eq!(u(&g["pages_deleted"]), 0, "{g}");
    assert_eq!(u(&g["pages_referenced"]), PAGES + 1, "{g}");
    qemu_io(
        &uri,
        &[&format!("read -P 20 {} 4k", 19 * PAGE_BYTES + 2 * CHUNK)],
    );

    // Across a restart the base reopens from its root.
    let mut d = d;
    d.restart();
    qemu_io(
        &d.uri("r"),
        &[&format!("read -P 30 {} 4k", 29 * PAGE_BYTES + 2 * CHUNK)],
    );
    d.finish();
}

/// A format-1 manifest, as older versions wrote it, restores and serves as
/// the parent of a format-2 snapshot.
#[test]
fn a_format_one_manifest_still_restores() {
    let store = Store::Local;
    let d = store.daemon("v1");
    let repo = store.repo(&d, "v1");
    let id = SnapshotId::generate();
    let size = 8 << 20;
    let cs = 1 << 20;
    let mut m = Manifest::new(ManifestHeader {
        id: id.clone(),
        volume: "old".into(),
        size,
        chunk_size: cs,
        parent: None,
        created_at: "2026-01-01T00:00:00Z".into(),
        labels: Default::default(),
        changed_chunks: 2,
        logical_bytes: 2 * cs,
        uploaded_bytes: 0,
        encryption: None,
    });
    let mut want = vec![0u8; size as usize];
    rt().block_on(async {
        for (c, b) in [(1u64, 0xa1u8), (6, 0xb6)] {
            let data = vec![b; cs as usize];
            want[(c * cs) as usize..((c + 1) * cs) as usize].copy_from_slice(&data);
            let put = repo.put_chunk(data).await.unwrap();
            m.push(c, Some(put.hash));
        }
        repo.put_manifest_v1(&m).await.unwrap();
    });
    let raw = rt()
        .block_on(repo.store().get(&snapshot::keys::manifest_key(&id)))
        .unwrap()
        .unwrap();
    assert_eq!(&raw[4..8], &1u32.to_le_bytes(), "written in format 1");

    d.vol_ok(&[
        "create",
        "restored",
        "--from-snapshot",
        id.as_str(),
        "--wait",
    ]);
    d.vol_ok(&["attach", "restored"]);
    assert!(dump(&d, "restored") == want);
    // Its next snapshot is format 2, naming the old chunks.
    qemu_io(&d.uri("restored"), &["write -P 0x33 0 4k"]);
    let s = self::id(&snap(&d, "restored"));
    let r = root(&repo, &s);
    assert_eq!(r.pages().len(), 1);
    let back = rt()
        .block_on(repo.get_manifest(&SnapshotId::parse(&s).unwrap()))
        .unwrap();
    assert_eq!(back.get(1), m.get(1));
    assert_eq!(back.get(6), m.get(6));
    assert_eq!(back.hashed().len(), 3);
    let v = d.vol_json(&["snapshot", "verify", &s]);
    assert_eq!(v["ok"], true, "{v}");
    d.finish();
}
