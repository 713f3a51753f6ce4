//! Capturing instances: CreateImage (one crash-consistent snapshot set of
//! the instance's EBS volumes, its instance-store devices recorded as
//! `VirtualName` entries without data), the volumes CreateSnapshots
//! takes, and snapshot sets with a quiesce hook.
//!
//! An image made here is `pending` until its set completes (settled when
//! images are listed), `failed` if the set fails. The set is made before
//! the image is recorded: a crash in between leaves a completed or failed
//! set and no image.

use std::collections::BTreeMap;

use tracing::info;
use volumed_api::{
    BlockDeviceMapping, DeviceKind, EbsDevice, ImageState, InstanceState, VolumeName, check_all,
    validate_tags,
};

use super::images::{check_description, check_image_name};
use super::quiesce::{self, Hook};
use super::{MachineError, Machines, Result, fresh_id, gib_ceil};
use crate::catalog::{ImageRecord, InstanceRecord, SnapshotRecord, SnapshotSetRecord, unix_now};
use crate::engine::Error;
use crate::engine::Volume;

/// What CreateImage asks for.
#[derive(Debug, Clone, Default)]
pub struct CaptureImage {
    pub instance_id: String,
    pub name: String,
    pub description: String,
    /// Without it the daemon's quiesce hook (if any) runs around the
    /// barrier, in place of EC2's reboot.
    pub no_reboot: bool,
    pub mappings: Vec<BlockDeviceMapping>,
    pub tags: BTreeMap<String, String>,
}

impl Machines {
    /// Takes one snapshot set of `names`, running `hook` around its
    /// barrier with each attached member's URI (from `uri_of`).
    pub async fn snapshot_set(
        &self,
        name: &str,
        names: &[VolumeName],
        labels: BTreeMap<String, String>,
        hook: Option<&Hook>,
        uri_of: &(dyn Fn(&Volume) -> Option<String> + Sync),
    ) -> Result<(SnapshotSetRecord, Vec<SnapshotRecord>)> {
        let mut uris = Vec::new();
        for n in names {
            if let Some(u) = uri_of(&*self.engine.get(n)?) {
                uris.push(u);
            }
        }
        let set = quiesce::around(
            hook,
            &uris,
            self.engine.create_snapshot_set(name, names, labels),
        )
        .await
        .map_err(MachineError::Quiesce)??;
        Ok(set)
    }

    /// The EBS volumes of instance `id` for CreateSnapshots: each with
    /// whether it is the root; the root left out with `exclude_boot`, and
    /// the volumes whose EC2 ids are in `exclude` (the root may not be).
    pub async fn instance_volumes(
        &self,
        id: &str,
        exclude_boot: bool,
        exclude: &[String],
    ) -> Result<Vec<(VolumeName, bool)>> {
        let rec = self.instance(id).await?;
        let mut out = Vec::new();
        for d in ebs_devices(&rec) {
            let name = d.0;
            let vol = self.engine.get(&name)?;
            let vid = self.engine.volume_id(&vol.record());
            let root = d.1 == rec.root_device_name;
            if root && exclude.contains(&vid) {
                return Err(MachineError::Invalid(format!(
                    "The root volume {vid} cannot be excluded with ExcludeDataVolumeId; use ExcludeBootVolume"
                )));
            }
            if (root && exclude_boot) || exclude.contains(&vid) {
                continue;
            }
            out.push((name, root));
        }
        Ok(out)
    }

