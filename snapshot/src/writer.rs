//! Writing format-2 manifests: the pages first (each only if not stored
//! already), then the caller commits the root. An incremental snapshot
//! names its parent's page wherever no chunk in that page changed, so what
//! it writes grows with the change, not with the volume.
//!
//! Reusing a parent's page is as safe against gc as reusing its chunks (see
//! `gc`): the writer checked after its start that the parent exists, so the
//! parent's root (or its young trash entry) keeps those pages marked.

use futures_util::{StreamExt, TryStreamExt};

use crate::geometry::ChunkGeometry;
use crate::hash::ChunkHash;
use crate::manifest::{Manifest, ManifestHeader};
use crate::page::{Page, PageSpan};
use crate::reader::ManifestReader;
use crate::repo::{Repo, RepoError};
use crate::root::{self, ManifestRoot};

/// Pages uploaded at once by a full write.
const PAGE_WRITE_CONCURRENCY: usize = 8;

/// Stores every non-zero page of `m`; returns the root naming them (with
/// `m`'s header unchanged) and the bytes uploaded.
pub async fn write_pages(repo: &Repo, m: &Manifest) -> Result<(ManifestRoot, u64), RepoError> {
    write_entries(repo, m.header.clone(), m.hashed()).await
}

/// As [`write_pages`], from a header and its sorted entries.
pub async fn write_entries(
    repo: &Repo,
    header: ManifestHeader,
    hashed: &[(u64, ChunkHash)],
) -> Result<(ManifestRoot, u64), RepoError> {
    // Pages are sealed in the domain the header names.
    let repo = &repo.sealed_as(header.encryption.as_ref())?;
    let chunks = header.size.div_ceil(header.chunk_size);
    let per = root::PAGE_CHUNKS;
    // Only pages with entries: a sparse 64 TiB volume costs its data.
    let mut pages: Vec<Page> = Vec::new();
    let mut rest = hashed;
    while let Some(&(first_idx, _)) = rest.first() {
        let Some(span) = root::span(chunks, per, first_idx / u64::from(per)) else {
            break;
        };
        let n = rest.partition_point(|(i, _)| *i < span.end());
        pages.push(Page::new(span, rest[..n].to_vec()));
        rest = &rest[n..];
    }
    let mut named = Vec::with_capacity(pages.len());
    let mut uploaded = 0u64;
    let mut puts = futures_util::stream::iter(pages.into_iter().map(|p| {
        let repo = repo.clone();
        async move {
            repo.put_page(&p)
                .await
                .map(|(name, up)| (p.span.index, name, up))
        }
    }))
    .buffered(PAGE_WRITE_CONCURRENCY);
    while let Some((index, name, up)) = puts.try_next().await? {
        named.push((index, name));
        uploaded += up;
    }
    drop(puts);
    Ok((ManifestRoot::new(header, per, named), uploaded))
}

/// What an incremental write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub root: ManifestRoot,
    /// Pages stored by this write (not found in the store already).
    pub pages_uploaded: u64,
    pub page_bytes: u64,
}

