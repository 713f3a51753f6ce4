//! Images (AMIs), instances, snapshot sets and their block-device
//! mappings: the JSON of the control API, and the pure rules a mapping
//! obeys, shared by `vol`, the control API and the EC2 endpoint so all
//! three accept exactly the same mappings.
//!
//! A mapping names a device and gives it exactly one of an EBS volume
//! (from a snapshot, or empty of a size), an instance-store volume
//! (`ephemeralN`), or nothing (`no_device`, which removes the device an
//! image maps when it is launched).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Instance-store virtual names run `ephemeral0` to `ephemeral23`, as EC2's.
pub const MAX_EPHEMERAL: u32 = 23;
/// Mappings one image or launch may carry (EC2 allows far fewer devices
/// on any instance type).
pub const MAX_MAPPINGS: usize = 64;
/// AWS's limits on an AMI's name and description.
pub const MAX_IMAGE_NAME: usize = 128;
pub const MAX_IMAGE_DESCRIPTION: usize = 255;

/// One device of an image or an instance launch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDeviceMapping {
    pub device_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebs: Option<EbsDevice>,
    /// `ephemeralN`: an instance-store volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_name: Option<String>,
    /// Removes the device (of the image, when launching).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_device: bool,
}

/// An EBS volume of a mapping: restored from `snapshot_id` (and as large
/// as it unless `volume_size` says larger), or empty of `volume_size` GiB.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EbsDevice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_on_termination: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput: Option<u64>,
    /// `Encrypted`: the volume is encrypted (in an encrypted store every
    /// volume is; elsewhere `true` is refused when the volume is made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// `KmsKeyId`: the key a new volume is encrypted under (requires
    /// `encrypted`); the host's default key when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
}

/// What a device of a checked mapping is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind<'a> {
    Ebs(&'a EbsDevice),
    /// The N of `ephemeralN`.
    InstanceStore(u32),
    NoDevice,
}

/// Why a mapping is refused; EC2 answers all of them with
/// `InvalidBlockDeviceMapping`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("Invalid device name {0}")]
    DeviceName(String),
    #[error("{0} must map exactly one of Ebs, VirtualName and NoDevice")]
    NotExactlyOne(String),
    #[error("Invalid virtual name {name} for {device}: expected ephemeral0 to ephemeral23")]
    VirtualName { device: String, name: String },
    #[error("Either snapshot ID or volume size must be provided for: {0}")]
    NoSource(String),
    #[error("{0} is being assigned to multiple times.")]
    Duplicate(String),
    #[error("Invalid snapshot id {id} for {device}")]
    SnapshotId { device: String, id: String },
    #[error("Volume size of {device} must be 1 to 65536 GiB, not {size}")]
    Size { device: String, size: u64 },
    #[error("too many block device mappings: at most {MAX_MAPPINGS}")]
    TooMany,
    #[error(
        "Invalid block device mapping {0:?}: expected DEVICE=none, DEVICE=ephemeralN or DEVICE=[snap-id]:[size]:[delete-on-termination]:[type[:iops]]"
    )]
    Syntax(String),
}

/// Largest EBS volume, in GiB (64 TiB).
pub const MAX_VOLUME_GIB: u64 = 64 << 10;

/// A device name EC2 accepts on Linux and Windows instances: `/dev/sdX`,
/// `/dev/xvdX`, `/dev/hdX` (one or two letters, and for a partition a
/// number from 1 to 15), or the same without `/dev/` (`xvdf`, as Windows
/// AMIs name them).
pub fn valid_device_name(name: &str) -> bool {
    let rest = name.strip_prefix("/dev/").unwrap_or(name);
    let Some(rest) = ["xvd", "sd", "hd"]
        .iter()
        .find_map(|p| rest.strip_prefix(p))
    else {
        return false;
    };
    let letters = rest.bytes().take_while(u8::is_ascii_lowercase).count();
    if !(1..=2).contains(&letters) {
        return false;
    }
    let digits = &rest[letters..];
    if digits.is_empty() {
        return true;
    }
    digits.len() <= 2
        && !digits.starts_with('0')
        && digits.parse::<u32>().is_ok_and(|n| (1..=15).contains(&n))
}

/// `snap-` and 1 to 64 of `[0-9a-z]`, as snapshot ids are.
pub fn valid_snapshot_id(s: &str) -> bool {
    s.strip_prefix("snap-").is_some_and(|rest| {
        (1..=64).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    })
}

