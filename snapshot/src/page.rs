//! A manifest page: the entries of one fixed range of chunk indices, stored
//! content-addressed under `pages/` and named by a format-2 root (see
//! `root`). All integers little-endian.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `VPAG` |
//! | 4 | 4 | version, 1 |
//! | 8 | 8 | page index |
//! | 16 | 8 | first chunk index (page index × the root's chunks per page) |
//! | 24 | 4 | chunks in the page (the last page of a volume may be short) |
//! | 28 | ... | entries over those chunks, as in a manifest: `0x00` + u64 zero run, `0x01` + 32-byte blake3 |
//! | end − 32 | 32 | blake3 of every byte before it |
//!
//! A page is named by the blake3 of all of its bytes (keyed in an
//! encrypted store, as chunks are), so reading it back
//! checks it against the name its root gave; the page also says which
//! range it covers, so a valid page put where another belongs is refused.
//! An all-zero page is never stored: the root names it as a zero run.

use crate::hash::{ChunkHash, Naming};
use crate::manifest::{self, ManifestError};

pub const MAGIC: &[u8; 4] = b"VPAG";
pub const VERSION: u32 = 1;

/// Where a page sits in its volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSpan {
    pub index: u64,
    pub first: u64,
    pub chunks: u32,
}

impl PageSpan {
    /// One past the last chunk index of the page.
    pub fn end(&self) -> u64 {
        self.first + u64::from(self.chunks)
    }

    pub fn contains(&self, chunk: u64) -> bool {
        chunk >= self.first && chunk < self.end()
    }
}

/// The decoded entries of one page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub span: PageSpan,
    /// `(chunk index, hash)` of the page's non-zero chunks, ascending,
    /// absolute indices.
    hashed: Vec<(u64, ChunkHash)>,
}

impl Page {
    /// A page of `span` holding `hashed` (ascending, inside the span).
    pub fn new(span: PageSpan, hashed: Vec<(u64, ChunkHash)>) -> Self {
        debug_assert!(hashed.iter().all(|(i, _)| span.contains(*i)));
        debug_assert!(hashed.windows(2).all(|w| w[0].0 < w[1].0));
        Page { span, hashed }
    }

    pub fn is_zero(&self) -> bool {
        self.hashed.is_empty()
    }

    pub fn hashed(&self) -> &[(u64, ChunkHash)] {
        &self.hashed
    }

    pub fn into_hashed(self) -> Vec<(u64, ChunkHash)> {
        self.hashed
    }

    /// The hash of chunk `chunk`, `None` for a zero chunk or one outside.
    pub fn get(&self, chunk: u64) -> Option<ChunkHash> {
        self.hashed
            .binary_search_by_key(&chunk, |(i, _)| *i)
            .ok()
            .map(|p| self.hashed[p].1)
    }

    /// The page's bytes and the name it is stored under.
    pub fn encode(&self) -> (ChunkHash, Vec<u8>) {
        self.encode_named(&Naming::Plain)
    }

