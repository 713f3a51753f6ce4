//! The snapshot manifest: everything needed to restore a snapshot without
//! reading any other snapshot. Its presence in the store is what makes the
//! snapshot exist, so it is written after every chunk it names.
//!
//! | part | encoding |
//! | --- | --- |
//! | magic | `VMAN` |
//! | version | u32 LE, 1 |
//! | header length | u32 LE |
//! | header | JSON [`ManifestHeader`] |
//! | chunk count | u64 LE, must equal ceil(size / chunk_size) |
//! | entries | `0x00` + u64 LE run of zero chunks, or `0x01` + 32-byte blake3 |
//! | checksum | blake3 of every byte before it |
//!
//! In memory only the hashed chunks are kept (sorted), so neither a huge
//! sparse volume nor a manifest that lies about its size can make decoding
//! allocate more than the manifest's own bytes justify.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::hash::ChunkHash;

pub const MAGIC: &[u8; 4] = b"VMAN";
pub const VERSION: u32 = 1;
/// Headers are small JSON; a larger claim is corrupt.
const MAX_HEADER: usize = 1 << 20;
pub(crate) const ENTRY_ZERO_RUN: u8 = 0;
pub(crate) const ENTRY_HASH: u8 = 1;

/// What a snapshot is, beyond its chunk list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestHeader {
    pub id: SnapshotId,
    pub volume: String,
    pub size: u64,
    pub chunk_size: u64,
    pub parent: Option<SnapshotId>,
    /// RFC 3339, UTC.
    pub created_at: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Chunks read and hashed for this snapshot (changed since the parent).
    pub changed_chunks: u64,
    /// Bytes of the volume that are not zero chunks.
    pub logical_bytes: u64,
    /// Bytes this snapshot added to the store, after dedup and compression.
    pub uploaded_bytes: u64,
    /// The encryption domain, and the master key wrapping its data keys,
    /// that the snapshot's objects are sealed in; absent in an unencrypted
    /// store, whose headers stay as they always were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::crypt::Encryption>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub header: ManifestHeader,
    /// `(chunk index, hash)` of every non-zero chunk, ascending by index.
    hashed: Vec<(u64, ChunkHash)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is truncated")]
    Truncated,
    #[error("manifest has a bad magic")]
    Magic,
    #[error("manifest version {0} is not understood")]
    Version(u32),
    #[error("manifest checksum does not match its contents")]
    Checksum,
    #[error("manifest header is invalid: {0}")]
    Header(String),
    #[error("manifest entries are invalid: {0}")]
    Entries(&'static str),
    /// A page object that is not the page its root names.
    #[error("manifest page is invalid: {0}")]
    Page(&'static str),
    #[error("{0}")]
    Seal(crate::crypt::SealError),
}

impl Manifest {
    /// A manifest for `header`, whose size and chunk size fix the chunk count.
    pub fn new(header: ManifestHeader) -> Self {
        Manifest {
            header,
            hashed: Vec::new(),
        }
    }

    pub fn chunk_count(&self) -> u64 {
        self.header.size.div_ceil(self.header.chunk_size)
    }

    /// Records chunk `index`'s hash; `None` means a zero chunk. Indices must
    /// be set in ascending order, each at most once.
    pub fn push(&mut self, index: u64, hash: Option<ChunkHash>) {
        debug_assert!(index < self.chunk_count());
        debug_assert!(self.hashed.last().is_none_or(|(i, _)| *i < index));
        if let Some(h) = hash {
            self.hashed.push((index, h));
        }
    }

    /// The hash of chunk `index`, `None` for a zero chunk.
    pub fn get(&self, index: u64) -> Option<ChunkHash> {
        self.hashed
            .binary_search_by_key(&index, |(i, _)| *i)
            .ok()
            .map(|p| self.hashed[p].1)
    }

    /// Every non-zero chunk, ascending.
    pub fn hashed(&self) -> &[(u64, ChunkHash)] {
        &self.hashed
    }

    /// The non-zero chunks in `[first, end)`, ascending.
    pub fn hashed_in(&self, first: u64, end: u64) -> &[(u64, ChunkHash)] {
        let a = self.hashed.partition_point(|(i, _)| *i < first);
        let b = self.hashed.partition_point(|(i, _)| *i < end);
        &self.hashed[a..b.max(a)]
    }

    /// A manifest from entries already sorted by index, each below the
    /// chunk count (as a decoder or the page reader produces them).
    pub(crate) fn from_sorted(header: ManifestHeader, hashed: Vec<(u64, ChunkHash)>) -> Self {
        debug_assert!(hashed.windows(2).all(|w| w[0].0 < w[1].0));
        Manifest { header, hashed }
    }

    /// The format-1 encoding: one object holding every entry. New
    /// snapshots are written paged (see `root`); this stays for readers of
    /// old stores and for tests that make old-format manifests.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.hashed.len() * 33);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        encode_header(&mut out, &self.header);
        let count = self.chunk_count();
        out.extend_from_slice(&count.to_le_bytes());
        encode_entries(&mut out, 0, count, &self.hashed);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Decodes a format-1 manifest; see [`StoredManifest::decode`] for
    /// either format.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let mut r = open_checked(bytes, MAGIC)?;
        let version = r.u32()?;
        if version != VERSION {
            return Err(ManifestError::Version(version));
        }
        let header = decode_header(&mut r)?;
        let count = r.u64()?;
        if count != header.size.div_ceil(header.chunk_size) {
            return Err(ManifestError::Entries(
                "chunk count does not match size / chunk size",
            ));
        }
        let hashed = decode_entries(&mut r, 0, count)?;
        r.finish()?;
        Ok(Manifest { header, hashed })
    }
}