impl BlockDeviceMapping {
    /// The one thing this mapping gives its device, once its fields are
    /// checked: a device name EC2 accepts, exactly one source, a valid
    /// virtual name, snapshot id and size.
    pub fn kind(&self) -> Result<DeviceKind<'_>, MappingError> {
        let dev = &self.device_name;
        if !valid_device_name(dev) {
            return Err(MappingError::DeviceName(dev.clone()));
        }
        let given = usize::from(self.ebs.is_some())
            + usize::from(self.virtual_name.is_some())
            + usize::from(self.no_device);
        if given != 1 {
            return Err(MappingError::NotExactlyOne(dev.clone()));
        }
        if self.no_device {
            return Ok(DeviceKind::NoDevice);
        }
        if let Some(name) = &self.virtual_name {
            return ephemeral_index(name)
                .map(DeviceKind::InstanceStore)
                .ok_or_else(|| MappingError::VirtualName {
                    device: dev.clone(),
                    name: name.clone(),
                });
        }
        let ebs = self
            .ebs
            .as_ref()
            .expect("exactly one source, and not the other two");
        if let Some(id) = &ebs.snapshot_id
            && !valid_snapshot_id(id)
        {
            return Err(MappingError::SnapshotId {
                device: dev.clone(),
                id: id.clone(),
            });
        }
        if let Some(size) = ebs.volume_size
            && !(1..=MAX_VOLUME_GIB).contains(&size)
        {
            return Err(MappingError::Size {
                device: dev.clone(),
                size,
            });
        }
        Ok(DeviceKind::Ebs(ebs))
    }

    /// A mapping that can make a volume by itself: an EBS one needs a
    /// snapshot or a size (a launch override may give only a size or a
    /// flag for a device its image maps, see [`merge`]).
    pub fn check_complete(&self) -> Result<DeviceKind<'_>, MappingError> {
        let k = self.kind()?;
        if let DeviceKind::Ebs(e) = k
            && e.snapshot_id.is_none()
            && e.volume_size.is_none()
        {
            return Err(MappingError::NoSource(self.device_name.clone()));
        }
        Ok(k)
    }

    /// The legacy `-b` grammar of `ec2-register` and `ec2-run-instances`:
    /// `DEVICE=none`, `DEVICE=ephemeralN`, or
    /// `DEVICE=[snap-id]:[size]:[delete-on-termination]:[type[:iops]]`
    /// (`/dev/sdh=snap-1::false:io1:500`, `/dev/sdj=:100`).
    pub fn parse_legacy(s: &str) -> Result<Self, MappingError> {
        let syntax = || MappingError::Syntax(s.to_owned());
        let (dev, spec) = s.split_once('=').ok_or_else(syntax)?;
        let mut m = BlockDeviceMapping {
            device_name: dev.to_owned(),
            ..Default::default()
        };
        if spec == "none" {
            m.no_device = true;
        } else if spec.starts_with("ephemeral") {
            m.virtual_name = Some(spec.to_owned());
        } else {
            let mut parts = spec.split(':');
            let mut ebs = EbsDevice::default();
            let mut field = || parts.next().filter(|p| !p.is_empty());
            ebs.snapshot_id = field().map(str::to_owned);
            ebs.volume_size = field()
                .map(|v| v.parse::<u64>().map_err(|_| syntax()))
                .transpose()?;
            ebs.delete_on_termination = match field() {
                None => None,
                Some("true") => Some(true),
                Some("false") => Some(false),
                Some(_) => return Err(syntax()),
            };
            ebs.volume_type = field().map(str::to_owned);
            ebs.iops = field()
                .map(|v| v.parse::<u64>().map_err(|_| syntax()))
                .transpose()?;
            if field().is_some() {
                // Encryption is not offered, and nothing else follows.
                return Err(syntax());
            }
            m.ebs = Some(ebs);
        }
        m.kind()?;
        Ok(m)
    }
}

/// The N of `ephemeralN` (0 to 23).
pub fn ephemeral_index(name: &str) -> Option<u32> {
    let n = name.strip_prefix("ephemeral")?;
    if n.is_empty() || n.len() > 2 || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    n.parse().ok().filter(|n| *n <= MAX_EPHEMERAL)
}

