//! The read side of the EBS direct APIs: ListSnapshotBlocks,
//! ListChangedBlocks (from the content-exact snapshot diff, so any two
//! snapshots of 512 KiB chunks compare, lineage or not) and
//! GetSnapshotBlock (the block's bytes through the host chunk cache, each
//! verified against its blake3 hash, with SHA-256 for the client).
//!
//! A block token is the block's chunk hash in hex: it names exactly the
//! bytes it was listed with, so a token from one snapshot reads only the
//! same content at the same index.

use bytes::Bytes;
use http_body_util::Full;
use snapshot::{ChunkHash, ManifestReader, RepoError, SnapshotId};

use super::{BLOCK_SIZE, EbsError, EbsResult, Query, checksum, epoch_seconds, json_response};
use crate::aws::{AwsState, Response};

/// Results per page unless asked: EBS's default and largest.
const MAX_RESULTS: u64 = 10_000;
/// EBS's smallest page.
const MIN_RESULTS: u64 = 100;
/// How long a listed token is said to be valid (EBS says 7 days; ours
/// never expire while the snapshot exists).
const TOKEN_VALIDITY_SECS: u64 = 7 * 24 * 3600;

/// A completed snapshot's manifest, which must have 512 KiB chunks, read
/// lazily: a listing or a block read costs the pages it touches.
async fn manifest(state: &AwsState, id: &SnapshotId) -> EbsResult<ManifestReader> {
    let m = match state.engine.manifest_reader(id).await {
        Ok(m) => m,
        Err(e) => return Err(super::states::refine_read(state, id, e.into()).await),
    };
    if m.header().chunk_size != BLOCK_SIZE {
        return Err(EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            format!(
                "snapshot {id} has {} byte chunks; the EBS direct APIs serve snapshots with 524288 byte (512 KiB) chunks only",
                m.header().chunk_size
            ),
        ));
    }
    Ok(m)
}

fn volume_size_gib(m: &ManifestReader) -> u64 {
    m.header().size.div_ceil(1 << 30)
}

fn page_error(id: &SnapshotId, e: RepoError) -> EbsError {
    crate::engine::Error::store(format!("read the manifest of snapshot {id}"), e).into()
}

/// Up to `max` non-zero blocks from `start`, ascending, and whether more
/// follow; reads the manifest's pages from `start` on until it has them.
async fn blocks_from(
    m: &ManifestReader,
    id: &SnapshotId,
    start: u64,
    max: usize,
) -> EbsResult<(Vec<(u64, ChunkHash)>, bool)> {
    let per = u64::from(m.page_chunks());
    let mut out = Vec::new();
    for index in start / per..m.page_count() {
        let Some(span) = m.span(index) else { break };
        let entries = m
            .hashed_in(start.max(span.first), span.end())
            .await
            .map_err(|e| page_error(id, e))?;
        for e in entries {
            if out.len() == max {
                return Ok((out, true));
            }
            out.push(e);
        }
    }
    Ok((out, false))
}

fn expiry() -> serde_json::Value {
    epoch_seconds(crate::catalog::unix_now() + TOKEN_VALIDITY_SECS)
}

/// The first block index of a page: `pageToken` wins over
/// `startingBlockIndex`.
fn start_index(q: &Query) -> EbsResult<u64> {
    match q.get("pageToken") {
        Some(t) => t.parse::<u64>().map_err(|_| {
            EbsError::validation("INVALID_PAGE_TOKEN", format!("invalid pageToken {t:?}"))
        }),
        None => q.number("startingBlockIndex", 0, i32::MAX as u64, 0),
    }
}

pub async fn list_blocks(state: &AwsState, id: &SnapshotId, q: &Query) -> EbsResult<Response> {
    q.only(&["maxResults", "pageToken", "startingBlockIndex"])?;
    let max = q.number("maxResults", MIN_RESULTS, MAX_RESULTS, MAX_RESULTS)?;
    let start = start_index(q)?;
    let m = manifest(state, id).await?;
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    let (page, more) = blocks_from(&m, id, start, max).await?;
    let blocks: Vec<serde_json::Value> = page
        .iter()
        .map(|(i, h)| serde_json::json!({ "BlockIndex": i, "BlockToken": h.to_hex() }))
        .collect();
    let mut body = serde_json::json!({
        "Blocks": blocks,
        "BlockSize": BLOCK_SIZE,
        "VolumeSize": volume_size_gib(&m),
        "ExpiryTime": expiry(),
    });
    if more && let Some((last, _)) = page.last() {
        body["NextToken"] = (last + 1).to_string().into();
    }
    Ok(json_response(200, &body))
}