/// A manifest object as the store holds it, in either format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredManifest {
    /// Format 1: every entry inline.
    V1(Manifest),
    /// Format 2: a root naming content-addressed pages.
    V2(crate::root::ManifestRoot),
}

impl StoredManifest {
    /// Decodes either format, by the version after the magic.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        match bytes
            .get(4..8)
            .map(|v| u32::from_le_bytes(v.try_into().expect("4 bytes")))
        {
            Some(crate::root::VERSION) => crate::root::ManifestRoot::decode(bytes).map(Self::V2),
            _ => Manifest::decode(bytes).map(Self::V1),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            StoredManifest::V1(m) => m.encode(),
            StoredManifest::V2(r) => r.encode(),
        }
    }

    pub fn header(&self) -> &ManifestHeader {
        match self {
            StoredManifest::V1(m) => &m.header,
            StoredManifest::V2(r) => &r.header,
        }
    }
}

/// Checks length, magic and trailing checksum; returns a cursor over the
/// bytes between the magic and the checksum.
pub(crate) fn open_checked<'a>(
    bytes: &'a [u8],
    magic: &[u8; 4],
) -> Result<Cursor<'a>, ManifestError> {
    if bytes.len() < 4 + 4 + 32 {
        return Err(ManifestError::Truncated);
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if &body[..4] != magic {
        return Err(ManifestError::Magic);
    }
    if blake3::hash(body).as_bytes() != sum {
        return Err(ManifestError::Checksum);
    }
    Ok(Cursor(&body[4..]))
}

/// Header length (u32 LE) and JSON.
pub(crate) fn encode_header(out: &mut Vec<u8>, h: &ManifestHeader) {
    let header = serde_json::to_vec(h).expect("a manifest header always serializes");
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
}

pub(crate) fn decode_header(r: &mut Cursor<'_>) -> Result<ManifestHeader, ManifestError> {
    let hlen = r.u32()? as usize;
    if hlen > MAX_HEADER {
        return Err(ManifestError::Header("longer than 1 MiB".into()));
    }
    let header: ManifestHeader =
        serde_json::from_slice(r.take(hlen)?).map_err(|e| ManifestError::Header(e.to_string()))?;
    if header.chunk_size == 0 || !header.chunk_size.is_power_of_two() {
        return Err(ManifestError::Header(format!(
            "chunk size {} is not a power of two",
            header.chunk_size
        )));
    }
    Ok(header)
}

/// Entries for the `count` slots starting at `first`: zero runs and
/// hashes. `hashed` holds absolute indices in `[first, first + count)`,
/// ascending.
pub(crate) fn encode_entries(
    out: &mut Vec<u8>,
    first: u64,
    count: u64,
    hashed: &[(u64, ChunkHash)],
) {
    let mut next = first;
    let end = first + count;
    for &(idx, hash) in hashed {
        debug_assert!(idx >= next && idx < end);
        if idx > next {
            out.push(ENTRY_ZERO_RUN);
            out.extend_from_slice(&(idx - next).to_le_bytes());
        }
        out.push(ENTRY_HASH);
        out.extend_from_slice(&hash.0);
        next = idx + 1;
    }
    if end > next {
        out.push(ENTRY_ZERO_RUN);
        out.extend_from_slice(&(end - next).to_le_bytes());
    }
}

