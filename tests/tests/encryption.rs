//! Encrypted stores end to end, with the real daemon, NBD clients, the
//! local store and a real S3-compatible server: what is stored shows
//! neither the data nor its plain hashes; a second host restores with the
//! key and fails in one line without it; dedup stays within a domain; keys
//! rotate without losing old snapshots; a disabled key means EIO, never
//! garbage; damaged or swapped sealed objects fail exactly the reads that
//! need them, and verify names them.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;

use serde_json::{Value, json};
use snapshot::crypt::{MasterSecret, StaticKeys};
use snapshot::{ChunkHash, MasterKeys, Repo, SnapshotId};
use volumed_tests::aws::AwsEndpoint;
use volumed_tests::snapkit::{Store, dump, image, rt, snap, u};
use volumed_tests::{TestDaemon, run_ok};

const CHUNK: usize = 512 << 10;
/// What a test writes and then looks for in the store: a 4 KiB block anyone
/// could know (a distribution's disk image, a leaked file).
const MARKER: &[u8] = b"VOLUMED-ENCRYPTION-MARKER-PATTERN";

fn marker_block(i: usize) -> Vec<u8> {
    let mut b: Vec<u8> = MARKER.iter().cycle().take(4096).copied().collect();
    // Blocks differ a little, so a chunk's blocks are not all one.
    b[4000..4008].copy_from_slice(&(i as u64).to_le_bytes());
    b
}

/// An image of `mib` MiB of marker blocks.
fn marker_image(mib: usize) -> Vec<u8> {
    (0..mib * 256).flat_map(marker_block).collect()
}

fn encrypted_env<'a>(
    store: &'a Store,
    prefix: &str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, String)> {
    let mut env = store.env(prefix);
    env.push(("VOLUMED_STORE_ENCRYPTION", "on".into()));
    for (k, v) in extra {
        env.push((k, v.to_string()));
    }
    env
}

fn start(env: &[(&str, String)]) -> TestDaemon {
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    TestDaemon::start_with_env(&refs)
}

/// A second host on `a`'s store (local or S3).
fn second_host(store: &Store, prefix: &str, a: &TestDaemon) -> TestDaemon {
    let mut env = encrypted_env(store, prefix, &[]);
    if let Store::Local = store {
        env.push((
            "VOLUMED_STORE",
            format!("file://{}", a.data_dir().join("store").display()),
        ));
    }
    start(&env)
}

/// Writes `img` into volume `name` over NBD.
fn write_image(d: &TestDaemon, name: &str, img: &[u8]) {
    let src = d.dir.path().join(format!("{name}.src"));
    std::fs::write(&src, img).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(d.uri(name)));
    std::fs::remove_file(&src).unwrap();
}

/// The key files of host `d`, as the test reads an encrypted store with.
fn keys_of(d: &TestDaemon) -> Arc<StaticKeys> {
    let keys = Arc::new(StaticKeys::new());
    for e in std::fs::read_dir(d.data_dir().join("keys")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().and_then(|x| x.to_str()) != Some("key") {
            continue;
        }
        let f: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for (v, hex) in f["versions"].as_object().unwrap() {
            let m: ChunkHash = hex.as_str().unwrap().parse().unwrap();
            keys.insert(
                f["id"].as_str().unwrap(),
                v.parse().unwrap(),
                MasterSecret(m.0),
            );
        }
    }
    keys
}

