//! Images (AMIs) and instances: records above the engine that join its
//! volumes, snapshots and exports into the two nouns EC2 users launch
//! with. An image is a root snapshot and a block-device mapping; an
//! instance is not a VM but a named set of attached volumes laid out from
//! an image, whose NBD URIs a hypervisor boots from.
//!
//! - `images`: RegisterImage, DescribeImages, DeregisterImage, tags, and
//!   the rule that a snapshot an image uses cannot be deleted;
//! - `bin`: deregistered images in the store's recycle bin, restored, and
//!   deleted with the snapshots only they used when their retention ends;
//! - `capture`: CreateImage and CreateSnapshots, through the engine's
//!   crash-consistent snapshot sets;
//! - `instances`: stop, start, reboot, terminate, and what a restart
//!   finishes; `launch`: RunInstances, all or nothing;
//! - `types`: the instance-type table (instance-store volumes per type);
//! - `quiesce`: the optional hook run around a set's barrier.
//!
//! Architecture invariant: this layer calls only the engine's public
//! lifecycle functions (create, attach, detach, delete, snapshot sets) and
//! writes only its own catalog trees (`images`, `instances`), one change
//! at a time under its lock.

pub mod bin;
pub mod capture;
pub mod images;
pub mod instances;
pub mod launch;
pub mod quiesce;
pub mod types;

use std::path::PathBuf;
use std::sync::Arc;

use volumed_api::{ErrorCode, MappingError};

use crate::catalog::Catalog;
use crate::engine::Engine;
use crate::engine::Error;
use types::InstanceTypes;

/// How long a terminated instance stays visible, as on EC2.
pub const TERMINATED_VISIBLE_SECS: u64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("{0}")]
    Mapping(#[from] MappingError),
    /// A root or EBS size the snapshot does not fit in (AWS's wording).
    #[error(
        "Volume of size {size}GB is smaller than snapshot '{snapshot}', expect size >= {needed}GB"
    )]
    SmallerThanSnapshot {
        size: u64,
        snapshot: String,
        needed: u64,
    },
    #[error("{0}")]
    BadMapping(String),
    #[error("The image id '[{0}]' does not exist")]
    ImageNotFound(String),
    #[error("Invalid id: \"{0}\" (expecting \"ami-...\")")]
    ImageIdMalformed(String),
    #[error("The instance ID '{0}' does not exist")]
    InstanceNotFound(String),
    #[error("Invalid id: \"{0}\" (expecting \"i-...\")")]
    InstanceIdMalformed(String),
    #[error("AMI name {name} is already in use by AMI {image}")]
    NameTaken { name: String, image: String },
    #[error("{0}")]
    InvalidName(String),
    #[error("Invalid value '{0}' for InstanceType.")]
    InstanceType(String),
    #[error("The instance '{id}' is not in a state from which it can be {what} (it is {state}).")]
    IncorrectState {
        id: String,
        state: &'static str,
        what: &'static str,
    },
    #[error("The image '{0}' is not available (it is {1}).")]
    ImageNotAvailable(String, &'static str),
    #[error("The snapshot {snapshot} is currently in use by {image}")]
    SnapshotInUse { snapshot: String, image: String },
    #[error("The image id '[{0}]' does not exist in the Recycle Bin")]
    ImageNotInBin(String),
    #[error(
        "image '{0}' has stayed in the recycle bin past its retention; it can no longer be restored"
    )]
    ImageBinExpired(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("quiesce hook: {0}")]
    Quiesce(String),
    #[error(transparent)]
    Engine(#[from] Error),
}

impl MachineError {
    /// The control API's code for this error; an engine error's is the
    /// engine's (`present::failure`, which calls this).
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            MachineError::Mapping(_)
            | MachineError::SmallerThanSnapshot { .. }
            | MachineError::BadMapping(_)
            | MachineError::ImageIdMalformed(_)
            | MachineError::InstanceIdMalformed(_)
            | MachineError::InvalidName(_)
            | MachineError::InstanceType(_)
            | MachineError::Invalid(_) => ErrorCode::InvalidRequest,
            MachineError::ImageNotFound(_)
            | MachineError::InstanceNotFound(_)
            | MachineError::ImageNotInBin(_) => ErrorCode::NotFound,
            MachineError::NameTaken { .. } => ErrorCode::AlreadyExists,
            MachineError::IncorrectState { .. }
            | MachineError::ImageNotAvailable(..)
            | MachineError::SnapshotInUse { .. }
            | MachineError::ImageBinExpired(_)
            | MachineError::Quiesce(_) => ErrorCode::Conflict,
            MachineError::Unsupported(_) => ErrorCode::Unsupported,
            MachineError::Engine(_) => return None,
        })
    }
}

pub type Result<T, E = MachineError> = std::result::Result<T, E>;

/// The images and instances of this host: their records' one writer.
pub struct Machines {
    engine: Arc<Engine>,
    catalog: Arc<Catalog>,
    types: InstanceTypes,
    /// Run around the barrier of CreateImage without `NoReboot`.
    quiesce_hook: Option<PathBuf>,
    /// Held across every change of an image or instance record, and
    /// across the volume changes an instance's change makes.
    lock: tokio::sync::Mutex<()>,
}

impl Machines {
    pub fn new(
        engine: Arc<Engine>,
        catalog: Arc<Catalog>,
        types: InstanceTypes,
        quiesce_hook: Option<PathBuf>,
    ) -> Self {
        Machines {
            catalog,
            engine,
            types,
            quiesce_hook,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn types(&self) -> &InstanceTypes {
        &self.types
    }

    /// Finishes in the background what a previous run left half done:
    /// launches are undone, stops, starts and terminations finished (see
    /// `instances::settle`).
    pub fn start_background(self: &Arc<Self>) {
        let m = Arc::clone(self);
        tokio::spawn(async move { m.settle().await });
    }
}

/// `PREFIX-` and 17 hex digits, unique across hosts as snapshot ids are.
/// What an EBS device's mapping asks of its volume beyond the engine's
/// options: kept on the instance's device record.
#[derive(Debug, Clone, Default)]
pub struct VolumeAttrs {
    pub tags: std::collections::BTreeMap<String, String>,
    pub volume_type: Option<String>,
    pub iops: Option<u64>,
    pub throughput: Option<u64>,
}

pub fn fresh_id(prefix: &str) -> String {
    let seed = snapshot::SnapshotId::generate();
    let hex = snapshot::ChunkHash::of(seed.as_str().as_bytes()).to_hex();
    format!("{prefix}-{}", &hex[..17])
}

/// `PREFIX-` and 8 or 17 lowercase hex digits: EC2's two id lengths.
pub fn is_id(prefix: &str, s: &str) -> bool {
    s.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|h| {
            (h.len() == 8 || h.len() == 17)
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// Whole GiB that hold `bytes`, as EC2 reports sizes.
pub fn gib_ceil(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        let a = fresh_id("ami");
        assert!(is_id("ami", &a), "{a}");
        assert!(!is_id("i", &a));
        assert!(is_id("i", "i-0123abcd"));
        assert!(!is_id("i", "i-0123ABCD"));
        assert!(!is_id("i", "i-"));
        assert_eq!(gib_ceil(1), 1);
        assert_eq!(gib_ceil(1 << 30), 1);
        assert_eq!(gib_ceil((1 << 30) + 1), 2);
    }
}
