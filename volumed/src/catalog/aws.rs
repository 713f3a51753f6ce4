//! The records of the AWS endpoint's own trees: what EC2 and EBS callers
//! set that volumed itself has no use for. The `aws` front-end is their
//! one writer; the views read them to show the same attributes in the
//! control API.
//!
//! - `aws_volumes`: a volume's id (16 hex digits, the data directory's
//!   name, never reused) -> [`AwsVolumeRecord`]. Keyed by the id, never by
//!   the name, so a volume deleted and created again under its name starts
//!   with no attributes.
//! - `aws_snapshots`: snapshot id -> [`AwsSnapshotRecord`].

use serde::{Deserialize, Serialize};

use super::AttachmentRecord;

/// EC2 attributes of a volume, recorded as given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwsVolumeRecord {
    #[serde(default)]
    pub volume_type: Option<String>,
    #[serde(default)]
    pub iops: Option<u64>,
    #[serde(default)]
    pub throughput: Option<u64>,
    /// What AttachVolume and ModifyInstanceAttribute said about one
    /// attachment.
    #[serde(default)]
    pub attachment: Option<AwsAttachmentRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwsAttachmentRecord {
    /// The attachment these belong to ([`AttachmentRecord::id`]).
    #[serde(default)]
    pub attachment: Option<u64>,
    /// The device name the attacher gave (EC2's `/dev/sdf`).
    #[serde(default)]
    pub device: Option<String>,
    /// Ending the instance (EC2 TerminateInstances) deletes the volume.
    #[serde(default)]
    pub delete_on_termination: bool,
}

impl AwsVolumeRecord {
    /// The attributes of attachment `att`: none when they were set for
    /// another attachment of the volume.
    pub fn attachment_of(&self, att: &AttachmentRecord) -> Option<&AwsAttachmentRecord> {
        self.attachment.as_ref().filter(|a| a.attachment == att.id)
    }
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

/// The key of volume `id` in `aws_volumes`.
pub(super) fn volume_key(id: u64) -> String {
    format!("{id:016x}")
}