/// Copies host `from`'s key file `name` to host `to`, mode 0600: how hosts
/// sharing a store share a key.
fn share_key(from: &TestDaemon, to: &TestDaemon, name: &str) {
    let file = format!("{name}.key");
    let dst = to.data_dir().join("keys").join(&file);
    std::fs::copy(from.data_dir().join("keys").join(&file), &dst).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Every object of the store and its bytes.
fn all_objects(repo: &Repo) -> Vec<(String, Vec<u8>)> {
    rt().block_on(async {
        let mut out = Vec::new();
        for o in repo.store().list("").await.unwrap() {
            let b = repo.store().get(&o.key).await.unwrap().unwrap();
            out.push((o.key, b.to_vec()));
        }
        out
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The marker is in no stored object, no object is named by the plain
/// blake3 of a chunk, a second host restores with the key and fails in one
/// line without it.
fn nothing_readable_without_the_key(store: Store) {
    let a = start(&encrypted_env(&store, "enc", &[]));
    assert_eq!(a.vol_json(&["status"])["store_encrypted"], true);
    let v = a.vol_json(&["create", "m", "--size", "16M", "--encrypted"]);
    assert_eq!(v["encrypted"], true, "{v}");
    assert_eq!(v["encryption"]["key"], "aws-ebs", "the default key: {v}");
    a.vol_ok(&["attach", "m"]);
    let img = marker_image(16);
    write_image(&a, "m", &img);
    let id = snap(&a, "m")["id"].as_str().unwrap().to_owned();
    let s = a.vol_json(&["snapshot", "inspect", &id]);
    assert_eq!(s["encrypted"], true);
    assert_eq!(
        s["encryption"], v["encryption"],
        "a snapshot is in its volume's domain"
    );

    let plain = store.repo(&a, "enc");
    let objects = all_objects(&plain);
    assert!(objects.len() > 16, "{} objects", objects.len());
    for (key, obj) in &objects {
        assert!(!contains(obj, &MARKER[..24]), "{key} holds the marker");
    }
    for c in img.chunks(CHUNK) {
        let h = ChunkHash::of(c);
        assert!(
            !objects.iter().any(|(k, _)| k.contains(&h.to_hex())),
            "an object is named by the plain blake3 of a chunk"
        );
    }
    // The test, holding the key, reads the snapshot back exactly.
    let keyed = store
        .repo(&a, "enc")
        .with_keys(keys_of(&a) as Arc<dyn MasterKeys>);
    assert!(image(&keyed, &id) == img);

    // A second host without the key: one line, naming the key.
    let b = second_host(&store, "enc", &a);
    let err = b.vol_err(&["create", "r", "--from-snapshot", &id]);
    assert!(
        err.contains("is not known on this host") && !err.contains('\n'),
        "{err}"
    );
    // With the key file copied in, it restores the data.
    share_key(&a, &b, "aws-ebs");
    let r = b.vol_json(&["create", "r", "--from-snapshot", &id, "--no-hydrate"]);
    assert_eq!(
        r["encryption"]["data_key_id"],
        v["encryption"]["data_key_id"]
    );
    b.vol_ok(&["attach", "r"]);
    assert!(dump(&b, "r") == img);
    // Its verify checks every sealed object.
    let rep = b.vol_json(&["snapshot", "verify", &id]);
    assert_eq!(rep["ok"], true, "{rep}");
    assert_eq!(rep["framing_only"], Value::Null);
    // An encrypted store refuses unencrypted volumes, as an unencrypted
    // one refuses encrypted ones.
    let err = a.vol_err(&["create", "x", "--size", "1M", "--key", "nope"]);
    assert!(err.contains("key 'nope' not found"), "{err}");
    a.finish();
    b.finish_expecting(&[], &[]);
}

#[test]
fn nothing_readable_without_the_key_local() {
    nothing_readable_without_the_key(Store::Local);
}

#[test]
fn nothing_readable_without_the_key_s3() {
    nothing_readable_without_the_key(Store::s3());
}

#[test]
fn an_unencrypted_store_stays_so() {
    let d = TestDaemon::start();
    assert_eq!(d.vol_json(&["status"])["store_encrypted"], false);
    let err = d.vol_err(&["create", "x", "--size", "1M", "--encrypted"]);
    assert!(err.contains("the store is not encrypted"), "{err}");
    let v = d.vol_json(&["create", "x", "--size", "1M"]);
    assert_eq!(v["encrypted"], false);
    assert_eq!(v["encryption"], Value::Null);
    // The store's header says so, and a restart asking for encryption is
    // refused with one line.
    let mut d = d;
    d.stop();
    d.set_env(&[("VOLUMED_STORE_ENCRYPTION", "on")]);
    let out = Command::new(volumed_tests::volumed_bin())
        .arg("--data-dir")
        .arg(d.data_dir())
        .args(["--nbd-listen", "127.0.0.1:0"])
        .env("VOLUMED_STORE_ENCRYPTION", "on")
        .env_remove("VOLUMED_STORE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is unencrypted") && err.contains("but encrypted was asked for"),
        "{err}"
    );
    d.set_env(&[]);
    d.start_again();
    d.finish();
}

/// Two volumes with the same content: in one domain the store grows about
/// once, in two lineage domains about twice. (The issue asks for 1 GiB;
/// the ratio does not depend on the size, and 128 MiB keeps the test's disk
/// use near 1 GiB on a shared machine.)
#[test]
fn dedup_within_a_domain_never_across_lineages() {
    const MIB: usize = 128;
    // Incompressible and the same in both volumes.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let img: Vec<u8> = (0..(MIB << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let grow = |d: &TestDaemon| {
        for n in ["a", "b"] {
            d.vol_ok(&["create", n, "--size", &format!("{MIB}M")]);
            d.vol_ok(&["attach", n]);
            write_image(d, n, &img);
        }
        let s1 = u(&snap(d, "a")["uploaded_bytes"]);
        let s2 = u(&snap(d, "b")["uploaded_bytes"]);
        (s1, s2)
    };
    let store = Store::Local;
    let one = start(&encrypted_env(&store, "dedup", &[]));
    let (a, b) = grow(&one);
    assert!(a >= (MIB as u64) << 20, "{a}");
    assert!(
        b < 1 << 20,
        "the same domain: the second adds only pages ({b})"
    );
    let two = start(&encrypted_env(
        &store,
        "dedup",
        &[("VOLUMED_ENCRYPTION_DOMAIN", "lineage")],
    ));
    let (a, b) = grow(&two);
    assert!(
        a >= (MIB as u64) << 20 && b >= (MIB as u64) << 20,
        "{a} {b}"
    );
    let domains = |d: &TestDaemon| {
        ["a", "b"].map(|n| d.vol_json(&["inspect", n])["encryption"]["data_key_id"].clone())
    };
    let [x, y] = domains(&one);
    assert_eq!(x, y);
    let [x, y] = domains(&two);
    assert_ne!(x, y);
    one.finish();
    two.finish();
}

/// Rotation: a new key version wraps every data key anew and a new data
/// key seals new data; snapshots from before and after it restore, on a
/// host holding only the rotated key file.
#[test]
fn rotation_keeps_every_snapshot_readable() {
    let store = Store::Local;
    let a = start(&encrypted_env(&store, "rot", &[]));
    a.vol_ok(&["key", "create", "team"]);
    a.vol_ok(&["create", "v", "--size", "8M", "--key", "team"]);
    a.vol_ok(&["attach", "v"]);
    let before = marker_image(8);
    write_image(&a, "v", &before);
    let old = snap(&a, "v")["id"].as_str().unwrap().to_owned();
    let r = a.vol_json(&["key", "rotate", "team"]);
    assert_eq!(r["key"]["version"], 2, "{r}");
    assert_eq!(
        (u(&r["domains"]), u(&r["rewrapped"]), u(&r["generations"])),
        (1, 1, 1)
    );
    let mut after = before.clone();
    after[..CHUNK].fill(0x5a);
    write_image(&a, "v", &after);
    let new = snap(&a, "v")["id"].as_str().unwrap().to_owned();

    // A host with the key file as it is now (both versions) reads both;
    // so would one holding version 2 only, since every wrap is under it.
    let b = second_host(&store, "rot", &a);
    share_key(&a, &b, "team");
    let path = b.data_dir().join("keys/team.key");
    let mut f: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f["versions"].as_object_mut().unwrap().remove("1");
    std::fs::write(&path, serde_json::to_vec(&f).unwrap()).unwrap();
    for (id, want) in [(&old, &before), (&new, &after)] {
        let name = format!("r{}", &id[5..12]);
        b.vol_ok(&["create", &name, "--from-snapshot", id, "--no-hydrate"]);
        b.vol_ok(&["attach", &name]);
        assert!(dump(&b, &name) == *want, "snapshot {id}");
    }
    // The new data's chunks are sealed with the new generation.
    let plain = store.repo(&a, "rot");
    let gens: BTreeMap<u32, usize> = all_objects(&plain)
        .iter()
        .filter(|(k, _)| k.starts_with("chunks/"))
        .map(|(_, o)| snapshot::crypt::seal::frame(o).unwrap().generation)
        .fold(BTreeMap::new(), |mut m, g| {
            *m.entry(g).or_default() += 1;
            m
        });
    assert_eq!(gens.keys().copied().collect::<Vec<_>>(), [0, 1], "{gens:?}");
    a.finish();
    b.finish();
}

/// A disabled key: reads of chunks not yet local get EIO, never garbage;
/// local ones read; `vol inspect` says why; enabling it again heals.
#[test]
fn a_disabled_key_means_eio_and_inspect_says_why() {
    let store = Store::Local;
    let d = start(&encrypted_env(&store, "dis", &[]));
    d.vol_ok(&["create", "src", "--size", "4M"]);
    d.vol_ok(&["attach", "src"]);
    let img = marker_image(4);
    write_image(&d, "src", &img);
    let id = snap(&d, "src")["id"].as_str().unwrap().to_owned();
    d.vol_ok(&["create", "r", "--from-snapshot", &id, "--no-hydrate"]);
    d.vol_ok(&["attach", "r"]);
    // Chunk 0 is fetched now, while the key works.
    volumed_tests::qemu_io(&d.uri("r"), &["read 0 4096"]);
    d.vol_ok(&["key", "disable", "aws-ebs"]);
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            &format!("read {} 4096", 3 * CHUNK),
            &d.uri("r"),
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    let ok = volumed_tests::qemu_io(&d.uri("r"), &["read -P 0x56 0 1"]);
    assert!(ok.contains("read 1/1"), "the local chunk still reads: {ok}");
    let v = d.vol_json(&["inspect", "r"]);
    let problem = v["encryption"]["problem"].as_str().unwrap_or_default();
    assert!(problem.contains("is disabled"), "{v}");
    let text = d.vol_ok(&["inspect", "r"]);
    assert!(text.contains("is disabled"), "{text}");
    // Verify without the key checks the framing, says so, and is not ok.
    let out = d.vol(&["--json", "snapshot", "verify", &id]);
    assert!(!out.status.success());
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["ok"], false, "{rep}");
    assert!(
        rep["framing_only"]
            .as_str()
            .unwrap_or_default()
            .contains("is disabled"),
        "{rep}"
    );
    let err = d.vol_err(&["snapshot", "verify", &id]);
    assert!(err.contains("checked only for its sealed framing"), "{err}");
    // No new volume under it either.
    let err = d.vol_err(&["create", "x", "--size", "1M"]);
    assert!(err.contains("cannot encrypt under key 'aws-ebs'"), "{err}");
    d.vol_ok(&["key", "enable", "aws-ebs"]);
    assert!(dump(&d, "r") == img);
    d.finish_expecting(&["cannot fetch a chunk", "I/O failed"], &[]);
}

/// Flips one byte of a stored sealed object of each kind, and copies one
/// chunk's object over another's name: exactly the reads that need it get
/// EIO (or the restore that needs the root fails), and verify names it.
#[test]
fn damaged_and_swapped_sealed_objects() {
    let store = Store::Local;
    // Without the host cache: a chunk read once would be served from it.
    let d = start(&encrypted_env(
        &store,
        "dmg",
        &[("VOLUMED_CACHE_SIZE", "0")],
    ));
    d.vol_ok(&["create", "src", "--size", "8M"]);
    d.vol_ok(&["attach", "src"]);
    let img = marker_image(8);
    write_image(&d, "src", &img);
    let id = snap(&d, "src")["id"].as_str().unwrap().to_owned();
    let keyed = store
        .repo(&d, "dmg")
        .with_keys(keys_of(&d) as Arc<dyn MasterKeys>);
    let sid = SnapshotId::parse(&id).unwrap();
    let m = rt().block_on(keyed.get_manifest(&sid)).unwrap();
    let dir = d.data_dir().join("store");
    let flip = |key: &str| {
        let path = dir.join(key);
        let mut b = std::fs::read(&path).unwrap();
        let n = b.len();
        b[n / 2] ^= 1;
        std::fs::write(&path, b).unwrap();
    };
    let eio = |name: &str, off: usize| {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("read {off} 4096"), &d.uri(name)])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("Input/output error")
            || String::from_utf8_lossy(&out.stderr).contains("Input/output error")
    };

    // A chunk.
    let (idx, hash) = m.hashed()[2];
    flip(&snapshot::keys::chunk_key(&hash));
    d.vol_ok(&["create", "r1", "--from-snapshot", &id, "--no-hydrate"]);
    d.vol_ok(&["attach", "r1"]);
    for c in 0..16 {
        assert_eq!(eio("r1", c * CHUNK), c == idx as usize, "chunk {c}");
    }
    let v = d.vol(&["--json", "snapshot", "verify", &id]);
    let rep: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(rep["damaged"][0]["hash"], hash.to_hex().as_str(), "{rep}");
    assert!(
        rep["damaged"][0]["error"]
            .as_str()
            .unwrap()
            .contains("does not authenticate")
    );

    // Another chunk's object copied over a third's name.
    let (idx2, victim) = m.hashed()[5];
    let donor = m.hashed()[6].1;
    std::fs::copy(
        dir.join(snapshot::keys::chunk_key(&donor)),
        dir.join(snapshot::keys::chunk_key(&victim)),
    )
    .unwrap();
    d.vol_ok(&["create", "r2", "--from-snapshot", &id, "--no-hydrate"]);
    d.vol_ok(&["attach", "r2"]);
    assert!(eio("r2", idx2 as usize * CHUNK));
    assert!(!eio("r2", 6 * CHUNK), "the donor still reads");
    let v = d.vol(&["--json", "snapshot", "verify", &id]);
    let rep: Value = serde_json::from_slice(&v.stdout).unwrap();
    let named: Vec<&str> = rep["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["hash"].as_str().unwrap())
        .collect();
    assert!(named.contains(&victim.to_hex().as_str()), "{rep}");
    assert!(
        rep.to_string().contains("copied over another's name"),
        "{rep}"
    );

    // The page: every chunk of this small volume is in it.
    let root = match rt().block_on(keyed.get_stored(&sid)).unwrap() {
        snapshot::StoredManifest::V2(r) => r,
        _ => panic!("format 2"),
    };
    flip(&snapshot::keys::page_key(&root.pages()[0].1));
    let err = d.vol_err(&["snapshot", "verify", &id]);
    assert!(err.contains(&root.pages()[0].1.to_hex()), "{err}");

    // The root: a restore needing it fails, naming it; r1 (whose copy of the
    // root is local) is untouched where its chunks are.
    flip(&snapshot::keys::manifest_key(&sid));
    let err = d.vol_err(&["create", "r3", "--from-snapshot", &id]);
    assert!(
        err.contains(&id) && err.contains("does not authenticate"),
        "{err}"
    );
    let err = d.vol_err(&["snapshot", "verify", &id]);
    assert!(err.contains(&id), "{err}");
    assert!(!eio("r1", 0));
    d.finish_expecting(
        &["cannot fetch a chunk", "I/O failed"],
        &["snapshot verification found problems"],
    );
}