pub async fn list_changed(state: &AwsState, second: &SnapshotId, q: &Query) -> EbsResult<Response> {
    q.only(&[
        "firstSnapshotId",
        "maxResults",
        "pageToken",
        "startingBlockIndex",
    ])?;
    let max = q.number("maxResults", MIN_RESULTS, MAX_RESULTS, MAX_RESULTS)?;
    let start = start_index(q)?;
    let first = q
        .get("firstSnapshotId")
        .map(super::snapshot_id)
        .transpose()?;
    let to = manifest(state, second).await?;
    let from = match &first {
        Some(f) => Some(manifest(state, f).await?),
        None => None,
    };
    let diff = state.engine.diff_snapshots(first.as_ref(), second).await?;
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    let mut blocks = Vec::new();
    let mut next = None;
    'extents: for e in &diff.extents {
        let end = e.offset.saturating_add(e.length).div_ceil(BLOCK_SIZE);
        for i in (e.offset / BLOCK_SIZE).max(start)..end {
            if blocks.len() == max {
                next = Some(i);
                break 'extents;
            }
            let mut b = serde_json::json!({ "BlockIndex": i });
            if let (Some(f), Some(fid)) = (&from, &first)
                && let Some(h) = f.get(i).await.map_err(|e| page_error(fid, e))?
            {
                b["FirstBlockToken"] = h.to_hex().into();
            }
            if let Some(h) = to.get(i).await.map_err(|e| page_error(second, e))? {
                b["SecondBlockToken"] = h.to_hex().into();
            }
            blocks.push(b);
        }
    }
    let mut body = serde_json::json!({
        "ChangedBlocks": blocks,
        "BlockSize": BLOCK_SIZE,
        "VolumeSize": volume_size_gib(&to),
        "ExpiryTime": expiry(),
    });
    if let Some(n) = next {
        body["NextToken"] = n.to_string().into();
    }
    Ok(json_response(200, &body))
}

pub async fn get_block(
    state: &AwsState,
    id: &SnapshotId,
    index: u64,
    q: &Query,
) -> EbsResult<Response> {
    q.only(&["blockToken"])?;
    let token = q
        .get("blockToken")
        .ok_or_else(|| EbsError::validation("INVALID_BLOCK_TOKEN", "blockToken is required"))?;
    let m = manifest(state, id).await?;
    if index >= m.chunk_count() {
        return Err(EbsError::validation(
            "INVALID_BLOCK",
            format!("block {index} is beyond the end of snapshot {id}"),
        ));
    }
    let hash = m
        .get(index)
        .await
        .map_err(|e| page_error(id, e))?
        .filter(|h| h.to_hex() == token)
        .ok_or_else(|| {
            EbsError::validation(
                "INVALID_BLOCK_TOKEN",
                format!("block token does not name block {index} of snapshot {id}"),
            )
        })?;
    let data = state
        .engine
        .fetcher()
        .get(&hash)
        .await
        .map_err(|e| crate::engine::Error::store(format!("read block {index} of {id}"), e))?;
    // A snapshot whose size is not a whole number of blocks has a short
    // last chunk; the API's blocks are always whole, zero-filled.
    let mut bytes: Vec<u8> = data.to_vec();
    let block = usize::try_from(BLOCK_SIZE).unwrap_or(usize::MAX);
    if bytes.len() < block {
        bytes.resize(block, 0);
    }
    let sum = checksum(&bytes);
    Ok(hyper::Response::builder()
        .status(200)
        .header("content-type", "application/octet-stream")
        .header("x-amz-Data-Length", bytes.len())
        .header("x-amz-Checksum", sum)
        .header("x-amz-Checksum-Algorithm", "SHA256")
        .body(Full::new(Bytes::from(bytes)))
        .expect("valid headers always build"))
}
