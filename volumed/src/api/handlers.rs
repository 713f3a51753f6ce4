//! Routes and handlers. Handlers validate what they are given, call the
//! engine, and turn its answer into JSON; the engine holds every rule.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use volumed_api::{
    ApiError, AttachVolume, CreateSnapshot, CreateVolume, Detached, ErrorBody, ErrorCode, GcReport,
    GcRequest, ModifyVolume, Snapshot, SnapshotList, Status, VerifyReport, VolumeList, VolumeName,
};

use snapshot::SnapshotId;

use super::jobs;
use super::machines;
use super::views::{self, NbdEndpoints};
use crate::engine::snapshot_catalog::SnapshotInfo;
use crate::engine::{Engine, Volume};
use crate::error::Error;

#[derive(Clone)]
pub struct ApiState {
    pub engine: Arc<Engine>,
    /// Images, instances and snapshot sets.
    pub machines: Arc<crate::machines::Machines>,
    /// The facts of this run; live counts are filled in per request.
    pub status: Arc<Status>,
    pub endpoints: Arc<NbdEndpoints>,
}

impl ApiState {
    fn volume(&self, vol: &Volume) -> volumed_api::Volume {
        views::volume(&self.engine, &self.endpoints, vol)
    }

    pub(super) fn snapshot(&self, info: SnapshotInfo) -> Snapshot {
        views::snapshot(&self.engine, &self.endpoints, info)
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route(
            "/v1/volumes/{name}",
            get(get_volume).patch(modify_volume).delete(delete_volume),
        )
        .route("/v1/volumes/{name}/attach", post(attach_volume))
        .route("/v1/volumes/{name}/detach", post(detach_volume))
        .route("/v1/volumes/{name}/snapshots", post(create_snapshot))
        .route(
            "/v1/volumes/{name}/tags",
            post(tag_volume).delete(untag_volume),
        )
        .route("/v1/snapshots", get(list_snapshots))
        .route(
            "/v1/snapshots/{id}",
            get(get_snapshot).delete(delete_snapshot),
        )
        .route("/v1/snapshots/{id}/attach", post(attach_snapshot))
        .route("/v1/snapshots/{id}/detach", post(detach_snapshot))
        .route("/v1/snapshots/{id}/verify", post(verify_snapshot))
        .route("/v1/snapshots/{id}/diff", get(diff_snapshot))
        .route("/v1/snapshots/{id}/changed-blocks", get(changed_blocks))
        .route("/v1/gc", post(gc))
        .route(
            "/v1/images",
            get(machines::list_images).post(machines::register_image),
        )
        .route(
            "/v1/images/{id}",
            get(machines::get_image).delete(machines::deregister_image),
        )
        .route(
            "/v1/instances",
            get(machines::list_instances).post(machines::run_instances),
        )
        .route("/v1/instances/{id}", get(machines::get_instance))
        .route(
            "/v1/instances/{id}/{action}",
            post(machines::instance_action),
        )
        .route(
            "/v1/snapshot-sets",
            get(machines::list_snapshot_sets).post(machines::create_snapshot_set),
        )
        .route("/v1/snapshot-sets/{id}", get(machines::get_snapshot_set))
        .route("/v1/imports", post(jobs::import_file))
        .route("/v1/imports/stream", post(jobs::import_stream))
        .route("/v1/exports", post(jobs::export))
        .route("/v1/jobs", get(jobs::list_jobs))
        .route("/v1/jobs/{id}", get(jobs::get_job))
        .route("/v1/jobs/{id}/events", get(jobs::job_events))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel_job))
        .fallback(|| async { ApiFailure::new(ErrorCode::NotFound, "no such API resource") })
        .method_not_allowed_fallback(|| async {
            ApiFailure {
                status: StatusCode::METHOD_NOT_ALLOWED,
                code: ErrorCode::InvalidRequest,
                message: "method not allowed on this resource".into(),
            }
        })
        .with_state(state)
}

