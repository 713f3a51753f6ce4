//! The write side of the EBS direct APIs: StartSnapshot, PutSnapshotBlock,
//! CompleteSnapshot. The result is a normal snapshot: each block is stored
//! as a chunk object (deduplicated, compressed) as soon as it arrives, and
//! CompleteSnapshot writes the manifest, the commit point, naming the
//! blocks written and, for the rest, the parent's chunks or zeros.
//!
//! An upload in progress lives in memory, announced to gc by a pending
//! marker so its chunks are kept; a daemon restart forgets it (its chunks
//! are then garbage after the grace period), as an EBS snapshot that
//! times out ends in `error`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use base64::Engine as _;
use serde::Deserialize;
use snapshot::{ChunkHash, Manifest, ManifestHeader, SnapshotId};
use tracing::{info, warn};

use super::{BLOCK_SIZE, EbsError, EbsResult, checksum, epoch_seconds, json_response};
use crate::aws::ec2::snapshots::{Ec2Snapshot, UNKNOWN_VOLUME};
use crate::aws::{AwsState, OWNER_ID, Request, Response};
use crate::catalog::{AwsSnapshotRecord, rfc3339, unix_now};

/// EBS's largest volume, in GiB.
const MAX_VOLUME_GIB: u64 = 64 << 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct StartRequest {
    volume_size: u64,
    #[serde(default)]
    parent_snapshot_id: Option<String>,
    #[serde(default)]
    tags: Vec<TagJson>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    client_token: Option<String>,
    #[serde(default)]
    encrypted: Option<bool>,
    #[serde(default)]
    kms_key_arn: Option<String>,
    /// Minutes; accepted, not enforced (see the module comment).
    #[serde(default)]
    timeout: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct TagJson {
    key: String,
    #[serde(default)]
    value: String,
}

struct Block {
    /// `None` for a block of zeros, which needs no object.
    hash: Option<ChunkHash>,
    sha256: [u8; 32],
}

struct Upload {
    volume_size: u64,
    parent: Option<Manifest>,
    description: String,
    tags: BTreeMap<String, String>,
    started: u64,
    blocks: BTreeMap<u64, Block>,
    uploaded_bytes: u64,
}

/// The uploads in progress, and the client tokens seen, by id.
#[derive(Default)]
pub struct Uploads {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    uploads: HashMap<SnapshotId, Upload>,
    /// ClientToken -> (snapshot, the request's fingerprint): a retry with
    /// the same token and request gets the same snapshot.
    tokens: HashMap<String, (SnapshotId, String)>,
}

impl Uploads {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn contains(&self, id: &SnapshotId) -> bool {
        self.lock().uploads.contains_key(id)
    }

    /// Uploads in progress, as DescribeSnapshots shows them.
    pub fn pending(&self) -> Vec<Ec2Snapshot> {
        self.lock()
            .uploads
            .iter()
            .map(|(id, u)| Ec2Snapshot {
                id: id.to_string(),
                volume_id: UNKNOWN_VOLUME.to_owned(),
                state: "pending",
                start_time: u.started,
                progress: 0,
                size_gib: u.volume_size >> 30,
                description: u.description.clone(),
                tags: u.tags.clone(),
            })
            .collect()
    }
}

fn start_response(id: &SnapshotId, u: &Upload) -> Response {
    let tags: Vec<serde_json::Value> = u
        .tags
        .iter()
        .map(|(k, v)| serde_json::json!({ "Key": k, "Value": v }))
        .collect();
    let mut body = serde_json::json!({
        "SnapshotId": id.as_str(),
        "OwnerId": OWNER_ID,
        "Status": "pending",
        "StartTime": epoch_seconds(u.started),
        "VolumeSize": u.volume_size >> 30,
        "BlockSize": BLOCK_SIZE,
        "Description": u.description,
        "Tags": tags,
    });
    if let Some(p) = &u.parent {
        body["ParentSnapshotId"] = p.header.id.as_str().into();
    }
    json_response(201, &body)
}

pub async fn start(state: &AwsState, req: &Request) -> EbsResult<Response> {
    let r: StartRequest = serde_json::from_slice(&req.body).map_err(|e| {
        EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            format!("invalid request body: {e}"),
        )
    })?;
    if !(1..=MAX_VOLUME_GIB).contains(&r.volume_size) {
        return Err(EbsError::validation(
            "INVALID_VOLUME_SIZE",
            format!(
                "VolumeSize {} must be 1 to {MAX_VOLUME_GIB} GiB",
                r.volume_size
            ),
        ));
    }
    if r.encrypted == Some(true) || r.kms_key_arn.is_some() {
        return Err(EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            "encrypted snapshots are not supported",
        ));
    }
    let description = r.description.clone().unwrap_or_default();
    if description.chars().count() > 255 || description.chars().any(char::is_control) {
        return Err(EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            "Description is at most 255 printable characters",
        ));
    }
    let mut tags = BTreeMap::new();
    for t in &r.tags {
        if tags.insert(t.key.clone(), t.value.clone()).is_some() {
            return Err(EbsError::validation(
                "INVALID_TAG",
                format!("tag {:?} is given twice", t.key),
            ));
        }
    }
    volumed_api::validate_tags(&tags)
        .map_err(|e| EbsError::validation("INVALID_TAG", e.to_string()))?;
    if let Some(t) = &r.client_token
        && (t.is_empty() || t.len() > 255)
    {
        return Err(EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            "ClientToken is 1 to 255 characters",
        ));
    }
    let fingerprint = format!(
        "{}|{:?}|{:?}|{description}|{:?}",
        r.volume_size, r.parent_snapshot_id, tags, r.timeout
    );
    if let Some(token) = &r.client_token {
        let seen = state.uploads.lock().tokens.get(token).cloned();
        if let Some((id, fp)) = seen {
            if fp != fingerprint {
                return Err(EbsError::conflict(format!(
                    "ClientToken {token} was used for snapshot {id} with other parameters"
                )));
            }
            let inner = state.uploads.lock();
            if let Some(u) = inner.uploads.get(&id) {
                return Ok(start_response(&id, u));
            }
            return Err(EbsError::conflict(format!(
                "ClientToken {token} was used for snapshot {id}, which is no longer pending"
            )));
        }
    }
    let volume_size = r.volume_size << 30;
    let parent = match &r.parent_snapshot_id {
        Some(p) => {
            let id = super::snapshot_id(p)?;
            let m = state.engine.manifest(&id).await.map_err(|e| match e {
                crate::error::Error::SnapshotNotFound(_) => EbsError {
                    kind: "ResourceNotFoundException",
                    status: 404,
                    reason: Some("DEPENDENCY_RESOURCE_NOT_FOUND"),
                    message: format!("The parent snapshot '{p}' does not exist."),
                },
                other => other.into(),
            })?;
            if m.header.chunk_size != BLOCK_SIZE {
                return Err(EbsError::validation(
                    "INVALID_PARAMETER_VALUE",
                    format!(
                        "parent snapshot {p} has {} byte chunks, not 524288",
                        m.header.chunk_size
                    ),
                ));
            }
            if m.header.size > volume_size {
                return Err(EbsError::validation(
                    "INVALID_VOLUME_SIZE",
                    format!("VolumeSize is smaller than parent snapshot {p}"),
                ));
            }
            Some(m)
        }
        None => None,
    };
    let id = SnapshotId::generate();
    // Announced before any chunk is written, so gc keeps them.
    state
        .engine
        .repo()
        .begin_pending(&id)
        .await
        .map_err(|e| crate::error::Error::store(format!("start snapshot {id}"), e))?;
    let upload = Upload {
        volume_size,
        parent,
        description,
        tags,
        started: unix_now(),
        blocks: BTreeMap::new(),
        uploaded_bytes: 0,
    };
    let resp = start_response(&id, &upload);
    let mut inner = state.uploads.lock();
    if let Some(token) = &r.client_token {
        inner
            .tokens
            .insert(token.clone(), (id.clone(), fingerprint));
    }
    inner.uploads.insert(id.clone(), upload);
    info!(snapshot = %id, size = volume_size, "EBS direct snapshot started");
    Ok(resp)
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.header(name)
}

