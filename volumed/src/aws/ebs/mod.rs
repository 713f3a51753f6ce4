//! The EBS direct APIs: REST/JSON under `/snapshots`, signed for `ebs`.
//! Blocks are 512 KiB and map one to one onto the chunks of snapshots with
//! the default chunk size; snapshots with other chunk sizes are refused.
//!
//! | method | path | action |
//! | --- | --- | --- |
//! | POST | /snapshots | StartSnapshot |
//! | PUT | /snapshots/{id}/blocks/{index} | PutSnapshotBlock |
//! | POST | /snapshots/completion/{id} | CompleteSnapshot |
//! | GET | /snapshots/{id}/blocks | ListSnapshotBlocks |
//! | GET | /snapshots/{id}/blocks/{index}?blockToken= | GetSnapshotBlock |
//! | GET | /snapshots/{id}/changedblocks | ListChangedBlocks |
//!
//! Errors are what the EBS API returns: the type in `x-amzn-ErrorType`,
//! `{"Message", "Reason"}` in the body.

pub mod read;
pub mod states;
pub mod write;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Method;
use snapshot::SnapshotId;

use super::sigv4::AuthError;
use super::{AwsState, Refusal, Request, Response};
use crate::catalog::CatalogError;
use crate::engine::Error;

/// The block size of the EBS direct APIs.
pub const BLOCK_SIZE: u64 = 512 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbsError {
    pub kind: &'static str,
    pub status: u16,
    pub reason: Option<&'static str>,
    pub message: String,
}

impl EbsError {
    pub fn validation(reason: &'static str, message: impl Into<String>) -> Self {
        EbsError {
            kind: "ValidationException",
            status: 400,
            reason: Some(reason),
            message: message.into(),
        }
    }

    pub fn not_found(id: &str) -> Self {
        EbsError {
            kind: "ResourceNotFoundException",
            status: 404,
            reason: Some("SNAPSHOT_NOT_FOUND"),
            message: format!("The snapshot '{id}' does not exist."),
        }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        EbsError {
            kind: "ConflictException",
            status: 409,
            reason: None,
            message: message.into(),
        }
    }

    fn auth(kind: &'static str, message: impl Into<String>) -> Self {
        EbsError {
            kind,
            status: 403,
            reason: None,
            message: message.into(),
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        EbsError {
            kind: "InternalServerException",
            status: 500,
            reason: None,
            message: message.into(),
        }
    }
}

impl From<Error> for EbsError {
    fn from(e: Error) -> Self {
        let msg = volumed_api::error_chain(&e);
        match &e {
            Error::SnapshotNotFound(id) => EbsError::not_found(id.as_str()),
            Error::NoSuchSnapshotId(id) => EbsError::not_found(id),
            Error::InvalidRequest(_) | Error::InvalidSize(_) => {
                EbsError::validation("INVALID_PARAMETER_VALUE", msg)
            }
            Error::Store { .. } | Error::ShuttingDown => EbsError {
                kind: "InternalServerException",
                status: 503,
                reason: None,
                message: msg,
            },
            _ => {
                tracing::error!(error = %msg, "EBS request failed");
                EbsError::internal(msg)
            }
        }
    }
}

/// The endpoint's own records failing: internal.
impl From<CatalogError> for EbsError {
    fn from(e: CatalogError) -> Self {
        EbsError::from(Error::from(e))
    }
}

pub type EbsResult<T> = Result<T, EbsError>;

/// Routes one authenticated request.
pub async fn handle(state: &AwsState, req: Request) -> Response {
    let rid = req.request_id.clone();
    match dispatch(state, &req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(request_id = rid, kind = e.kind, message = %e.message, "EBS request failed");
            error_response(&e, &rid)
        }
    }
}

async fn dispatch(state: &AwsState, req: &Request) -> EbsResult<Response> {
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let q = Query::parse(&req.query)?;
    match (&req.method, segs.as_slice()) {
        (&Method::POST, ["snapshots"]) => write::start(state, req).await,
        (&Method::PUT, ["snapshots", id, "blocks", index]) => {
            let id = snapshot_id(id)?;
            match write::put_block(state, req, &id, block_index(index)?).await {
                Err(e) => Err(states::refine_write(state, &id, e).await),
                done => done,
            }
        }
        (&Method::POST, ["snapshots", "completion", id]) => {
            let id = snapshot_id(id)?;
            match write::complete(state, req, &id).await {
                Err(e) => Err(states::refine_write(state, &id, e).await),
                done => done,
            }
        }
        (&Method::GET, ["snapshots", id, "blocks"]) => {
            read::list_blocks(state, &snapshot_id(id)?, &q).await
        }
        (&Method::GET, ["snapshots", id, "blocks", index]) => {
            read::get_block(state, &snapshot_id(id)?, block_index(index)?, &q).await
        }
        (&Method::GET, ["snapshots", id, "changedblocks"]) => {
            read::list_changed(state, &snapshot_id(id)?, &q).await
        }
        (m, _) => Err(EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            format!("no EBS direct API at {m} {}", req.path),
        )),
    }
}

