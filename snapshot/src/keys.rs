//! The store's key layout: every prefix and every key the repository, gc
//! and the daemon use is spelled here and nowhere else.
//!
//! Every key is relative to the store's root or prefix:
//!
//! | key | object |
//! | --- | --- |
//! | `chunks/<first two hex digits>/<64 hex digits>` | a chunk object (see `codec`), named by the blake3 of its uncompressed bytes |
//! | `manifests/<snapshot id>` | a manifest (see `manifest`; in format 2 a root, see `root`): the snapshot exists exactly when it does |
//! | `pages/<64 hex digits>` | a manifest page (see `page`), named by the blake3 of its bytes |
//! | `holds/<name>` | a copy of a manifest whose chunks a host still needs (a volume restored from it and not yet hydrated), so gc keeps them even if the snapshot is deleted |
//! | `trash/<snapshot id>` | a deleted manifest, kept for gc's grace period so a snapshot that started from it can still finish |
//! | `trash/hold-<name>` | a released hold, kept for the same reason |
//! | `bin/<snapshot id>/<expiry>` | a deleted manifest kept in the recycle bin until `expiry` (seconds since the epoch, decimal): honoured by gc like young trash until then, restorable |
//! | `bin-images/<image id>/<expiry>` | a deregistered image's record (the daemon's JSON, opaque here) kept in the recycle bin until `expiry`; its snapshots keep their manifests meanwhile, so gc needs nothing from it |
//! | `protected/<snapshot id>` | an empty object: the snapshot may not be deleted (see `bin`) |
//! | `claims/<scope>/<slot>` | the host id of whoever claimed one scheduled slot of some work (a policy's prune), written create-if-absent so one host does it |
//! | `pending/<snapshot id>` | a snapshot being written, kept fresh while it runs, holding its start by the store's clock (see `gc`) |
//! | `gc/clock-<random>` | a probe written and removed to read the store's clock |
//! | `volumed-store` | the store header: whether the store is encrypted (see `store_header`) |
//! | `datakeys/<domain>/<generation>` | an encryption domain's data key of one generation, wrapped by a master key (see `crypt::domain`); 32 and 8 hex digits |
//!
//! In an encrypted store chunks and pages are named by their keyed hash,
//! and chunks, pages, manifests, holds and trash entries are sealed objects
//! (see `crypt::seal`); the keys are the same.
//!
//! Hold names are chosen by the daemon; like every key component they must
//! be `[a-z0-9._-]` (see `store::valid_key`). Keys for trash entries of
//! manifests and of holds cannot collide: a snapshot id starts with `snap-`.

use crate::crypt::DomainId;
use crate::hash::ChunkHash;
use crate::manifest::SnapshotId;

/// Chunk objects, fanned out by the first byte of their hash.
pub const CHUNKS: &str = "chunks/";
/// Manifest pages, by the blake3 of their bytes.
pub const PAGES: &str = "pages/";
/// Manifests: the commit points of snapshots.
pub const MANIFESTS: &str = "manifests/";
/// Markers of snapshots being written.
pub const PENDING: &str = "pending/";
/// Manifests whose chunks a host still needs.
pub const HOLDS: &str = "holds/";
/// Deleted manifests and released holds, honoured for gc's grace period.
pub const TRASH: &str = "trash/";
/// Deleted manifests kept for a retention period (the recycle bin).
pub const BIN: &str = "bin/";
/// Deregistered images kept for a retention period (the recycle bin).
pub const IMAGE_BIN: &str = "bin-images/";
/// Markers of snapshots that may not be deleted.
pub const PROTECTED: &str = "protected/";
/// Claims on scheduled work, one host per slot.
pub const CLAIMS: &str = "claims/";
/// Probes gc writes to read the store's clock.
pub const GC_CLOCK: &str = "gc/clock-";

/// The store header.
pub const STORE_HEADER: &str = "volumed-store";
/// Encryption domains' wrapped data keys.
pub const DATAKEYS: &str = "datakeys/";

/// What distinguishes a released hold from a deleted manifest in the trash.
const TRASHED_HOLD: &str = "hold-";

