//! A manifest read lazily: a format-2 root in memory, its pages fetched
//! when a chunk in them is asked for and kept in a small cache, so a fully
//! written 16 TiB snapshot costs its root (about 33 bytes per 8192 chunks)
//! plus at most [`CACHED_PAGES`] pages, not 40 bytes per chunk. A format-1
//! manifest is held whole, as it always was.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::hash::ChunkHash;
use crate::manifest::{Manifest, ManifestHeader, StoredManifest};
use crate::page::{Page, PageSpan};
use crate::repo::{Repo, RepoError};
use crate::root::{self, ManifestRoot};

/// Decoded pages kept, most recent first: 32 full pages of 8192 entries
/// are about 10 MiB, and reads are usually local to a few pages.
pub const CACHED_PAGES: usize = 32;

pub struct ManifestReader {
    stored: StoredManifest,
    repo: Repo,
    cache: Mutex<VecDeque<(u64, Arc<Page>)>>,
}

impl std::fmt::Debug for ManifestReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestReader")
            .field("id", &self.header().id)
            .finish_non_exhaustive()
    }
}

impl ManifestReader {
    /// Reads `stored`'s pages (if any) from `repo`.
    pub fn new(repo: Repo, stored: StoredManifest) -> Self {
        ManifestReader {
            stored,
            repo,
            cache: Mutex::new(VecDeque::with_capacity(CACHED_PAGES)),
        }
    }

    pub fn header(&self) -> &ManifestHeader {
        self.stored.header()
    }

    /// The manifest object as stored (for holds and local copies).
    pub fn stored(&self) -> &StoredManifest {
        &self.stored
    }

    /// The root, for a format-2 manifest.
    pub fn root(&self) -> Option<&ManifestRoot> {
        match &self.stored {
            StoredManifest::V2(r) => Some(r),
            StoredManifest::V1(_) => None,
        }
    }

    pub fn chunk_count(&self) -> u64 {
        let h = self.header();
        h.size.div_ceil(h.chunk_size)
    }

    /// Chunks per page: the root's, or the default for format 1 (whose
    /// pages are cut from the in-memory list).
    pub fn page_chunks(&self) -> u32 {
        self.root()
            .map_or(root::PAGE_CHUNKS, ManifestRoot::page_chunks)
    }

    pub fn page_count(&self) -> u64 {
        root::page_count(self.chunk_count(), self.page_chunks())
    }

    pub fn span(&self, index: u64) -> Option<PageSpan> {
        root::span(self.chunk_count(), self.page_chunks(), index)
    }

    /// Chunk ranges that may hold data, ascending: for format 2 the ranges
    /// of pages that are not all zero (a chunk in them may still be zero),
    /// for format 1 exactly the non-zero chunks (merged). Costs no reads.
    pub fn maybe_data(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut push = |r: Range<u64>| match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        };
        match &self.stored {
            StoredManifest::V1(m) => m.hashed().iter().for_each(|(i, _)| push(*i..*i + 1)),
            StoredManifest::V2(r) => r.pages().iter().for_each(|(p, _)| {
                if let Some(s) = r.span(*p) {
                    push(s.first..s.end());
                }
            }),
        }
        out
    }

    /// Page `index`'s name: `Some(None)` for an all-zero page, `None` when
    /// the manifest is format 1 (its pages have no names).
    pub fn page_name(&self, index: u64) -> Option<Option<ChunkHash>> {
        self.root().map(|r| r.page(index))
    }

    /// Page `index`: from the cache, else read (format 2) or cut from the
    /// list (format 1).
    pub async fn page(&self, index: u64) -> Result<Arc<Page>, RepoError> {
        if let Some(p) = self.cached(index) {
            return Ok(p);
        }
        let page = match &self.stored {
            StoredManifest::V2(r) => self.repo.root_page(r, index).await?,
            StoredManifest::V1(m) => {
                let span = self
                    .span(index)
                    .ok_or_else(|| past_the_end(self.header()))?;
                Page::new(span, m.hashed_in(span.first, span.end()).to_vec())
            }
        };
        let page = Arc::new(page);
        let mut cache = self.lock();
        if !cache.iter().any(|(i, _)| *i == index) {
            if cache.len() == CACHED_PAGES {
                cache.pop_back();
            }
            cache.push_front((index, Arc::clone(&page)));
        }
        Ok(page)
    }

    fn cached(&self, index: u64) -> Option<Arc<Page>> {
        let mut cache = self.lock();
        let pos = cache.iter().position(|(i, _)| *i == index)?;
        let hit = cache.remove(pos)?;
        let page = Arc::clone(&hit.1);
        cache.push_front(hit);
        Some(page)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Arc<Page>)>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hash of chunk `chunk`; `None` for a zero chunk or one past the
    /// end. Reads at most one page.
    pub async fn get(&self, chunk: u64) -> Result<Option<ChunkHash>, RepoError> {
        if chunk >= self.chunk_count() {
            return Ok(None);
        }
        match &self.stored {
            StoredManifest::V1(m) => Ok(m.get(chunk)),
            StoredManifest::V2(r) => {
                let index = r.page_of(chunk);
                if r.page(index).is_none() {
                    return Ok(None);
                }
                Ok(self.page(index).await?.get(chunk))
            }
        }
    }

    /// The non-zero chunks in `[first, end)`, ascending; reads the pages
    /// that range touches.
    pub async fn hashed_in(
        &self,
        first: u64,
        end: u64,
    ) -> Result<Vec<(u64, ChunkHash)>, RepoError> {
        let end = end.min(self.chunk_count());
        if first >= end {
            return Ok(Vec::new());
        }
        if let StoredManifest::V1(m) = &self.stored {
            return Ok(m.hashed_in(first, end).to_vec());
        }
        let per = u64::from(self.page_chunks());
        let mut out = Vec::new();
        for index in first / per..=(end - 1) / per {
            if self.page_name(index) == Some(None) {
                continue;
            }
            let page = self.page(index).await?;
            out.extend(
                page.hashed()
                    .iter()
                    .filter(|(i, _)| *i >= first && *i < end)
                    .copied(),
            );
        }
        Ok(out)
    }

    /// Every entry in memory.
    pub async fn materialize(&self) -> Result<Manifest, RepoError> {
        self.repo.materialize(self.stored.clone()).await
    }
}