    /// CreateImage: returns the `pending` image and the set of its
    /// snapshots.
    pub async fn create_image(
        &self,
        req: CaptureImage,
        uri_of: &(dyn Fn(&Volume) -> Option<String> + Sync),
    ) -> Result<(ImageRecord, SnapshotSetRecord)> {
        check_image_name(&req.name)?;
        check_description(&req.description)?;
        validate_tags(&req.tags).map_err(|e| MachineError::Invalid(e.to_string()))?;
        check_all(&req.mappings)?;
        let rec = self.instance(&req.instance_id).await?;
        if !matches!(rec.state, InstanceState::Running | InstanceState::Stopped) {
            return Err(MachineError::IncorrectState {
                id: rec.id,
                state: rec.state.as_str(),
                what: "imaged",
            });
        }
        // The instance's devices as the image will map them.
        let mut mappings: Vec<BlockDeviceMapping> = Vec::new();
        let mut volumes: Vec<(String, VolumeName)> = Vec::new();
        for d in &rec.devices {
            if let Some(v) = &d.virtual_name {
                mappings.push(BlockDeviceMapping {
                    device_name: d.device_name.clone(),
                    virtual_name: Some(v.clone()),
                    ..Default::default()
                });
                continue;
            }
            let Some(name) = &d.volume else { continue };
            let vol = self.engine.get(name)?;
            mappings.push(BlockDeviceMapping {
                device_name: d.device_name.clone(),
                ebs: Some(EbsDevice {
                    snapshot_id: None,
                    volume_size: Some(gib_ceil(vol.size())),
                    volume_type: d.volume_type.clone(),
                    delete_on_termination: Some(d.delete_on_termination),
                    iops: d.iops,
                    throughput: d.throughput,
                    // Its snapshot is sealed under the volume's key.
                    encrypted: vol.record().encryption.is_some().then_some(true),
                    kms_key_id: None,
                }),
                ..Default::default()
            });
            volumes.push((d.device_name.clone(), name.clone()));
        }
        apply_overrides(&mut mappings, &mut volumes, &req.mappings, &rec)?;
        // Snapshots the overrides name must exist and fit.
        self.check_snapshots(&mappings).await?;
        let _guard = self.lock.lock().await;
        self.check_name_free(&req.name)?;
        let image_id = fresh_id("ami");
        let names: Vec<VolumeName> = volumes.iter().map(|(_, n)| n.clone()).collect();
        let hook = match (&self.quiesce_hook, req.no_reboot) {
            (Some(path), false) => Some(Hook {
                path: path.clone(),
                ignore_errors: false,
            }),
            _ => None,
        };
        let labels = BTreeMap::from([("image".to_owned(), image_id.clone())]);
        let (set, members) = self
            .snapshot_set(&image_id, &names, labels, hook.as_ref(), uri_of)
            .await?;
        for (dev, name) in &volumes {
            let snap = members
                .iter()
                .find(|m| m.volume == name.as_str())
                .map(|m| m.id.to_string());
            if let Some(m) = mappings.iter_mut().find(|m| &m.device_name == dev)
                && let Some(e) = m.ebs.as_mut()
            {
                e.snapshot_id = snap;
            }
        }
        let image = ImageRecord {
            id: image_id,
            name: req.name,
            description: req.description,
            architecture: rec.architecture.clone(),
            root_device_name: rec.root_device_name.clone(),
            mappings,
            state: ImageState::Pending,
            created_at: unix_now(),
            tags: req.tags,
            source_instance: Some(rec.id.clone()),
            snapshot_set: Some(set.id.clone()),
            error: None,
        };
        self.catalog.put_image(&image).await.map_err(Error::from)?;
        info!(image = %image.id, instance = %rec.id, set = %set.id, "image created from an instance");
        Ok((image, set))
    }
}

/// (volume, device) of each EBS device of `rec` that has a volume.
fn ebs_devices(rec: &InstanceRecord) -> Vec<(VolumeName, String)> {
    rec.devices
        .iter()
        .filter(|d| d.virtual_name.is_none())
        .filter_map(|d| Some((d.volume.clone()?, d.device_name.clone())))
        .collect()
}

/// CreateImage's own mappings over the instance's: `NoDevice` leaves a
/// device out (an EBS one is then not snapshotted), `VirtualName` adds an
/// instance-store device, an EBS entry for an instance's EBS device may
/// change only DeleteOnTermination and grow the size, and one for a new
/// device adds it as given.
fn apply_overrides(
    mappings: &mut Vec<BlockDeviceMapping>,
    volumes: &mut Vec<(String, VolumeName)>,
    overrides: &[BlockDeviceMapping],
    rec: &InstanceRecord,
) -> Result<()> {
    for o in overrides {
        let pos = mappings.iter().position(|m| m.device_name == o.device_name);
        match (o.kind()?, pos) {
            (DeviceKind::NoDevice, Some(i)) => {
                if o.device_name == rec.root_device_name {
                    return Err(MachineError::BadMapping(format!(
                        "The root device {} cannot be left out of the image",
                        o.device_name
                    )));
                }
                mappings.remove(i);
                volumes.retain(|(d, _)| d != &o.device_name);
            }
            (DeviceKind::NoDevice, None) => {}
            (DeviceKind::Ebs(over), Some(i)) if mappings[i].ebs.is_some() => {
                let base = mappings[i].ebs.as_mut().expect("checked just above");
                if over.snapshot_id.is_some() {
                    return Err(MachineError::BadMapping(format!(
                        "{}: only DeleteOnTermination and a larger VolumeSize of the instance's volume can change",
                        o.device_name
                    )));
                }
                if let Some(size) = over.volume_size {
                    if Some(size) < base.volume_size {
                        return Err(MachineError::BadMapping(format!(
                            "{}: VolumeSize {size} is smaller than the volume ({} GiB)",
                            o.device_name,
                            base.volume_size.unwrap_or(0)
                        )));
                    }
                    base.volume_size = Some(size);
                }
                base.delete_on_termination =
                    over.delete_on_termination.or(base.delete_on_termination);
            }
            (_, Some(i)) => {
                if o.device_name == rec.root_device_name {
                    return Err(MachineError::BadMapping(format!(
                        "The root device {} stays the instance's EBS volume",
                        o.device_name
                    )));
                }
                o.check_complete()?;
                volumes.retain(|(d, _)| d != &o.device_name);
                mappings[i] = o.clone();
            }
            (_, None) => {
                o.check_complete()?;
                mappings.push(o.clone());
            }
        }
    }
    Ok(())
}