pub fn chunk_key(hash: &ChunkHash) -> String {
    let hex = hash.to_hex();
    format!("{CHUNKS}{}/{hex}", &hex[..2])
}

/// The chunk a `chunks/hh/<hex>` key names; any other key (a stray file,
/// a key in the wrong fan-out directory) names none, so gc never deletes
/// what is not ours.
pub fn chunk_of_key(key: &str) -> Option<ChunkHash> {
    let rest = key.strip_prefix(CHUNKS)?;
    let (dir, hex) = rest.split_once('/')?;
    let h: ChunkHash = hex.parse().ok()?;
    (hex.get(..2) == Some(dir)).then_some(h)
}

pub fn page_key(name: &ChunkHash) -> String {
    format!("{PAGES}{}", name.to_hex())
}

/// The page a `pages/<hex>` key names; any other key names none.
pub fn page_of_key(key: &str) -> Option<ChunkHash> {
    key.strip_prefix(PAGES)?.parse().ok()
}

pub fn manifest_key(id: &SnapshotId) -> String {
    format!("{MANIFESTS}{id}")
}

/// The snapshot a `manifests/<id>` key names, if it is one.
pub fn snapshot_of_manifest_key(key: &str) -> Option<SnapshotId> {
    key.strip_prefix(MANIFESTS).and_then(SnapshotId::parse)
}

pub fn pending_key(id: &SnapshotId) -> String {
    format!("{PENDING}{id}")
}

pub fn hold_key(name: &str) -> String {
    format!("{HOLDS}{name}")
}

/// The hold name in a `holds/<name>` key.
pub fn hold_of_key(key: &str) -> Option<&str> {
    key.strip_prefix(HOLDS).filter(|n| !n.is_empty())
}

/// Where a deleted snapshot's manifest waits out the grace period.
pub fn trashed_manifest_key(id: &SnapshotId) -> String {
    format!("{TRASH}{id}")
}

/// Where a released hold waits out the grace period.
pub fn trashed_hold_key(name: &str) -> String {
    format!("{TRASH}{TRASHED_HOLD}{name}")
}

/// Where a deleted snapshot's manifest waits in the recycle bin until
/// `expires` (seconds since the epoch).
pub fn binned_manifest_key(id: &SnapshotId, expires: u64) -> String {
    format!("{BIN}{id}/{expires}")
}

/// The prefix of every bin entry of snapshot `id`.
pub fn bin_prefix_of(id: &SnapshotId) -> String {
    format!("{BIN}{id}/")
}

/// The snapshot and expiry a `bin/<id>/<expiry>` key names.
pub fn binned_of_key(key: &str) -> Option<(SnapshotId, u64)> {
    let (id, expires) = key.strip_prefix(BIN)?.split_once('/')?;
    let canonical = !expires.is_empty()
        && expires.bytes().all(|b| b.is_ascii_digit())
        && (expires == "0" || !expires.starts_with('0'));
    if !canonical {
        return None;
    }
    Some((SnapshotId::parse(id)?, expires.parse().ok()?))
}

/// Where a deregistered image's record waits in the recycle bin until
/// `expires`. `image` is the caller's id, kept to `[a-z0-9-]`.
pub fn binned_image_key(image: &str, expires: u64) -> String {
    format!("{IMAGE_BIN}{image}/{expires}")
}

/// The prefix of every bin entry of image `image`.
pub fn image_bin_prefix_of(image: &str) -> String {
    format!("{IMAGE_BIN}{image}/")
}

/// The image and expiry a `bin-images/<id>/<expiry>` key names.
pub fn binned_image_of_key(key: &str) -> Option<(&str, u64)> {
    let (image, expires) = key.strip_prefix(IMAGE_BIN)?.split_once('/')?;
    let canonical = !image.is_empty()
        && image
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !expires.is_empty()
        && expires.bytes().all(|b| b.is_ascii_digit())
        && (expires == "0" || !expires.starts_with('0'));
    if !canonical {
        return None;
    }
    Some((image, expires.parse().ok()?))
}

