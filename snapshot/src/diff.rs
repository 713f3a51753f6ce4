//! Changed blocks between two snapshots, exact by content.
//!
//! Manifests are self-contained lists of chunk hashes, so the difference of
//! two snapshots is a walk over both lists: chunk `i` changed when its hash
//! in one differs from its hash in the other (a zero chunk has no hash). No
//! lineage is needed, any two snapshots of the same chunk size compare, and
//! a chunk rewritten with identical content is not a change. The walk
//! visits only the chunks that hold data in either snapshot, so a sparse
//! 64 TiB volume costs what its data costs; over format-2 manifests it also
//! skips every page the two name alike.

use serde::{Deserialize, Serialize};

use crate::geometry::ChunkGeometry;
use crate::hash::ChunkHash;
use crate::manifest::{Manifest, ManifestHeader, SnapshotId};
use crate::reader::ManifestReader;

/// A byte range of the newer snapshot that differs from the older one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// The range is zeros in the newer snapshot (trimmed or zeroed).
    pub zero: bool,
}

/// What changed from `from` (or from nothing) to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    pub from: Option<SnapshotId>,
    pub to: SnapshotId,
    pub volume_size: u64,
    pub chunk_size: u64,
    /// The sum of the extents' lengths.
    pub changed_bytes: u64,
    /// Ascending, not overlapping; adjacent chunks of the same kind merged.
    pub extents: Vec<Extent>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DiffError {
    #[error(
        "snapshots {from} ({from_chunk} byte chunks) and {to} ({to_chunk} byte chunks) have different chunk sizes"
    )]
    ChunkSize {
        from: SnapshotId,
        from_chunk: u64,
        to: SnapshotId,
        to_chunk: u64,
    },
    #[error("snapshot {0}: {1}")]
    Geometry(SnapshotId, crate::geometry::GeometryError),
    /// A manifest page could not be read.
    #[error("snapshot {0}: {1}")]
    Read(SnapshotId, Box<crate::repo::RepoError>),
}

/// The ranges of `to` that differ from `from`; without `from`, the ranges
/// of `to` that hold data.
pub fn diff(from: Option<&Manifest>, to: &Manifest) -> Result<Diff, DiffError> {
    let h = &to.header;
    let geometry = check(from.map(|f| &f.header), h)?;
    let older: &[(u64, ChunkHash)] = from.map_or(&[], |f| f.hashed());
    let mut out = Extents::new(geometry);
    walk(older, to.hashed(), &mut out);
    Ok(finish(from.map(|f| &f.header), h, out))
}

/// As [`diff`], over manifests read lazily, page by page: a page both name
/// alike (the same page object, or both all zero) is skipped unread, so two
/// format-2 snapshots of a huge volume cost the pages that differ.
pub async fn diff_readers(
    from: Option<&ManifestReader>,
    to: &ManifestReader,
) -> Result<Diff, DiffError> {
    let h = to.header();
    let geometry = check(from.map(|f| f.header()), h)?;
    let read =
        |id: &SnapshotId, e: crate::repo::RepoError| DiffError::Read(id.clone(), Box::new(e));
    let mut out = Extents::new(geometry);
    let per = u64::from(to.page_chunks());
    let same_pages = from.is_some_and(|f| f.page_chunks() == to.page_chunks());
    for index in 0..to.page_count() {
        let Some(span) = to.span(index) else { break };
        let theirs = to.page_name(index);
        if same_pages
            && theirs.is_some()
            && from.and_then(|f| f.page_name(index)) == theirs
            && from.and_then(|f| f.span(index)) == Some(span)
        {
            continue;
        }
        let newer = to
            .hashed_in(span.first, span.end())
            .await
            .map_err(|e| read(&h.id, e))?;
        let older = match from {
            Some(f) => f
                .hashed_in(span.first, span.end())
                .await
                .map_err(|e| read(&f.header().id, e))?,
            None => Vec::new(),
        };
        walk(&older, &newer, &mut out);
        debug_assert!(span.end() <= (index + 1) * per);
    }
    Ok(finish(from.map(|f| f.header()), h, out))
}

