//! The sealed object: a clear frame naming what the object is and how to
//! find its key, then the plaintext object (a chunk, a page, a manifest
//! root or a data key) encrypted with AES-256-GCM. All integers
//! little-endian.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `VSEL` |
//! | 4 | 1 | frame version (1) |
//! | 5 | 1 | kind: 1 chunk, 2 manifest page, 3 manifest root, 4 wrapped data key |
//! | 6 | 1 | cipher: 1 AES-256-GCM |
//! | 7 | 1 | name length N, 1 to 64 |
//! | 8 | 16 | encryption domain id |
//! | 24 | 4 | data key generation |
//! | 28 | 16 | salt, random |
//! | 44 | N | name: a chunk's or page's 32-byte keyed hash, a root's snapshot id, a data key's `<master key id>#<version>` |
//! | 44 + N | L | ciphertext, as long as the plaintext |
//! | 44 + N + L | 16 | GCM tag |
//!
//! The associated data is the whole frame (bytes 0 to 44 + N), so the kind,
//! domain, generation, name and format version are authenticated with the
//! body: an object copied over another's name, or under another kind,
//! fails to open.
//!
//! Each object gets its own AES key: blake3 keyed by the generation's seal
//! key over the salt. A key seals exactly one message, so the GCM nonce is
//! fixed at zero and the random-nonce bound of GCM (2^32 messages per key)
//! does not apply; two objects share a key only if their 128-bit salts
//! collide (birthday bound: 2^64 objects).

use bytes::{Bytes, BytesMut};
use ring::aead;

use crate::crypt::domain::DomainId;

pub const MAGIC: &[u8; 4] = b"VSEL";
pub const VERSION: u8 = 1;
pub const CIPHER_AES_256_GCM: u8 = 1;
/// The frame before the name.
pub const FIXED_LEN: usize = 44;
pub const TAG_LEN: usize = 16;
pub const MAX_NAME: usize = 64;
const SALT_LEN: usize = 16;
/// What the per-object key is derived for (domain separation from every
/// other use of a seal key).
const OBJECT_KEY_LABEL: &[u8] = b"volumed 2026-12 sealed object key";

/// What a sealed object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chunk = 1,
    Page = 2,
    Root = 3,
    DataKey = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Chunk,
            2 => Kind::Page,
            3 => Kind::Root,
            4 => Kind::DataKey,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Chunk => "chunk",
            Kind::Page => "manifest page",
            Kind::Root => "manifest",
            Kind::DataKey => "data key",
        }
    }
}

/// A generation's seal key (or a master key version's wrapping key): the
/// key every object key is derived from.
#[derive(Clone, PartialEq, Eq)]
pub struct SealKey(pub(crate) [u8; 32]);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    fn object_key(&self, salt: &[u8]) -> aead::LessSafeKey {
        let k = blake3::Hasher::new_keyed(&self.0)
            .update(OBJECT_KEY_LABEL)
            .update(salt)
            .finalize();
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, k.as_bytes())
            .expect("a 32-byte key is what AES-256-GCM takes");
        aead::LessSafeKey::new(unbound)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("sealed object is {0} bytes, shorter than its frame")]
    Short(usize),
    #[error("object is not sealed, but the store is encrypted")]
    NotSealed,
    #[error("sealed object frame version {0} is not understood")]
    Version(u8),
    #[error("sealed object holds a {found}, expected a {expected}")]
    Kind {
        expected: &'static str,
        found: String,
    },
    #[error("sealed object cipher {0} is not understood")]
    Cipher(u8),
    #[error("sealed object name length {0} is out of range")]
    NameLength(u8),
    #[error(
        "sealed object is named {found}, expected {expected}: an object copied over another's name"
    )]
    Name { expected: String, found: String },
    #[error("sealed object does not authenticate: damaged, or sealed under another key")]
    Authentication,
    #[error("sealed object is too large to seal")]
    TooLarge,
}

/// The clear frame of a sealed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub domain: DomainId,
    pub generation: u32,
    pub name: Vec<u8>,
}

impl Frame {
    /// Bytes before the ciphertext.
    pub fn body_offset(&self) -> usize {
        FIXED_LEN + self.name.len()
    }

    /// The name as people read it: hex for a 32-byte hash, else text.
    pub fn name_text(&self) -> String {
        name_text(&self.name)
    }

