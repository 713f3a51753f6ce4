//! The format-2 manifest root: the header and the names of the pages that
//! hold the entries (see `page`). It is the object under `manifests/<id>`,
//! written after every page and chunk it names. All integers little-endian.
//!
//! | part | encoding |
//! | --- | --- |
//! | magic | `VMAN` |
//! | version | u32, 2 |
//! | header length | u32, at most 1 MiB |
//! | header | JSON [`ManifestHeader`], as in format 1 |
//! | chunk count | u64, must equal ceil(size / chunk_size) |
//! | chunks per page | u32, a power of two from 1 to 65536 |
//! | page count | u64, must equal ceil(chunk count / chunks per page) |
//! | page entries | `0x00` + u64: a run of that many all-zero pages (not stored); `0x01` + 32 bytes: a page's name |
//! | checksum | blake3 of every byte before it |
//!
//! Page `p` covers chunks `[p × per page, min((p + 1) × per page, count))`.
//! An incremental snapshot names its parent's pages wherever no chunk in
//! them changed, so it writes only the pages that did. As with format 1,
//! only named pages are kept in memory, so a root that lies about its size
//! cannot make decoding allocate more than its bytes justify.

use crate::hash::ChunkHash;
use crate::manifest::{self, MAGIC, ManifestError, ManifestHeader};
use crate::page::PageSpan;

pub const VERSION: u32 = 2;
/// Chunks per page that new roots use: a full page is 8192 × 33 bytes
/// (264 KiB), so a snapshot after one small write uploads one such page
/// and a root of 33 bytes per page (132 KiB for 16 TiB of 512 KiB chunks).
pub const PAGE_CHUNKS: u32 = 8192;
/// Larger pages are refused: a page must stay a small object.
const MAX_PAGE_CHUNKS: u32 = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRoot {
    pub header: ManifestHeader,
    page_chunks: u32,
    /// `(page index, page name)` of every page that is not all zero,
    /// ascending.
    pages: Vec<(u64, ChunkHash)>,
}

impl ManifestRoot {
    /// A root of `pages` (ascending, each below the page count).
    pub fn new(header: ManifestHeader, page_chunks: u32, pages: Vec<(u64, ChunkHash)>) -> Self {
        debug_assert!(page_chunks.is_power_of_two() && page_chunks <= MAX_PAGE_CHUNKS);
        debug_assert!(pages.windows(2).all(|w| w[0].0 < w[1].0));
        ManifestRoot {
            header,
            page_chunks,
            pages,
        }
    }

    pub fn chunk_count(&self) -> u64 {
        self.header.size.div_ceil(self.header.chunk_size)
    }

    pub fn page_chunks(&self) -> u32 {
        self.page_chunks
    }

    pub fn page_count(&self) -> u64 {
        page_count(self.chunk_count(), self.page_chunks)
    }

    /// The range page `index` covers; `None` past the last page.
    pub fn span(&self, index: u64) -> Option<PageSpan> {
        span(self.chunk_count(), self.page_chunks, index)
    }

    /// The page holding chunk `chunk`.
    pub fn page_of(&self, chunk: u64) -> u64 {
        chunk / u64::from(self.page_chunks)
    }

    /// The name of page `index`; `None` for an all-zero page.
    pub fn page(&self, index: u64) -> Option<ChunkHash> {
        self.pages
            .binary_search_by_key(&index, |(i, _)| *i)
            .ok()
            .map(|p| self.pages[p].1)
    }

    /// Every page that is not all zero, ascending.
    pub fn pages(&self) -> &[(u64, ChunkHash)] {
        &self.pages
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + self.pages.len() * 33);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        manifest::encode_header(&mut out, &self.header);
        out.extend_from_slice(&self.chunk_count().to_le_bytes());
        out.extend_from_slice(&self.page_chunks.to_le_bytes());
        let pages = self.page_count();
        out.extend_from_slice(&pages.to_le_bytes());
        manifest::encode_entries(&mut out, 0, pages, &self.pages);
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
        let header = manifest::decode_header(&mut r)?;
        let count = r.u64()?;
        if count != header.size.div_ceil(header.chunk_size) {
            return Err(ManifestError::Entries(
                "chunk count does not match size / chunk size",
            ));
        }
        let page_chunks = r.u32()?;
        if !page_chunks.is_power_of_two() || page_chunks > MAX_PAGE_CHUNKS {
            return Err(ManifestError::Page(
                "chunks per page is not a power of two up to 65536",
            ));
        }
        let pages = r.u64()?;
        if pages != page_count(count, page_chunks) {
            return Err(ManifestError::Entries(
                "page count does not match chunk count / chunks per page",
            ));
        }
        let named = manifest::decode_entries(&mut r, 0, pages)?;
        r.finish()?;
        Ok(ManifestRoot {
            header,
            page_chunks,
            pages: named,
        })
    }
}

