//! JSON documents of the control API (`/v1/...`). Request bodies deny unknown
//! fields so a typo in a script is an error, not a silently ignored option.

use serde::{Deserialize, Serialize};

use crate::VolumeName;

/// Smallest and largest chunk size, and the default (the EBS direct APIs'
/// block size). The chunk is the unit of copy-on-write and snapshot dedup.
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
pub const MAX_CHUNK_SIZE: u64 = 4 << 20;
pub const DEFAULT_CHUNK_SIZE: u64 = 512 << 10;

/// Largest volume, as for EBS io2 Block Express. It also bounds the
/// chunk-state map a volume can ask the daemon to keep.
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;

/// Volume sizes are whole sectors: every NBD client rounds to 512 bytes.
pub const SIZE_ALIGNMENT: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    Available,
    Attached,
    /// Being filled by an import job: not usable until it completes.
    Importing,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Available => "available",
            VolumeState::Attached => "attached",
            VolumeState::Importing => "importing",
        }
    }
}

/// A volume as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: VolumeName,
    /// Bytes.
    pub size: u64,
    pub chunk_size: u64,
    pub ephemeral: bool,
    pub state: VolumeState,
    /// `nbd://HOST:PORT/NAME` while attached, else null.
    pub uri: Option<String>,
    /// `nbd+unix:///NAME?socket=PATH` while attached, else null.
    pub unix_uri: Option<String>,
    pub source_snapshot: Option<String>,
    /// The instance recorded by `attach --instance`, while attached.
    pub instance: Option<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub attached_at: Option<String>,
    /// Bytes the volume's data files occupy on the host's disk.
    pub allocated_bytes: u64,
    /// For a volume created from a snapshot: how far it has copied the
    /// snapshot's chunks in. Null for other volumes.
    #[serde(default)]
    pub hydration: Option<Hydration>,
    /// `failed` once a write or sync on its files failed: every NBD request
    /// then gets EIO and snapshots are refused until a detach and attach
    /// reopen it.
    #[serde(default)]
    pub health: VolumeHealth,
    /// Why it failed (the first failure), else null.
    #[serde(default)]
    pub health_reason: Option<String>,
    /// The EC2-style id (`vol-` and 17 hex digits), stable for the
    /// volume's life; a volume created through the AWS endpoint is named by it.
    #[serde(default)]
    pub volume_id: String,
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// While attached: to what, at which device name, and whether ending
    /// the instance deletes the volume. Null when available.
    #[serde(default)]
    pub attachment: Option<Attachment>,
    /// EC2 attributes recorded as given (`gp3`, IOPS, MiB/s); they do not
    /// change how the volume performs.
    #[serde(default)]
    pub volume_type: Option<String>,
    #[serde(default)]
    pub iops: Option<u64>,
    #[serde(default)]
    pub throughput: Option<u64>,
    #[serde(default)]
    pub encrypted: bool,
    /// Its key and encryption domain, when encrypted.
    #[serde(default)]
    pub encryption: Option<crate::EncryptionInfo>,
    /// Its data files are encrypted under a key held only in the daemon's
    /// memory: an encrypted host's scratch volume, reading zeros after a
    /// restart of the daemon.
    #[serde(default)]
    pub memory_key: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub instance: Option<String>,
    pub device: Option<String>,
    pub delete_on_termination: bool,
    /// RFC 3339, UTC.
    pub attached_at: String,
}

/// `POST /v1/volumes/{name}/tags`: sets these tags (replacing values of
/// keys it names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagVolume {
    pub tags: std::collections::BTreeMap<String, String>,
}

/// `DELETE /v1/volumes/{name}/tags`: removes these keys (absent ones are
/// not an error, as with EC2's DeleteTags).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UntagVolume {
    pub keys: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeHealth {
    #[default]
    Ok,
    Failed,
}

impl VolumeHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeHealth::Ok => "ok",
            VolumeHealth::Failed => "failed",
        }
    }
}