fn check(from: Option<&ManifestHeader>, h: &ManifestHeader) -> Result<ChunkGeometry, DiffError> {
    let geometry = ChunkGeometry::new(h.size, h.chunk_size)
        .map_err(|e| DiffError::Geometry(h.id.clone(), e))?;
    if let Some(f) = from
        && f.chunk_size != h.chunk_size
    {
        return Err(DiffError::ChunkSize {
            from: f.id.clone(),
            from_chunk: f.chunk_size,
            to: h.id.clone(),
            to_chunk: h.chunk_size,
        });
    }
    Ok(geometry)
}

fn finish(from: Option<&ManifestHeader>, h: &ManifestHeader, out: Extents) -> Diff {
    let extents = out.finish();
    Diff {
        from: from.map(|f| f.id.clone()),
        to: h.id.clone(),
        volume_size: h.size,
        chunk_size: h.chunk_size,
        changed_bytes: extents.iter().map(|e| e.length).sum(),
        extents,
    }
}

/// Pushes the chunks whose hashes differ between two ascending lists.
fn walk(older: &[(u64, ChunkHash)], newer: &[(u64, ChunkHash)], out: &mut Extents) {
    let (mut a, mut b) = (older.iter().peekable(), newer.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            // Only in the older one: zero now (beyond the newer one's end,
            // not part of it at all).
            (Some(&&(i, _)), None) => {
                out.push(i, true);
                a.next();
            }
            (Some(&&(i, _)), Some(&&(j, _))) if i < j => {
                out.push(i, true);
                a.next();
            }
            // Only in the newer one: data where there was none.
            (None, Some(&&(j, _))) => {
                out.push(j, false);
                b.next();
            }
            (Some(&&(i, _)), Some(&&(j, _))) if j < i => {
                out.push(j, false);
                b.next();
            }
            (Some(&&(i, hi)), Some(&&(_, hj))) => {
                if hi != hj {
                    out.push(i, false);
                }
                a.next();
                b.next();
            }
        }
    }
}

impl Diff {
    /// `[offset, offset + len)` cut at the end of the volume, as runs of
    /// (length, changed): what an NBD dirty-bitmap context answers. Runs
    /// alternate, so changed extents of both kinds that touch are one run.
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.volume_size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |n: u64, changed: bool| match out.last_mut() {
            Some((m, c)) if *c == changed => *m += n,
            _ if n > 0 => out.push((n, changed)),
            _ => {}
        };
        let mut pos = offset;
        let first = self
            .extents
            .partition_point(|e| e.offset.saturating_add(e.length) <= offset);
        for e in &self.extents[first..] {
            if pos >= end {
                break;
            }
            let (start, stop) = (
                e.offset.max(pos),
                e.offset.saturating_add(e.length).min(end),
            );
            if start >= end {
                break;
            }
            push(start - pos, false);
            push(stop - start, true);
            pos = stop;
        }
        if pos < end {
            push(end - pos, false);
        }
        out
    }
}

/// Builds merged extents from changed chunks given in ascending order.
struct Extents {
    geometry: ChunkGeometry,
    done: Vec<Extent>,
    /// The extent being grown: first chunk, chunk after the last, zero.
    open: Option<(u64, u64, bool)>,
}

impl Extents {
    fn new(geometry: ChunkGeometry) -> Self {
        Extents {
            geometry,
            done: Vec::new(),
            open: None,
        }
    }

    fn push(&mut self, chunk: u64, zero: bool) {
        if !self.geometry.contains(chunk) {
            return;
        }
        match &mut self.open {
            Some((_, end, z)) if *end == chunk && *z == zero => *end += 1,
            _ => {
                self.close();
                self.open = Some((chunk, chunk + 1, zero));
            }
        }
    }