/// Checks every mapping of a list and that no device is named twice.
pub fn check_all(mappings: &[BlockDeviceMapping]) -> Result<(), MappingError> {
    if mappings.len() > MAX_MAPPINGS {
        return Err(MappingError::TooMany);
    }
    let mut seen = std::collections::BTreeSet::new();
    for m in mappings {
        m.kind()?;
        if !seen.insert(m.device_name.as_str()) {
            return Err(MappingError::Duplicate(m.device_name.clone()));
        }
    }
    Ok(())
}

/// A launch's mappings merged into its image's by device name, as
/// RunInstances does (the image is not changed): a launch entry replaces
/// the image's entry for its device, except that an EBS entry for a device
/// the image maps to EBS overrides only the fields it gives (size, type,
/// IOPS, throughput, DeleteOnTermination, Encrypted, KmsKeyId) and keeps
/// the image's snapshot;
/// `no_device` removes the device; entries for new devices are added. The
/// result is in the image's order, new devices after, `no_device` entries
/// gone; every entry is complete.
pub fn merge(
    image: &[BlockDeviceMapping],
    launch: &[BlockDeviceMapping],
) -> Result<Vec<BlockDeviceMapping>, MappingError> {
    check_all(image)?;
    check_all(launch)?;
    let mut out: Vec<BlockDeviceMapping> = image.iter().filter(|m| !m.no_device).cloned().collect();
    for l in launch {
        let pos = out.iter().position(|m| m.device_name == l.device_name);
        match (pos, l.kind()?) {
            (Some(i), DeviceKind::NoDevice) => {
                out.remove(i);
            }
            (None, DeviceKind::NoDevice) => {}
            (Some(i), DeviceKind::Ebs(over)) if out[i].ebs.is_some() => {
                let base = out[i].ebs.as_mut().expect("checked just above");
                if over.snapshot_id.is_some() {
                    base.snapshot_id = over.snapshot_id.clone();
                }
                base.volume_size = over.volume_size.or(base.volume_size);
                base.volume_type = over.volume_type.clone().or(base.volume_type.take());
                base.iops = over.iops.or(base.iops);
                base.throughput = over.throughput.or(base.throughput);
                base.delete_on_termination =
                    over.delete_on_termination.or(base.delete_on_termination);
                base.encrypted = over.encrypted.or(base.encrypted);
                base.kms_key_id = over.kms_key_id.clone().or(base.kms_key_id.take());
            }
            (Some(i), _) => out[i] = l.clone(),
            (None, _) => out.push(l.clone()),
        }
    }
    for m in &out {
        m.check_complete()?;
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    /// Its snapshots (of CreateImage) are still being taken.
    Pending,
    Available,
    /// A snapshot it was made from failed.
    Failed,
}

impl ImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Pending => "pending",
            ImageState::Available => "available",
            ImageState::Failed => "failed",
        }
    }
}

/// An image (AMI) as the control API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// `ami-` and 17 hex digits.
    pub id: String,
    pub name: String,
    pub description: String,
    pub architecture: String,
    pub root_device_name: String,
    pub mappings: Vec<BlockDeviceMapping>,
    pub state: ImageState,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub tags: BTreeMap<String, String>,
    /// The instance CreateImage made it from.
    #[serde(default)]
    pub source_instance: Option<String>,
    /// Why it is `failed`.
    #[serde(default)]
    pub error: Option<String>,
}

/// `POST /v1/images`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterImage {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `x86_64` unless given.
    #[serde(default)]
    pub architecture: Option<String>,
    pub root_device_name: String,
    pub mappings: Vec<BlockDeviceMapping>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// `DELETE /v1/images/{id}` (body optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeregisterImage {
    /// Also delete the image's snapshots that no other image uses.
    #[serde(default)]
    pub delete_snapshots: bool,
}

/// What deregistering did to each of the image's snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deregistered {
    pub image: String,
    pub snapshots: Vec<SnapshotDeletion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDeletion {
    pub snapshot: String,
    /// `deleted`, or why not (`in use by ami-…`, an error).
    pub result: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageList {
    pub images: Vec<Image>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    Pending,
    Running,
    Stopping,
    Stopped,
    ShuttingDown,
    Terminated,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::ShuttingDown => "shutting-down",
            InstanceState::Terminated => "terminated",
        }
    }

    /// EC2's state code (the low byte of `State.Code`).
    pub fn code(self) -> u16 {
        match self {
            InstanceState::Pending => 0,
            InstanceState::Running => 16,
            InstanceState::ShuttingDown => 32,
            InstanceState::Terminated => 48,
            InstanceState::Stopping => 64,
            InstanceState::Stopped => 80,
        }
    }
}

