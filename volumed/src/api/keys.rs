//! Handlers of the key service (`vol key`) and of snapshot copies: the key
//! list, create, one key, rotate, enable, disable, the default key, and
//! `POST /v1/snapshots/{id}/copy`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use volumed_api::{CopySnapshot, CreateKey, Key, KeyList, KeyRotation, SetDefaultKey, Snapshot};

use super::handlers::snapshot_id;
use super::state::{ApiResult, ApiState, body};
use crate::present::views;

pub async fn list_keys(State(s): State<ApiState>) -> ApiResult<Json<KeyList>> {
    let keys = s.engine.keys()?.list();
    Ok(Json(KeyList {
        keys: keys.into_iter().map(views::key).collect(),
        store_encrypted: s.engine.store_encrypted(),
    }))
}

pub async fn create_key(
    State(s): State<ApiState>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Key>)> {
    let req: CreateKey = body(&bytes, None)?;
    let k = s
        .engine
        .keys()?
        .create(&req.name, &req.description, req.command.as_deref())
        .await
        .map_err(crate::engine::Error::from)?;
    Ok((StatusCode::CREATED, Json(views::key(k))))
}

pub async fn get_key(State(s): State<ApiState>, Path(r): Path<String>) -> ApiResult<Json<Key>> {
    let k = s
        .engine
        .keys()?
        .resolve(&r)
        .map_err(crate::engine::Error::from)?;
    Ok(Json(views::key(k)))
}

pub async fn rotate_key(
    State(s): State<ApiState>,
    Path(r): Path<String>,
) -> ApiResult<Json<KeyRotation>> {
    let (k, report) = s.engine.rotate_key(&r).await?;
    Ok(Json(KeyRotation {
        key: views::key(k),
        domains: report.domains,
        rewrapped: report.rewrapped,
        generations: report.generations,
    }))
}

async fn set_enabled(s: &ApiState, r: &str, enabled: bool) -> ApiResult<Json<Key>> {
    let k = s
        .engine
        .keys()?
        .set_enabled(r, enabled)
        .await
        .map_err(crate::engine::Error::from)?;
    Ok(Json(views::key(k)))
}

pub async fn enable_key(State(s): State<ApiState>, Path(r): Path<String>) -> ApiResult<Json<Key>> {
    set_enabled(&s, &r, true).await
}

pub async fn disable_key(State(s): State<ApiState>, Path(r): Path<String>) -> ApiResult<Json<Key>> {
    set_enabled(&s, &r, false).await
}

pub async fn set_default_key(State(s): State<ApiState>, bytes: Bytes) -> ApiResult<Json<Key>> {
    let req: SetDefaultKey = body(&bytes, Some(SetDefaultKey::default()))?;
    let k = s
        .engine
        .keys()?
        .set_default(req.key.as_deref())
        .await
        .map_err(crate::engine::Error::from)?;
    Ok(Json(views::key(k)))
}

pub async fn copy_snapshot(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    let req: CopySnapshot = body(&bytes, Some(CopySnapshot::default()))?;
    let rec = s
        .engine
        .copy_snapshot(&snapshot_id(&id)?, req.key.as_deref(), req.labels)
        .await?;
    let info = s.engine.snapshot(&rec.id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(views::snapshot(&s.engine, &s.endpoints, info)),
    ))
}