/// `vol snapshot copy`: under the same key it shares every chunk; under
/// another key every chunk is sealed anew, and the copy reads with the
/// source's key disabled.
#[test]
fn copies_share_chunks_or_reseal_them() {
    let store = Store::Local;
    let d = start(&encrypted_env(&store, "copy", &[]));
    d.vol_ok(&["key", "create", "other"]);
    d.vol_ok(&["create", "v", "--size", "8M"]);
    d.vol_ok(&["attach", "v"]);
    let img = marker_image(8);
    write_image(&d, "v", &img);
    let id = snap(&d, "v")["id"].as_str().unwrap().to_owned();
    let plain = store.repo(&d, "copy");
    let chunks = || rt().block_on(plain.store().list("chunks/")).unwrap().len();
    let before = chunks();
    let same = d.vol_json(&["snapshot", "copy", &id, "--wait"]);
    assert_eq!(same["state"], "completed", "{same}");
    assert_eq!(chunks(), before, "metadata only");
    let full = d.vol_json(&["snapshot", "copy", &id, "--key", "other", "--wait"]);
    assert_eq!(full["state"], "completed", "{full}");
    assert_eq!(full["encryption"]["key"], "other");
    assert_eq!(chunks(), 2 * before, "every chunk sealed anew");
    let err = d.vol_err(&["create", "x", "--from-snapshot", &id, "--key", "other"]);
    assert!(err.contains("copy it under that key first"), "{err}");
    d.vol_ok(&["key", "disable", "aws-ebs"]);
    let copy_id = full["id"].as_str().unwrap();
    d.vol_ok(&["create", "c", "--from-snapshot", copy_id, "--no-hydrate"]);
    d.vol_ok(&["attach", "c"]);
    assert!(dump(&d, "c")[..img.len()] == img[..]);
    d.finish();
}

