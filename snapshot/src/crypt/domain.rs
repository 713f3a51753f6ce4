//! Encryption domains: ids, data keys and what is derived from them, and
//! the wrapped form a data key takes in the store.
//!
//! A data key is 32 random bytes. Generation `g` of domain `D` is stored
//! under `datakeys/<D>/<g as 8 hex digits>` as a sealed object (see
//! `seal`) of kind "data key", domain `D`, generation `g`, named
//! `<master key id>#<master key version>`, whose plaintext is the 32 bytes.
//! Its seal key is derived from that master key version's material, so
//! only a holder of the master key can unwrap it; rotation overwrites the
//! object with a wrap under a newer version (the data key is unchanged).
//!
//! Derivations (blake3 `derive_key`, each context used for nothing else):
//!
//! | key | context | from |
//! | --- | --- | --- |
//! | id key (names) | `volumed 2026-12 chunk and page names` | data key of generation 0 |
//! | seal key of generation g | `volumed 2026-12 object sealing` | data key of generation g |
//! | wrapping key of a master key version | `volumed 2026-12 data key wrapping` | the version's material |
//! | a store domain's id | `volumed 2026-12 store domain id` (first 16 bytes) | the master key's id |

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::seal::{self, Kind, SealError, SealKey};
use super::{MasterSecret, random};
use crate::hash::Naming;

const NAMES_CONTEXT: &str = "volumed 2026-12 chunk and page names";
const SEAL_CONTEXT: &str = "volumed 2026-12 object sealing";
const WRAP_CONTEXT: &str = "volumed 2026-12 data key wrapping";
const STORE_DOMAIN_CONTEXT: &str = "volumed 2026-12 store domain id";

/// An encryption domain: 16 bytes, written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainId(pub [u8; 16]);

impl DomainId {
    pub fn random() -> Self {
        DomainId(random())
    }

    /// The store-wide domain of master key `key`.
    pub fn for_store_key(key: &str) -> Self {
        let d = blake3::derive_key(STORE_DOMAIN_CONTEXT, key.as_bytes());
        DomainId(d[..16].try_into().expect("16 of 32 bytes"))
    }

    pub fn to_hex(&self) -> String {
        crate::hash::hex(&self.0)
    }
}

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DomainId({})", self.to_hex())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid encryption domain {0:?}: 32 lowercase hex digits expected")]
pub struct DomainParseError(pub String);

impl FromStr for DomainId {
    type Err = DomainParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DomainParseError(s.chars().take(80).collect());
        if s.len() != 32 {
            return Err(bad());
        }
        // Padded to a chunk hash's length, parsed by its parser.
        let full: crate::ChunkHash = format!("{s}{}", "0".repeat(32))
            .parse()
            .map_err(|_| bad())?;
        Ok(DomainId(full.0[..16].try_into().expect("16 bytes")))
    }
}

impl Serialize for DomainId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for DomainId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One generation's data key.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey(pub(crate) [u8; 32]);

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    pub fn random() -> Self {
        DataKey(random())
    }

    fn seal_key(&self) -> SealKey {
        SealKey(blake3::derive_key(SEAL_CONTEXT, &self.0))
    }
}

/// A domain's unwrapped keys: its naming and a seal key per generation.
pub struct DomainKeys {
    pub id: DomainId,
    /// The master key whose versions wrap every generation.
    pub key: String,
    naming: Naming,
    seal: BTreeMap<u32, SealKey>,
}

impl fmt::Debug for DomainKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainKeys")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("generations", &self.seal.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl DomainKeys {
    /// From the unwrapped data keys by generation; generation 0 must be
    /// among them (it fixes the names).
    pub fn new(id: DomainId, key: String, data: &BTreeMap<u32, DataKey>) -> Option<Self> {
        let first = data.get(&0)?;
        Some(DomainKeys {
            id,
            key,
            naming: Naming::Keyed(blake3::derive_key(NAMES_CONTEXT, &first.0)),
            seal: data.iter().map(|(g, k)| (*g, k.seal_key())).collect(),
        })
    }

    /// How objects in this domain are named.
    pub fn naming(&self) -> &Naming {
        &self.naming
    }

    pub fn seal_key(&self, generation: u32) -> Option<&SealKey> {
        self.seal.get(&generation)
    }

    /// The generation new objects are sealed with: the newest.
    pub fn newest(&self) -> (u32, &SealKey) {
        let (g, k) = self
            .seal
            .last_key_value()
            .expect("a domain always has generation 0");
        (*g, k)
    }

    pub fn generations(&self) -> impl Iterator<Item = u32> + '_ {
        self.seal.keys().copied()
    }
}