/// Progress of a restored volume filling itself from the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hydration {
    /// `hydrating`, `complete`, `off` (background hydration disabled: chunks
    /// arrive only when read), or `retrying` (a fetch failed; see `error`).
    pub state: String,
    pub hydrated_bytes: u64,
    /// Bytes of the snapshot's non-zero chunks that the volume holds.
    pub total_bytes: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: VolumeName,
    /// Required unless `from_snapshot` is given; then it defaults to the
    /// snapshot's size and may only be larger.
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub ephemeral: bool,
    #[serde(default)]
    pub from_snapshot: Option<String>,
    #[serde(default)]
    pub chunk_size: Option<u64>,
    /// Fill a restored volume from the store in the background (default
    /// true); without it chunks are fetched only when first touched.
    #[serde(default)]
    pub hydrate: Option<bool>,
    /// In an encrypted store every volume is encrypted; `false` is refused
    /// there, `true` refused in an unencrypted one.
    // Left out when unset, so a newer `vol` still creates volumes on an
    // older daemon, whose requests refuse fields they do not know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// The key (name, alias, id or ARN); default: the default key, or for
    /// a restored volume its snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModifyVolume {
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub ephemeral: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachVolume {
    #[serde(default)]
    pub instance: Option<String>,
}

/// Longest `--instance` id kept with an attachment.
pub const MAX_INSTANCE_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeList {
    pub volumes: Vec<Volume>,
}

/// What `POST /v1/volumes/{name}/detach` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detached {
    pub volume: Volume,
    /// True when the volume was ephemeral and has been deleted.
    pub deleted: bool,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable, machine-readable: see [`ErrorCode`].
    pub code: ErrorCode,
    /// One line for people, naming the object and the reason.
    pub message: String,
}

/// Stable error codes; each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    InvalidName,
    InvalidSize,
    NotFound,
    AlreadyExists,
    VolumeAttached,
    VolumeNotAttached,
    SnapshotAttached,
    SnapshotNotAttached,
    /// A protected snapshot cannot be deleted.
    SnapshotProtected,
    Conflict,
    Unsupported,
    ShuttingDown,
    /// The snapshot store could not be reached or kept failing.
    StoreUnavailable,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest | ErrorCode::InvalidName | ErrorCode::InvalidSize => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists
            | ErrorCode::VolumeAttached
            | ErrorCode::VolumeNotAttached
            | ErrorCode::SnapshotAttached
            | ErrorCode::SnapshotNotAttached
            | ErrorCode::SnapshotProtected
            | ErrorCode::Conflict => 409,
            ErrorCode::Unsupported => 501,
            ErrorCode::ShuttingDown | ErrorCode::StoreUnavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    Pending,
    Completed,
    Error,
}

impl SnapshotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Pending => "pending",
            SnapshotState::Completed => "completed",
            SnapshotState::Error => "error",
        }
    }
}

/// A snapshot as the API reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub volume: String,
    pub state: SnapshotState,
    /// The volume's size at the snapshot's instant.
    pub size: u64,
    pub chunk_size: u64,
    /// The snapshot this one is incremental to.
    pub parent: Option<String>,
    /// RFC 3339, UTC: the snapshot's instant.
    pub created_at: String,
    pub completed_at: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Chunks read and hashed because they changed since the parent.
    pub changed_chunks: u64,
    /// Bytes of the volume that are not zero chunks.
    pub logical_bytes: u64,
    /// Bytes this snapshot added to the store, after dedup and compression.
    pub uploaded_bytes: u64,
    /// 0.0 to 1.0.
    pub progress: f64,
    pub chunks_done: u64,
    pub chunks_total: u64,
    /// Why the snapshot ended in `error`.
    pub error: Option<String>,
    /// Never pruned, and refused by every delete (`vol snapshot protect`).
    #[serde(default)]
    pub protected: bool,
    /// The store could not be asked whether it is protected (an outage):
    /// `protected` says nothing then. Absent when known.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub protection_unknown: bool,
    /// Its read-only NBD export on this host, while `vol snapshot attach`
    /// keeps it; null otherwise.
    #[serde(default)]
    pub export: Option<SnapshotExport>,
    #[serde(default)]
    pub encrypted: bool,
    /// Its key and encryption domain, when encrypted.
    #[serde(default)]
    pub encryption: Option<crate::EncryptionInfo>,
}