pub fn snapshot_id(s: &str) -> EbsResult<SnapshotId> {
    SnapshotId::parse(s).ok_or_else(|| {
        EbsError::validation("INVALID_SNAPSHOT_ID", format!("invalid snapshot id {s:?}"))
    })
}

fn block_index(s: &str) -> EbsResult<u64> {
    s.parse::<u64>()
        .ok()
        .filter(|i| *i <= i32::MAX as u64)
        .ok_or_else(|| {
            EbsError::validation(
                "INVALID_BLOCK",
                format!("block index {s:?} is not a whole number from 0 to 2147483647"),
            )
        })
}

/// The query parameters the read APIs take.
#[derive(Debug, Default)]
pub struct Query {
    pub pairs: Vec<(String, String)>,
}

impl Query {
    fn parse(q: &str) -> EbsResult<Self> {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes())
            .filter(|(k, _)| !k.starts_with("X-Amz-"))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if pairs.len() > 16 {
            return Err(EbsError::validation(
                "INVALID_PARAMETER_VALUE",
                "too many query parameters",
            ));
        }
        Ok(Query { pairs })
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    /// Refuses parameters other than `known`.
    pub fn only(&self, known: &[&str]) -> EbsResult<()> {
        match self
            .pairs
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            Some((k, _)) => Err(EbsError::validation(
                "INVALID_PARAMETER_VALUE",
                format!("unknown query parameter {k}"),
            )),
            None => Ok(()),
        }
    }

    /// A whole number within `min..=max`, or `default`.
    pub fn number(&self, k: &str, min: u64, max: u64, default: u64) -> EbsResult<u64> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| {
                    EbsError::validation(
                        "INVALID_PARAMETER_VALUE",
                        format!("{k} must be a whole number from {min} to {max}"),
                    )
                }),
        }
    }
}

pub fn json_response(status: u16, body: &serde_json::Value) -> Response {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a static status and header always build")
}

pub fn error_response(e: &EbsError, request_id: &str) -> Response {
    let mut body = serde_json::json!({ "Message": e.message, "message": e.message });
    if let Some(r) = e.reason {
        body["Reason"] = r.into();
    }
    hyper::Response::builder()
        .status(e.status)
        .header("content-type", "application/json")
        .header("x-amzn-errortype", e.kind)
        .header("x-amzn-requestid", request_id)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a static status and header always build")
}

/// An unauthenticated or oversized request, as a JSON service answers it.
pub fn refusal(request_id: &str, why: Refusal) -> Response {
    let e = match why {
        Refusal::TooLarge => EbsError::validation(
            "INVALID_PARAMETER_VALUE",
            "request body is too large or too slow",
        ),
        Refusal::Auth(a) => match a {
            AuthError::Missing => EbsError::auth(
                "MissingAuthenticationTokenException",
                "Missing Authentication Token",
            ),
            AuthError::UnknownKey(_) => EbsError::auth(
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            ),
            AuthError::Malformed(m) => EbsError::auth("IncompleteSignatureException", m),
            AuthError::Expired(m) => EbsError::auth(
                "InvalidSignatureException",
                format!("Signature expired: {m}"),
            ),
            e @ (AuthError::Scope(_) | AuthError::Mismatch | AuthError::PayloadHash) => {
                EbsError::auth("InvalidSignatureException", e.to_string())
            }
        },
    };
    error_response(&e, request_id)
}

/// Base64 of SHA-256, as the `x-amz-Checksum` headers carry it.
pub fn checksum(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// Seconds since the epoch as the JSON protocol writes timestamps.
pub fn epoch_seconds(t: u64) -> serde_json::Value {
    serde_json::Value::from(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_indices_and_ids_are_checked() {
        assert_eq!(block_index("0"), Ok(0));
        assert_eq!(block_index("2147483647"), Ok(i32::MAX as u64));
        for bad in [
            "",
            "-1",
            "1.5",
            "0x10",
            "2147483648",
            "18446744073709551616",
            " 1",
        ] {
            let e = block_index(bad).unwrap_err();
            assert_eq!(
                (e.kind, e.reason),
                ("ValidationException", Some("INVALID_BLOCK")),
                "{bad:?}"
            );
        }
        assert!(snapshot_id("snap-0123").is_ok());
        assert!(snapshot_id("snap-../x").is_err());
        let q = Query::parse("maxResults=50&X-Amz-Date=1").unwrap();
        assert!(q.number("maxResults", 100, 10_000, 10_000).is_err());
        assert!(q.only(&["maxResults"]).is_ok());
        assert!(q.only(&[]).is_err());
    }
}
