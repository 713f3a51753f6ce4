//! Encryption of everything a store holds, for stores that are encrypted
//! from their creation (see `store_header`).
//!
//! The key hierarchy, top down:
//!
//! - **Master keys** ("KMS keys"): named, versioned secrets the program
//!   that links this crate holds (volumed's key service); this crate only
//!   asks for them through [`MasterKeys`]. They never reach the store.
//! - **Encryption domains**: the scope of deduplication. Each domain has
//!   data keys, one per *generation*, each 32 random bytes, stored in the
//!   store wrapped (sealed) by a version of one master key under
//!   `datakeys/<domain>/<generation>` (see `domain`). Rotation wraps them
//!   anew and adds a generation for new data; old data stays readable with
//!   the generation it was sealed with.
//! - From a domain's data keys: the **id key** (from generation 0) that
//!   names chunks and pages (`blake3::keyed_hash`), so equal chunks within
//!   the domain share one object and names tell an outsider nothing; and
//!   one **seal key** per generation, from which every sealed object gets a
//!   key of its own (see `seal`).
//!
//! Every chunk, page and manifest root (also as hold or trash entry) is a
//! sealed object: AES-256-GCM over its whole plaintext body, with its kind,
//! domain, generation and name as associated data, so no object can be
//! swapped for another. What stays visible is listed in docs/security.md.

pub mod domain;
pub mod keyring;
pub mod seal;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub use domain::{DomainId, DomainKeys};
pub use keyring::{Keyring, RotateReport};
pub use seal::SealError;

/// Which domain, under which master key, a snapshot's objects are sealed
/// in: recorded in its manifest header (inside the sealed root).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    /// The master key's id, as the key service names it.
    pub key: String,
    pub domain: DomainId,
}

impl Encryption {
    /// The store-wide domain of master key `key`: every host derives the
    /// same id, so volumes under one key deduplicate against each other.
    pub fn store_domain(key: &str) -> Self {
        Encryption {
            key: key.to_owned(),
            domain: DomainId::for_store_key(key),
        }
    }

    /// A domain of its own (a volume lineage, as EBS gives each encrypted
    /// volume a data key): no dedup with any other lineage.
    pub fn new_lineage(key: &str) -> Self {
        Encryption {
            key: key.to_owned(),
            domain: DomainId::random(),
        }
    }
}

/// 32 bytes of a master key version's material.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterSecret(pub [u8; 32]);

impl fmt::Debug for MasterSecret {
    // Key material never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterSecret(..)")
    }
}

/// Why a master key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key {0} is not known on this host")]
    Unknown(String),
    #[error("key {0} is disabled")]
    Disabled(String),
    #[error(
        "key {key} has no version {version} on this host (rotated elsewhere? copy its key file again)"
    )]
    Version { key: String, version: u32 },
    #[error("key {key} is unavailable: {reason}")]
    Unavailable { key: String, reason: String },
}

/// The master keys, as the program linking this crate holds them.
pub trait MasterKeys: Send + Sync {
    /// The material of `key`'s `version`, if the key is enabled.
    fn material(&self, key: &str, version: u32) -> Result<MasterSecret, KeyError>;
    /// The version new wraps use, and its material, if the key is enabled.
    fn current(&self, key: &str) -> Result<(u32, MasterSecret), KeyError>;
    /// Ok when `key` is known and enabled. Asked before every use of a data
    /// key it wraps, so disabling a key stops reads and writes at once.
    fn check(&self, key: &str) -> Result<(), KeyError>;
}

/// Master keys held in memory: for programs that read an encrypted store
/// with key material they were given, and for tests.
#[derive(Default)]
pub struct StaticKeys {
    inner: Mutex<StaticInner>,
}

#[derive(Default)]
struct StaticInner {
    versions: HashMap<String, BTreeMap<u32, MasterSecret>>,
    disabled: HashSet<String>,
}

impl StaticKeys {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StaticInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or replaces) version `version` of `key`.
    pub fn insert(&self, key: &str, version: u32, material: MasterSecret) {
        self.lock()
            .versions
            .entry(key.to_owned())
            .or_default()
            .insert(version, material);
    }

    /// Forgets version `version` of `key`.
    pub fn remove(&self, key: &str, version: u32) {
        if let Some(v) = self.lock().versions.get_mut(key) {
            v.remove(&version);
        }
    }

    pub fn set_enabled(&self, key: &str, enabled: bool) {
        let mut inner = self.lock();
        if enabled {
            inner.disabled.remove(key);
        } else {
            inner.disabled.insert(key.to_owned());
        }
    }
}

impl MasterKeys for StaticKeys {
    fn material(&self, key: &str, version: u32) -> Result<MasterSecret, KeyError> {
        self.check(key)?;
        self.lock()
            .versions
            .get(key)
            .and_then(|v| v.get(&version))
            .cloned()
            .ok_or_else(|| KeyError::Version {
                key: key.to_owned(),
                version,
            })
    }

    fn current(&self, key: &str) -> Result<(u32, MasterSecret), KeyError> {
        self.check(key)?;
        self.lock()
            .versions
            .get(key)
            .and_then(|v| v.last_key_value())
            .map(|(v, m)| (*v, m.clone()))
            .ok_or_else(|| KeyError::Unknown(key.to_owned()))
    }

    fn check(&self, key: &str) -> Result<(), KeyError> {
        let inner = self.lock();
        if !inner.versions.contains_key(key) {
            return Err(KeyError::Unknown(key.to_owned()));
        }
        if inner.disabled.contains(key) {
            return Err(KeyError::Disabled(key.to_owned()));
        }
        Ok(())
    }
}

/// Random bytes from the operating system.
pub fn random<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    // The system generator fails only where the OS has none at all.
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .expect("the operating system's random generator works");
    out
}