fn aws_encrypted() -> AwsEndpoint {
    AwsEndpoint::start_with_env(&[("VOLUMED_STORE_ENCRYPTION", "on")])
}

/// `aws ec2`: create-volume --encrypted with a key, the fields Describe*
/// shows, copy-snapshot under another key (a full copy), encryption by
/// default and the default key; `aws ebs start-snapshot --encrypted
/// --parent-snapshot-id` is refused as on AWS.
#[test]
fn the_aws_encryption_fields_and_actions() {
    let ep = aws_encrypted();
    let d = &ep.daemon;
    d.vol_ok(&["key", "create", "team"]);
    d.vol_ok(&["key", "create", "other"]);
    let by_default = ep.aws_json(&["ec2", "get-ebs-encryption-by-default"]);
    assert_eq!(by_default["EbsEncryptionByDefault"], true);
    let err = ep.aws_err(&["ec2", "disable-ebs-encryption-by-default"]);
    assert!(err.contains("UnsupportedOperation"), "{err}");
    let def = ep.aws_json(&["ec2", "get-ebs-default-kms-key-id"]);
    assert!(def["KmsKeyId"].as_str().unwrap().contains(":key/"), "{def}");
    let team_arn = d.vol_json(&["key", "inspect", "team"])["arn"]
        .as_str()
        .unwrap()
        .to_owned();
    let m = ep.aws_json(&[
        "ec2",
        "modify-ebs-default-kms-key-id",
        "--kms-key-id",
        "alias/team",
    ]);
    assert_eq!(m["KmsKeyId"], team_arn.as_str());
    let err = ep.aws_err(&[
        "ec2",
        "create-volume",
        "--size",
        "1",
        "--availability-zone",
        "us-east-1a",
        "--kms-key-id",
        "alias/team",
    ]);
    assert!(err.contains("InvalidParameterDependency"), "{err}");

    let v = ep.aws_json(&[
        "ec2",
        "create-volume",
        "--size",
        "1",
        "--availability-zone",
        "us-east-1a",
        "--encrypted",
        "--kms-key-id",
        "alias/team",
    ]);
    assert_eq!(v["Encrypted"], true, "{v}");
    assert_eq!(v["KmsKeyId"], team_arn.as_str());
    let vol_id = v["VolumeId"].as_str().unwrap().to_owned();
    let dv = ep.aws_json(&["ec2", "describe-volumes", "--volume-ids", &vol_id]);
    assert_eq!(dv["Volumes"][0]["Encrypted"], true);
    assert_eq!(dv["Volumes"][0]["KmsKeyId"], team_arn.as_str());
    // Without a key: the default key (team, since modified).
    let v2 = ep.aws_json(&[
        "ec2",
        "create-volume",
        "--size",
        "1",
        "--availability-zone",
        "us-east-1a",
    ]);
    assert_eq!(v2["KmsKeyId"], team_arn.as_str());

    d.vol_ok(&["attach", &vol_id]);
    write_image(d, &vol_id, &marker_image(4));
    let s = ep.aws_json(&["ec2", "create-snapshot", "--volume-id", &vol_id]);
    let sid = s["SnapshotId"].as_str().unwrap().to_owned();
    d.wait_snapshot_settled(&sid);
    let ds = ep.aws_json(&["ec2", "describe-snapshots", "--snapshot-ids", &sid]);
    let snap = &ds["Snapshots"][0];
    assert_eq!(snap["Encrypted"], true, "{ds}");
    assert_eq!(snap["KmsKeyId"], team_arn.as_str());
    let dek = snap["DataEncryptionKeyId"].as_str().unwrap().to_owned();

    // Copy under the same key: metadata only, the same data key.
    let same = ep.aws_json(&[
        "ec2",
        "copy-snapshot",
        "--source-region",
        "us-east-1",
        "--source-snapshot-id",
        &sid,
    ]);
    let same_id = same["SnapshotId"].as_str().unwrap().to_owned();
    d.wait_snapshot_settled(&same_id);
    // Under another key: a full copy, another data key.
    let other = ep.aws_json(&[
        "ec2",
        "copy-snapshot",
        "--source-region",
        "us-east-1",
        "--source-snapshot-id",
        &sid,
        "--encrypted",
        "--kms-key-id",
        "alias/other",
        "--description",
        "moved",
    ]);
    let other_id = other["SnapshotId"].as_str().unwrap().to_owned();
    let settled = d.wait_snapshot_settled(&other_id);
    assert_eq!(settled["state"], "completed", "{settled}");
    let ds = ep.aws_json(&[
        "ec2",
        "describe-snapshots",
        "--snapshot-ids",
        &same_id,
        &other_id,
    ]);
    let by_id = |id: &str| {
        ds["Snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["SnapshotId"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(by_id(&same_id)["DataEncryptionKeyId"], dek.as_str());
    let o = by_id(&other_id);
    assert_ne!(o["DataEncryptionKeyId"], dek.as_str());
    assert!(
        o["KmsKeyId"].as_str().unwrap().ends_with(
            &d.vol_json(&["key", "inspect", "other"])["id"]
                .as_str()
                .unwrap()
                .to_owned()
        )
    );
    assert_eq!(o["Description"], "moved");
    // The copy restores to the same bytes.
    let r = ep.aws_json(&[
        "ec2",
        "create-volume",
        "--availability-zone",
        "us-east-1a",
        "--snapshot-id",
        &other_id,
    ]);
    let rid = r["VolumeId"].as_str().unwrap().to_owned();
    assert_eq!(r["KmsKeyId"], o["KmsKeyId"]);
    d.vol_ok(&["attach", &rid]);
    assert!(dump(d, &rid)[..4 << 20] == marker_image(4)[..]);

    // EBS direct: a key with a parent is refused; without one, accepted.
    let err = ep.aws_err(&[
        "ebs",
        "start-snapshot",
        "--volume-size",
        "1",
        "--parent-snapshot-id",
        &sid,
        "--encrypted",
    ]);
    assert!(err.contains("ValidationException"), "{err}");
    let st = ep.aws_json(&[
        "ebs",
        "start-snapshot",
        "--volume-size",
        "1",
        "--encrypted",
        "--kms-key-arn",
        &team_arn,
    ]);
    assert_eq!(st["KmsKeyArn"], team_arn.as_str(), "{st}");
    d.vol_ok(&["detach", &vol_id]);
    d.vol_ok(&["detach", &rid]);
    // The upload left pending ends with the daemon.
    ep.daemon.finish_expecting(
        &[],
        &[
            "block upload failed",
            "could not remove the snapshot's marker",
        ],
    );
}

/// coldsnap uploads an image into an encrypted store and downloads it.
#[test]
fn coldsnap_on_an_encrypted_store() {
    let ep = aws_encrypted();
    let dir = tempfile::tempdir().unwrap();
    let image_path = dir.path().join("disk.img");
    let mut img = marker_image(8);
    img.resize(64 << 20, 0);
    std::fs::write(&image_path, &img).unwrap();
    let up = ep.coldsnap(&[
        "upload",
        "--wait",
        "--no-progress",
        image_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(
        up.status.success(),
        "coldsnap upload: {stdout} {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let id = stdout
        .split_whitespace()
        .find(|w| w.starts_with("snap-"))
        .unwrap()
        .to_owned();
    let s = ep.daemon.vol_json(&["snapshot", "inspect", &id]);
    assert_eq!(s["encrypted"], true, "{s}");
    let out = dir.path().join("down.img");
    let down = ep.coldsnap(&["download", "--no-progress", &id, out.to_str().unwrap()]);
    assert!(
        down.status.success(),
        "coldsnap download: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    // The download is the whole volume (whole GiB), zero past the image.
    let got = std::fs::read(&out).unwrap();
    assert!(got[..img.len()] == img[..]);
    assert!(got[img.len()..].iter().all(|b| *b == 0));
    let plain = Store::Local.repo(&ep.daemon, "");
    for (key, obj) in all_objects(&plain) {
        assert!(!contains(&obj, &MARKER[..24]), "{key} holds the marker");
    }
    ep.daemon.finish();
}

/// RunInstances makes each EBS volume of its mappings as CreateVolume
/// would with their `Encrypted` and `KmsKeyId`: the image's, overridden by
/// the launch's; a key without `Encrypted` is refused as on AWS, and a
/// root restored under another key fails the launch and leaves nothing.
#[test]
fn run_instances_honours_encrypted_mappings() {
    let ep = aws_encrypted();
    let d = &ep.daemon;
    d.vol_ok(&["key", "create", "team"]);
    d.vol_ok(&["key", "create", "other"]);
    let arn = |k: &str| {
        d.vol_json(&["key", "inspect", k])["arn"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    d.vol_ok(&["create", "golden", "--size", "64M"]);
    let root = d.vol_json(&["snapshot", "create", "golden", "--wait"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let default_arn = ep.aws_json(&["ec2", "get-ebs-default-kms-key-id"])["KmsKeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    let bdm = serde_json::json!([
        {"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": root}},
        {"DeviceName": "/dev/sdf", "Ebs": {"VolumeSize": 1, "Encrypted": true, "KmsKeyId": "alias/team"}},
    ]);
    let ami = ep.aws_json(&[
        "ec2",
        "register-image",
        "--name",
        "enc",
        "--root-device-name",
        "/dev/sda1",
        "--block-device-mappings",
        &bdm.to_string(),
    ])["ImageId"]
        .as_str()
        .unwrap()
        .to_owned();
    let img = ep.aws_json(&["ec2", "describe-images", "--image-ids", &ami]);
    let sdf = &img["Images"][0]["BlockDeviceMappings"][1]["Ebs"];
    assert_eq!(
        (&sdf["Encrypted"], &sdf["KmsKeyId"]),
        (&json!(true), &json!("alias/team")),
        "{img}"
    );

    let volumes = || {
        ep.aws_json(&["ec2", "describe-volumes"])["Volumes"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = volumes();
    let launch = |extra: &Value| {
        ep.aws(&[
            "ec2",
            "run-instances",
            "--image-id",
            &ami,
            "--count",
            "1",
            "--block-device-mappings",
            &extra.to_string(),
        ])
    };
    let err = String::from_utf8_lossy(
        &launch(&json!([{"DeviceName": "/dev/sdg", "Ebs": {"VolumeSize": 1, "KmsKeyId": "alias/other"}}])).stderr,
    )
    .into_owned();
    assert!(err.contains("InvalidParameterDependency"), "{err}");
    let out = launch(
        &json!([{"DeviceName": "/dev/sda1", "Ebs": {"Encrypted": true, "KmsKeyId": "alias/other"}}]),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another key"), "{err}");
    assert_eq!(volumes(), before, "a failed launch leaves no volume");

    let out = launch(
        &json!([{"DeviceName": "/dev/sdg", "Ebs": {"VolumeSize": 1, "Encrypted": true, "KmsKeyId": "alias/other"}}]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = r["Instances"][0]["InstanceId"].as_str().unwrap().to_owned();
    let inst = ep.aws_json(&["ec2", "describe-instances", "--instance-ids", &id]);
    let mut keys = BTreeMap::new();
    for m in inst["Reservations"][0]["Instances"][0]["BlockDeviceMappings"]
        .as_array()
        .unwrap()
    {
        let v = m["Ebs"]["VolumeId"].as_str().unwrap();
        let dv = ep.aws_json(&["ec2", "describe-volumes", "--volume-ids", v]);
        assert_eq!(dv["Volumes"][0]["Encrypted"], true, "{dv}");
        keys.insert(
            m["DeviceName"].as_str().unwrap().to_owned(),
            dv["Volumes"][0]["KmsKeyId"].as_str().unwrap().to_owned(),
        );
    }
    assert_eq!(
        keys,
        BTreeMap::from([
            ("/dev/sda1".to_owned(), default_arn),
            ("/dev/sdf".to_owned(), arn("team")),
            ("/dev/sdg".to_owned(), arn("other")),
        ])
    );
    // The refused root's launch was undone, and says so.
    ep.daemon
        .finish_expecting(&[], &["launch failed; removing what it made"]);
}
