//! The check after every step: the daemon, seen only through real clients,
//! against the model. Volumes (`vol --json list`: which exist, size,
//! ephemeral, attachment, health), the bytes of every attached volume (and
//! after a restart of every detached one), which snapshots exist and in
//! what state, a snapshot's content once it completes (and again after
//! every gc), and the daemon's log.

use serde_json::Value;
use snapshot::SnapshotId;
use std::collections::BTreeMap;
use std::process::Command;

use super::driver::Driver;
use super::state::{Content, Model, Phase, Snapshot, Volume};

/// Everything the model expects now; `restarted` after a restart or kill,
/// when detached volumes are read too.
pub fn check(drv: &mut Driver, model: &mut Model, restarted: bool) {
    volumes(drv, model);
    for (name, v) in model.volumes.iter().filter(|(_, v)| v.attached) {
        bytes(drv, name, v);
    }
    if restarted {
        detached_bytes(drv, model);
    }
    snapshots(drv, model);
    log(drv);
}

fn volumes(drv: &Driver, model: &Model) {
    let list = drv.daemon.vol_json(&["list"]);
    let listed: BTreeMap<&str, &Value> = list
        .as_array()
        .expect("vol list: an array")
        .iter()
        .map(|v| (v["name"].as_str().expect("a name"), v))
        .collect();
    let names: Vec<&str> = listed.keys().copied().collect();
    let want: Vec<&str> = model.volumes.keys().map(String::as_str).collect();
    assert_eq!(names, want, "the volumes listed are not the model's");
    for (name, m) in &model.volumes {
        let v = listed[name.as_str()];
        let state = if m.attached { "attached" } else { "available" };
        let seen = (
            v["size"].as_u64(),
            v["chunk_size"].as_u64(),
            v["ephemeral"].as_bool(),
            v["state"].as_str(),
            v["source_snapshot"].as_str(),
            v["health"].as_str(),
        );
        let expected = (
            Some(m.size),
            Some(m.chunk_size),
            Some(m.ephemeral),
            Some(state),
            m.source.as_deref(),
            Some("ok"),
        );
        assert_eq!(
            seen, expected,
            "volume {name} (size, chunk, ephemeral, state, source, health): {v}"
        );
        assert_eq!(
            v["uri"].is_string(),
            m.attached,
            "volume {name}: a URI exactly while attached: {v}"
        );
    }
    // A deleted volume's data goes with its entry (an ephemeral one's at
    // detach): one data directory per volume.
    let dirs = drv.daemon.volume_dirs();
    assert_eq!(
        dirs.len(),
        model.volumes.len(),
        "data directories {dirs:?} for volumes {want:?}"
    );
}

/// The bytes of attached volume `name`, read by nbdcopy.
fn bytes(drv: &Driver, name: &str, v: &Volume) {
    let out = Command::new("nbdcopy")
        .arg(drv.daemon.uri(name))
        .arg("-")
        .output()
        .expect("run nbdcopy");
    assert!(
        out.status.success(),
        "nbdcopy from {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    same_bytes(&format!("volume {name}"), &out.stdout, &v.bytes);
}

/// After a restart: each detached volume attached, read and detached
/// again. An ephemeral one is left alone (a detach would delete it); it
/// was never attached, so it holds only what it was created with, which
/// its first attach reads.
fn detached_bytes(drv: &Driver, model: &Model) {
    for (name, v) in model
        .volumes
        .iter()
        .filter(|(_, v)| !v.attached && !v.ephemeral)
    {
        drv.daemon.vol_ok(&["attach", name]);
        bytes(drv, name, v);
        drv.daemon.vol_ok(&["detach", name]);
    }
}

/// Fails unless `got` equals `want`, naming the first difference.
fn same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    let sectors = got
        .chunks(512)
        .zip(want.chunks(512))
        .filter(|(a, b)| a != b)
        .count();
    match first {
        Some(at) => panic!(
            "{what} differs from the model: first at byte {at} ({:#04x}, the model {:#04x}); \
             {sectors} sectors of 512 differ",
            got[at], want[at]
        ),
        None => panic!(
            "{what} is {} bytes, the model {} bytes",
            got.len(),
            want.len()
        ),
    }
}