    /// Fails unless the object is a `kind` named `name` (when given).
    pub fn expect(&self, kind: Kind, name: Option<&[u8]>) -> Result<(), SealError> {
        if self.kind != kind {
            return Err(SealError::Kind {
                expected: kind.as_str(),
                found: self.kind.as_str().to_owned(),
            });
        }
        match name {
            Some(n) if n != self.name.as_slice() => Err(SealError::Name {
                expected: name_text(n),
                found: self.name_text(),
            }),
            _ => Ok(()),
        }
    }
}

fn name_text(name: &[u8]) -> String {
    if name.len() == 32 {
        crate::hash::hex(name)
    } else {
        String::from_utf8_lossy(name).into_owned()
    }
}

/// Frame length for a name of `name_len` bytes.
pub fn frame_len(name_len: usize) -> usize {
    FIXED_LEN + name_len
}

/// Whether `obj` starts like a sealed object (says nothing of its health).
pub fn is_sealed(obj: &[u8]) -> bool {
    obj.starts_with(MAGIC)
}

/// Reads the frame of a sealed object, checking its shape only.
pub fn frame(obj: &[u8]) -> Result<Frame, SealError> {
    if !is_sealed(obj) {
        return Err(SealError::NotSealed);
    }
    if obj.len() < FIXED_LEN {
        return Err(SealError::Short(obj.len()));
    }
    if obj[4] != VERSION {
        return Err(SealError::Version(obj[4]));
    }
    let kind = Kind::from_u8(obj[5]).ok_or_else(|| SealError::Kind {
        expected: "known kind",
        found: format!("kind {}", obj[5]),
    })?;
    if obj[6] != CIPHER_AES_256_GCM {
        return Err(SealError::Cipher(obj[6]));
    }
    let n = obj[7];
    if n == 0 || usize::from(n) > MAX_NAME {
        return Err(SealError::NameLength(n));
    }
    let head = FIXED_LEN + usize::from(n);
    if obj.len() < head + TAG_LEN {
        return Err(SealError::Short(obj.len()));
    }
    Ok(Frame {
        kind,
        domain: DomainId(obj[8..24].try_into().expect("16 bytes")),
        generation: u32::from_le_bytes(obj[24..28].try_into().expect("4 bytes")),
        name: obj[FIXED_LEN..head].to_vec(),
    })
}

/// Seals in place: `buf` holds `frame_len(name.len())` bytes of room, then
/// the plaintext, and has capacity for the tag. The frame is written into
/// the room, the plaintext encrypted where it lies, the tag appended.
pub fn seal_in_place(
    buf: &mut Vec<u8>,
    kind: Kind,
    domain: &DomainId,
    generation: u32,
    name: &[u8],
    key: &SealKey,
) -> Result<(), SealError> {
    let head = frame_len(name.len());
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(SealError::NameLength(name.len().min(255) as u8));
    }
    if buf.len() < head {
        return Err(SealError::Short(buf.len()));
    }
    let salt: [u8; SALT_LEN] = super::random();
    buf[..4].copy_from_slice(MAGIC);
    buf[4] = VERSION;
    buf[5] = kind as u8;
    buf[6] = CIPHER_AES_256_GCM;
    buf[7] = name.len() as u8;
    buf[8..24].copy_from_slice(&domain.0);
    buf[24..28].copy_from_slice(&generation.to_le_bytes());
    buf[28..44].copy_from_slice(&salt);
    buf[FIXED_LEN..head].copy_from_slice(name);
    let (frame, body) = buf.split_at_mut(head);
    let tag = key
        .object_key(&salt)
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key([0; 12]),
            aead::Aad::from(&*frame),
            body,
        )
        .map_err(|_| SealError::TooLarge)?;
    buf.extend_from_slice(tag.as_ref());
    Ok(())
}

/// Seals `plain` into a new object.
pub fn seal(
    plain: &[u8],
    kind: Kind,
    domain: &DomainId,
    generation: u32,
    name: &[u8],
    key: &SealKey,
) -> Result<Vec<u8>, SealError> {
    let head = frame_len(name.len());
    let mut buf = Vec::with_capacity(head + plain.len() + TAG_LEN);
    buf.resize(head, 0);
    buf.extend_from_slice(plain);
    seal_in_place(&mut buf, kind, domain, generation, name, key)?;
    Ok(buf)
}

