//! Handlers of volumes, snapshots, status and gc. Each validates what it
//! is given, calls the engine, and turns its answer into JSON through
//! `present::views`; the engine holds every rule.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use snapshot::SnapshotId;
use volumed_api::{
    AttachVolume, CreateSnapshot, CreateVolume, Detached, ErrorCode, GcReport, GcRequest,
    ModifyVolume, Snapshot, SnapshotList, Status, VerifyReport, VolumeList, VolumeName,
};

use super::state::{ApiFailure, ApiResult, ApiState, body};
use crate::engine::{Error, VolumeOptions};
use crate::present::views;

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

pub(super) async fn tag_volume(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<volumed_api::Volume>> {
    let n = name(&raw)?;
    let req: volumed_api::TagVolume = body(&bytes, None)?;
    let vol = s.engine.tag_volume(&n, &req.tags, &[]).await?;
    Ok(Json(s.volume(&vol)))
}

pub(super) async fn untag_volume(
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
pub(super) fn snapshot_id(raw: &str) -> ApiResult<SnapshotId> {
    Ok(Error::snapshot_id(raw)?)
}

pub(super) async fn status(State(s): State<ApiState>) -> Json<Status> {
    let mut st = views::status(&s.status, &s.engine);
    st.failing_policies = s.lifecycle.failing_policies();
    Json(st)
}

pub(super) async fn list_volumes(State(s): State<ApiState>) -> Json<VolumeList> {
    let volumes = s.engine.list().iter().map(|v| s.volume(v)).collect();
    Json(VolumeList { volumes })
}

pub(super) async fn create_volume(
    State(s): State<ApiState>,
    bytes: Bytes,
) -> ApiResult<impl IntoResponse> {
    let (req, tags) = create_body(&bytes)?;
    let opts = VolumeOptions {
        tags,
        ..Default::default()
    };
    let vol = s.engine.create_with(req, opts).await?;
    Ok((StatusCode::CREATED, Json(s.volume(&vol))))
}

pub(super) async fn get_volume(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
) -> ApiResult<Json<volumed_api::Volume>> {
    let vol = s.engine.get(&name(&raw)?)?;
    Ok(Json(s.volume(&vol)))
}

pub(super) async fn modify_volume(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<volumed_api::Volume>> {
    let n = name(&raw)?;
    let req: ModifyVolume = body(&bytes, None)?;
    let vol = s.engine.modify(&n, req).await?;
    Ok(Json(s.volume(&vol)))
}

pub(super) async fn delete_volume(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
) -> ApiResult<StatusCode> {
    s.engine.delete(&name(&raw)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn attach_volume(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<volumed_api::Volume>> {
    let n = name(&raw)?;
    let req: AttachVolume = body(&bytes, Some(AttachVolume::default()))?;
    let vol = s.engine.attach(&n, req).await?;
    Ok(Json(s.volume(&vol)))
}

pub(super) async fn detach_volume(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
) -> ApiResult<Json<Detached>> {
    let (vol, deleted) = s.engine.detach(&name(&raw)?).await?;
    Ok(Json(Detached {
        volume: s.volume(&vol),
        deleted,
    }))
}

pub(super) async fn create_snapshot(
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
pub(super) struct SnapshotQuery {
    volume: Option<String>,
}

pub(super) async fn list_snapshots(
    State(s): State<ApiState>,
    query: Result<Query<SnapshotQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<SnapshotList>> {
    let Query(q) = query.map_err(|e| ApiFailure::new(ErrorCode::InvalidRequest, e.body_text()))?;
    if let Some(v) = &q.volume {
        name(v)?;
    }
    // The store answers which snapshots are protected; while it cannot,
    // the list still comes from this host's records, protection unknown
    // (deletes keep refusing: they ask the store themselves).
    let (protected, warning) = match s.engine.protected_snapshots().await {
        Ok(p) => (Some(p), None),
        Err(e) => {
            let why = volumed_api::error_chain(&e);
            tracing::warn!(error = %why, "snapshot protection unknown; listing without it");
            (
                None,
                Some(format!(
                    "snapshot protection unknown, the store did not answer: {why}"
                )),
            )
        }
    };
    let snapshots = s
        .engine
        .snapshots(q.volume.as_deref())
        .await?
        .into_iter()
        .map(|info| {
            let completed = info.completed();
            let p = protected.as_ref().map(|p| p.contains(info.id()));
            Snapshot {
                protected: p.unwrap_or(false),
                protection_unknown: completed && p.is_none(),
                ..s.snapshot(info)
            }
        })
        .collect();
    Ok(Json(SnapshotList { snapshots, warning }))
}

pub(super) async fn get_snapshot(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Snapshot>> {
    let id = snapshot_id(&id)?;
    let info = s.engine.snapshot(&id).await?;
    // Only a completed snapshot can be protected: a pending or failed one
    // answers from its record alone, also while the store is down; a
    // completed one answers with its protection unknown then.
    let (protected, unknown) = if info.completed() {
        match s.engine.snapshot_protected(&id).await {
            Ok(p) => (p, false),
            Err(e) => {
                tracing::warn!(snapshot = %id, error = %volumed_api::error_chain(&e), "snapshot protection unknown");
                (false, true)
            }
        }
    } else {
        (false, false)
    };
    Ok(Json(Snapshot {
        protected,
        protection_unknown: unknown,
        ..s.snapshot(info)
    }))
}

pub(super) async fn attach_snapshot(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Snapshot>> {
    let id = snapshot_id(&id)?;
    Ok(Json(s.snapshot(s.engine.attach_snapshot(&id).await?)))
}

pub(super) async fn detach_snapshot(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Snapshot>> {
    let id = snapshot_id(&id)?;
    Ok(Json(s.snapshot(s.engine.detach_snapshot(&id).await?)))
}

pub(super) async fn delete_snapshot(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    // Into the recycle bin if a rule keeps it; refused while a registered
    // image uses it, as on EC2.
    s.lifecycle.delete_snapshot(&snapshot_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn verify_snapshot(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<VerifyReport>> {
    let report = s.engine.verify_snapshot(&snapshot_id(&id)?).await?;
    Ok(Json(views::verify_report(report)))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DiffQuery {
    from: Option<String>,
}

pub(super) async fn diff_snapshot(
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
pub(super) struct ChangedBlocksQuery {
    from: Option<String>,
    starting_offset: Option<u64>,
    max_results: Option<usize>,
    next_token: Option<String>,
}

/// Paged changed blocks with CSI SnapshotMetadata's names; `next_token`,
/// when given, wins over `starting_offset`.
pub(super) async fn changed_blocks(
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

pub(super) async fn gc(State(s): State<ApiState>, bytes: Bytes) -> ApiResult<Json<GcReport>> {
    let req: GcRequest = body(&bytes, Some(GcRequest::default()))?;
    let grace = req.grace_secs.map(std::time::Duration::from_secs);
    // Images past their retention in the recycle bin go first, so the
    // chunks of the snapshots they alone used go in this same run.
    let (grace, report, images) = s.lifecycle.collect(grace).await?;
    Ok(Json(volumed_api::GcReport {
        images_expired: images.images,
        image_snapshots_deleted: images.snapshots,
        ..views::gc_report(grace, report)
    }))
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
