//! Handlers of images, instances and snapshot sets: bodies checked, the
//! machines layer (or the engine, for sets) called, answers built in
//! `machine_views`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use volumed_api::{
    CreateSnapshotSet, DeregisterImage, Deregistered, ErrorCode, Image, ImageList, Instance,
    InstanceList, RegisterImage, RunInstances, SnapshotDeletion, SnapshotSet, SnapshotSetCreated,
    SnapshotSetList,
};

use super::machine_views;
use super::state::{ApiFailure, ApiResult, ApiState, body};
use crate::engine::snapshot_catalog::SnapshotInfo;
use crate::machines::MachineError;
use crate::machines::launch::Launch;
use crate::machines::quiesce::Hook;

impl From<MachineError> for ApiFailure {
    fn from(e: MachineError) -> Self {
        ApiFailure::of(&e)
    }
}

pub async fn register_image(State(s): State<ApiState>, bytes: Bytes) -> ApiResult<Json<Image>> {
    let req: RegisterImage = body(&bytes, None)?;
    let rec = s.machines.register_image(req).await?;
    Ok(Json(machine_views::image(rec)))
}

pub async fn list_images(State(s): State<ApiState>) -> ApiResult<Json<ImageList>> {
    let images = s.machines.images().await?;
    Ok(Json(ImageList {
        images: images.into_iter().map(machine_views::image).collect(),
    }))
}

pub async fn get_image(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Image>> {
    Ok(Json(machine_views::image(s.machines.image(&id).await?)))
}

pub async fn deregister_image(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Deregistered>> {
    let req: DeregisterImage = body(&bytes, Some(DeregisterImage::default()))?;
    // Into the recycle bin if a rule keeps it (see `lifecycle::images`).
    let done = s
        .lifecycle
        .deregister_image(&id, req.delete_snapshots)
        .await?
        .snapshots;
    Ok(Json(Deregistered {
        image: id,
        snapshots: done
            .into_iter()
            .map(|(snapshot, r)| SnapshotDeletion {
                snapshot,
                result: r.err().unwrap_or_else(|| "deleted".into()),
            })
            .collect(),
    }))
}

pub async fn run_instances(
    State(s): State<ApiState>,
    bytes: Bytes,
) -> ApiResult<Json<InstanceList>> {
    let req: RunInstances = body(&bytes, None)?;
    let count = req.count.unwrap_or(1);
    let recs = s
        .machines
        .run_instances(Launch {
            image_id: req.image_id,
            instance_type: req.instance_type,
            min_count: count,
            max_count: count,
            mappings: req.mappings,
            tags: req.tags,
            volume_tags: req.volume_tags,
            client_token: None,
        })
        .await?;
    Ok(Json(InstanceList {
        instances: recs.into_iter().map(|r| s.instance(r)).collect(),
    }))
}

pub async fn list_instances(State(s): State<ApiState>) -> ApiResult<Json<InstanceList>> {
    let recs = s.machines.instances().await?;
    Ok(Json(InstanceList {
        instances: recs.into_iter().map(|r| s.instance(r)).collect(),
    }))
}

pub async fn get_instance(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Instance>> {
    let rec = s.machines.instance(&id).await?;
    Ok(Json(s.instance(rec)))
}

/// `POST /v1/instances/{id}/{stop|start|reboot|terminate}`.
pub async fn instance_action(
    State(s): State<ApiState>,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Json<Instance>> {
    let ids = [id.clone()];
    match action.as_str() {
        "stop" => drop(s.machines.stop_instances(&ids).await?),
        "start" => drop(s.machines.start_instances(&ids).await?),
        "reboot" => s.machines.reboot_instances(&ids).await?,
        "terminate" => drop(s.machines.terminate_instances(&ids).await?),
        other => {
            return Err(ApiFailure::new(
                ErrorCode::NotFound,
                format!("no instance action {other:?}: stop, start, reboot or terminate"),
            ));
        }
    }
    // A terminated instance is listed for an hour.
    let rec = s.machines.instance(&id).await?;
    Ok(Json(s.instance(rec)))
}

pub async fn create_snapshot_set(
    State(s): State<ApiState>,
    bytes: Bytes,
) -> ApiResult<Json<SnapshotSetCreated>> {
    let req: CreateSnapshotSet = body(&bytes, None)?;
    let hook = req.quiesce_hook.map(|p| Hook {
        path: p.into(),
        ignore_errors: req.ignore_quiesce_error,
    });
    if let Some(h) = &hook
        && !h.path.is_absolute()
    {
        return Err(ApiFailure::new(
            ErrorCode::InvalidRequest,
            format!("quiesce hook {} must be an absolute path", h.path.display()),
        ));
    }
    let ep = s.endpoints.clone();
    let uri_of = move |v: &crate::engine::Volume| {
        v.record()
            .attachment
            .is_some()
            .then(|| ep.unix_uri(v.name.as_str()))
    };
    let (set, members) = s
        .machines
        .snapshot_set(&req.name, &req.volumes, req.labels, hook.as_ref(), &uri_of)
        .await?;
    let snapshots = members
        .into_iter()
        .map(|rec| s.snapshot(SnapshotInfo::Recorded { rec, live: None }))
        .collect();
    Ok(Json(SnapshotSetCreated {
        set: machine_views::snapshot_set(set),
        snapshots,
    }))
}

pub async fn list_snapshot_sets(State(s): State<ApiState>) -> ApiResult<Json<SnapshotSetList>> {
    let sets = s.engine.snapshot_sets()?;
    Ok(Json(SnapshotSetList {
        sets: sets.into_iter().map(machine_views::snapshot_set).collect(),
    }))
}

pub async fn get_snapshot_set(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotSet>> {
    Ok(Json(machine_views::snapshot_set(
        s.engine.snapshot_set(&id)?,
    )))
}

impl ApiState {
    fn instance(&self, rec: crate::catalog::InstanceRecord) -> Instance {
        machine_views::instance(&self.engine, &self.endpoints, rec)
    }
}