pub fn page_count(chunks: u64, page_chunks: u32) -> u64 {
    chunks.div_ceil(u64::from(page_chunks))
}

/// The range of page `index` in a volume of `chunks` chunks.
pub fn span(chunks: u64, page_chunks: u32, index: u64) -> Option<PageSpan> {
    let first = index.checked_mul(u64::from(page_chunks))?;
    if first >= chunks {
        return None;
    }
    let n = (chunks - first).min(u64::from(page_chunks));
    Some(PageSpan {
        index,
        first,
        chunks: u32::try_from(n).expect("at most page_chunks, a u32"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::StoredManifest;
    use proptest::prelude::*;

    fn header(size: u64, chunk_size: u64) -> ManifestHeader {
        crate::manifest::test_header(size, chunk_size)
    }

    #[test]
    fn spans_cover_the_volume_and_the_last_is_short() {
        // 10 chunks in pages of 4: 4, 4, 2.
        let r = ManifestRoot::new(header(10 << 16, 1 << 16), 4, vec![]);
        assert_eq!(r.page_count(), 3);
        assert_eq!(
            r.span(2),
            Some(PageSpan {
                index: 2,
                first: 8,
                chunks: 2
            })
        );
        assert_eq!(r.span(3), None);
        assert_eq!(span(u64::MAX, 1 << 16, u64::MAX), None);
        assert_eq!(r.page_of(9), 2);
    }

    #[test]
    fn a_sixteen_tib_root_is_small_and_either_format_decodes() {
        // 16 TiB of 512 KiB chunks, every page named.
        let h = header(16 << 40, 512 << 10);
        let pages = (0..4096u64)
            .map(|p| (p, ChunkHash::of(&p.to_le_bytes())))
            .collect();
        let r = ManifestRoot::new(h.clone(), PAGE_CHUNKS, pages);
        let bytes = r.encode();
        assert!(bytes.len() < 140 << 10, "{} bytes", bytes.len());
        assert_eq!(
            StoredManifest::decode(&bytes).unwrap(),
            StoredManifest::V2(r)
        );
        let v1 = crate::Manifest::new(h);
        assert_eq!(
            StoredManifest::decode(&v1.encode()).unwrap(),
            StoredManifest::V1(v1)
        );
    }

    fn resign(mut body: Vec<u8>) -> Vec<u8> {
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        body
    }

    #[test]
    fn lying_roots_are_refused() {
        let r = ManifestRoot::new(header(64 << 20, 1 << 20), 16, vec![]);
        let bytes = r.encode();
        let body = bytes[..bytes.len() - 32].to_vec();
        // Pages per root: not a power of two.
        let n = body.len();
        let mut b = body.clone();
        // Layout from the end: page count (8), chunks per page (4), then
        // one zero run (9 bytes).
        b[n - 9 - 8 - 4..n - 9 - 8].copy_from_slice(&3u32.to_le_bytes());
        assert!(ManifestRoot::decode(&resign(b)).is_err());
        // A page count that disagrees.
        let mut b = body.clone();
        b[n - 9 - 8..n - 9].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(ManifestRoot::decode(&resign(b)).is_err());
        // Trailing bytes.
        let mut b = body;
        b.push(1);
        assert!(ManifestRoot::decode(&resign(b)).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = StoredManifest::decode(&bytes);
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&VERSION.to_le_bytes());
            b.extend_from_slice(&bytes);
            let _ = StoredManifest::decode(&resign(b));
        }

        #[test]
        fn round_trips(picks in proptest::collection::btree_set(0u64..300, 0..40),
                       shift in 0u32..8) {
            let per = 1u32 << shift;
            let h = header(300 << 16 << shift, 1 << 16);
            let pages = picks.iter().map(|p| (*p, ChunkHash::of(&p.to_le_bytes()))).collect();
            let r = ManifestRoot::new(h, per, pages);
            prop_assert_eq!(ManifestRoot::decode(&r.encode()).unwrap(), r);
        }
    }
}