pub fn protected_key(id: &SnapshotId) -> String {
    format!("{PROTECTED}{id}")
}

/// The snapshot a `protected/<id>` key names.
pub fn protected_of_key(key: &str) -> Option<SnapshotId> {
    key.strip_prefix(PROTECTED).and_then(SnapshotId::parse)
}

/// The claim on slot `slot` (seconds since the epoch) of `scope`, which
/// the caller keeps to `[a-z0-9._-]`.
pub fn claim_key(scope: &str, slot: u64) -> String {
    format!("{CLAIMS}{scope}/{slot}")
}

/// The prefix of every claim of `scope`.
pub fn claims_of(scope: &str) -> String {
    format!("{CLAIMS}{scope}/")
}

/// The scope and slot a `claims/<scope>/<slot>` key names.
pub fn claim_of_key(key: &str) -> Option<(&str, u64)> {
    let (scope, slot) = key.strip_prefix(CLAIMS)?.rsplit_once('/')?;
    if scope.is_empty() || !slot.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((scope, slot.parse().ok()?))
}

/// The prefix of every data key of `domain`.
pub fn data_keys_of(domain: &DomainId) -> String {
    format!("{DATAKEYS}{domain}/")
}

pub fn data_key_key(domain: &DomainId, generation: u32) -> String {
    format!("{DATAKEYS}{domain}/{generation:08x}")
}

/// The domain and generation a `datakeys/<domain>/<generation>` key names.
pub fn data_key_of_key(key: &str) -> Option<(DomainId, u32)> {
    let (domain, generation) = key.strip_prefix(DATAKEYS)?.split_once('/')?;
    if generation.len() != 8
        || !generation
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    Some((
        domain.parse().ok()?,
        u32::from_str_radix(generation, 16).ok()?,
    ))
}

/// What a manifest-shaped object under `key` must be named: the snapshot
/// id for a manifest, its trash entry or its bin entry; any snapshot for a hold (a copy of
/// some snapshot's root) or a released one.
pub fn root_name_of_key(key: &str) -> Option<SnapshotId> {
    if let Some(id) = snapshot_of_manifest_key(key) {
        return Some(id);
    }
    if let Some((id, _)) = binned_of_key(key) {
        return Some(id);
    }
    key.strip_prefix(TRASH).and_then(SnapshotId::parse)
}

