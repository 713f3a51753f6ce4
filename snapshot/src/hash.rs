//! Chunk names: blake3 of the uncompressed chunk bytes, or in an encrypted
//! store blake3 keyed with the encryption domain's id key (see `crypt`), so
//! a name says nothing to whoever lacks the key, yet equal chunks under one
//! key still share one object.

use std::fmt;
use std::str::FromStr;

/// The name of a chunk's (or a page's) object: the blake3 hash of its
/// uncompressed bytes, plain or keyed (see [`Naming`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

/// How objects are named: by the plain blake3 of their bytes (unencrypted
/// stores), or by blake3 keyed with a domain's id key (encrypted ones).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Plain,
    Keyed([u8; 32]),
}

impl Naming {
    /// The name of `data` under this naming.
    pub fn name(&self, data: &[u8]) -> ChunkHash {
        match self {
            Naming::Plain => ChunkHash::of(data),
            Naming::Keyed(key) => ChunkHash(*blake3::keyed_hash(key, data).as_bytes()),
        }
    }

    pub fn is_keyed(&self) -> bool {
        matches!(self, Naming::Keyed(_))
    }
}

impl fmt::Debug for Naming {
    // The id key never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Naming::Plain => f.write_str("Naming::Plain"),
            Naming::Keyed(_) => f.write_str("Naming::Keyed(..)"),
        }
    }
}

/// Lowercase hex of any digest (chunk hashes, SHA-256 of images and
/// request bodies).
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(HEX[(b >> 4) as usize]));
        s.push(char::from(HEX[(b & 15) as usize]));
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", self.to_hex())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunk hash {0:?}: 64 lowercase hex digits expected")]
pub struct HashParseError(pub String);

impl FromStr for ChunkHash {
    type Err = HashParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || HashParseError(s.chars().take(80).collect());
        if s.len() != 64 {
            return Err(bad());
        }
        let nib = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
            out[i] = (nib(pair[0]).ok_or_else(bad)? << 4) | nib(pair[1]).ok_or_else(bad)?;
        }
        Ok(ChunkHash(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_value_and_hex() {
        let h = ChunkHash::of(b"");
        assert_eq!(
            h.to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(h.to_hex().parse::<ChunkHash>().unwrap(), h);
        assert!("AF13".parse::<ChunkHash>().is_err());
        assert!("zz".repeat(32).parse::<ChunkHash>().is_err());
    }

    #[test]
    fn keyed_names_differ_from_plain_blake3_and_between_keys() {
        let data = b"a block everyone knows";
        let plain = Naming::Plain.name(data);
        assert_eq!(plain, ChunkHash::of(data));
        let a = Naming::Keyed([1; 32]).name(data);
        let b = Naming::Keyed([2; 32]).name(data);
        assert_ne!(a, plain);
        assert_ne!(a, b);
        assert_eq!(
            a,
            Naming::Keyed([1; 32]).name(data),
            "deterministic: dedup works"
        );
        assert_eq!(format!("{:?}", Naming::Keyed([1; 32])), "Naming::Keyed(..)");
    }

    proptest! {
        #[test]
        fn hex_round_trips(bytes in proptest::array::uniform32(any::<u8>())) {
            let h = ChunkHash(bytes);
            prop_assert_eq!(h.to_hex().parse::<ChunkHash>().unwrap(), h);
        }

        #[test]
        fn parse_never_panics(s in ".{0,70}") {
            let _ = s.parse::<ChunkHash>();
        }
    }
}
