//! The chunk object: a small header and the chunk's bytes, compressed with
//! zstd when that makes them smaller (and compression is on). Everything
//! read back is checked: the header, the lengths, and the name of the
//! decompressed bytes (plain or keyed blake3, see [`Naming`]) against the
//! name the object is fetched by. In an encrypted store this object is the
//! plaintext of a sealed one (see `crypt::seal`).
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `VCHK` |
//! | 4 | 1 | version (1) |
//! | 5 | 1 | codec: 0 raw, 1 zstd |
//! | 6 | 2 | reserved, zero |
//! | 8 | 4 | uncompressed length, LE |
//! | 12 | 4 | stored (payload) length, LE |
//! | 16 | 32 | name: blake3 of the uncompressed bytes, keyed in an encrypted store |
//! | 48 | stored length | payload |

use bytes::Bytes;

use crate::hash::{ChunkHash, Naming};

pub const MAGIC: &[u8; 4] = b"VCHK";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 48;
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// The largest chunk a volume can have; a header claiming more is corrupt,
/// and decompression never allocates past it.
pub const MAX_CHUNK: usize = 4 << 20;

/// zstd level 3 is zstd's default: about 300 MB/s per core on mixed data,
/// which keeps a full snapshot near the speed of hashing on two cores.
pub const DEFAULT_LEVEL: i32 = 3;

/// The level that stores every chunk raw (`--compress off`): compressed
/// sizes tell an observer of an encrypted store something about the data.
pub const NO_COMPRESSION: i32 = 0;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("chunk object is {0} bytes, shorter than its header")]
    Short(usize),
    #[error("chunk object has a bad magic")]
    Magic,
    #[error("chunk object version {0} is not understood")]
    Version(u8),
    #[error("chunk object codec {0} is not understood")]
    Codec(u8),
    #[error("chunk object claims {0} bytes, more than the largest chunk")]
    TooLarge(u64),
    #[error("chunk object payload is {got} bytes, header says {want}")]
    Length { want: usize, got: usize },
    #[error("chunk object does not decompress: {0}")]
    Decompress(String),
    #[error("chunk object decompresses to {got} bytes, header says {want}")]
    DecompressedLength { want: usize, got: usize },
    #[error("chunk object header names {found}, expected {expected}")]
    HeaderHash {
        expected: ChunkHash,
        found: ChunkHash,
    },
    #[error("chunk bytes hash to {found}, expected {expected}")]
    Hash {
        expected: ChunkHash,
        found: ChunkHash,
    },
    #[error("{0}")]
    Seal(crate::crypt::SealError),
}

/// An encoded chunk object and its hash.
pub struct Encoded {
    pub hash: ChunkHash,
    pub bytes: Vec<u8>,
}

/// Hashes and encodes a chunk. Data that zstd cannot shrink is stored raw.
pub fn encode(data: &[u8], level: i32) -> Encoded {
    encode_named(data, level, &Naming::Plain, 0, 0)
}

