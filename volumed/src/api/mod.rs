//! The control API: HTTP/1.1 + JSON on a Unix socket, resources under `/v1/`.
//!
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | GET | /v1/status | | Status |
//! | GET | /v1/volumes | | VolumeList |
//! | POST | /v1/volumes | CreateVolume | 201 Volume |
//! | GET | /v1/volumes/{name} | | Volume |
//! | PATCH | /v1/volumes/{name} | ModifyVolume | Volume |
//! | DELETE | /v1/volumes/{name} | | 204 |
//! | POST | /v1/volumes/{name}/attach | AttachVolume (optional) | Volume |
//! | POST | /v1/volumes/{name}/detach | | Detached |
//! | POST | /v1/volumes/{name}/tags | TagVolume | Volume |
//! | DELETE | /v1/volumes/{name}/tags | UntagVolume | Volume |
//! | POST | /v1/volumes/{name}/snapshots | CreateSnapshot (optional) | 202 Snapshot (pending) |
//! | GET | /v1/snapshots?volume=NAME | | SnapshotList |
//! | GET | /v1/snapshots/{id} | | Snapshot (this host's, or any in the store) |
//! | DELETE | /v1/snapshots/{id} | | 204 (into the recycle bin if a rule keeps it; 409 if protected) |
//! | POST | /v1/snapshots/{id}/attach | | Snapshot (with `export`) |
//! | POST | /v1/snapshots/{id}/detach | | Snapshot |
//! | POST | /v1/snapshots/{id}/verify | | VerifyReport |
//! | GET | /v1/snapshots/{id}/diff?from=ID | | SnapshotDiff |
//! | GET | /v1/snapshots/{id}/changed-blocks?from=ID&starting_offset=N&max_results=N&next_token=T | | ChangedBlocks |
//! | POST | /v1/snapshots/{id}/copy | CopySnapshot (optional) | 202 Snapshot (pending) |
//! | POST | /v1/snapshots/{id}/protect | | Snapshot (protected) |
//! | POST | /v1/snapshots/{id}/unprotect | | Snapshot |
//! | GET | /v1/policies | | PolicyList |
//! | POST | /v1/policies | PolicySpec | 201 Policy |
//! | GET | /v1/policies/{name} | | Policy (with next run and last result) |
//! | PUT | /v1/policies/{name} | PolicySpec | Policy |
//! | DELETE | /v1/policies/{name} | | 204 |
//! | POST | /v1/policies/{name}/run | | [RunResult] |
//! | POST | /v1/prune | PruneRequest (optional) | PruneReport |
//! | GET | /v1/bin | | BinList |
//! | POST | /v1/bin/{id}/restore | | Snapshot |
//! | GET | /v1/bin/rules | | BinRuleList |
//! | POST | /v1/bin/rules | BinRuleSpec | 201 BinRule |
//! | GET | /v1/bin/rules/{id} | | BinRule |
//! | DELETE | /v1/bin/rules/{id} | | 204 |
//! | POST | /v1/bin/rules/{id}/lock | LockBinRule | BinRule |
//! | POST | /v1/bin/rules/{id}/unlock | | BinRule |
//! | POST | /v1/bin/images/{id}/restore | | Image |
//! | POST | /v1/gc | GcRequest (optional) | GcReport |
//! | POST | /v1/imports | ImportRequest (a file) | 202 Job (running) |
//! | POST | /v1/imports/stream | raw bytes; ImportRequest in `x-volumed-import` | Job (completed) |
//! | POST | /v1/exports | ExportRequest | 202 Job, or for destination `-` the raw bytes |
//! | GET | /v1/jobs | | JobList |
//! | GET | /v1/jobs/{id} | | Job |
//! | GET | /v1/jobs/{id}/events | | NDJSON stream of Job, one per change, the last final |
//! | POST | /v1/jobs/{id}/cancel | | Job |
//! | GET | /v1/images | | ImageList |
//! | POST | /v1/images | RegisterImage | Image |
//! | GET | /v1/images/{id} | | Image |
//! | DELETE | /v1/images/{id} | DeregisterImage (optional) | Deregistered |
//! | GET | /v1/instances | | InstanceList |
//! | POST | /v1/instances | RunInstances | InstanceList |
//! | GET | /v1/instances/{id} | | Instance |
//! | POST | /v1/instances/{id}/{stop,start,reboot,terminate} | | Instance |
//! | GET | /v1/snapshot-sets | | SnapshotSetList |
//! | POST | /v1/snapshot-sets | CreateSnapshotSet | SnapshotSetCreated |
//! | GET | /v1/snapshot-sets/{id} | | SnapshotSet |
//! | GET | /v1/keys | | KeyList |
//! | POST | /v1/keys | CreateKey | 201 Key |
//! | GET | /v1/keys/{key} | | Key (by name, alias, id or ARN) |
//! | POST | /v1/keys/{key}/rotate | | KeyRotation |
//! | POST | /v1/keys/{key}/enable | | Key |
//! | POST | /v1/keys/{key}/disable | | Key |
//! | POST | /v1/default-key | SetDefaultKey (optional) | Key |
//!
//! `handlers` parses and routes; `present::views` builds every answer and
//! URI from engine state; `server` runs axum on the socket.
//!
//! Every error is `{"error": {"code", "message"}}` with the status of its
//! code (see `volumed_api::ErrorCode::http_status`).

mod handlers;
mod jobs;
mod keys;
mod lifecycle;
mod machine_views;
mod machines;
pub mod server;
mod state;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use volumed_api::ErrorCode;

pub use server::serve;
use state::ApiFailure;
pub use state::ApiState;

/// The one routing table.
pub(crate) fn router(state: ApiState) -> Router {
    use handlers::*;
    Router::new()
        .route("/v1/status", get(handlers::status))
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
        .route("/v1/snapshots/{id}/copy", post(keys::copy_snapshot))
        .route("/v1/keys", get(keys::list_keys).post(keys::create_key))
        .route("/v1/keys/{key}", get(keys::get_key))
        .route("/v1/keys/{key}/rotate", post(keys::rotate_key))
        .route("/v1/keys/{key}/enable", post(keys::enable_key))
        .route("/v1/keys/{key}/disable", post(keys::disable_key))
        .route("/v1/default-key", post(keys::set_default_key))
        .route("/v1/snapshots/{id}/protect", post(lifecycle::protect))
        .route("/v1/snapshots/{id}/unprotect", post(lifecycle::unprotect))
        .route(
            "/v1/policies",
            get(lifecycle::list_policies).post(lifecycle::create_policy),
        )
        .route(
            "/v1/policies/{name}",
            get(lifecycle::get_policy)
                .put(lifecycle::update_policy)
                .delete(lifecycle::delete_policy),
        )
        .route("/v1/policies/{name}/run", post(lifecycle::run_now))
        .route("/v1/prune", post(lifecycle::prune))
        .route("/v1/bin", get(lifecycle::bin_list))
        .route("/v1/bin/{id}/restore", post(lifecycle::bin_restore))
        .route(
            "/v1/bin/images/{id}/restore",
            post(lifecycle::bin_restore_image),
        )
        .route(
            "/v1/bin/rules",
            get(lifecycle::list_rules).post(lifecycle::create_rule),
        )
        .route(
            "/v1/bin/rules/{id}",
            get(lifecycle::get_rule).delete(lifecycle::delete_rule),
        )
        .route("/v1/bin/rules/{id}/lock", post(lifecycle::lock_rule))
        .route("/v1/bin/rules/{id}/unlock", post(lifecycle::unlock_rule))
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
