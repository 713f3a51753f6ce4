//! The trees of the machines layer (`machines/`), its one writer:
//! - `images`: image id (`ami-…`) -> [`ImageRecord`];
//! - `instances`: instance id (`i-…`) -> [`InstanceRecord`].
//!
//! An instance is recorded before any of its volumes is created
//! (`launching`), so a restart that finds a launch cut short removes the
//! volumes it names and the record; every other change of state is
//! recorded first and finished at start if a crash interrupted it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use volumed_api::{BlockDeviceMapping, ImageState, InstanceState, VolumeName};

use super::writer::{Pending, Tree};
use super::{Catalog, Result, encode, get, scan};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub architecture: String,
    pub root_device_name: String,
    pub mappings: Vec<BlockDeviceMapping>,
    pub state: ImageState,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The instance CreateImage made it from, and the snapshot set of its
    /// volumes: the image is `pending` until the set completes.
    #[serde(default)]
    pub source_instance: Option<String>,
    #[serde(default)]
    pub snapshot_set: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// One device of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_name: String,
    /// The volume behind the device; an instance-store device has none
    /// while its instance is stopped.
    pub volume: Option<VolumeName>,
    /// `ephemeralN` for an instance-store device, else an EBS device.
    #[serde(default)]
    pub virtual_name: Option<String>,
    /// Bytes (an instance-store volume is made again of this size at start).
    pub size: u64,
    #[serde(default)]
    pub delete_on_termination: bool,
    /// Seconds since the Unix epoch.
    pub attached_at: u64,
    /// An EBS device's volume type, IOPS and throughput as its mapping
    /// gave them (the endpoint shows them for the device's volume).
    #[serde(default)]
    pub volume_type: Option<String>,
    #[serde(default)]
    pub iops: Option<u64>,
    #[serde(default)]
    pub throughput: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    /// `r-…`: the instances of one RunInstances share it.
    pub reservation_id: String,
    pub image_id: String,
    pub instance_type: String,
    pub architecture: String,
    /// What the instance is, or, while a change is under way, what it is
    /// becoming (`pending`, `stopping`, `shutting-down`): a restart that
    /// finds one of those finishes it.
    pub state: InstanceState,
    pub launch_index: u32,
    /// Seconds since the Unix epoch.
    pub launched_at: u64,
    pub state_changed_at: u64,
    pub root_device_name: String,
    pub devices: Vec<DeviceRecord>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Set until every volume of the launch exists and is attached; a
    /// restart that finds it set deletes the volumes named here and the
    /// record.
    #[serde(default)]
    pub launching: bool,
    /// RunInstances' ClientToken: a retry with it gets this instance.
    #[serde(default)]
    pub client_token: Option<String>,
}

impl Catalog {
    pub fn put_image(&self, rec: &ImageRecord) -> Pending {
        self.put(Tree::Images, &rec.id, encode(rec))
    }

    pub fn remove_image(&self, id: &str) -> Pending {
        self.remove(Tree::Images, id)
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        scan(&self.trees.images, "read images")
    }

    pub fn put_instance(&self, rec: &InstanceRecord) -> Pending {
        self.put(Tree::Instances, &rec.id, encode(rec))
    }

    pub fn remove_instance(&self, id: &str) -> Pending {
        self.remove(Tree::Instances, id)
    }

    pub fn instance(&self, id: &str) -> Result<Option<InstanceRecord>> {
        get(&self.trees.instances, id, "read instances")
    }

    pub fn instances(&self) -> Result<Vec<InstanceRecord>> {
        scan(&self.trees.instances, "read instances")
    }
}
