//! The write side of the EBS direct APIs: StartSnapshot, PutSnapshotBlock,
//! CompleteSnapshot. This front-end parses and checks requests and keeps
//! the ClientTokens it has seen; the upload itself is the engine's block
//! upload job (`engine::jobs::block_upload`), under the same commit
//! protocol as every other snapshot: its marker kept fresh, its record in
//! the catalog from the start, its manifest the commit point.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use snapshot::SnapshotId;
use tracing::info;

use super::{BLOCK_SIZE, EbsError, EbsResult, checksum, epoch_seconds, json_response};
use crate::aws::ec2::snapshots::UNKNOWN_VOLUME;
use crate::aws::{AwsState, OWNER_ID, Request, Response};
use crate::catalog::AwsSnapshotRecord;
use crate::engine::Error;
use crate::engine::UploadSpec;

/// EBS's largest volume, in GiB.
const MAX_VOLUME_GIB: u64 = 64 << 10;
/// StartSnapshot's `Timeout` when none is given, in minutes (AWS's).
const DEFAULT_TIMEOUT_MINUTES: u64 = 60;
/// The longest `Timeout` AWS accepts, in minutes.
const MAX_TIMEOUT_MINUTES: u64 = 4320;

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
    /// Minutes without a block or a completion before the upload ends
    /// `error`.
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

/// The ClientTokens seen: a retry with the same token and request gets the
/// same snapshot while it is pending.
#[derive(Default)]
pub struct Tokens {
    /// token -> (snapshot, the request's fingerprint, the first answer).
    seen: Mutex<HashMap<String, (SnapshotId, String, serde_json::Value)>>,
}