/// Encodes a chunk named by `naming`, stored raw when `level` is
/// [`NO_COMPRESSION`]. The object starts after `front` zero bytes and has
/// room for `back` more, so a sealer can frame it without a copy.
pub fn encode_named(
    data: &[u8],
    level: i32,
    naming: &Naming,
    front: usize,
    back: usize,
) -> Encoded {
    let hash = naming.name(data);
    let compressed = (level != NO_COMPRESSION && worth_compressing(data))
        .then(|| compress(data, level))
        .flatten()
        .filter(|c| c.len() < data.len());
    let (codec, payload): (u8, &[u8]) = match &compressed {
        Some(c) => (CODEC_ZSTD, c),
        None => (CODEC_RAW, data),
    };
    let mut bytes = Vec::with_capacity(front + HEADER_LEN + payload.len() + back);
    bytes.resize(front, 0);
    bytes.extend_from_slice(MAGIC);
    bytes.push(VERSION);
    bytes.push(codec);
    bytes.extend_from_slice(&[0, 0]);
    bytes.extend_from_slice(&(data.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&hash.0);
    bytes.extend_from_slice(payload);
    Encoded { hash, bytes }
}

/// Bytes per sample in [`worth_compressing`].
const SAMPLE_LEN: usize = 32 << 10;

/// Whether compressing `data` is likely to pay. Random data (encrypted
/// guests, media, already-compressed files) costs a full zstd pass for
/// nothing, so two small samples, one at the start and one in the middle,
/// are tried at the fastest level first; if neither shrinks by 3 % the
/// chunk is stored raw. Small chunks are always tried in full.
fn worth_compressing(data: &[u8]) -> bool {
    if data.len() <= 4 * SAMPLE_LEN {
        return true;
    }
    let mid = data.len() / 2;
    [&data[..SAMPLE_LEN], &data[mid..mid + SAMPLE_LEN]]
        .iter()
        .any(|sample| match compress(sample, 1) {
            Some(c) => c.len() * 100 < sample.len() * 97,
            None => true,
        })
}

thread_local! {
    /// This thread's zstd contexts, one per level used. A context made per
    /// call cost 12 to 14 % of a full snapshot's CPU (perf samples of
    /// `ZSTD_createCCtx` and the memset of its fresh match tables, see
    /// performance.md "Encryption"); a reused one compresses to the same
    /// bytes.
    static COMPRESSORS: std::cell::RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// `data` compressed at `level` with this thread's context for it; `None`
/// if zstd fails (the chunk is then stored raw).
fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSORS.with(|cell| {
        let mut all = cell.borrow_mut();
        let i = match all.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                all.push((level, zstd::bulk::Compressor::new(level).ok()?));
                all.len() - 1
            }
        };
        all[i].1.compress(data).ok()
    })
}

/// Decodes a chunk object and proves it is the chunk `expected`.
pub fn decode(obj: &[u8], expected: &ChunkHash) -> Result<Vec<u8>, CodecError> {
    decode_named(obj, expected, &Naming::Plain)
}

/// [`decode`] under `naming`.
pub fn decode_named(
    obj: &[u8],
    expected: &ChunkHash,
    naming: &Naming,
) -> Result<Vec<u8>, CodecError> {
    let raw_len = check_header(obj, expected)?;
    let payload = &obj[HEADER_LEN..];
    let data = match obj[5] {
        CODEC_RAW => payload.to_vec(),
        // The capacity bounds the output: a bomb cannot grow past it.
        CODEC_ZSTD => zstd::bulk::decompress(payload, raw_len)
            .map_err(|e| CodecError::Decompress(e.to_string()))?,
        other => return Err(CodecError::Codec(other)),
    };
    check_data(&data, raw_len, expected, naming)?;
    Ok(data)
}

/// [`decode`] for an object held in `Bytes`: a raw chunk comes back as a
/// slice of the object, without a copy (hydration moves every byte of a
/// volume through here, and on two cores each copy of it shows).
pub fn decode_shared(obj: Bytes, expected: &ChunkHash) -> Result<Bytes, CodecError> {
    decode_shared_named(obj, expected, &Naming::Plain)
}

/// [`decode_shared`] under `naming`.
pub fn decode_shared_named(
    obj: Bytes,
    expected: &ChunkHash,
    naming: &Naming,
) -> Result<Bytes, CodecError> {
    let raw_len = check_header(&obj, expected)?;
    if obj[5] != CODEC_RAW {
        return decode_named(&obj, expected, naming).map(Bytes::from);
    }
    let data = obj.slice(HEADER_LEN..);
    check_data(&data, raw_len, expected, naming)?;
    Ok(data)
}

/// Whether decoding `obj` means decompressing it (more work than hashing
/// alone, so worth a blocking thread). Says nothing of the object's health.
pub fn is_compressed(obj: &[u8]) -> bool {
    obj.get(5) == Some(&CODEC_ZSTD)
}