/// One device of an instance as the control API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceDevice {
    pub device_name: String,
    /// The volume behind it; null for an instance-store device of a
    /// stopped instance (it comes back empty at start).
    pub volume: Option<String>,
    /// The EC2 volume id of an EBS device.
    pub volume_id: Option<String>,
    /// `ephemeralN` of an instance-store device.
    pub virtual_name: Option<String>,
    pub size: u64,
    pub delete_on_termination: bool,
    /// While the volume is exported: its NBD URIs.
    pub uri: Option<String>,
    pub unix_uri: Option<String>,
}

/// An instance as the control API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// `i-` and 17 hex digits.
    pub id: String,
    pub reservation_id: String,
    pub image_id: String,
    pub instance_type: String,
    pub state: InstanceState,
    pub launched_at: String,
    pub root_device_name: String,
    pub devices: Vec<InstanceDevice>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceList {
    pub instances: Vec<Instance>,
}

/// `POST /v1/instances`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunInstances {
    pub image_id: String,
    /// The daemon's default type (`m1.small`) unless given.
    #[serde(default)]
    pub instance_type: Option<String>,
    /// Launched all or none; 1 unless given.
    #[serde(default)]
    pub count: Option<u32>,
    /// Merged into the image's by device name.
    #[serde(default)]
    pub mappings: Vec<BlockDeviceMapping>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Tags for every EBS volume the launch creates.
    #[serde(default)]
    pub volume_tags: BTreeMap<String, String>,
}

/// `POST /v1/snapshot-sets`: one crash-consistent snapshot of each volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotSet {
    pub name: String,
    pub volumes: Vec<crate::VolumeName>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A program run with `NBD-URI quiesce` for each attached member before
    /// the barrier and `NBD-URI unquiesce` after it, as rbd-nbd's hook.
    #[serde(default)]
    pub quiesce_hook: Option<String>,
    /// Go on when the hook fails (else the set fails).
    #[serde(default)]
    pub ignore_quiesce_error: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotSetState {
    /// Its members are being uploaded.
    Pending,
    Completed,
    /// It failed or was interrupted: no member snapshot remains.
    Failed,
}

/// A snapshot set as the control API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSet {
    pub id: String,
    pub name: String,
    pub state: SnapshotSetState,
    /// RFC 3339, UTC: the instant of every member.
    pub created_at: String,
    /// Volume name and snapshot id of each member.
    pub members: Vec<SetMember>,
    pub error: Option<String>,
}