/// Every snapshot the daemon lists is the model's, in a state the model
/// allows; pending ones that completed are read back.
fn snapshots(drv: &mut Driver, model: &mut Model) {
    let list = drv.daemon.vol_json(&["snapshot", "list"]);
    let listed: BTreeMap<String, Value> = list
        .as_array()
        .expect("vol snapshot list: an array")
        .iter()
        .map(|s| (s["id"].as_str().expect("an id").to_owned(), s.clone()))
        .collect();
    for id in listed.keys() {
        assert!(
            model.snapshots.contains_key(id),
            "snapshot {id} is listed but the model has none: {}",
            listed[id]
        );
    }
    for (id, s) in model.snapshots.iter_mut() {
        let seen = listed.get(id);
        if let Some(l) = seen {
            assert_eq!(
                (l["size"].as_u64(), l["chunk_size"].as_u64()),
                (Some(s.size()), Some(s.chunk_size())),
                "snapshot {id}'s size and chunk size: {l}"
            );
            if let Some(volume) = s.content.volume() {
                assert_eq!(l["volume"], volume, "snapshot {id}'s volume: {l}");
            }
        }
        let state = seen.map(|l| l["state"].as_str().unwrap_or_default());
        match s.phase {
            Phase::Open => open_upload(drv, id, s, state),
            Phase::Pending => match state {
                Some("pending") => {}
                Some("completed") => s.phase = Phase::Completed,
                Some("error") if s.interrupted => s.phase = Phase::Error,
                Some("error") => panic!(
                    "snapshot {id} ended `error` with no restart to interrupt it: {}",
                    seen.expect("listed")
                ),
                other => panic!("snapshot {id} was pending and is now {other:?}"),
            },
            Phase::Completed | Phase::Error => {
                let want = if s.phase == Phase::Completed {
                    "completed"
                } else {
                    "error"
                };
                assert_eq!(
                    state,
                    Some(want),
                    "snapshot {id} was {want} and is now {state:?}"
                );
            }
        }
        if s.phase == Phase::Completed && !s.verified {
            content(drv, id, s);
            s.verified = true;
        }
    }
}

/// An EBS direct snapshot blocks are still being put into: pending to
/// DescribeSnapshots (and absent or pending in `vol snapshot list`). After
/// a restart it must go on or end `error`; it may not vanish.
fn open_upload(drv: &mut Driver, id: &str, s: &mut Snapshot, listed: Option<&str>) {
    let described = drv
        .ebs
        .state(id)
        .unwrap_or_else(|e| panic!("DescribeSnapshots {id}: {e}"));
    match (described.as_deref(), listed) {
        (Some("pending"), None | Some("pending")) => s.interrupted = false,
        (Some("error"), _) | (_, Some("error")) if s.interrupted => s.phase = Phase::Error,
        (d, l) if s.interrupted => panic!(
            "EBS direct snapshot {id} was open across a restart and is now {d:?} to \
             DescribeSnapshots, {l:?} to vol snapshot list: an upload in progress must \
             go on or end `error`, not vanish"
        ),
        (d, l) => panic!(
            "EBS direct snapshot {id} is open, but DescribeSnapshots says {d:?} and \
             vol snapshot list {l:?}"
        ),
    }
}

/// A completed snapshot read back: a volume's through the `snapshot`
/// crate from the store, an EBS direct one through GetSnapshotBlock.
fn content(drv: &mut Driver, id: &str, s: &Snapshot) {
    match &s.content {
        Content::Volume { bytes, .. } => {
            let got = image(drv, id).unwrap_or_else(|e| {
                panic!("completed snapshot {id} cannot be read from the store: {e}")
            });
            same_bytes(&format!("snapshot {id}"), &got, bytes);
        }
        Content::Blocks(blocks) => {
            let got = drv.ebs.read_blocks(id).unwrap_or_else(|e| {
                panic!("completed EBS direct snapshot {id} cannot be read: {e}")
            });
            let want: BTreeMap<u64, Option<u8>> =
                blocks.iter().map(|(i, b)| (*i, Some(*b))).collect();
            assert_eq!(
                got, want,
                "EBS direct snapshot {id}: blocks read (index -> byte) differ from those put"
            );
        }
    }
}

/// A snapshot's full image, rebuilt from its manifest and chunk objects in
/// the daemon's store.
fn image(drv: &Driver, id: &str) -> Result<Vec<u8>, String> {
    let repo = &drv.repo;
    let id = SnapshotId::parse(id).ok_or("a bad id")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let m = repo
            .get_manifest(&id)
            .await
            .map_err(|e| format!("manifest: {e}"))?;
        let cs = m.header.chunk_size;
        let mut img = vec![0u8; m.header.size as usize];
        for (c, h) in m.hashed() {
            let data = repo
                .get_chunk(h)
                .await
                .map_err(|e| format!("chunk {c}: {e}"))?;
            let off = (c * cs) as usize;
            img[off..off + data.len()].copy_from_slice(&data);
        }
        Ok(img)
    })
}

/// No ERROR line, and no WARN line the run has not made legitimate (see
/// `Driver::warnings`).
fn log(drv: &Driver) {
    let warnings: Vec<&str> = drv.warnings.iter().map(String::as_str).collect();
    drv.daemon.assert_log_clean(&[], &warnings);
}
