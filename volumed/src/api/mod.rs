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
//! | POST | /v1/gc | GcRequest (optional) | GcReport |
//! | POST | /v1/imports | ImportRequest (a file) | 202 Job (running) |
//! | POST | /v1/imports/stream | raw bytes; ImportRequest in `x-volumed-import` | Job (completed) |
//! | POST | /v1/exports | ExportRequest | 202 Job, or for destination `-` the raw bytes |
//! | GET | /v1/jobs | | JobList |
//! | GET | /v1/jobs/{id} | | Job |
//! | GET | /v1/jobs/{id}/events | | NDJSON stream of Job, one per change, the last final |
//! | POST | /v1/jobs/{id}/cancel | | Job |
//! | GET | /v1/keys | | KeyList |
//! | POST | /v1/keys | CreateKey | 201 Key |
//! | GET | /v1/keys/{key} | | Key (by name, alias, id or ARN) |
//! | POST | /v1/keys/{key}/rotate | | KeyRotation |
//! | POST | /v1/keys/{key}/enable | | Key |
//! | POST | /v1/keys/{key}/disable | | Key |
//! | POST | /v1/default-key | SetDefaultKey (optional) | Key |
//!
//! `handlers` parses and routes; `views` builds every answer and URI from
//! engine state; `server` runs axum on the socket.
//!
//! Every error is `{"error": {"code", "message"}}` with the status of its
//! code (see `volumed_api::ErrorCode::http_status`).

mod handlers;
mod jobs;
mod keys;
mod lifecycle;
pub mod server;
pub mod views;

pub use handlers::ApiState;
pub use server::serve;