/// What `POST /v1/snapshot-sets` answers: the set and its members'
/// `pending` snapshots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotSetCreated {
    pub set: SnapshotSet,
    pub snapshots: Vec<crate::Snapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSetList {
    pub sets: Vec<SnapshotSet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetMember {
    pub volume: String,
    pub snapshot: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ebs(snap: Option<&str>, size: Option<u64>) -> EbsDevice {
        EbsDevice {
            snapshot_id: snap.map(str::to_owned),
            volume_size: size,
            ..Default::default()
        }
    }

    #[test]
    fn device_names() {
        for ok in [
            "/dev/sda1",
            "/dev/sdb",
            "/dev/xvda",
            "/dev/xvdba",
            "xvdf",
            "/dev/sdc15",
            "/dev/hdz",
        ] {
            assert!(valid_device_name(ok), "{ok}");
        }
        for bad in [
            "",
            "/dev/",
            "/dev/sd",
            "/dev/sda0",
            "/dev/sda16",
            "/dev/sdA",
            "/dev/nvme0n1",
            "sda1/",
            "/dev/sdabc",
            "/dev/sda01",
            "/etc/passwd",
            "/dev/sda1 ",
        ] {
            assert!(!valid_device_name(bad), "{bad}");
        }
    }

    #[test]
    fn legacy_grammar() {
        let m = BlockDeviceMapping::parse_legacy("/dev/sdb=ephemeral0").unwrap();
        assert_eq!(m.kind().unwrap(), DeviceKind::InstanceStore(0));
        let m = BlockDeviceMapping::parse_legacy("/dev/sdc=none").unwrap();
        assert_eq!(m.kind().unwrap(), DeviceKind::NoDevice);
        let m = BlockDeviceMapping::parse_legacy("/dev/sdh=snap-7eb96d16::false:io1:500").unwrap();
        let e = m.ebs.unwrap();
        assert_eq!(e.snapshot_id.as_deref(), Some("snap-7eb96d16"));
        assert_eq!(
            (e.volume_size, e.delete_on_termination),
            (None, Some(false))
        );
        assert_eq!((e.volume_type.as_deref(), e.iops), (Some("io1"), Some(500)));
        let m = BlockDeviceMapping::parse_legacy("/dev/sdj=:100").unwrap();
        assert_eq!(m.ebs.unwrap(), ebs(None, Some(100)));
        let m = BlockDeviceMapping::parse_legacy("/dev/sdd=snap-1:20:true").unwrap();
        assert_eq!(m.ebs.as_ref().unwrap().delete_on_termination, Some(true));
        for bad in [
            "/dev/sdb",
            "/dev/sdb=ephemeral24",
            "/dev/sdb=snap-1:x",
            "/dev/sdb=snap-1:1:maybe",
            "/dev/sdb=snap-1:1:true:gp2:3:encrypted",
            "/dev/sdb=SNAP",
        ] {
            assert!(BlockDeviceMapping::parse_legacy(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exactly_one_source() {
        let both = BlockDeviceMapping {
            device_name: "/dev/sdb".into(),
            ebs: Some(ebs(None, Some(1))),
            virtual_name: Some("ephemeral0".into()),
            no_device: false,
        };
        assert_eq!(
            both.kind(),
            Err(MappingError::NotExactlyOne("/dev/sdb".into()))
        );
        let none = BlockDeviceMapping {
            device_name: "/dev/sdb".into(),
            ..Default::default()
        };
        assert!(none.kind().is_err());
        let empty = BlockDeviceMapping {
            device_name: "/dev/sdb".into(),
            ebs: Some(ebs(None, None)),
            ..Default::default()
        };
        assert_eq!(
            empty.check_complete(),
            Err(MappingError::NoSource("/dev/sdb".into()))
        );
    }

    #[test]
    fn launch_merges_by_device() {
        let image = vec![
            BlockDeviceMapping {
                device_name: "/dev/sda1".into(),
                ebs: Some(ebs(Some("snap-root"), None)),
                ..Default::default()
            },
            BlockDeviceMapping::parse_legacy("/dev/sdb=ephemeral0").unwrap(),
        ];
        let launch = vec![
            BlockDeviceMapping::parse_legacy("/dev/sdb=none").unwrap(),
            BlockDeviceMapping::parse_legacy("/dev/sda1=:20").unwrap(),
            BlockDeviceMapping::parse_legacy("/dev/sdf=:2").unwrap(),
        ];
        let out = merge(&image, &launch).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].device_name, "/dev/sda1");
        let root = out[0].ebs.as_ref().unwrap();
        assert_eq!(
            (root.snapshot_id.as_deref(), root.volume_size),
            (Some("snap-root"), Some(20))
        );
        assert_eq!(
            out[1],
            BlockDeviceMapping::parse_legacy("/dev/sdf=:2").unwrap()
        );
        // A new EBS device needs a source.
        let bare = BlockDeviceMapping {
            device_name: "/dev/sdg".into(),
            ebs: Some(ebs(None, None)),
            ..Default::default()
        };
        assert!(merge(&image, &[bare]).is_err());
        let twice = vec![launch[0].clone(), launch[0].clone()];
        assert_eq!(
            merge(&image, &twice),
            Err(MappingError::Duplicate("/dev/sdb".into()))
        );
    }

    proptest! {
        #[test]
        fn legacy_parse_never_panics(s in "\\PC{0,60}") {
            let _ = BlockDeviceMapping::parse_legacy(&s);
        }

        #[test]
        fn valid_names_round_trip_the_grammar(dev in "/dev/(sd|xvd)[a-z]{1,2}", n in 0u32..24, size in 1u64..100) {
            let m = BlockDeviceMapping::parse_legacy(&format!("{dev}=ephemeral{n}")).unwrap();
            prop_assert_eq!(m.kind().unwrap(), DeviceKind::InstanceStore(n));
            let m = BlockDeviceMapping::parse_legacy(&format!("{dev}=:{size}")).unwrap();
            prop_assert_eq!(m.ebs.unwrap().volume_size, Some(size));
        }
    }
}