/// A clock probe's key; `nonce` keeps concurrent probes apart.
pub fn clock_probe_key(nonce: &str) -> String {
    format!("{GC_CLOCK}{nonce}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::valid_key;

    #[test]
    fn image_bin_keys_round_trip_and_only_they_parse() {
        let key = binned_image_key("ami-0123456789abcdef0", 1_800_000_000);
        assert!(valid_key(&key));
        assert_eq!(key, "bin-images/ami-0123456789abcdef0/1800000000");
        assert_eq!(
            binned_image_of_key(&key),
            Some(("ami-0123456789abcdef0", 1_800_000_000))
        );
        assert!(key.starts_with(&image_bin_prefix_of("ami-0123456789abcdef0")));
        for bad in [
            "bin-images/ami-1/",
            "bin-images//5",
            "bin-images/ami-1/05",
            "bin-images/ami-1/x",
            "bin-images/AMI-1/5",
            "bin/ami-1/5",
        ] {
            assert_eq!(binned_image_of_key(bad), None, "{bad}");
        }
        // A snapshot bin listing never sees image entries, and back.
        assert!(!key.starts_with(BIN));
        assert_eq!(binned_of_key(&key), None);
    }

    #[test]
    fn chunk_keys_round_trip_and_only_they_parse() {
        let h = ChunkHash::of(b"x");
        let key = chunk_key(&h);
        assert!(valid_key(&key));
        assert_eq!(key, format!("chunks/{}/{}", &h.to_hex()[..2], h.to_hex()));
        assert_eq!(chunk_of_key(&key), Some(h));
        let hex = h.to_hex();
        assert_eq!(chunk_of_key(&format!("chunks/zz/{hex}")), None);
        assert_eq!(chunk_of_key("chunks/ab/cd"), None);
        assert_eq!(chunk_of_key("manifests/x"), None);
        let pk = page_key(&h);
        assert!(valid_key(&pk));
        assert_eq!(pk, format!("pages/{hex}"));
        assert_eq!(page_of_key(&pk), Some(h));
        assert_eq!(page_of_key(&key), None);
        assert_eq!(page_of_key("pages/zz"), None);
    }

    #[test]
    fn manifest_hold_trash_and_pending_keys() {
        let id = SnapshotId::parse("snap-00ab").unwrap();
        assert_eq!(manifest_key(&id), "manifests/snap-00ab");
        assert_eq!(
            snapshot_of_manifest_key(&manifest_key(&id)),
            Some(id.clone())
        );
        assert_eq!(snapshot_of_manifest_key("manifests/junk"), None);
        assert_eq!(snapshot_of_manifest_key("holds/snap-00ab"), None);
        assert_eq!(pending_key(&id), "pending/snap-00ab");
        assert_eq!(hold_key("host-1"), "holds/host-1");
        assert_eq!(hold_of_key(&hold_key("host-1")), Some("host-1"));
        assert_eq!(hold_of_key("holds/"), None);
        assert_eq!(hold_of_key("trash/host-1"), None);
        assert_eq!(trashed_manifest_key(&id), "trash/snap-00ab");
        assert_eq!(trashed_hold_key("host-1"), "trash/hold-host-1");
        assert_eq!(clock_probe_key("snap-1"), "gc/clock-snap-1");
        let d = DomainId([0xab; 16]);
        let dk = data_key_key(&d, 10);
        assert_eq!(dk, format!("datakeys/{}/0000000a", "ab".repeat(16)));
        assert_eq!(data_key_of_key(&dk), Some((d, 10)));
        assert!(dk.starts_with(&data_keys_of(&d)));
        assert_eq!(data_key_of_key("datakeys/ab/0000000a"), None);
        assert_eq!(data_key_of_key(&format!("datakeys/{d}/A")), None);
        assert_eq!(root_name_of_key(&manifest_key(&id)), Some(id.clone()));
        assert_eq!(
            root_name_of_key(&trashed_manifest_key(&id)),
            Some(id.clone())
        );
        assert_eq!(root_name_of_key(&hold_key("h")), None);
        assert_eq!(root_name_of_key(&trashed_hold_key("h")), None);
        let b = binned_manifest_key(&id, 1_767_225_600);
        assert_eq!(b, "bin/snap-00ab/1767225600");
        assert!(b.starts_with(&bin_prefix_of(&id)));
        assert_eq!(binned_of_key(&b), Some((id.clone(), 1_767_225_600)));
        assert_eq!(root_name_of_key(&b), Some(id.clone()));
        assert_eq!(binned_of_key("bin/snap-00ab/017"), None);
        assert_eq!(binned_of_key("bin/snap-00ab/"), None);
        assert_eq!(binned_of_key("bin/snap-00ab/1x"), None);
        assert_eq!(binned_of_key("bin/junk/1"), None);
        assert_eq!(binned_of_key("trash/snap-00ab"), None);
        assert_eq!(protected_key(&id), "protected/snap-00ab");
        assert_eq!(protected_of_key(&protected_key(&id)), Some(id.clone()));
        assert_eq!(protected_of_key("protected/x"), None);
        let c = claim_key("prune-3f2a", 1_700_000_000);
        assert_eq!(c, "claims/prune-3f2a/1700000000");
        assert!(c.starts_with(&claims_of("prune-3f2a")));
        assert_eq!(claim_of_key(&c), Some(("prune-3f2a", 1_700_000_000)));
        assert_eq!(claim_of_key("claims/x/y"), None);
        assert_eq!(claim_of_key("claims//1"), None);
        for k in [
            b,
            c,
            protected_key(&id),
            dk,
            STORE_HEADER.to_owned(),
            manifest_key(&id),
            pending_key(&id),
            hold_key("h"),
            trashed_manifest_key(&id),
            trashed_hold_key("h"),
            clock_probe_key("n"),
        ] {
            assert!(valid_key(&k), "{k}");
        }
    }
}
