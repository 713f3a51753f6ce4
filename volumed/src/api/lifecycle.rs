//! Handlers of snapshot lifecycles: policies, prune, protection and the
//! recycle bin. Each calls `lifecycle::Lifecycle` (or, for protection, the
//! engine) and answers its types as they are.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use volumed_api::{
    BinList, BinRule, BinRuleList, BinRuleSpec, Policy, PolicyList, PolicySpec, PruneReport,
    PruneRequest, RunResult, Snapshot,
};

use super::handlers::snapshot_id;
use super::state::{ApiResult, ApiState, body};
use crate::lifecycle::LifecycleError;
use crate::lifecycle::policy::Source;

async fn set_protected(s: &ApiState, id: &str, protected: bool) -> ApiResult<Json<Snapshot>> {
    let id = snapshot_id(id)?;
    let info = s.engine.protect_snapshot(&id, protected).await?;
    Ok(Json(Snapshot {
        protected,
        ..s.snapshot(info)
    }))
}

pub async fn protect(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Snapshot>> {
    set_protected(&s, &id, true).await
}

pub async fn unprotect(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Snapshot>> {
    set_protected(&s, &id, false).await
}

pub async fn list_policies(State(s): State<ApiState>) -> ApiResult<Json<PolicyList>> {
    Ok(Json(PolicyList {
        policies: s.lifecycle.policies()?,
    }))
}

pub async fn create_policy(
    State(s): State<ApiState>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Policy>)> {
    let spec: PolicySpec = body(&bytes, None)?;
    let p = s
        .lifecycle
        .create_policy(spec, Source::Native, None)
        .await?;
    Ok((StatusCode::CREATED, Json(p)))
}

pub async fn get_policy(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Policy>> {
    Ok(Json(s.lifecycle.policy(&name)?))
}

pub async fn update_policy(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Policy>> {
    let spec: PolicySpec = body(&bytes, None)?;
    if spec.name != name {
        return Err(LifecycleError::Invalid(format!(
            "the body names policy '{}', the path '{name}'",
            spec.name
        ))
        .into());
    }
    Ok(Json(s.lifecycle.update_policy(spec, None).await?))
}

pub async fn delete_policy(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    s.lifecycle.delete_policy(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn run_now(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<RunResult>>> {
    Ok(Json(s.lifecycle.run_now(&name).await?))
}

pub async fn prune(State(s): State<ApiState>, bytes: Bytes) -> ApiResult<Json<PruneReport>> {
    let req: PruneRequest = body(&bytes, Some(PruneRequest::default()))?;
    Ok(Json(s.lifecycle.prune(req).await?))
}

pub async fn bin_list(State(s): State<ApiState>) -> ApiResult<Json<BinList>> {
    Ok(Json(BinList {
        entries: s.lifecycle.bin_list().await?,
    }))
}

pub async fn bin_restore(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Snapshot>> {
    let id = snapshot_id(&id)?;
    let info = s.lifecycle.bin_restore(&id).await?;
    Ok(Json(s.snapshot(info)))
}

pub async fn bin_restore_image(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<volumed_api::Image>> {
    let rec = s.lifecycle.bin_restore_image(&id).await?;
    Ok(Json(super::machine_views::image(rec)))
}

pub async fn list_rules(State(s): State<ApiState>) -> ApiResult<Json<BinRuleList>> {
    Ok(Json(BinRuleList {
        rules: s.lifecycle.bin_rules()?,
    }))
}

pub async fn create_rule(
    State(s): State<ApiState>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<BinRule>)> {
    let spec: BinRuleSpec = body(&bytes, None)?;
    let r = s
        .lifecycle
        .create_bin_rule(spec, Default::default(), None)
        .await?;
    Ok((StatusCode::CREATED, Json(r)))
}

pub async fn get_rule(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<BinRule>> {
    Ok(Json(s.lifecycle.bin_rule_view(&id)?))
}

pub async fn lock_rule(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<BinRule>> {
    let req: volumed_api::LockBinRule = body(&bytes, None)?;
    s.lifecycle
        .lock_bin_rule(&id, req.unlock_delay_days)
        .await?;
    Ok(Json(s.lifecycle.bin_rule_view(&id)?))
}

pub async fn unlock_rule(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<BinRule>> {
    s.lifecycle.unlock_bin_rule(&id).await?;
    Ok(Json(s.lifecycle.bin_rule_view(&id)?))
}

pub async fn delete_rule(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.lifecycle.delete_bin_rule(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