/// Writes the pages of a snapshot that is `parent` with `changes` applied:
/// `(chunk, new hash or None for zero)`, ascending, each chunk at most
/// once, below `header`'s chunk count. Chunks of `parent` past the new
/// size are dropped. `header.logical_bytes` is computed here and
/// `header.uploaded_bytes` grows by the page bytes; the root is returned
/// uncommitted.
pub async fn write_incremental(
    repo: &Repo,
    mut header: ManifestHeader,
    parent: &ManifestReader,
    changes: &[(u64, Option<ChunkHash>)],
) -> Result<Written, RepoError> {
    let repo = &repo.sealed_as(header.encryption.as_ref())?;
    // A page, like a chunk, is named within its domain: another domain's
    // pages (and the chunks they name) cannot be reused.
    if parent.header().encryption != header.encryption {
        return Err(RepoError::CorruptManifest {
            id: header.id.to_string(),
            source: crate::manifest::ManifestError::Header(format!(
                "parent {} is in another encryption domain",
                parent.header().id
            )),
        });
    }
    let geometry = ChunkGeometry::new(header.size, header.chunk_size).map_err(|e| {
        RepoError::CorruptManifest {
            id: header.id.to_string(),
            source: crate::manifest::ManifestError::Header(e.to_string()),
        }
    })?;
    let chunks = geometry.count();
    // The parent's page size, so its pages line up with ours.
    let per = parent.page_chunks();
    let ph = parent.header();
    let same_geometry = ph.size == header.size && ph.chunk_size == header.chunk_size;
    // With the same geometry the figure moves by the changes alone; else
    // every page is counted.
    let mut logical = same_geometry.then_some(ph.logical_bytes);
    let mut counted = 0u64;
    let mut named = Vec::new();
    let (mut pages_uploaded, mut page_bytes) = (0u64, 0u64);
    let mut next = 0usize;
    for index in 0..root::page_count(chunks, per) {
        let span: PageSpan = root::span(chunks, per, index).expect("index below the page count");
        let lo = next;
        while next < changes.len() && changes[next].0 < span.end() {
            next += 1;
        }
        let mine = &changes[lo..next];
        let reusable = mine.is_empty() && parent.span(index) == Some(span);
        if let (true, Some(name)) = (reusable, parent.page_name(index)) {
            if let Some(n) = name {
                named.push((index, n));
                if logical.is_none() {
                    let page = parent.page(index).await?;
                    counted += bytes_of(&geometry, page.hashed());
                }
            }
            continue;
        }
        let old = parent.hashed_in(span.first, span.end()).await?;
        let merged = merge(&old, mine);
        if let Some(l) = logical.as_mut() {
            for &(c, h) in mine {
                let was = old.binary_search_by_key(&c, |(i, _)| *i).is_ok();
                if was {
                    *l = l.saturating_sub(geometry.len(c));
                }
                if h.is_some() {
                    *l += geometry.len(c);
                }
            }
        } else {
            counted += bytes_of(&geometry, &merged);
        }
        if merged.is_empty() {
            continue;
        }
        let (name, up) = repo.put_page(&Page::new(span, merged)).await?;
        if up > 0 {
            pages_uploaded += 1;
            page_bytes += up;
        }
        named.push((index, name));
    }
    header.logical_bytes = logical.unwrap_or(counted);
    header.uploaded_bytes += page_bytes;
    Ok(Written {
        root: ManifestRoot::new(header, per, named),
        pages_uploaded,
        page_bytes,
    })
}

fn bytes_of(g: &ChunkGeometry, hashed: &[(u64, ChunkHash)]) -> u64 {
    hashed.iter().map(|(c, _)| g.len(*c)).sum()
}

