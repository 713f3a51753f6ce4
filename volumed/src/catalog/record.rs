//! The catalog's record of one volume.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use snapshot::SnapshotId;
use volumed_api::VolumeName;

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
    pub importing: Option<String>,
    /// The EC2-style id (`vol-` and 17 hex digits). Records from before it
    /// existed have none; theirs is derived from the host and `id` (see
    /// `Engine::volume_id`), so it is stable all the same.
    #[serde(default)]
    pub volume_id: Option<String>,
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// EC2 attributes, recorded as given.
    #[serde(default)]
    pub volume_type: Option<String>,
    #[serde(default)]
    pub iops: Option<u64>,
    #[serde(default)]
    pub throughput: Option<u64>,
    /// In an encrypted store: the domain and key its snapshots are sealed
    /// with (its source snapshot's, for a restored volume).
    #[serde(default)]
    pub encryption: Option<snapshot::Encryption>,
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

/// What the AWS endpoint keeps about a snapshot beyond its manifest, whose
/// labels cannot change: EC2 tags, description and source volume id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwsSnapshotRecord {
    #[serde(default)]
    pub volume_id: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
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
    /// The device name the attacher gave (EC2's `/dev/sdf`).
    #[serde(default)]
    pub device: Option<String>,
    /// Ending the instance (EC2 TerminateInstances) deletes the volume.
    #[serde(default)]
    pub delete_on_termination: bool,
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
            volume_type: None,
            iops: None,
            throughput: None,
            encryption: None,
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
