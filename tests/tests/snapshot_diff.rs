//! `vol snapshot diff` and `GET /v1/snapshots/{to}/changed-blocks`:
//! content-exact changed blocks between any two snapshots, on both stores,
//! checked against the volume's own bytes.

use std::time::{Duration, Instant};

use serde_json::Value;

use volumed_tests::snapkit::{Store, dump, snap, u};
use volumed_tests::{TestDaemon, qemu_io};

const CHUNK: u64 = 512 << 10;

fn extents(d: &Value) -> Vec<(u64, u64, bool)> {
    d["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                u(&e["offset"]),
                u(&e["length"]),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn diff(d: &TestDaemon, from: &str, to: &str) -> Value {
    d.vol_json(&["snapshot", "diff", "--from", from, to])
}

fn writes_trims_and_rewrites(store: Store) {
    let d = store.daemon("diff");
    d.vol_ok(&["create", "data", "--size", "64M"]);
    d.vol_ok(&["attach", "data"]);
    let uri = d.uri("data");
    // Data in chunks 0..8 and 20.
    qemu_io(&uri, &["write -P 0x01 0 4M", "write -P 0x02 10M 512k"]);
    let a = snap(&d, "data");
    let a_id = a["id"].as_str().unwrap();

    // Three chunks written (two adjacent: 16 and 17; and 30), one chunk that
    // held data trimmed (20), and chunk 2 rewritten with the same bytes.
    qemu_io(
        &uri,
        &[
            "write -P 0x03 8M 1M",
            "write -P 0x04 15M 4k",
            "discard 10M 512k",
            "write -P 0x01 1M 512k",
        ],
    );
    let b = snap(&d, "data");
    let b_id = b["id"].as_str().unwrap();

    let db = diff(&d, a_id, b_id);
    assert_eq!(db["from"], a["id"]);
    assert_eq!(db["to"], b["id"]);
    assert_eq!(u(&db["chunk_size"]), CHUNK);
    assert_eq!(u(&db["volume_size"]), 64 << 20);
    assert_eq!(
        extents(&db),
        vec![
            (16 * CHUNK, 2 * CHUNK, false),
            (20 * CHUNK, CHUNK, true),
            (30 * CHUNK, CHUNK, false),
        ],
        "{db}"
    );
    assert_eq!(u(&db["changed_bytes"]), 4 * CHUNK);

    // An unchanged pair, and the same snapshot against itself: nothing.
    qemu_io(&uri, &["write -P 0x03 8M 512k"]);
    let c = snap(&d, "data");
    let c_id = c["id"].as_str().unwrap();
    assert!(extents(&diff(&d, b_id, c_id)).is_empty());
    assert!(extents(&diff(&d, b_id, b_id)).is_empty());

    // Without --from: what holds data in B.
    let alloc = d.vol_json(&["snapshot", "diff", b_id]);
    assert_eq!(alloc["from"], Value::Null);
    assert_eq!(
        extents(&alloc),
        vec![
            (0, 8 * CHUNK, false),
            (16 * CHUNK, 2 * CHUNK, false),
            (30 * CHUNK, CHUNK, false)
        ]
    );

    // The incremental round trip a backup tool makes: A's bytes, with B's
    // changed extents laid over them, are B's bytes.
    let mut image_a = volumed_tests::snapkit::image(&store.repo(&d, "diff"), a_id);
    let image_b = volumed_tests::snapkit::image(&store.repo(&d, "diff"), b_id);
    for (off, len, zero) in extents(&db) {
        let r = off as usize..(off + len) as usize;
        if zero {
            image_a[r].fill(0);
        } else {
            image_a[r.clone()].copy_from_slice(&image_b[r]);
        }
    }
    assert!(image_a == image_b, "A + diff(A, B) is not B");
    // And C, the volume now, is what the snapshot holds.
    assert!(volumed_tests::snapkit::image(&store.repo(&d, "diff"), c_id) == dump(&d, "data"));

    // The formats other tools read.
    let rbd = d.vol_ok(&["snapshot", "diff", "--from", a_id, b_id, "--format", "rbd"]);
    assert_eq!(
        rbd.trim(),
        format!(
            r#"[{{"offset":{},"length":{},"exists":"true"}},{{"offset":{},"length":{},"exists":"false"}},{{"offset":{},"length":{},"exists":"true"}}]"#,
            16 * CHUNK,
            2 * CHUNK,
            20 * CHUNK,
            CHUNK,
            30 * CHUNK,
            CHUNK
        )
    );
    let ebs: Value = serde_json::from_str(
        &d.vol_ok(&["snapshot", "diff", "--from", a_id, b_id, "--format", "ebs"]),
    )
    .unwrap();
    assert_eq!(u(&ebs["BlockSize"]), CHUNK);
    assert_eq!(u(&ebs["VolumeSize"]), 1);
    let blocks: Vec<u64> = ebs["ChangedBlocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| u(&b["BlockIndex"]))
        .collect();
    assert_eq!(blocks, vec![16, 17, 20, 30]);
    let human = d.vol_ok(&["snapshot", "diff", "--from", a_id, b_id]);
    assert!(human.contains("2 MiB in 3 extents"), "{human}");

    // The paged API, CSI names: pages of one extent cover the same ranges.
    let mut token: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let mut path = format!("/v1/snapshots/{b_id}/changed-blocks?from={a_id}&max_results=1");
        if let Some(t) = &token {
            path.push_str(&format!("&next_token={t}"));
        }
        let (status, body) = d.api("GET", &path, "");
        assert_eq!(status, 200, "{body}");
        let page: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(u(&page["volume_capacity_bytes"]), 64 << 20);
        for b in page["block_metadata"].as_array().unwrap() {
            pages.push((u(&b["byte_offset"]), u(&b["size_bytes"])));
        }
        match page["next_token"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        pages,
        vec![
            (16 * CHUNK, 2 * CHUNK),
            (20 * CHUNK, CHUNK),
            (30 * CHUNK, CHUNK)
        ]
    );
    let (status, body) = d.api(
        "GET",
        &format!(
            "/v1/snapshots/{b_id}/changed-blocks?from={a_id}&starting_offset={}",
            17 * CHUNK
        ),
        "",
    );
    assert_eq!(status, 200);
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(u(&page["block_metadata"][0]["byte_offset"]), 17 * CHUNK);
    assert_eq!(u(&page["block_metadata"][0]["size_bytes"]), CHUNK);
    d.finish();
}

#[test]
fn writes_trims_and_rewrites_local() {
    writes_trims_and_rewrites(Store::Local);
}

#[test]
fn writes_trims_and_rewrites_s3() {
    writes_trims_and_rewrites(Store::s3());
}

/// A 64 TiB sparse volume: the diff walks only what holds data.
#[test]
fn huge_sparse_volume_answers_at_once() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "big", "--size", "64T"]);
    d.vol_ok(&["attach", "big"]);
    qemu_io(&d.uri("big"), &["write -P 0x05 1G 4k"]);
    let a = snap(&d, "big");
    qemu_io(&d.uri("big"), &["write -P 0x06 60T 4k"]);
    let b = snap(&d, "big");
    let t = Instant::now();
    let db = diff(&d, a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let took = t.elapsed();
    assert_eq!(extents(&db), vec![(60u64 << 40, CHUNK, false)]);
    assert!(
        took < Duration::from_secs(1),
        "diff of a 64 TiB volume took {took:?}"
    );
    d.finish();
}

#[test]
fn bad_requests_get_one_line_errors() {
    let d = TestDaemon::start();
    d.vol_ok(&["create", "big", "--size", "8M"]);
    d.vol_ok(&["create", "small", "--size", "8M", "--chunk-size", "64K"]);
    d.vol_ok(&["attach", "big"]);
    d.vol_ok(&["attach", "small"]);
    qemu_io(&d.uri("big"), &["write 0 4k"]);
    qemu_io(&d.uri("small"), &["write 0 4k"]);
    let a = snap(&d, "big");
    let s = snap(&d, "small");
    let (a_id, s_id) = (a["id"].as_str().unwrap(), s["id"].as_str().unwrap());

    let e = d.vol_err(&["snapshot", "diff", "--from", a_id, s_id]);
    assert!(e.contains("different chunk sizes"), "{e}");
    let e = d.vol_err(&["snapshot", "diff", "snap-404"]);
    assert!(e.contains("snapshot 'snap-404' not found"), "{e}");
    let e = d.vol_err(&["snapshot", "diff", "--from", "not-an-id", a_id]);
    assert!(e.contains("invalid snapshot id"), "{e}");
    let e = d.vol_err(&["snapshot", "diff", s_id, "--format", "ebs"]);
    assert!(e.contains("512 KiB"), "{e}");
    for bad in [
        format!("/v1/snapshots/{a_id}/changed-blocks?max_results=0"),
        format!("/v1/snapshots/{a_id}/changed-blocks?next_token=zzz"),
        format!("/v1/snapshots/{a_id}/changed-blocks?bogus=1"),
        format!("/v1/snapshots/{a_id}/diff?from=snap-"),
    ] {
        let (status, body) = d.api("GET", &bad, "");
        assert!((400..500).contains(&status), "{bad}: {status} {body}");
        assert!(body.contains("\"error\""), "{body}");
    }
    d.finish();
}