/// Reads entries for `count` slots starting at `first`; only the hashed
/// ones are kept, so the result is bounded by the input's length.
pub(crate) fn decode_entries(
    r: &mut Cursor<'_>,
    first: u64,
    count: u64,
) -> Result<Vec<(u64, ChunkHash)>, ManifestError> {
    let mut hashed = Vec::new();
    let mut next = 0u64;
    while next < count {
        match r.u8()? {
            ENTRY_ZERO_RUN => {
                let run = r.u64()?;
                if run == 0 || run > count - next {
                    return Err(ManifestError::Entries(
                        "zero run is empty or runs past the end",
                    ));
                }
                next += run;
            }
            ENTRY_HASH => {
                let h: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
                let idx = first
                    .checked_add(next)
                    .ok_or(ManifestError::Entries("index overflows"))?;
                hashed.push((idx, ChunkHash(h)));
                next += 1;
            }
            _ => return Err(ManifestError::Entries("unknown entry tag")),
        }
    }
    Ok(hashed)
}

pub(crate) struct Cursor<'a>(pub(crate) &'a [u8]);

impl<'a> Cursor<'a> {
    /// Nothing may follow the last field.
    pub(crate) fn finish(&self) -> Result<(), ManifestError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ManifestError::Entries("bytes after the last entry"))
        }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ManifestError> {
        if self.0.len() < n {
            return Err(ManifestError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, ManifestError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, ManifestError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, ManifestError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

/// A snapshot id: `snap-` and 17 hex digits, as EC2's (ids made before
/// had 16, and still parse), unique across hosts sharing a
/// store (derived from the time, the process and a counter, hashed).
///
/// Serialized as its plain string; deserializing validates it, so a value
/// of this type is always safe as an object key and a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotId(String);

/// The longest random part [`SnapshotId::parse`] accepts.
const MAX_ID_SUFFIX: usize = 64;

/// A string that is not a snapshot id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid snapshot id {0:?}: expected snap- followed by 1 to 64 of [0-9a-z]")]
pub struct InvalidSnapshotId(pub String);

impl SnapshotId {
    pub fn generate() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = blake3::Hasher::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        h.update(&now.as_nanos().to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        if let Ok(host) = std::fs::read("/etc/machine-id") {
            h.update(&host);
        }
        let hex = ChunkHash(*h.finalize().as_bytes()).to_hex();
        SnapshotId(format!("snap-{}", &hex[..17]))
    }

    /// Accepts `snap-` followed by 1 to 64 of `[0-9a-z]`: safe as an object
    /// key and a file name.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("snap-")?;
        let ok = !rest.is_empty()
            && rest.len() <= MAX_ID_SUFFIX
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
        ok.then(|| SnapshotId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SnapshotId {
    type Err = InvalidSnapshotId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SnapshotId::parse(s).ok_or_else(|| InvalidSnapshotId(s.to_owned()))
    }
}

impl TryFrom<String> for SnapshotId {
    type Error = InvalidSnapshotId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SnapshotId> for String {
    fn from(id: SnapshotId) -> String {
        id.0
    }
}

impl AsRef<str> for SnapshotId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for SnapshotId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for SnapshotId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// A header for the crate's tests: a fresh id, volume `v`, no parent or
/// labels, zero counts; tests change the fields they care about.
#[cfg(test)]
pub(crate) fn test_header(size: u64, chunk_size: u64) -> ManifestHeader {
    ManifestHeader {
        id: SnapshotId::generate(),
        volume: "v".into(),
        size,
        chunk_size,
        parent: None,
        created_at: "2026-12-02T00:00:00Z".into(),
        labels: Default::default(),
        changed_chunks: 0,
        logical_bytes: 0,
        uploaded_bytes: 0,
        encryption: None,
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(size: u64, chunk_size: u64) -> ManifestHeader {
        ManifestHeader {
            id: SnapshotId::parse("snap-0123456789abcdef").unwrap(),
            volume: "data".into(),
            size,
            chunk_size,
            parent: None,
            created_at: "2026-11-25T09:00:00Z".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
            changed_chunks: 2,
            logical_bytes: 2 * chunk_size,
            uploaded_bytes: 1000,
            encryption: None,
        }
    }

    #[test]
    fn round_trip_sparse_and_huge() {
        // 64 TiB in 64 KiB chunks: a billion entries, two of them hashed.
        let mut m = Manifest::new(header(64 << 40, 64 << 10));
        m.push(5, Some(ChunkHash::of(b"a")));
        m.push((1 << 30) - 1, Some(ChunkHash::of(b"b")));
        let bytes = m.encode();
        assert!(
            bytes.len() < 1024,
            "zero runs are compact: {} bytes",
            bytes.len()
        );
        let back = Manifest::decode(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.get(5), Some(ChunkHash::of(b"a")));
        assert_eq!(back.get(6), None);
    }

    #[test]
    fn damage_is_detected() {
        let mut m = Manifest::new(header(10 << 20, 1 << 20));
        m.push(0, Some(ChunkHash::of(b"x")));
        let bytes = m.encode();
        for i in [0, 6, 20, bytes.len() / 2, bytes.len() - 40, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Manifest::decode(&b).is_err(), "flip at {i}");
        }
        assert_eq!(
            Manifest::decode(&bytes[..bytes.len() - 1]),
            Err(ManifestError::Checksum)
        );
        assert_eq!(
            Manifest::decode(&bytes[..10]),
            Err(ManifestError::Truncated)
        );
    }

    /// Re-signs a body so only the structural checks can refuse it.
    fn resign(mut body: Vec<u8>) -> Vec<u8> {
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        body
    }

    #[test]
    fn lying_structure_is_refused_even_with_a_valid_checksum() {
        let m = Manifest::new(header(4 << 20, 1 << 20));
        let bytes = m.encode();
        let body = bytes[..bytes.len() - 32].to_vec();
        // A zero run longer than the volume.
        let mut b = body.clone();
        let n = b.len();
        b[n - 8..].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Manifest::decode(&resign(b)),
            Err(ManifestError::Entries(_))
        ));
        // Trailing garbage.
        let mut b = body.clone();
        b.push(0);
        assert!(matches!(
            Manifest::decode(&resign(b)),
            Err(ManifestError::Entries(_))
        ));
    }

    #[test]
    fn snapshot_ids() {
        let a = SnapshotId::generate();
        let b = SnapshotId::generate();
        assert_ne!(a, b);
        assert!(SnapshotId::parse(a.as_str()).is_some());
        for bad in ["snap-", "snap-../x", "SNAP-1", "snap-ABC", "x"] {
            assert!(SnapshotId::parse(bad).is_none(), "{bad}");
            assert!(bad.parse::<SnapshotId>().is_err(), "{bad}");
        }
        let long = format!("snap-{}", "a".repeat(MAX_ID_SUFFIX));
        assert_eq!(long.parse::<SnapshotId>().unwrap().as_str(), long);
        assert!(format!("{long}a").parse::<SnapshotId>().is_err());
        assert_eq!(
            "x".parse::<SnapshotId>().unwrap_err().to_string(),
            r#"invalid snapshot id "x": expected snap- followed by 1 to 64 of [0-9a-z]"#
        );
        assert_eq!(a, a.as_str());
        assert_eq!(AsRef::<str>::as_ref(&a), a.to_string());
    }

    #[test]
    fn snapshot_ids_serialize_as_plain_strings_and_are_checked() {
        let id = SnapshotId::parse("snap-00ff").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""snap-00ff""#);
        let back: SnapshotId = serde_json::from_str(r#""snap-00ff""#).unwrap();
        assert_eq!(back, id);
        for bad in [r#""snap-../etc""#, r#""""#, "7"] {
            assert!(serde_json::from_str::<SnapshotId>(bad).is_err(), "{bad}");
        }
    }

    /// The header's JSON is what older manifests hold: typed ids must not
    /// change a byte of it, or their checksums and equality checks break.
    #[test]
    fn header_json_is_unchanged_by_typed_ids() {
        let mut h = header(4 << 20, 1 << 20);
        h.parent = SnapshotId::parse("snap-00000000000000aa");
        let json = String::from_utf8(serde_json::to_vec(&h).unwrap()).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"id":"snap-0123456789abcdef","volume":"data","size":4194304,"#,
                r#""chunk_size":1048576,"parent":"snap-00000000000000aa","#,
                r#""created_at":"2026-11-25T09:00:00Z","labels":{"env":"prod"},"#,
                r#""changed_chunks":2,"logical_bytes":2097152,"uploaded_bytes":1000}"#
            )
        );
        let back: ManifestHeader = serde_json::from_str(&json).unwrap();
        assert_eq!(back, h);
        // A header whose id is not an id is refused, checksum or not.
        let bad = json.replace("snap-0123456789abcdef", "snap-../../x");
        assert!(serde_json::from_str::<ManifestHeader>(&bad).is_err());
        let m = Manifest::new(h);
        let bytes = m.encode();
        let body = bytes[..bytes.len() - 32].to_vec();
        let pos = body
            .windows(5)
            .position(|w| w == b"snap-")
            .expect("the id is in the header");
        let mut b = body.clone();
        b[pos + 5] = b'X';
        assert!(matches!(
            Manifest::decode(&resign(b)),
            Err(ManifestError::Header(_))
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Manifest::decode(&bytes);
            let _ = Manifest::decode(&resign(bytes));
        }

        #[test]
        fn round_trips(picks in proptest::collection::btree_set(0u64..1000, 0..50)) {
            let mut m = Manifest::new(header(1000 << 16, 1 << 16));
            for i in &picks {
                m.push(*i, Some(ChunkHash::of(&i.to_le_bytes())));
            }
            let back = Manifest::decode(&m.encode()).unwrap();
            prop_assert_eq!(back.hashed().len(), picks.len());
            prop_assert_eq!(back, m);
        }
    }
}