    fn close(&mut self) {
        if let Some((first, end, zero)) = self.open.take() {
            let offset = self.geometry.offset(first);
            let last = self.geometry.range(end - 1);
            self.done.push(Extent {
                offset,
                length: last.end - offset,
                zero,
            });
        }
    }

    fn finish(mut self) -> Vec<Extent> {
        self.close();
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ManifestHeader;
    use proptest::prelude::*;

    const CS: u64 = 64 << 10;

    fn manifest(id: &str, size: u64, chunks: &[(u64, u8)]) -> Manifest {
        let mut m = Manifest::new(ManifestHeader {
            id: SnapshotId::parse(id).unwrap(),
            volume: "v".into(),
            size,
            chunk_size: CS,
            parent: None,
            created_at: "2026-12-01T00:00:00Z".into(),
            labels: Default::default(),
            changed_chunks: 0,
            logical_bytes: 0,
            uploaded_bytes: 0,
            encryption: None,
        });
        for &(i, b) in chunks {
            m.push(i, Some(ChunkHash::of(&[b])));
        }
        m
    }

    #[test]
    fn runs_cover_the_range_and_merge_touching_extents() {
        let a = manifest("snap-a", 64 * CS, &[(1, 1), (2, 2), (10, 3)]);
        let b = manifest("snap-b", 64 * CS, &[(2, 9), (3, 9), (10, 3)]);
        // chunk 1 zero now, chunks 2-3 data: one changed run of 3 chunks.
        let d = diff(Some(&a), &b).unwrap();
        assert_eq!(
            d.runs(0, 64 * CS),
            vec![(CS, false), (3 * CS, true), (60 * CS, false)]
        );
        assert_eq!(d.runs(CS + 10, 10), vec![(10, true)]);
        assert_eq!(d.runs(5 * CS, CS), vec![(CS, false)]);
        // Cut at the volume's end.
        assert_eq!(d.runs(63 * CS, 10 * CS), vec![(CS, false)]);
        assert!(d.runs(64 * CS, CS).is_empty());
    }

    #[test]
    fn writes_trims_and_identical_rewrites() {
        let a = manifest("snap-a", 64 * CS, &[(1, 1), (2, 2), (10, 3)]);
        // Chunks 4 and 5 written (adjacent), 20 written, 10 trimmed, 1
        // rewritten with the same bytes.
        let b = manifest(
            "snap-b",
            64 * CS,
            &[(1, 1), (2, 2), (4, 4), (5, 5), (20, 6)],
        );
        let d = diff(Some(&a), &b).unwrap();
        assert_eq!(
            d.extents,
            vec![
                Extent {
                    offset: 4 * CS,
                    length: 2 * CS,
                    zero: false
                },
                Extent {
                    offset: 10 * CS,
                    length: CS,
                    zero: true
                },
                Extent {
                    offset: 20 * CS,
                    length: CS,
                    zero: false
                },
            ]
        );
        assert_eq!(d.changed_bytes, 4 * CS);
        assert!(diff(Some(&b), &b).unwrap().extents.is_empty());
        let alloc = diff(None, &b).unwrap();
        assert_eq!(alloc.extents.len(), 3);
        assert_eq!(alloc.changed_bytes, 5 * CS);
        assert!(alloc.extents.iter().all(|e| !e.zero));
    }

    #[test]
    fn short_last_chunk_and_grown_volume() {
        let a = manifest("snap-a", 2 * CS, &[(1, 1)]);
        let b = manifest("snap-b", 3 * CS + 512, &[(1, 1), (3, 9)]);
        let d = diff(Some(&a), &b).unwrap();
        assert_eq!(
            d.extents,
            vec![Extent {
                offset: 3 * CS,
                length: 512,
                zero: false
            }]
        );
        // Chunks of the older one past the newer one's end are not part of it.
        let d = diff(Some(&b), &a).unwrap();
        assert!(d.extents.is_empty(), "{d:?}");
    }

    #[test]
    fn different_chunk_sizes_refused() {
        let a = manifest("snap-a", 4 * CS, &[]);
        let mut b = manifest("snap-b", 4 * CS, &[]);
        b.header.chunk_size = CS * 2;
        let e = diff(Some(&a), &b).unwrap_err();
        assert!(e.to_string().contains("different chunk sizes"), "{e}");
    }

    #[tokio::test]
    async fn paged_diff_agrees_and_skips_pages_named_alike() {
        use crate::manifest::StoredManifest;
        let repo = crate::Repo::new(
            std::sync::Arc::new(crate::store::MemoryStore::new()),
            crate::codec::DEFAULT_LEVEL,
        );
        let chunks = 3 * 8192 + 5;
        let all: Vec<(u64, u8)> = (0..chunks).map(|i| (i, (i % 5) as u8)).collect();
        let a = manifest("snap-a", chunks * CS, &all);
        let mut changed = all.clone();
        changed[8192 + 7].1 = 9;
        changed.truncate(3 * 8192 + 2);
        let b = manifest("snap-b", chunks * CS, &changed);
        let (ra, rb) = (
            repo.put_manifest(&a).await.unwrap(),
            repo.put_manifest(&b).await.unwrap(),
        );
        assert_eq!(ra.page(0), rb.page(0));
        // Page 0 is shared: gone from the store, the diff never notices.
        repo.store()
            .delete(&crate::keys::page_key(&ra.page(0).unwrap()))
            .await
            .unwrap();
        let (ma, mb) = (
            ManifestReader::new(repo.clone(), StoredManifest::V2(ra)),
            ManifestReader::new(repo.clone(), StoredManifest::V2(rb)),
        );
        let d = diff_readers(Some(&ma), &mb).await.unwrap();
        assert_eq!(d, diff(Some(&a), &b).unwrap());
        assert_eq!(d.extents.len(), 2, "{d:?}");
        assert!(
            diff_readers(None, &mb).await.is_err(),
            "page 0 is needed then"
        );
    }

    proptest! {
        /// Against a chunk-by-chunk model: every chunk whose content
        /// differs is in exactly one extent of the right kind.
        #[test]
        fn agrees_with_a_model(
            a in proptest::collection::btree_map(0u64..64, 0u8..3, 0..40),
            b in proptest::collection::btree_map(0u64..64, 0u8..3, 0..40),
            start in any::<u64>(),
            span in any::<u64>(),
        ) {
            let ma = manifest("snap-a", 64 * CS, &a.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>());
            let mb = manifest("snap-b", 64 * CS, &b.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>());
            let d = diff(Some(&ma), &mb).unwrap();
            let mut covered = [None; 64];
            for e in &d.extents {
                prop_assert!(e.length > 0 && e.offset % CS == 0 && e.length % CS == 0);
                for c in e.offset / CS..(e.offset + e.length) / CS {
                    prop_assert!(covered[c as usize].is_none());
                    covered[c as usize] = Some(e.zero);
                }
            }
            for (c, cov) in covered.iter().enumerate() {
                let (x, y) = (a.get(&(c as u64)), b.get(&(c as u64)));
                let want = if x == y { None } else { Some(y.is_none()) };
                prop_assert_eq!(*cov, want, "chunk {}", c);
            }
            for w in d.extents.windows(2) {
                prop_assert!(w[0].offset + w[0].length < w[1].offset || w[0].zero != w[1].zero);
            }
            // Runs of any range tile it, alternate, and agree with the model
            // byte by byte.
            let (off, len) = (start % (64 * CS), span % (70 * CS));
            let runs = d.runs(off, len);
            let end = (off + len).min(64 * CS);
            prop_assert_eq!(runs.iter().map(|r| r.0).sum::<u64>(), end - off);
            prop_assert!(runs.windows(2).all(|w| w[0].1 != w[1].1));
            let mut pos = off;
            for (n, changed) in runs {
                for c in pos / CS..=(pos + n - 1) / CS {
                    prop_assert_eq!(changed, covered[c as usize].is_some());
                }
                pos += n;
            }
        }
    }
}