fn required<'a>(req: &'a Request, name: &str) -> EbsResult<&'a str> {
    header(req, name).ok_or_else(|| {
        EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            format!("the {name} header is required"),
        )
    })
}

fn not_pending(id: &SnapshotId) -> EbsError {
    EbsError::not_found(id.as_str())
}

pub async fn put_block(
    state: &AwsState,
    req: &Request,
    id: &SnapshotId,
    index: u64,
) -> EbsResult<Response> {
    let blocks = match state.uploads.lock().uploads.get(id) {
        Some(u) => u.volume_size / BLOCK_SIZE,
        None => return Err(not_pending(id)),
    };
    if index >= blocks {
        return Err(EbsError::validation(
            "INVALID_BLOCK",
            format!("block {index} is beyond the end of the {blocks} blocks of snapshot {id}"),
        ));
    }
    let length = required(req, "x-amz-data-length")?;
    if length.parse::<u64>().ok() != Some(BLOCK_SIZE) || req.body.len() as u64 != BLOCK_SIZE {
        return Err(EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            format!(
                "a block is exactly 524288 bytes; x-amz-Data-Length is {length} and the body {} bytes",
                req.body.len()
            ),
        ));
    }
    let algorithm = required(req, "x-amz-checksum-algorithm")?;
    if algorithm != "SHA256" {
        return Err(EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            format!("x-amz-Checksum-Algorithm {algorithm} is not SHA256"),
        ));
    }
    let given = required(req, "x-amz-checksum")?;
    let sum = ring::digest::digest(&ring::digest::SHA256, &req.body);
    let given_bytes = base64::engine::general_purpose::STANDARD
        .decode(given)
        .unwrap_or_default();
    // Both are public (the client sent the body), so a plain compare is fine.
    if given_bytes != sum.as_ref() {
        return Err(EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            format!("x-amz-Checksum {given} does not match the block's data"),
        ));
    }
    let sha256: [u8; 32] = sum
        .as_ref()
        .try_into()
        .map_err(|_| EbsError::validation("INVALID_PARAMETER_VALUE", "bad digest length"))?;
    let (hash, uploaded) = if req.body.iter().all(|b| *b == 0) {
        (None, 0)
    } else {
        let put = state
            .engine
            .repo()
            .put_chunk(req.body.to_vec())
            .await
            .map_err(|e| crate::error::Error::store(format!("store block {index} of {id}"), e))?;
        (Some(put.hash), put.uploaded)
    };
    {
        let mut inner = state.uploads.lock();
        let Some(u) = inner.uploads.get_mut(id) else {
            return Err(not_pending(id));
        };
        u.blocks.insert(index, Block { hash, sha256 });
        u.uploaded_bytes = u.uploaded_bytes.saturating_add(uploaded);
    }
    Ok(hyper::Response::builder()
        .status(201)
        .header("content-type", "application/json")
        .header("x-amz-Checksum", checksum(&req.body))
        .header("x-amz-Checksum-Algorithm", "SHA256")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .expect("valid headers always build"))
}