/// The name a wrapped data key is sealed under.
fn wrap_name(key: &str, version: u32) -> Vec<u8> {
    format!("{key}#{version}").into_bytes()
}

/// The master key id and version a wrapped data key's frame names.
pub fn wrapped_by(f: &seal::Frame) -> Option<(String, u32)> {
    let text = std::str::from_utf8(&f.name).ok()?;
    let (key, version) = text.rsplit_once('#')?;
    Some((key.to_owned(), version.parse().ok()?))
}

fn wrapping_key(material: &MasterSecret) -> SealKey {
    SealKey(blake3::derive_key(WRAP_CONTEXT, &material.0))
}

/// Generation `generation` of domain `domain` wrapped by `key` at
/// `version` (whose material is `material`): the object's bytes.
pub fn wrap(
    data: &DataKey,
    domain: &DomainId,
    generation: u32,
    key: &str,
    version: u32,
    material: &MasterSecret,
) -> Result<Vec<u8>, SealError> {
    seal::seal(
        &data.0,
        Kind::DataKey,
        domain,
        generation,
        &wrap_name(key, version),
        &wrapping_key(material),
    )
}

/// Unwraps a data key object whose frame `f` names `key`'s `version`,
/// expected to be generation `generation` of `domain`.
pub fn unwrap(
    obj: Bytes,
    f: &seal::Frame,
    domain: &DomainId,
    generation: u32,
    material: &MasterSecret,
) -> Result<DataKey, SealError> {
    f.expect(Kind::DataKey, None)?;
    if f.domain != *domain || f.generation != generation {
        return Err(SealError::Name {
            expected: format!("{domain} generation {generation}"),
            found: format!("{} generation {}", f.domain, f.generation),
        });
    }
    let plain = seal::open(obj, f, &wrapping_key(material))?;
    let bytes: [u8; 32] = plain[..]
        .try_into()
        .map_err(|_| SealError::Short(plain.len()))?;
    Ok(DataKey(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_parse() {
        let d = DomainId::random();
        assert_eq!(d.to_hex().parse::<DomainId>().unwrap(), d);
        assert!("xyz".parse::<DomainId>().is_err());
        assert!("A".repeat(32).parse::<DomainId>().is_err());
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<DomainId>(&json).unwrap(), d);
        assert_eq!(DomainId::for_store_key("k1"), DomainId::for_store_key("k1"));
        assert_ne!(DomainId::for_store_key("k1"), DomainId::for_store_key("k2"));
    }

    #[test]
    fn wrapped_keys_unwrap_only_with_their_material_and_place() {
        let d = DomainId::random();
        let dk = DataKey::random();
        let m1 = MasterSecret([1; 32]);
        let obj = Bytes::from(wrap(&dk, &d, 2, "key-a", 7, &m1).unwrap());
        let f = seal::frame(&obj).unwrap();
        assert_eq!(wrapped_by(&f), Some(("key-a".to_owned(), 7)));
        assert_eq!(unwrap(obj.clone(), &f, &d, 2, &m1).unwrap(), dk);
        assert_eq!(
            unwrap(obj.clone(), &f, &d, 2, &MasterSecret([2; 32])),
            Err(SealError::Authentication)
        );
        assert!(
            unwrap(obj.clone(), &f, &d, 3, &m1).is_err(),
            "another generation"
        );
        assert!(
            unwrap(obj, &f, &DomainId::random(), 2, &m1).is_err(),
            "another domain"
        );
    }

    #[test]
    fn derived_keys_separate_names_from_sealing() {
        let d = DomainId::random();
        let mut data = BTreeMap::new();
        data.insert(0, DataKey([3; 32]));
        let one = DomainKeys::new(d, "k".into(), &data).unwrap();
        data.insert(1, DataKey([4; 32]));
        let two = DomainKeys::new(d, "k".into(), &data).unwrap();
        assert!(
            one.naming() == two.naming(),
            "a new generation keeps the names"
        );
        assert_eq!(two.newest().0, 1);
        assert!(one.seal_key(0) == two.seal_key(0));
        let Naming::Keyed(id_key) = *one.naming() else {
            panic!("keyed")
        };
        assert_ne!(id_key, one.seal_key(0).unwrap().0);
        assert!(DomainKeys::new(d, "k".into(), &BTreeMap::new()).is_none());
    }
}