/// Where a snapshot attached read-only is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotExport {
    pub uri: String,
    pub unix_uri: String,
    /// RFC 3339, UTC.
    pub attached_at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
    /// Set when the list is partial in some way (the store unreachable:
    /// this host's records only, protection unknown); one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Daemon status, `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub data_dir: String,
    pub nbd_listen: String,
    pub nbd_socket: String,
    /// NBD TLS: "off"; "required" (on TCP; the Unix socket offers it);
    /// "required+client-cert" when clients must present a certificate.
    #[serde(default)]
    pub nbd_tls: String,
    pub store: String,
    pub volumes: usize,
    pub io_backend: String,
    /// Chunk objects fetched from the store for restored volumes, and their
    /// bytes, since start; chunks served by the host cache are not counted.
    #[serde(default)]
    pub store_fetches: u64,
    #[serde(default)]
    pub store_fetched_bytes: u64,
    #[serde(default)]
    pub cache_bytes: u64,
    #[serde(default)]
    pub cache_hits: u64,
    /// `qemu-img` and `qemu-nbd` (qemu-utils), needed to import and export
    /// images other than raw: their version, or `missing`.
    #[serde(default)]
    pub image_tools: String,
    /// The AWS-compatible endpoint's address, null when it is off.
    #[serde(default)]
    pub aws_listen: Option<String>,
    /// Whether the store is encrypted (its header says so).
    #[serde(default)]
    pub store_encrypted: bool,
    /// Snapshot policies whose last run failed.
    #[serde(default)]
    pub failing_policies: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_rejects_unknown_fields() {
        let err = serde_json::from_str::<CreateVolume>(r#"{"name":"a","size":1,"colour":"red"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn create_defaults() {
        let c: CreateVolume = serde_json::from_str(r#"{"name":"a","size":4096}"#).unwrap();
        assert!(!c.ephemeral);
        assert_eq!(c.chunk_size, None);
    }

    #[test]
    fn error_codes_are_snake_case_and_map_to_statuses() {
        assert_eq!(
            serde_json::to_string(&ErrorCode::VolumeAttached).unwrap(),
            "\"volume_attached\""
        );
        assert_eq!(ErrorCode::NotFound.http_status(), 404);
        assert_eq!(ErrorCode::InvalidSize.http_status(), 400);
        assert_eq!(ErrorCode::AlreadyExists.http_status(), 409);
    }
}

/// What `POST /v1/snapshots/{id}/verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub snapshot: String,
    /// True when every object was present and matched its hash (false
    /// when only the framing could be checked).
    pub ok: bool,
    /// Non-zero chunks the manifest names.
    pub chunks: u64,
    /// Distinct chunk objects read.
    pub objects: u64,
    pub ok_objects: u64,
    pub missing: Vec<BadChunk>,
    pub damaged: Vec<BadChunk>,
    /// Set when only the manifest's sealed framing could be checked,
    /// saying why (its key is disabled or unknown here).
    #[serde(default)]
    pub framing_only: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadChunk {
    pub hash: String,
    /// Chunk indices of the volume with this content.
    pub indices: Vec<u64>,
    pub error: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    /// Overrides the daemon's grace period for this run, in seconds.
    #[serde(default)]
    pub grace_secs: Option<u64>,
}

/// What `POST /v1/gc` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub grace_secs: u64,
    pub manifests: u64,
    pub holds: u64,
    pub trash_honoured: u64,
    pub trash_expired: u64,
    /// Recycle-bin entries whose chunks were kept, and those past their
    /// retention, removed.
    #[serde(default)]
    pub bin_honoured: u64,
    #[serde(default)]
    pub bin_expired: u64,
    /// Images whose retention in the recycle bin ended, deleted before
    /// this run, and the snapshots only they used, deleted with them.
    #[serde(default)]
    pub images_expired: u64,
    #[serde(default)]
    pub image_snapshots_deleted: u64,
    /// Snapshots being written somewhere (any host) during this run.
    #[serde(default)]
    pub pending_snapshots: u64,
    #[serde(default)]
    pub pending_expired: u64,
    pub chunks_seen: u64,
    pub chunks_referenced: u64,
    pub chunks_young: u64,
    pub chunks_deleted: u64,
    /// Chunk objects' and manifest pages' bytes.
    pub bytes_deleted: u64,
    /// Manifest pages (format 2) in the store, named by a root, unnamed
    /// but young, and deleted.
    #[serde(default)]
    pub pages_seen: u64,
    #[serde(default)]
    pub pages_referenced: u64,
    #[serde(default)]
    pub pages_young: u64,
    #[serde(default)]
    pub pages_deleted: u64,
}