/// `old` with `changes` applied, ascending.
fn merge(old: &[(u64, ChunkHash)], changes: &[(u64, Option<ChunkHash>)]) -> Vec<(u64, ChunkHash)> {
    let mut out = Vec::with_capacity(old.len() + changes.len());
    let (mut a, mut b) = (old.iter().peekable(), changes.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(&&(i, h)), None) => {
                out.push((i, h));
                a.next();
            }
            (Some(&&(i, h)), Some(&&(j, _))) if i < j => {
                out.push((i, h));
                a.next();
            }
            (o, Some(&&(j, h))) => {
                if o.is_some_and(|&&(i, _)| i == j) {
                    a.next();
                }
                if let Some(h) = h {
                    out.push((j, h));
                }
                b.next();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::keys;
    use crate::manifest::StoredManifest;
    use crate::store::MemoryStore;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn header(chunks: u64, logical: u64) -> ManifestHeader {
        ManifestHeader {
            logical_bytes: logical,
            ..crate::manifest::test_header(chunks << 16, 1 << 16)
        }
    }

    async fn pages_stored(repo: &Repo) -> usize {
        repo.store().list(keys::PAGES).await.unwrap().len()
    }

    #[tokio::test]
    async fn a_small_change_writes_one_page() {
        let repo = Repo::new(Arc::new(MemoryStore::new()), codec::DEFAULT_LEVEL);
        let chunks = 4 * u64::from(root::PAGE_CHUNKS);
        let mut m = Manifest::new(header(chunks, chunks << 16));
        for i in 0..chunks {
            m.push(i, Some(ChunkHash::of(&(i % 7).to_le_bytes())));
        }
        let parent_root = repo.put_manifest(&m).await.unwrap();
        assert_eq!(pages_stored(&repo).await, 4);
        let parent = ManifestReader::new(repo.clone(), StoredManifest::V2(parent_root.clone()));
        let new = ChunkHash::of(b"new");
        let w = write_incremental(
            &repo,
            header(chunks, 0),
            &parent,
            &[(8192 + 3, Some(new)), (8192 + 4, None)],
        )
        .await
        .unwrap();
        assert_eq!(w.pages_uploaded, 1);
        assert_eq!(pages_stored(&repo).await, 5);
        assert_eq!(w.root.header.logical_bytes, (chunks - 1) << 16);
        assert_eq!(w.root.header.uploaded_bytes, w.page_bytes);
        for p in [0, 2, 3] {
            assert_eq!(w.root.page(p), parent_root.page(p), "page {p} reused");
        }
        repo.commit_root(&w.root).await.unwrap();
        let back = repo.get_manifest(&w.root.header.id).await.unwrap();
        assert_eq!(back.get(8192 + 3), Some(new));
        assert_eq!(back.get(8192 + 4), None);
        assert_eq!(back.hashed().len() as u64, chunks - 1);
        // Zeroing a whole page names it as a zero run; nothing is stored.
        let all: Vec<_> = (0..8192).map(|i| (i, None)).collect();
        let w = write_incremental(&repo, header(chunks, 0), &parent, &all)
            .await
            .unwrap();
        assert_eq!((w.pages_uploaded, w.root.page(0)), (0, None));
        assert_eq!(w.root.header.logical_bytes, (chunks - 8192) << 16);
    }

    #[tokio::test]
    async fn a_grown_volume_and_a_format_one_parent() {
        let repo = Repo::new(Arc::new(MemoryStore::new()), codec::DEFAULT_LEVEL);
        let mut m = Manifest::new(header(10_000, 0));
        m.push(9_999, Some(ChunkHash::of(b"a")));
        m.header.logical_bytes = 1 << 16;
        let parent = ManifestReader::new(repo.clone(), StoredManifest::V1(m));
        let w = write_incremental(
            &repo,
            header(20_000, 0),
            &parent,
            &[(15_000, Some(ChunkHash::of(b"b")))],
        )
        .await
        .unwrap();
        assert_eq!(w.root.header.logical_bytes, 2 << 16);
        assert_eq!(w.root.pages().len(), 1, "both chunks are in page 1");
        repo.commit_root(&w.root).await.unwrap();
        let back = repo.get_manifest(&w.root.header.id).await.unwrap();
        assert_eq!(
            back.hashed().iter().map(|e| e.0).collect::<Vec<_>>(),
            [9_999, 15_000]
        );
    }

    proptest! {
        #[test]
        fn merge_agrees_with_a_model(
            old in proptest::collection::btree_map(0u64..100, 0u8..4, 0..40),
            changes in proptest::collection::btree_map(0u64..100, proptest::option::of(0u8..4), 0..40),
        ) {
            let h = |b: u8| ChunkHash::of(&[b]);
            let o: Vec<_> = old.iter().map(|(i, b)| (*i, h(*b))).collect();
            let c: Vec<_> = changes.iter().map(|(i, b)| (*i, b.map(h))).collect();
            let mut model = old.clone();
            for (i, b) in &changes {
                match b {
                    Some(b) => { model.insert(*i, *b); }
                    None => { model.remove(i); }
                }
            }
            let want: Vec<_> = model.iter().map(|(i, b)| (*i, h(*b))).collect();
            prop_assert_eq!(merge(&o, &c), want);
        }
    }
}
