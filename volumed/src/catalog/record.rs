//! The catalog's records of volumes, snapshots and snapshot exports, and
//! the clock they are written with.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use snapshot::SnapshotId;
use volumed_api::VolumeName;

use super::JobId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Names the volume's data directory; never reused, so a volume deleted
    /// and created again under the same name never sees the old files.
    pub id: u64,
    pub name: VolumeName,
    pub size: u64,
    pub chunk_size: u64,
    pub ephemeral: bool,
    pub source_snapshot: Option<SnapshotId>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub attachment: Option<AttachmentRecord>,
    /// Set before the data files are removed; a volume found in this state on
    /// start is removed again, so a crash mid-delete leaves no half volume.
    #[serde(default)]
    pub deleting: bool,
    /// The last completed snapshot: the parent of the next one.
    #[serde(default)]
    pub last_snapshot: Option<SnapshotId>,
    /// A restored volume fills itself from the store in the background.
    #[serde(default)]
    pub hydrate: bool,
    /// Every chunk of its snapshot is local and the store hold is released:
    /// the volume no longer needs the store.
    #[serde(default)]
    pub hydrated: bool,
    /// The import job filling the volume: until it completes the volume is
    /// `importing`, cannot be attached, and is removed if the job fails.
    #[serde(default)]
    pub importing: Option<JobId>,
    /// The EC2-style id (`vol-` and 17 hex digits). Records from before it
    /// existed have none; theirs is derived from the host and `id` (see
    /// `Engine::volume_id`), so it is stable all the same.
    #[serde(default)]
    pub volume_id: Option<String>,
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// In an encrypted store: the domain and key its snapshots are sealed
    /// with (its source snapshot's, for a restored volume).
    #[serde(default)]
    pub encryption: Option<snapshot::Encryption>,
    /// Its data files are encrypted under a key held only in the daemon's
    /// memory (an ephemeral volume made from nothing on an encrypted
    /// host): after the daemon ends, they hold nothing readable, and the
    /// next start finds the volume's bytes gone (see `engine::recovery`).
    #[serde(default)]
    pub memory_key: bool,
}

/// The catalog's record of a snapshot this host took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub volume: String,
    pub state: SnapshotState,
    pub size: u64,
    pub chunk_size: u64,
    pub parent: Option<SnapshotId>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    pub changed_chunks: u64,
    pub logical_bytes: u64,
    pub uploaded_bytes: u64,
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub error: Option<String>,
    pub completed_at: Option<u64>,
    /// Orders snapshots taken within the same second.
    #[serde(default)]
    pub seq: u64,
    /// Where its bytes come from.
    #[serde(default)]
    pub source: SnapshotSource,
    /// In an encrypted store: the domain and key it is sealed with.
    #[serde(default)]
    pub encryption: Option<snapshot::Encryption>,
}

/// What a snapshot is written from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotSource {
    /// A volume of this host, frozen at an instant.
    #[default]
    Volume,
    /// Blocks a client sends (the EBS direct APIs); they live in memory
    /// until the commit, so a restart ends the snapshot `error`.
    Blocks,
    /// A copy of another snapshot (`vol snapshot copy`, CopySnapshot).
    Copy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    Pending,
    Completed,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub instance: Option<String>,
    pub attached_at: u64,
    /// A catalog id, never reused: what the AWS endpoint keys an
    /// attachment's attributes by, so they never apply to a later
    /// attachment of the volume. Attachments recorded before it have none.
    #[serde(default)]
    pub id: Option<u64>,
}

/// A snapshot exported read-only over NBD by `vol snapshot attach`: opened
/// again at every start until detached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotExportRecord {
    pub id: SnapshotId,
    /// Seconds since the Unix epoch.
    pub attached_at: u64,
}

impl VolumeRecord {
    pub fn new(
        id: u64,
        name: VolumeName,
        size: u64,
        chunk_size: u64,
        ephemeral: bool,
        source_snapshot: Option<SnapshotId>,
    ) -> Self {
        VolumeRecord {
            id,
            name,
            size,
            chunk_size,
            ephemeral,
            source_snapshot,
            created_at: unix_now(),
            attachment: None,
            deleting: false,
            last_snapshot: None,
            hydrate: false,
            hydrated: false,
            importing: None,
            volume_id: None,
            tags: Default::default(),
            encryption: None,
            memory_key: false,
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seconds since the Unix epoch as RFC 3339, UTC: how records' times are
/// shown and how manifests carry them.
pub fn rfc3339(secs: u64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()
}