impl Tokens {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (SnapshotId, String, serde_json::Value)>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
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
    // A child is sealed as its parent is: naming a key with a parent is
    // refused, as on AWS.
    if r.parent_snapshot_id.is_some() && (r.encrypted.is_some() || r.kms_key_arn.is_some()) {
        return Err(EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            "Encrypted and KmsKeyArn cannot be given with ParentSnapshotId",
        ));
    }
    if r.kms_key_arn.is_some() && r.encrypted != Some(true) {
        return Err(EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            "KmsKeyArn requires Encrypted to be true",
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
    let timeout = r.timeout.unwrap_or(DEFAULT_TIMEOUT_MINUTES);
    if !(10..=MAX_TIMEOUT_MINUTES).contains(&timeout) {
        return Err(EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            format!("Timeout {timeout} must be 10 to {MAX_TIMEOUT_MINUTES} minutes"),
        ));
    }
    let fingerprint = format!(
        "{}|{:?}|{:?}|{description}|{:?}|{:?}|{:?}",
        r.volume_size, r.parent_snapshot_id, tags, r.timeout, r.encrypted, r.kms_key_arn
    );
    if let Some(token) = &r.client_token {
        let seen = state.ebs_tokens.lock().get(token).cloned();
        if let Some((id, fp, body)) = seen {
            if fp != fingerprint {
                return Err(EbsError::conflict(format!(
                    "ClientToken {token} was used for snapshot {id} with other parameters"
                )));
            }
            if state.engine.is_uploading(&id) {
                return Ok(json_response(201, &body));
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
            // Checked here for the answers EBS gives; the engine checks
            // again, after announcing the snapshot, that it still exists.
            let h = state
                .engine
                .snapshot_header(&id)
                .await
                .map_err(|e| parent_error(e, p))?;
            if h.chunk_size != BLOCK_SIZE {
                return Err(EbsError::validation(
                    "INVALID_PARAMETER_VALUE",
                    format!(
                        "parent snapshot {p} has {} byte chunks, not 524288",
                        h.chunk_size
                    ),
                ));
            }
            if h.size > volume_size {
                return Err(EbsError::validation(
                    "INVALID_VOLUME_SIZE",
                    format!("VolumeSize is smaller than parent snapshot {p}"),
                ));
            }
            Some(id)
        }
        None => None,
    };
    let spec = UploadSpec {
        volume: UNKNOWN_VOLUME.to_owned(),
        size: volume_size,
        chunk_size: BLOCK_SIZE,
        parent,
        labels: BTreeMap::new(),
        timeout: Duration::from_secs(timeout * 60),
        encryption: match &r.parent_snapshot_id {
            // The parent's, read again by the engine once announced.
            Some(_) => None,
            None => state
                .engine
                .new_encryption(r.encrypted, r.kms_key_arn.as_deref())
                .await
                .map_err(|e| EbsError::validation("INVALID_PARAMETER_VALUE", e.to_string()))?,
        },
    };
    let parent_name = r.parent_snapshot_id.clone().unwrap_or_default();
    let rec = state
        .engine
        .start_block_upload(spec)
        .await
        .map_err(|e| parent_error(e, &parent_name))?;
    let meta = AwsSnapshotRecord {
        volume_id: None,
        description: description.clone(),
        tags: tags.clone(),
    };
    state.attrs.put_snapshot(&rec.id, &meta).await?;
    let tag_list: Vec<serde_json::Value> = tags
        .iter()
        .map(|(k, v)| serde_json::json!({ "Key": k, "Value": v }))
        .collect();
    let mut body = serde_json::json!({
        "SnapshotId": rec.id.as_str(),
        "OwnerId": OWNER_ID,
        "Status": "pending",
        "StartTime": epoch_seconds(rec.created_at),
        "VolumeSize": r.volume_size,
        "BlockSize": BLOCK_SIZE,
        "Description": description,
        "Tags": tag_list,
    });
    if let Some(p) = &rec.parent {
        body["ParentSnapshotId"] = p.as_str().into();
    }
    if let (Some(enc), Ok(keys)) = (&rec.encryption, state.engine.keys()) {
        body["KmsKeyArn"] = keys.arn(&enc.key).into();
    }
    if let Some(token) = &r.client_token {
        state
            .ebs_tokens
            .lock()
            .insert(token.clone(), (rec.id.clone(), fingerprint, body.clone()));
    }
    info!(snapshot = %rec.id, size = volume_size, "EBS direct snapshot started");
    Ok(json_response(201, &body))
}

/// A missing parent is EBS's DEPENDENCY_RESOURCE_NOT_FOUND.
fn parent_error(e: Error, parent: &str) -> EbsError {
    match e {
        Error::SnapshotNotFound(_) => EbsError {
            kind: "ResourceNotFoundException",
            status: 404,
            reason: Some("DEPENDENCY_RESOURCE_NOT_FOUND"),
            message: format!("The parent snapshot '{parent}' does not exist."),
        },
        other => other.into(),
    }
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

/// A snapshot not being uploaded here, as EBS answers for one that is not
/// pending (it may exist, completed or failed).
fn not_pending(id: &SnapshotId) -> EbsError {
    EbsError::not_found(id.as_str())
}

/// The engine's refusals in the EBS shapes.
fn upload_error(e: Error, id: &SnapshotId) -> EbsError {
    match e {
        Error::SnapshotNotUploading(_) => not_pending(id),
        Error::InvalidRequest(m) => EbsError::validation("INVALID_BLOCK", m),
        Error::SnapshotBusy(_) => EbsError::conflict(format!(
            "snapshot {id} is being completed by another request"
        )),
        other => other.into(),
    }
}

pub async fn put_block(
    state: &AwsState,
    req: &Request,
    id: &SnapshotId,
    index: u64,
) -> EbsResult<Response> {
    let Some(blocks) = state.engine.upload_chunk_count(id) else {
        return Err(not_pending(id));
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
    state
        .engine
        .put_upload_block(id, index, req.body.to_vec(), sha256)
        .await
        .map_err(|e| upload_error(e, id))?;
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
    state
        .engine
        .complete_block_upload(id, |blocks| {
            let written = blocks.len() as u64;
            if count != written {
                return Err(Error::InvalidRequest(format!(
                    "x-amz-ChangedBlocksCount is {count} but {written} blocks were written"
                )));
            }
            if let Some(want) = &aggregate {
                let mut all = Vec::with_capacity(blocks.len() * 32);
                for b in blocks.values() {
                    all.extend_from_slice(&b.checksum);
                }
                if &checksum(&all) != want {
                    return Err(Error::InvalidRequest(format!(
                        "the aggregate checksum {want} does not match the blocks written"
                    )));
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| match e {
            Error::InvalidRequest(m) => EbsError::validation("INVALID_PARAMETER_VALUE", m),
            e => upload_error(e, id),
        })?;
    info!(snapshot = %id, blocks = count, "EBS direct snapshot completed");
    Ok(json_response(
        202,
        &serde_json::json!({ "Status": "completed" }),
    ))
}
