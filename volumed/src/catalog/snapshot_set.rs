//! The tree `snapshot_sets`: set id -> [`SnapshotSetRecord`], written by
//! the engine's snapshot sets (`engine/snapshot_set.rs`) only. A set is
//! recorded before any of its members, so a restart finds every member of
//! a set it interrupted and removes them.

use serde::{Deserialize, Serialize};
use snapshot::SnapshotId;
use volumed_api::VolumeName;

use super::writer::{Pending, Tree};
use super::{Catalog, Result, encode, scan};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetState {
    /// Recorded before the barrier; its members upload.
    Creating,
    /// Every member completed.
    Completed,
    /// It failed or was interrupted: its members are removed
    /// (`to_discard` lists those not yet gone).
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetMemberRecord {
    pub volume: VolumeName,
    /// The volume's record id: a volume deleted and created again under
    /// its name is not a member.
    pub volume_id: u64,
    pub snapshot: SnapshotId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSetRecord {
    /// `set-` and 17 hex digits.
    pub id: String,
    pub name: String,
    pub state: SetState,
    /// Seconds since the Unix epoch: every member's instant.
    pub created_at: u64,
    pub members: Vec<SetMemberRecord>,
    #[serde(default)]
    pub error: Option<String>,
    /// Members of a failed set still to remove from records and store.
    #[serde(default)]
    pub to_discard: Vec<SnapshotId>,
}

impl Catalog {
    pub fn put_snapshot_set(&self, rec: &SnapshotSetRecord) -> Pending {
        self.put(Tree::SnapshotSets, &rec.id, encode(rec))
    }

    pub fn snapshot_sets(&self) -> Result<Vec<SnapshotSetRecord>> {
        scan(&self.trees.snapshot_sets, "read snapshot_sets")
    }
}
