//! What every handler shares: the state (`ApiState`), the error answer
//! (`ApiFailure`, `{"error": {"code", "message"}}` with its code's status)
//! and the one parser of JSON bodies.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use volumed_api::{ApiError, ErrorBody, ErrorCode, Snapshot, Status};

use crate::catalog::Catalog;
use crate::engine::{Engine, SnapshotInfo, Volume};
use crate::images::Images;
use crate::lifecycle::Lifecycle;
use crate::present::views;
use crate::present::{NbdEndpoints, failure};

#[derive(Clone)]
pub struct ApiState {
    pub engine: Arc<Engine>,
    /// Images, instances and snapshot sets.
    pub machines: Arc<crate::machines::Machines>,
    pub images: Arc<Images>,
    /// Read for the EC2 attributes the views show (the AWS endpoint writes
    /// them).
    pub catalog: Arc<Catalog>,
    /// The facts of this run; live counts are filled in per request.
    pub status: Arc<Status>,
    pub endpoints: Arc<NbdEndpoints>,
    /// Snapshot policies, prune and the recycle bin; every snapshot
    /// deletion goes through it.
    pub lifecycle: Arc<Lifecycle>,
}

impl ApiState {
    pub(super) fn volume(&self, vol: &Volume) -> volumed_api::Volume {
        views::volume(&self.engine, &self.catalog, &self.endpoints, vol)
    }

    pub(super) fn snapshot(&self, info: SnapshotInfo) -> Snapshot {
        views::snapshot(&self.engine, &self.endpoints, info)
    }
}

/// An error response.
pub struct ApiFailure {
    pub(super) status: StatusCode,
    pub(super) code: ErrorCode,
    pub(super) message: String,
}

impl ApiFailure {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiFailure {
            status,
            code,
            message: message.into(),
        }
    }
}

impl ApiFailure {
    /// The answer to `e`: its code from `present::failure`, its chain as
    /// the message. Internal errors are logged.
    pub(super) fn of(e: &(dyn std::error::Error + 'static)) -> Self {
        let code = failure::api_code(e);
        let message = volumed_api::error_chain(e);
        if code == ErrorCode::Internal {
            tracing::error!(error = %message, "control API request failed");
        }
        ApiFailure::new(code, message)
    }
}

impl From<crate::engine::Error> for ApiFailure {
    fn from(e: crate::engine::Error) -> Self {
        ApiFailure::of(&e)
    }
}

impl From<crate::images::Error> for ApiFailure {
    fn from(e: crate::images::Error) -> Self {
        ApiFailure::of(&e)
    }
}

impl From<crate::lifecycle::LifecycleError> for ApiFailure {
    fn from(e: crate::lifecycle::LifecycleError) -> Self {
        ApiFailure::of(&e)
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ApiError {
                code: self.code,
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

pub(super) type ApiResult<T> = Result<T, ApiFailure>;

/// Parses a JSON body; an empty body means the type's default when
/// `default` is given (so `curl -X POST .../attach` works).
pub(super) fn body<T: DeserializeOwned>(bytes: &Bytes, default: Option<T>) -> ApiResult<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return default.ok_or_else(|| {
            ApiFailure::new(
                ErrorCode::InvalidRequest,
                "request body is empty; JSON expected",
            )
        });
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ApiFailure::new(
            ErrorCode::InvalidRequest,
            format!("invalid request body: {e}"),
        )
    })
}