fn past_the_end(h: &ManifestHeader) -> RepoError {
    RepoError::CorruptManifest {
        id: h.id.to_string(),
        source: crate::manifest::ManifestError::Page("page index past the last page"),
    }
}

impl Repo {
    /// A snapshot's manifest, read lazily.
    pub async fn open_manifest(&self, id: &crate::SnapshotId) -> Result<ManifestReader, RepoError> {
        Ok(ManifestReader::new(
            self.clone(),
            self.get_stored(id).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::store::MemoryStore;

    fn header(chunks: u64) -> ManifestHeader {
        crate::manifest::test_header(chunks << 16, 1 << 16)
    }

    #[tokio::test]
    async fn reads_pages_on_demand_and_agrees_with_format_one() {
        let repo = Repo::new(
            std::sync::Arc::new(MemoryStore::new()),
            codec::DEFAULT_LEVEL,
        );
        // 3 pages and a bit; the second page all zero.
        let chunks = 3 * u64::from(root::PAGE_CHUNKS) + 10;
        let mut m = Manifest::new(header(chunks));
        let picks = [0, 5, 8191, 2 * 8192 + 1, chunks - 1];
        for i in picks {
            m.push(i, Some(ChunkHash::of(&i.to_le_bytes())));
        }
        let root = repo.put_manifest(&m).await.unwrap();
        assert_eq!(root.pages().len(), 3, "the zero page is not stored");
        let paged = repo.open_manifest(&m.header.id).await.unwrap();
        let v1 = ManifestReader::new(repo.clone(), StoredManifest::V1(m.clone()));
        for r in [&paged, &v1] {
            for i in [
                0,
                1,
                5,
                8191,
                8192,
                2 * 8192 + 1,
                chunks - 1,
                chunks,
                u64::MAX,
            ] {
                assert_eq!(r.get(i).await.unwrap(), m.get(i), "chunk {i}");
            }
            assert_eq!(
                r.hashed_in(1, 2 * 8192 + 2).await.unwrap(),
                m.hashed_in(1, 2 * 8192 + 2)
            );
            assert_eq!(r.materialize().await.unwrap(), m);
        }
        assert_eq!(paged.maybe_data(), vec![0..8192, 2 * 8192..chunks]);
        assert_eq!(v1.maybe_data().len(), picks.len());
        assert!(paged.lock().len() <= CACHED_PAGES);
        // A page gone from the store is an error, not a zero chunk.
        let name = root.page(0).unwrap();
        repo.store()
            .delete(&crate::keys::page_key(&name))
            .await
            .unwrap();
        let cold = repo.open_manifest(&m.header.id).await.unwrap();
        assert!(matches!(cold.get(0).await, Err(RepoError::MissingPage(_))));
    }
}
