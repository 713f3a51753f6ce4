//! The tree `volume_modifications`: EC2 volume id -> the most recent
//! [`VolumeModificationRecord`] of that volume, written by the AWS
//! endpoint's ModifyVolume (`aws/ec2/modifications.rs`) only, and read by
//! its DescribeVolumesModifications. A volume's record goes when the
//! endpoint deletes the volume; one deleted otherwise leaves a record no
//! answer shows (its id is never given to another volume).

use serde::{Deserialize, Serialize};

use super::writer::{Pending, Tree};
use super::{Catalog, Result, encode, scan};

/// One ModifyVolume: the volume before and after. Sizes in bytes, times in
/// seconds since the Unix epoch; IOPS and throughput as DescribeVolumes
/// reported them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeModificationRecord {
    pub volume_id: String,
    pub original_size: u64,
    pub target_size: u64,
    pub original_volume_type: String,
    pub target_volume_type: String,
    #[serde(default)]
    pub original_iops: Option<u64>,
    #[serde(default)]
    pub target_iops: Option<u64>,
    #[serde(default)]
    pub original_throughput: Option<u64>,
    #[serde(default)]
    pub target_throughput: Option<u64>,
    pub start_time: u64,
    pub end_time: u64,
}

impl Catalog {
    pub fn put_volume_modification(&self, rec: &VolumeModificationRecord) -> Pending {
        self.put(Tree::VolumeModifications, &rec.volume_id, encode(rec))
    }

    pub fn remove_volume_modification(&self, volume_id: &str) -> Pending {
        self.remove(Tree::VolumeModifications, volume_id)
    }

    pub fn volume_modifications(&self) -> Result<Vec<VolumeModificationRecord>> {
        scan(
            &self.trees.volume_modifications,
            "read volume_modifications",
        )
    }
}