pub async fn complete(state: &AwsState, req: &Request, id: &SnapshotId) -> EbsResult<Response> {
    let count = required(req, "x-amz-changedblockscount")?;
    let count: u64 = count.parse().map_err(|_| {
        EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            format!("x-amz-ChangedBlocksCount {count:?} is not a number"),
        )
    })?;
    let aggregate = header(req, "x-amz-checksum").map(str::to_owned);
    if aggregate.is_some() {
        let alg = header(req, "x-amz-checksum-algorithm");
        let method = header(req, "x-amz-checksum-aggregation-method");
        if alg != Some("SHA256") || method != Some("LINEAR") {
            return Err(EbsError::validation(
                "INVALID_PARAMETER_VALUE",
                "an aggregate checksum needs x-amz-Checksum-Algorithm SHA256 and x-amz-Checksum-Aggregation-Method LINEAR",
            ));
        }
    }
    // Built under the lock, written without it.
    let manifest = {
        let inner = state.uploads.lock();
        let Some(u) = inner.uploads.get(id) else {
            return Err(not_pending(id));
        };
        let written = u.blocks.len() as u64;
        if count != written {
            return Err(EbsError::validation(
                "INVALID_PARAMETER_VALUE",
                format!("x-amz-ChangedBlocksCount is {count} but {written} blocks were written"),
            ));
        }
        if let Some(want) = &aggregate {
            let mut all = Vec::with_capacity(u.blocks.len() * 32);
            for b in u.blocks.values() {
                all.extend_from_slice(&b.sha256);
            }
            if &checksum(&all) != want {
                return Err(EbsError::validation(
                    "INVALID_PARAMETER_VALUE",
                    format!("the aggregate checksum {want} does not match the blocks written"),
                ));
            }
        }
        build_manifest(id, u)
    };
    let repo = state.engine.repo();
    repo.put_manifest(&manifest)
        .await
        .map_err(|e| crate::error::Error::store(format!("complete snapshot {id}"), e))?;
    let upload = state.uploads.lock().uploads.remove(id);
    if let Err(e) = repo.end_pending(id).await {
        warn!(snapshot = %id, error = %e, "could not remove the pending marker; gc expires it");
    }
    if let Some(u) = upload {
        let meta = AwsSnapshotRecord {
            volume_id: None,
            description: u.description,
            tags: u.tags,
        };
        state.engine.put_snapshot_meta(id, &meta)?;
    }
    info!(snapshot = %id, blocks = count, "EBS direct snapshot completed");
    Ok(json_response(
        202,
        &serde_json::json!({ "Status": "completed" }),
    ))
}