    /// [`Page::encode`] under `naming`.
    pub fn encode_named(&self, naming: &Naming) -> (ChunkHash, Vec<u8>) {
        let mut out = Vec::with_capacity(64 + self.hashed.len() * 33);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.span.index.to_le_bytes());
        out.extend_from_slice(&self.span.first.to_le_bytes());
        out.extend_from_slice(&self.span.chunks.to_le_bytes());
        manifest::encode_entries(
            &mut out,
            self.span.first,
            u64::from(self.span.chunks),
            &self.hashed,
        );
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        (naming.name(&out), out)
    }

    /// Decodes the page named `name` that must cover `want`: the bytes must
    /// hash to the name, check themselves, and cover exactly that range.
    pub fn decode(bytes: &[u8], name: &ChunkHash, want: PageSpan) -> Result<Self, ManifestError> {
        Self::decode_named(bytes, name, want, &Naming::Plain)
    }

    /// [`Page::decode`] under `naming`.
    pub fn decode_named(
        bytes: &[u8],
        name: &ChunkHash,
        want: PageSpan,
        naming: &Naming,
    ) -> Result<Self, ManifestError> {
        if naming.name(bytes) != *name {
            return Err(ManifestError::Page("bytes do not match the page's name"));
        }
        let page = Self::decode_unnamed(bytes)?;
        if page.span != want {
            return Err(ManifestError::Page(
                "page covers another range than its root names",
            ));
        }
        Ok(page)
    }

    /// Decodes a page by its own checks only.
    pub fn decode_unnamed(bytes: &[u8]) -> Result<Self, ManifestError> {
        let mut r = manifest::open_checked(bytes, MAGIC)?;
        let version = r.u32()?;
        if version != VERSION {
            return Err(ManifestError::Version(version));
        }
        let index = r.u64()?;
        let first = r.u64()?;
        let chunks = r.u32()?;
        if first.checked_add(u64::from(chunks)).is_none() || chunks == 0 {
            return Err(ManifestError::Page("range is empty or overflows"));
        }
        let hashed = manifest::decode_entries(&mut r, first, u64::from(chunks))?;
        r.finish()?;
        Ok(Page {
            span: PageSpan {
                index,
                first,
                chunks,
            },
            hashed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn span(index: u64, chunks: u32) -> PageSpan {
        PageSpan {
            index,
            first: index * 1024,
            chunks,
        }
    }

    #[test]
    fn a_full_page_stays_well_under_a_mebibyte() {
        let s = span(3, 8192);
        let hashed = (s.first..s.end())
            .map(|i| (i, ChunkHash::of(&i.to_le_bytes())))
            .collect();
        let page = Page::new(s, hashed);
        let (name, bytes) = page.encode();
        assert!(bytes.len() < 300 << 10, "{} bytes", bytes.len());
        assert_eq!(Page::decode(&bytes, &name, s).unwrap(), page);
    }

    #[test]
    fn a_page_of_the_wrong_range_or_name_is_refused() {
        let s = span(2, 1024);
        let page = Page::new(s, vec![(s.first + 5, ChunkHash::of(b"a"))]);
        let (name, bytes) = page.encode();
        assert_eq!(page.get(s.first + 5), Some(ChunkHash::of(b"a")));
        assert_eq!(page.get(s.first + 6), None);
        for other in [span(3, 1024), span(2, 1000)] {
            assert!(matches!(
                Page::decode(&bytes, &name, other),
                Err(ManifestError::Page(_))
            ));
        }
        assert!(matches!(
            Page::decode(&bytes, &ChunkHash::of(b"x"), s),
            Err(ManifestError::Page(_))
        ));
        let mut b = bytes.clone();
        b[30] ^= 1;
        assert!(Page::decode_unnamed(&b).is_err());
    }

    /// Re-signs a body so only the structural checks can refuse it.
    fn resign(mut body: Vec<u8>) -> Vec<u8> {
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        body
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Page::decode_unnamed(&bytes);
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&bytes);
            let signed = resign(b);
            let name = ChunkHash(*blake3::hash(&signed).as_bytes());
            let _ = Page::decode(&signed, &name, span(0, 16));
        }

        #[test]
        fn round_trips(index in 0u64..1000, chunks in 1u32..2000,
                       picks in proptest::collection::btree_set(0u32..2000, 0..60)) {
            let s = span(index, chunks);
            let hashed: Vec<_> = picks
                .iter()
                .filter(|p| **p < chunks)
                .map(|p| (s.first + u64::from(*p), ChunkHash::of(&p.to_le_bytes())))
                .collect();
            let page = Page::new(s, hashed);
            let (name, bytes) = page.encode();
            prop_assert_eq!(Page::decode(&bytes, &name, s).unwrap(), page);
        }
    }
}