/// Opens a sealed object whose frame `f` was read by [`frame`] and checked
/// by the caller, decrypting in place when `obj` is not shared; the
/// plaintext comes back as a slice of it.
pub fn open(obj: Bytes, f: &Frame, key: &SealKey) -> Result<Bytes, SealError> {
    let head = f.body_offset();
    if obj.len() < head + TAG_LEN {
        return Err(SealError::Short(obj.len()));
    }
    let mut buf: BytesMut = obj
        .try_into_mut()
        .unwrap_or_else(|b| BytesMut::from(&b[..]));
    let salt: [u8; SALT_LEN] = buf[28..44].try_into().expect("16 bytes");
    let (frame, body) = buf.split_at_mut(head);
    let plain_len = key
        .object_key(&salt)
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0; 12]),
            aead::Aad::from(&*frame),
            body,
        )
        .map_err(|_| SealError::Authentication)?
        .len();
    Ok(buf.freeze().slice(head..head + plain_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> SealKey {
        SealKey([b; 32])
    }

    #[test]
    fn round_trip_and_frame() {
        let d = DomainId([5; 16]);
        let obj = seal(b"plaintext body", Kind::Chunk, &d, 3, &[7; 32], &key(1)).unwrap();
        assert_eq!(obj.len(), FIXED_LEN + 32 + 14 + TAG_LEN);
        let f = frame(&obj).unwrap();
        assert_eq!((f.kind, f.domain, f.generation), (Kind::Chunk, d, 3));
        f.expect(Kind::Chunk, Some(&[7; 32])).unwrap();
        assert_eq!(
            &open(Bytes::from(obj.clone()), &f, &key(1)).unwrap()[..],
            b"plaintext body"
        );
        // Shared bytes are copied, then opened alike.
        let shared = Bytes::from(obj.clone());
        let _keep = shared.clone();
        assert_eq!(&open(shared, &f, &key(1)).unwrap()[..], b"plaintext body");
        // Sealing twice gives different bytes (a fresh salt), same plaintext.
        let again = seal(b"plaintext body", Kind::Chunk, &d, 3, &[7; 32], &key(1)).unwrap();
        assert_ne!(obj, again);
        assert!(!obj.windows(9).any(|w| w == b"plaintext"));
    }

    #[test]
    fn wrong_key_kind_or_name_fails() {
        let d = DomainId([5; 16]);
        let obj = Bytes::from(seal(b"x", Kind::Page, &d, 0, b"snap-1", &key(1)).unwrap());
        let f = frame(&obj).unwrap();
        assert_eq!(
            open(obj.clone(), &f, &key(2)),
            Err(SealError::Authentication)
        );
        assert!(matches!(
            f.expect(Kind::Chunk, None),
            Err(SealError::Kind { .. })
        ));
        let e = f.expect(Kind::Page, Some(b"snap-2")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sealed object is named snap-1, expected snap-2: an object copied over another's name"
        );
        assert_eq!(
            frame(b"VCHK rest of a plain chunk"),
            Err(SealError::NotSealed)
        );
        assert!(matches!(frame(b"VSEL"), Err(SealError::Short(4))));
    }

    proptest! {
        /// Any single changed byte, frame or body or tag, fails to open
        /// (or fails the frame check) with the same key.
        #[test]
        fn tampering_any_byte_fails(i in 0usize..200, v in 1u8..=255, len in 0usize..100) {
            let d = DomainId([9; 16]);
            let plain = vec![0x5a; len];
            let obj = seal(&plain, Kind::Root, &d, 1, b"snap-00ff", &key(4)).unwrap();
            let i = i % obj.len();
            let mut bad = obj.clone();
            bad[i] ^= v;
            let opened = frame(&bad).and_then(|f| {
                f.expect(Kind::Root, Some(b"snap-00ff"))?;
                open(Bytes::from(bad.clone()), &f, &key(4))
            });
            prop_assert!(opened.is_err(), "byte {} changed yet it opened", i);
        }

        #[test]
        fn frame_and_open_never_panic(obj in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&obj);
            for o in [obj, b] {
                if let Ok(f) = frame(&o) {
                    let _ = open(Bytes::from(o.clone()), &f, &key(0));
                }
            }
        }

        #[test]
        fn round_trips(plain in proptest::collection::vec(any::<u8>(), 0..3000), generation in any::<u32>()) {
            let d = DomainId([1; 16]);
            let obj = seal(&plain, Kind::Chunk, &d, generation, &[3; 32], &key(8)).unwrap();
            let f = frame(&obj).unwrap();
            prop_assert_eq!(f.generation, generation);
            prop_assert_eq!(&open(Bytes::from(obj), &f, &key(8)).unwrap()[..], &plain[..]);
        }
    }
}
