//! The store header: one object, `volumed-store`, written create-if-absent
//! when a program first uses an empty store, recording whether the store is
//! encrypted. A store is encrypted or not from its creation and stays so.
//! All integers little-endian.
//!
//! | part | encoding |
//! | --- | --- |
//! | magic | `VSTO` |
//! | version | u32, 1 |
//! | header length | u32, at most 64 KiB |
//! | header | JSON [`StoreHeader`] |
//! | checksum | blake3 of every byte before it |
//!
//! A store with snapshots but no header was made before headers existed:
//! it is unencrypted, and its header is written to say so. The header is
//! not secret and not sealed; a program told to expect an encrypted store
//! refuses one whose header says otherwise, so a header replaced by
//! someone with write access to the bucket cannot make it write plaintext.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::keys;
use crate::manifest::{self, ManifestError};
use crate::store::{ObjectStore, PutOutcome, StoreError};

pub const MAGIC: &[u8; 4] = b"VSTO";
pub const VERSION: u32 = 1;
const MAX_JSON: usize = 64 << 10;

/// What the store header says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreHeader {
    /// `None`: objects are stored plain (compressed), named by plain blake3.
    pub encryption: Option<StoreEncryption>,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The program and version that wrote it.
    pub created_by: String,
}

/// How an encrypted store seals and names its objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreEncryption {
    /// `aes-256-gcm`: see `crypt::seal`.
    pub cipher: String,
    /// `blake3-keyed`: see `crypt::domain`.
    pub names: String,
}

impl StoreEncryption {
    pub fn current() -> Self {
        StoreEncryption {
            cipher: "aes-256-gcm".into(),
            names: "blake3-keyed".into(),
        }
    }
}

impl StoreHeader {
    pub fn is_encrypted(&self) -> bool {
        self.encryption.is_some()
    }

    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a store header always serializes");
        let mut out = Vec::with_capacity(json.len() + 44);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let mut r = manifest::open_checked(bytes, MAGIC)?;
        let version = r.u32()?;
        if version != VERSION {
            return Err(ManifestError::Version(version));
        }
        let len = r.u32()? as usize;
        if len > MAX_JSON {
            return Err(ManifestError::Header("longer than 64 KiB".into()));
        }
        let h: StoreHeader = serde_json::from_slice(r.take(len)?)
            .map_err(|e| ManifestError::Header(e.to_string()))?;
        r.finish()?;
        if let Some(e) = &h.encryption
            && *e != StoreEncryption::current()
        {
            return Err(ManifestError::Header(format!(
                "cipher {} with names {} is not understood",
                e.cipher, e.names
            )));
        }
        Ok(h)
    }
}

/// What the program using the store expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Whatever the header says; a new store is unencrypted.
    Auto,
    /// Encrypted: a new store is made encrypted, an unencrypted one refused.
    Encrypted,
    /// Unencrypted: a new store is made so, an encrypted one refused.
    Plain,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store header of {store} is damaged: {source}")]
    Corrupt {
        store: String,
        source: ManifestError,
    },
    #[error("store {store} is {found} (since {since}), but {wanted} was asked for")]
    Mismatch {
        store: String,
        found: &'static str,
        wanted: &'static str,
        since: String,
    },
    #[error(
        "store {0} holds snapshots written before store headers existed, so it is unencrypted; an encrypted store must start empty"
    )]
    LegacyNotEncrypted(String),
}

fn word(encrypted: bool) -> &'static str {
    if encrypted {
        "encrypted"
    } else {
        "unencrypted"
    }
}

/// Reads the store's header, writing it first if the store has none:
/// as `expect` says for an empty store, unencrypted for one made before
/// headers existed. `now` and `by` fill a new header.
pub async fn open(
    store: &dyn ObjectStore,
    expect: Expect,
    now: &str,
    by: &str,
) -> Result<StoreHeader, HeaderError> {
    // Twice at most: a header another host wrote between our read and our
    // write is read back.
    for _ in 0..2 {
        if let Some(bytes) = store.get(keys::STORE_HEADER).await? {
            let h = StoreHeader::decode(&bytes).map_err(|source| HeaderError::Corrupt {
                store: store.describe(),
                source,
            })?;
            return check(store, expect, h);
        }
        let legacy = has_snapshots(store).await?;
        if legacy && expect == Expect::Encrypted {
            return Err(HeaderError::LegacyNotEncrypted(store.describe()));
        }
        let h = StoreHeader {
            encryption: (!legacy && expect == Expect::Encrypted).then(StoreEncryption::current),
            created_at: now.to_owned(),
            created_by: by.to_owned(),
        };
        if store
            .put_if_absent(keys::STORE_HEADER, Bytes::from(h.encode()))
            .await?
            == PutOutcome::Created
        {
            tracing::info!(store = %store.describe(), encrypted = h.is_encrypted(), "store header written");
            return Ok(h);
        }
    }
    Err(HeaderError::Store(StoreError::new(
        "get",
        keys::STORE_HEADER,
        crate::store::ErrorKind::Transient,
        "the store header was written and then vanished",
    )))
}

