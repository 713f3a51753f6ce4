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
//! | DELETE | /v1/snapshots/{id} | | 204 |
//! | POST | /v1/snapshots/{id}/attach | | Snapshot (with `export`) |
//! | POST | /v1/snapshots/{id}/detach | | Snapshot |
//! | POST | /v1/snapshots/{id}/verify | | VerifyReport |
//! | GET | /v1/snapshots/{id}/diff?from=ID | | SnapshotDiff |
//! | GET | /v1/snapshots/{id}/changed-blocks?from=ID&starting_offset=N&max_results=N&next_token=T | | ChangedBlocks |
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
//!
//! `handlers` parses and routes; `views` builds every answer and URI from
//! engine state; `server` runs axum on the socket.
//!
//! Every error is `{"error": {"code", "message"}}` with the status of its
//! code (see `volumed_api::ErrorCode::http_status`).

mod handlers;
mod jobs;
mod machine_views;
mod machines;
pub mod server;
pub mod views;

pub use handlers::ApiState;
pub use server::serve;