/// An error response.
pub struct ApiFailure {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiFailure {
    pub(super) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiFailure {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<Error> for ApiFailure {
    fn from(e: Error) -> Self {
        if e.code() == ErrorCode::Internal {
            tracing::error!(error = %e, "control API request failed");
        }
        ApiFailure::new(e.code(), e.to_string())
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

/// A CreateVolume body with optional `tags` (kept out of `CreateVolume`
/// itself, whose literal other code builds).
fn create_body(
    bytes: &Bytes,
) -> ApiResult<(CreateVolume, std::collections::BTreeMap<String, String>)> {
    let mut v: serde_json::Value = body(bytes, None)?;
    let tags = match v.as_object_mut().and_then(|o| o.remove("tags")) {
        Some(t) => serde_json::from_value(t).map_err(|e| {
            ApiFailure::new(
                ErrorCode::InvalidRequest,
                format!("invalid request body: tags: {e}"),
            )
        })?,
        None => Default::default(),
    };
    let req = serde_json::from_value(v).map_err(|e| {
        ApiFailure::new(
            ErrorCode::InvalidRequest,
            format!("invalid request body: {e}"),
        )
    })?;
    Ok((req, tags))
}

async fn tag_volume(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<volumed_api::Volume>> {
    let n = name(&raw)?;
    let req: volumed_api::TagVolume = body(&bytes, None)?;
    let vol = s.engine.tag_volume(&n, &req.tags, &[]).await?;
    Ok(Json(s.volume(&vol)))
}

async fn untag_volume(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<volumed_api::Volume>> {
    let n = name(&raw)?;
    let req: volumed_api::UntagVolume = body(&bytes, None)?;
    let remove: Vec<(String, Option<String>)> = req.keys.into_iter().map(|k| (k, None)).collect();
    let vol = s
        .engine
        .tag_volume(&n, &Default::default(), &remove)
        .await?;
    Ok(Json(s.volume(&vol)))
}

fn name(raw: &str) -> ApiResult<VolumeName> {
    VolumeName::parse(raw).map_err(|reason| {
        Error::InvalidName {
            name: raw.to_owned(),
            reason,
        }
        .into()
    })
}

/// A snapshot id from a path: a malformed one names no snapshot.
fn snapshot_id(raw: &str) -> ApiResult<SnapshotId> {
    SnapshotId::parse(raw).ok_or_else(|| Error::SnapshotNotFound(raw.to_owned()).into())
}

async fn status(State(s): State<ApiState>) -> Json<Status> {
    Json(views::status(&s.status, &s.engine))
}

async fn list_volumes(State(s): State<ApiState>) -> Json<VolumeList> {
    let volumes = s.engine.list().iter().map(|v| s.volume(v)).collect();
    Json(VolumeList { volumes })
}

async fn create_volume(State(s): State<ApiState>, bytes: Bytes) -> ApiResult<impl IntoResponse> {
    let (req, tags) = create_body(&bytes)?;
    let attrs = crate::engine::aws_attrs::VolumeAttrs {
        tags,
        ..Default::default()
    };
    let vol = s.engine.create_with(req, attrs, None).await?;
    Ok((StatusCode::CREATED, Json(s.volume(&vol))))
}

async fn get_volume(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
) -> ApiResult<Json<volumed_api::Volume>> {
    let vol = s.engine.get(&name(&raw)?)?;
    Ok(Json(s.volume(&vol)))
}

async fn modify_volume(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<volumed_api::Volume>> {
    let n = name(&raw)?;
    let req: ModifyVolume = body(&bytes, None)?;
    let vol = s.engine.modify(&n, req).await?;
    Ok(Json(s.volume(&vol)))
}

async fn delete_volume(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
) -> ApiResult<StatusCode> {
    s.engine.delete(&name(&raw)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn attach_volume(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<volumed_api::Volume>> {
    let n = name(&raw)?;
    let req: AttachVolume = body(&bytes, Some(AttachVolume::default()))?;
    let vol = s.engine.attach(&n, req).await?;
    Ok(Json(s.volume(&vol)))
}

async fn detach_volume(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
) -> ApiResult<Json<Detached>> {
    let (vol, deleted) = s.engine.detach(&name(&raw)?).await?;
    Ok(Json(Detached {
        volume: s.volume(&vol),
        deleted,
    }))
}

async fn create_snapshot(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    let n = name(&raw)?;
    let req: CreateSnapshot = body(&bytes, Some(CreateSnapshot::default()))?;
    let rec = s.engine.create_snapshot(&n, req).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(s.snapshot(s.engine.snapshot(&rec.id).await?)),
    ))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotQuery {
    volume: Option<String>,
}

async fn list_snapshots(
    State(s): State<ApiState>,
    query: Result<Query<SnapshotQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<SnapshotList>> {
    let Query(q) = query.map_err(|e| ApiFailure::new(ErrorCode::InvalidRequest, e.body_text()))?;
    if let Some(v) = &q.volume {
        name(v)?;
    }
    Ok(Json(SnapshotList {
        snapshots: s
            .engine
            .snapshots(q.volume.as_deref())
            .await?
            .into_iter()
            .map(|info| s.snapshot(info))
            .collect(),
    }))
}

async fn get_snapshot(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Snapshot>> {
    let id = snapshot_id(&id)?;
    Ok(Json(s.snapshot(s.engine.snapshot(&id).await?)))
}

async fn attach_snapshot(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Snapshot>> {
    let id = snapshot_id(&id)?;
    Ok(Json(s.snapshot(s.engine.attach_snapshot(&id).await?)))
}

async fn detach_snapshot(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Snapshot>> {
    let id = snapshot_id(&id)?;
    Ok(Json(s.snapshot(s.engine.detach_snapshot(&id).await?)))
}

async fn delete_snapshot(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    // A snapshot a registered image uses is refused, as on EC2.
    s.machines.delete_snapshot(&snapshot_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn verify_snapshot(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<VerifyReport>> {
    let report = s.engine.verify_snapshot(&snapshot_id(&id)?).await?;
    Ok(Json(views::verify_report(report)))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffQuery {
    from: Option<String>,
}

async fn diff_snapshot(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<DiffQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<volumed_api::SnapshotDiff>> {
    let Query(q) = query.map_err(|e| ApiFailure::new(ErrorCode::InvalidRequest, e.body_text()))?;
    let to = snapshot_id(&id)?;
    let from = q.from.as_deref().map(snapshot_id).transpose()?;
    let d = s.engine.diff_snapshots(from.as_ref(), &to).await?;
    Ok(Json(views::snapshot_diff(d)))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangedBlocksQuery {
    from: Option<String>,
    starting_offset: Option<u64>,
    max_results: Option<usize>,
    next_token: Option<String>,
}

/// Paged changed blocks with CSI SnapshotMetadata's names; `next_token`,
/// when given, wins over `starting_offset`.
async fn changed_blocks(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<ChangedBlocksQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<volumed_api::ChangedBlocks>> {
    let Query(q) = query.map_err(|e| ApiFailure::new(ErrorCode::InvalidRequest, e.body_text()))?;
    let max = q.max_results.unwrap_or(views::CHANGED_BLOCKS_PAGE);
    if max == 0 || max > views::CHANGED_BLOCKS_MAX_PAGE {
        return Err(ApiFailure::new(
            ErrorCode::InvalidRequest,
            format!(
                "max_results must be 1 to {}",
                views::CHANGED_BLOCKS_MAX_PAGE
            ),
        ));
    }
    let start = match &q.next_token {
        Some(t) => t.parse::<u64>().map_err(|_| {
            ApiFailure::new(
                ErrorCode::InvalidRequest,
                format!("invalid next_token {t:?}"),
            )
        })?,
        None => q.starting_offset.unwrap_or(0),
    };
    let to = snapshot_id(&id)?;
    let from = q.from.as_deref().map(snapshot_id).transpose()?;
    let d = s.engine.diff_snapshots(from.as_ref(), &to).await?;
    Ok(Json(views::changed_blocks(&d, start, max)))
}

async fn gc(State(s): State<ApiState>, bytes: Bytes) -> ApiResult<Json<GcReport>> {
    let req: GcRequest = body(&bytes, Some(GcRequest::default()))?;
    let grace = req.grace_secs.map(std::time::Duration::from_secs);
    let (grace, report) = s.engine.gc(grace).await?;
    Ok(Json(views::gc_report(grace, report)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every request body the API parses, from the same bytes.
    fn parse_all(b: &Bytes) {
        let _ = body::<CreateVolume>(b, None);
        let _ = create_body(b);
        let _ = body::<volumed_api::TagVolume>(b, None);
        let _ = body::<volumed_api::UntagVolume>(b, None);
        let _ = body::<ModifyVolume>(b, None);
        let _ = body::<AttachVolume>(b, Some(AttachVolume::default()));
        let _ = body::<CreateSnapshot>(b, Some(CreateSnapshot::default()));
        let _ = body::<GcRequest>(b, Some(GcRequest::default()));
        let _ = body::<volumed_api::ImportRequest>(b, None);
        let _ = body::<volumed_api::ExportRequest>(b, None);
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            parse_all(&Bytes::from(data));
        }

        /// JSON-shaped bodies with the API's field names and hostile values
        /// get deep into the deserializers.
        #[test]
        fn json_shaped_bodies_never_panic(
            s in r#"\{("(name|size|ephemeral|from_snapshot|chunk_size|hydrate|labels|grace_secs|instance|x)":(-?[0-9]{1,25}(\.[0-9]+)?|"[^"\\]{0,40}"|true|false|null|\{\}|\[\]|\{"[a-z]{1,3}":"[^"\\]{0,5}"\}),?){0,7}\}"#
        ) {
            parse_all(&Bytes::from(s));
        }
    }

    #[test]
    fn hostile_bodies_are_refused() {
        for bad in [
            r#"{"name":"a","size":18446744073709551616}"#.to_owned(),
            r#"{"name":"a","size":-1}"#.to_owned(),
            r#"{"name":"../etc","size":1}"#.to_owned(),
            r#"{"name":"a","size":1,"extra":true}"#.to_owned(),
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
            format!(r#"{{"name":"{}","size":512}}"#, "a".repeat(1 << 20)),
        ] {
            let r = body::<CreateVolume>(&Bytes::from(bad.clone()), None);
            assert!(r.is_err(), "{}", &bad[..bad.len().min(60)]);
        }
        let r = body::<GcRequest>(&Bytes::from(r#"{"grace_secs":-5}"#), None);
        assert!(r.is_err());
    }
}