/// Checks the header against the object's length and the hash it is
/// fetched by; returns the uncompressed length it claims.
fn check_header(obj: &[u8], expected: &ChunkHash) -> Result<usize, CodecError> {
    if obj.len() < HEADER_LEN {
        return Err(CodecError::Short(obj.len()));
    }
    if &obj[..4] != MAGIC {
        return Err(CodecError::Magic);
    }
    if obj[4] != VERSION {
        return Err(CodecError::Version(obj[4]));
    }
    let raw_len = u32::from_le_bytes(obj[8..12].try_into().expect("4 bytes")) as usize;
    let stored_len = u32::from_le_bytes(obj[12..16].try_into().expect("4 bytes")) as usize;
    if raw_len > MAX_CHUNK {
        return Err(CodecError::TooLarge(raw_len as u64));
    }
    let found = ChunkHash(obj[16..48].try_into().expect("32 bytes"));
    if found != *expected {
        return Err(CodecError::HeaderHash {
            expected: *expected,
            found,
        });
    }
    let payload = obj.len() - HEADER_LEN;
    if payload != stored_len {
        return Err(CodecError::Length {
            want: stored_len,
            got: payload,
        });
    }
    Ok(raw_len)
}

/// The decoded bytes have the length the header claims and the name the
/// object is fetched by.
fn check_data(
    data: &[u8],
    raw_len: usize,
    expected: &ChunkHash,
    naming: &Naming,
) -> Result<(), CodecError> {
    if data.len() != raw_len {
        return Err(CodecError::DecompressedLength {
            want: raw_len,
            got: data.len(),
        });
    }
    let actual = naming.name(data);
    if actual != *expected {
        return Err(CodecError::Hash {
            expected: *expected,
            found: actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reused_contexts_compress_as_fresh_ones() {
        let text = b"volumed block storage ".repeat(30000);
        let other = b"another text, compressed in between ".repeat(9000);
        for (data, level) in [(&text, DEFAULT_LEVEL), (&other, 1), (&text, DEFAULT_LEVEL)] {
            assert_eq!(
                compress(data, level).unwrap(),
                zstd::bulk::compress(data, level).unwrap()
            );
        }
    }

    #[test]
    fn compressible_and_random_round_trip() {
        let text = b"volumed ".repeat(65536);
        let e = encode(&text, DEFAULT_LEVEL);
        assert_eq!(e.bytes[5], CODEC_ZSTD);
        assert!(e.bytes.len() < text.len() / 10);
        assert_eq!(decode(&e.bytes, &e.hash).unwrap(), text);

        let mut x = 1u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 33) as u8
            })
            .collect();
        let e = encode(&random, DEFAULT_LEVEL);
        assert_eq!(e.bytes[5], CODEC_RAW, "incompressible data is stored raw");
        assert_eq!(decode(&e.bytes, &e.hash).unwrap(), random);
    }

    #[test]
    fn sampling_keeps_compressible_chunks_compressed() {
        // Random first half, text second half: the middle sample compresses.
        let mut data = vec![0u8; 256 << 10];
        blake3::Hasher::new()
            .update(b"seed")
            .finalize_xof()
            .fill(&mut data);
        data.extend(b"text ".iter().cycle().take(256 << 10));
        let e = encode(&data, DEFAULT_LEVEL);
        assert_eq!(e.bytes[5], CODEC_ZSTD);
        assert_eq!(decode(&e.bytes, &e.hash).unwrap(), data);
        // All random: stored raw without compressing the whole chunk.
        let mut random = vec![0u8; 512 << 10];
        blake3::Hasher::new()
            .update(b"other")
            .finalize_xof()
            .fill(&mut random);
        assert_eq!(encode(&random, DEFAULT_LEVEL).bytes[5], CODEC_RAW);
    }

    #[test]
    fn every_kind_of_damage_is_detected() {
        let data = b"some chunk data ".repeat(4096);
        let e = encode(&data, 1);
        let other = ChunkHash::of(b"other");
        assert!(matches!(
            decode(&e.bytes, &other),
            Err(CodecError::HeaderHash { .. })
        ));
        assert!(matches!(
            decode(&e.bytes[..20], &e.hash),
            Err(CodecError::Short(20))
        ));
        assert!(matches!(
            decode(&e.bytes[..e.bytes.len() - 1], &e.hash),
            Err(CodecError::Length { .. })
        ));
        let mut flipped = e.bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(decode(&flipped, &e.hash).is_err(), "a flipped payload byte");
        let mut magic = e.bytes.clone();
        magic[0] = b'X';
        assert_eq!(decode(&magic, &e.hash), Err(CodecError::Magic));
        let mut huge = e.bytes.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&huge, &e.hash),
            Err(CodecError::TooLarge(_))
        ));
        // A raw object whose payload was changed: only the hash can tell.
        let raw = encode(&[7u8; 100], 1);
        let mut bad = raw.bytes.clone();
        bad[5] = CODEC_RAW;
        let n = bad.len();
        bad[n - 1] = 8;
        assert!(decode(&bad, &raw.hash).is_err());
    }

    #[test]
    fn compression_off_keyed_names_and_room_for_a_frame() {
        let text = b"volumed ".repeat(8192);
        let keyed = Naming::Keyed([9; 32]);
        let e = encode_named(&text, NO_COMPRESSION, &keyed, 7, 16);
        assert!(e.bytes[..7].iter().all(|b| *b == 0));
        let obj = &e.bytes[7..];
        assert_eq!(obj[5], CODEC_RAW, "compression off stores raw");
        assert_eq!(e.hash, keyed.name(&text));
        assert_ne!(e.hash, ChunkHash::of(&text));
        assert!(e.bytes.capacity() >= e.bytes.len() + 16);
        assert_eq!(decode_named(obj, &e.hash, &keyed).unwrap(), text);
        // The same object checked with the plain naming does not pass.
        assert!(matches!(decode(obj, &e.hash), Err(CodecError::Hash { .. })));
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..20_000), level in 1i32..6) {
            let e = encode(&data, level);
            prop_assert_eq!(&decode(&e.bytes, &e.hash).unwrap(), &data);
            let shared = decode_shared(Bytes::from(e.bytes.clone()), &e.hash).unwrap();
            prop_assert_eq!(&shared[..], &data[..]);
        }

        /// The shared decode accepts exactly what `decode` accepts, with
        /// the same bytes or the same error, whatever byte is damaged.
        #[test]
        fn shared_decode_agrees_with_decode(raw in any::<bool>(), i in 0usize..600, v in any::<u8>()) {
            let data = if raw {
                let mut r = vec![0u8; 500];
                blake3::Hasher::new().update(b"raw").finalize_xof().fill(&mut r);
                r
            } else {
                b"text ".repeat(100)
            };
            let e = encode(&data, 1);
            prop_assert_eq!(is_compressed(&e.bytes), !raw);
            let mut b = e.bytes.clone();
            let i = i % b.len();
            b[i] = v;
            let owned = decode(&b, &e.hash);
            let shared = decode_shared(Bytes::from(b), &e.hash).map(|s| s.to_vec());
            prop_assert_eq!(owned, shared);
        }

        #[test]
        fn decode_never_panics(obj in proptest::collection::vec(any::<u8>(), 0..200), hash in proptest::array::uniform32(any::<u8>())) {
            let _ = decode(&obj, &ChunkHash(hash));
        }

        #[test]
        fn decode_of_damaged_header_never_panics(i in 0usize..48, v in any::<u8>()) {
            let e = encode(&[1u8; 5000], 3);
            let mut b = e.bytes.clone();
            b[i] = v;
            if let Ok(d) = decode(&b, &e.hash) { prop_assert_eq!(d, vec![1u8; 5000]); }
        }
    }
}