/// [`open`], remembered by the host under `dir`: the header last seen is
/// what `Expect::Auto` expects (so a header replaced in the bucket is
/// refused, never followed into writing plaintext), and it stands in for
/// the store's when the store cannot be reached at start.
pub async fn open_remembered(
    store: &dyn ObjectStore,
    expect: Expect,
    dir: &std::path::Path,
    now: &str,
    by: &str,
) -> Result<StoreHeader, HeaderError> {
    let name = crate::hash::hex(&blake3::hash(store.describe().as_bytes()).as_bytes()[..8]);
    let path = dir.join(format!("store-header-{name}"));
    let seen = std::fs::read(&path)
        .ok()
        .and_then(|b| StoreHeader::decode(&b).ok());
    let expect = match (expect, &seen) {
        (Expect::Auto, Some(h)) if h.is_encrypted() => Expect::Encrypted,
        (Expect::Auto, Some(_)) => Expect::Plain,
        (e, _) => e,
    };
    match open(store, expect, now, by).await {
        Ok(h) => {
            if seen.as_ref() != Some(&h) {
                let tmp = dir.join(format!(".store-header-{name}.tmp"));
                let written =
                    std::fs::write(&tmp, h.encode()).and_then(|()| std::fs::rename(&tmp, &path));
                if let Err(e) = written {
                    tracing::warn!(path = %path.display(), error = %e, "could not remember the store header");
                }
            }
            Ok(h)
        }
        Err(HeaderError::Store(e)) if e.is_transient() => match seen {
            Some(h) => {
                tracing::warn!(store = %store.describe(), error = %e,
                    "the store is unreachable; going by the header this host saw last");
                Ok(h)
            }
            None => Err(HeaderError::Store(e)),
        },
        Err(e) => Err(e),
    }
}

fn check(
    store: &dyn ObjectStore,
    expect: Expect,
    h: StoreHeader,
) -> Result<StoreHeader, HeaderError> {
    let wanted = match expect {
        Expect::Auto => return Ok(h),
        Expect::Encrypted => true,
        Expect::Plain => false,
    };
    if h.is_encrypted() != wanted {
        return Err(HeaderError::Mismatch {
            store: store.describe(),
            found: word(h.is_encrypted()),
            wanted: word(wanted),
            since: h.created_at,
        });
    }
    Ok(h)
}

/// Whether anything but garbage is stored: a manifest, hold, trash entry
/// or snapshot in progress (small prefixes, unlike `chunks/`).
async fn has_snapshots(store: &dyn ObjectStore) -> Result<bool, StoreError> {
    for prefix in [keys::MANIFESTS, keys::HOLDS, keys::TRASH, keys::PENDING] {
        if !store.list(prefix).await?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use proptest::prelude::*;

    #[tokio::test]
    async fn a_new_store_gets_the_header_asked_for_and_keeps_it() {
        let s = MemoryStore::new();
        let h = open(&s, Expect::Encrypted, "t0", "test").await.unwrap();
        assert!(h.is_encrypted());
        // Later opens read it; a contrary expectation is refused.
        assert_eq!(open(&s, Expect::Auto, "t1", "test").await.unwrap(), h);
        let e = open(&s, Expect::Plain, "t1", "test").await.unwrap_err();
        assert!(
            e.to_string()
                .contains("is encrypted (since t0), but unencrypted was asked for"),
            "{e}"
        );
        let plain = MemoryStore::new();
        assert!(
            !open(&plain, Expect::Auto, "t", "x")
                .await
                .unwrap()
                .is_encrypted()
        );
        assert!(matches!(
            open(&plain, Expect::Encrypted, "t", "x").await,
            Err(HeaderError::Mismatch { .. })
        ));
    }

    #[tokio::test]
    async fn a_store_from_before_headers_is_unencrypted() {
        let s = MemoryStore::new();
        s.put("manifests/snap-1", Bytes::from_static(b"m"))
            .await
            .unwrap();
        assert!(matches!(
            open(&s, Expect::Encrypted, "t", "x").await,
            Err(HeaderError::LegacyNotEncrypted(_))
        ));
        let h = open(&s, Expect::Auto, "t", "x").await.unwrap();
        assert!(!h.is_encrypted());
        assert!(
            s.get(keys::STORE_HEADER).await.unwrap().is_some(),
            "recorded"
        );
    }

    #[tokio::test]
    async fn the_header_seen_last_is_expected_and_stands_in_for_an_unreachable_store() {
        use crate::store::faulty::{Fault, Faulty};
        let dir = tempfile::tempdir().unwrap();
        let s = Faulty::new(MemoryStore::new());
        let h = open_remembered(&s, Expect::Encrypted, dir.path(), "t0", "x")
            .await
            .unwrap();
        assert!(h.is_encrypted());
        // The header replaced by one saying "unencrypted": refused, even
        // without an expectation given.
        let plain = StoreHeader {
            encryption: None,
            ..h.clone()
        };
        s.put(keys::STORE_HEADER, Bytes::from(plain.encode()))
            .await
            .unwrap();
        assert!(matches!(
            open_remembered(&s, Expect::Auto, dir.path(), "t1", "x").await,
            Err(HeaderError::Mismatch { .. })
        ));
        // Unreachable: the header seen last stands in.
        s.fail_next(100, Fault::Transient);
        let seen = open_remembered(&s, Expect::Auto, dir.path(), "t1", "x")
            .await
            .unwrap();
        assert_eq!(seen, h);
        // Without one seen, an unreachable store is an error.
        let other = tempfile::tempdir().unwrap();
        assert!(
            open_remembered(&s, Expect::Auto, other.path(), "t1", "x")
                .await
                .is_err()
        );
    }

    #[test]
    fn damage_and_unknown_ciphers_are_refused() {
        let h = StoreHeader {
            encryption: Some(StoreEncryption::current()),
            created_at: "t".into(),
            created_by: "x".into(),
        };
        let bytes = h.encode();
        assert_eq!(StoreHeader::decode(&bytes).unwrap(), h);
        let mut bad = bytes.clone();
        bad[14] ^= 1;
        assert!(StoreHeader::decode(&bad).is_err());
        let other = StoreHeader {
            encryption: Some(StoreEncryption {
                cipher: "rot13".into(),
                names: "blake3-keyed".into(),
            }),
            ..h
        };
        assert!(StoreHeader::decode(&other.encode()).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = StoreHeader::decode(&bytes);
        }
    }
}