/// The manifest: each block written, else the parent's chunk, else zeros.
fn build_manifest(id: &SnapshotId, u: &Upload) -> Manifest {
    let count = u.volume_size.div_ceil(BLOCK_SIZE);
    let mut chunks: BTreeMap<u64, Option<ChunkHash>> = BTreeMap::new();
    if let Some(p) = &u.parent {
        for &(i, h) in p.hashed() {
            if i < count {
                chunks.insert(i, Some(h));
            }
        }
    }
    for (&i, b) in &u.blocks {
        chunks.insert(i, b.hash);
    }
    let hashed = chunks.values().filter(|h| h.is_some()).count() as u64;
    let header = ManifestHeader {
        id: id.clone(),
        volume: UNKNOWN_VOLUME.to_owned(),
        size: u.volume_size,
        chunk_size: BLOCK_SIZE,
        parent: u.parent.as_ref().map(|p| p.header.id.clone()),
        created_at: rfc3339(u.started),
        labels: BTreeMap::new(),
        changed_chunks: u.blocks.len() as u64,
        logical_bytes: hashed.saturating_mul(BLOCK_SIZE),
        uploaded_bytes: u.uploaded_bytes,
    };
    let mut m = Manifest::new(header);
    for (i, h) in chunks {
        if h.is_some() {
            m.push(i, h);
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_overlays_blocks_on_the_parent() {
        let h = |b: u8| ChunkHash([b; 32]);
        let mut pm = Manifest::new(ManifestHeader {
            id: SnapshotId::parse("snap-parent").unwrap(),
            volume: "v".into(),
            size: 4 * BLOCK_SIZE,
            chunk_size: BLOCK_SIZE,
            parent: None,
            created_at: String::new(),
            labels: BTreeMap::new(),
            changed_chunks: 0,
            logical_bytes: 0,
            uploaded_bytes: 0,
        });
        pm.push(0, Some(h(1)));
        pm.push(1, Some(h(2)));
        pm.push(3, Some(h(4)));
        let mut blocks = BTreeMap::new();
        blocks.insert(
            1,
            Block {
                hash: None,
                sha256: [0; 32],
            },
        );
        blocks.insert(
            2,
            Block {
                hash: Some(h(9)),
                sha256: [0; 32],
            },
        );
        let u = Upload {
            volume_size: 8 * BLOCK_SIZE,
            parent: Some(pm),
            description: String::new(),
            tags: BTreeMap::new(),
            started: 0,
            blocks,
            uploaded_bytes: 0,
        };
        let m = build_manifest(&SnapshotId::parse("snap-child").unwrap(), &u);
        assert_eq!(m.chunk_count(), 8);
        assert_eq!(m.get(0), Some(h(1)), "unchanged: the parent's");
        assert_eq!(m.get(1), None, "written zeros");
        assert_eq!(m.get(2), Some(h(9)), "written");
        assert_eq!(m.get(3), Some(h(4)));
        assert_eq!(m.get(7), None);
        assert_eq!(m.header.logical_bytes, 3 * BLOCK_SIZE);
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }
}
