//! RunInstances: an image's mapping merged with the launch's, laid out as
//! volumes, all attached (exported) under the instance's id, all or
//! nothing.
//!
//! Crash safety: every instance of the launch is recorded `pending` and
//! `launching`, naming the volumes it will have, before the first volume
//! is created. If a volume cannot be made the ones made are removed and
//! so are the records; if the daemon dies in between, the next start
//! finds the records still `launching` and does the same
//! (`instances::settle`). Only then does an instance become `running`.

use std::collections::BTreeMap;

use tracing::{info, warn};
use volumed_api::{
    AttachVolume, BlockDeviceMapping, CreateVolume, DeviceKind, ImageState, InstanceState,
    VolumeName, merge, validate_tags,
};

use super::VolumeAttrs;
use super::types::DEFAULT_TYPE;
use super::{MachineError, Machines, Result, fresh_id};
use crate::catalog::{DeviceRecord, InstanceRecord, unix_now};
use crate::engine::volume_id::new_volume_id;
use crate::engine::{Error, VolumeOptions};
use crate::failpoint;

/// Instances one RunInstances may launch.
pub const MAX_LAUNCH: u32 = 20;

/// What RunInstances asks for.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub image_id: String,
    pub instance_type: Option<String>,
    pub min_count: u32,
    pub max_count: u32,
    pub mappings: Vec<BlockDeviceMapping>,
    pub tags: BTreeMap<String, String>,
    pub volume_tags: BTreeMap<String, String>,
    /// A retried request with the same token gets the same instances.
    pub client_token: Option<String>,
}

/// One device to make for an instance.
#[derive(Debug, Clone)]
enum Make {
    Ebs {
        snapshot: Option<String>,
        /// Bytes; `None` takes the snapshot's size.
        size: Option<u64>,
        attrs: VolumeAttrs,
        /// `Encrypted` and `KmsKeyId`, as CreateVolume takes them.
        encrypted: Option<bool>,
        key: Option<String>,
    },
    InstanceStore {
        size: u64,
    },
}

impl Machines {
    pub async fn run_instances(&self, req: Launch) -> Result<Vec<InstanceRecord>> {
        if let Some(t) = &req.client_token {
            if t.is_empty() || t.len() > 64 {
                return Err(MachineError::Invalid(
                    "ClientToken must be 1 to 64 characters".into(),
                ));
            }
            let done: Vec<InstanceRecord> = self
                .instances()
                .await?
                .into_iter()
                .filter(|i| i.client_token.as_ref() == Some(t))
                .collect();
            if !done.is_empty() {
                return Ok(done);
            }
        }
        let img = self.image(&req.image_id).await?;
        if img.state != ImageState::Available {
            return Err(MachineError::ImageNotAvailable(img.id, img.state.as_str()));
        }
        let type_name = req
            .instance_type
            .clone()
            .unwrap_or_else(|| DEFAULT_TYPE.to_owned());
        let store = self
            .types
            .get(&type_name)
            .ok_or_else(|| MachineError::InstanceType(type_name.clone()))?;
        if req.min_count < 1 || req.min_count > req.max_count || req.max_count > MAX_LAUNCH {
            return Err(MachineError::Invalid(format!(
                "MinCount ({}) and MaxCount ({}) must satisfy 1 <= MinCount <= MaxCount <= {MAX_LAUNCH}",
                req.min_count, req.max_count
            )));
        }
        validate_tags(&req.tags).map_err(|e| MachineError::Invalid(e.to_string()))?;
        validate_tags(&req.volume_tags).map_err(|e| MachineError::Invalid(e.to_string()))?;
        let merged = merge(&img.mappings, &req.mappings)?;
        let root_ok = merged
            .iter()
            .any(|m| m.device_name == img.root_device_name && m.ebs.is_some());
        if !root_ok {
            return Err(MachineError::BadMapping(format!(
                "The root device {} must stay an EBS volume",
                img.root_device_name
            )));
        }
        self.check_snapshots(&merged).await?;
        // The devices to make, in the mapping's order; instance-store
        // entries beyond the type's count are ignored, as on EC2.
        let mut plan: Vec<(String, Option<String>, bool, Make)> = Vec::new();
        for m in &merged {
            match m.check_complete()? {
                DeviceKind::Ebs(e) => plan.push((
                    m.device_name.clone(),
                    None,
                    e.delete_on_termination.unwrap_or(true),
                    Make::Ebs {
                        snapshot: e.snapshot_id.clone(),
                        size: e.volume_size.map(|g| g << 30),
                        attrs: VolumeAttrs {
                            tags: req.volume_tags.clone(),
                            volume_type: Some(
                                e.volume_type.clone().unwrap_or_else(|| "gp2".into()),
                            ),
                            iops: e.iops,
                            throughput: e.throughput,
                        },
                        encrypted: e.encrypted.filter(|x| *x),
                        key: e.kms_key_id.clone(),
                    },
                )),
                DeviceKind::InstanceStore(n) if n < store.count => plan.push((
                    m.device_name.clone(),
                    m.virtual_name.clone(),
                    true,
                    Make::InstanceStore { size: store.size },
                )),
                DeviceKind::InstanceStore(_) | DeviceKind::NoDevice => {}
            }
        }

        let _guard = self.lock.lock().await;
        let now = unix_now();
        let reservation = fresh_id("r");
        let mut launches = Vec::new();
        for index in 0..req.max_count {
            let id = fresh_id("i");
            let mut devices = Vec::new();
            let mut makes = Vec::new();
            for (dev, virtual_name, dot, make) in &plan {
                let name = match (make, virtual_name) {
                    (Make::InstanceStore { .. }, Some(v)) => store_volume_name(&id, v)?,
                    _ => volume_name(&new_volume_id())?,
                };
                let (size, attrs) = match make {
                    Make::Ebs { size, attrs, .. } => (size.unwrap_or(0), attrs.clone()),
                    Make::InstanceStore { size } => (*size, VolumeAttrs::default()),
                };
                devices.push(DeviceRecord {
                    device_name: dev.clone(),
                    volume: Some(name.clone()),
                    virtual_name: virtual_name.clone(),
                    size,
                    delete_on_termination: *dot,
                    attached_at: now,
                    volume_type: attrs.volume_type,
                    iops: attrs.iops,
                    throughput: attrs.throughput,
                });
                makes.push((name, make.clone()));
            }
            let rec = InstanceRecord {
                id,
                reservation_id: reservation.clone(),
                image_id: img.id.clone(),
                instance_type: type_name.clone(),
                architecture: img.architecture.clone(),
                state: InstanceState::Pending,
                launch_index: index,
                launched_at: now,
                state_changed_at: now,
                root_device_name: img.root_device_name.clone(),
                devices,
                tags: req.tags.clone(),
                launching: true,
                client_token: req.client_token.clone(),
            };
            launches.push((rec, makes));
        }
        // Every record before any volume: see the module comment.
        for (rec, _) in &launches {
            self.catalog.put_instance(rec).await.map_err(Error::from)?;
        }
        let mut made = Ok(());
        'all: for (rec, makes) in &launches {
            for (name, make) in makes {
                made = self.make_device(rec, name, make).await;
                if made.is_err() {
                    break 'all;
                }
                failpoint::hit("launch-after-volume");
            }
        }
        if let Err(e) = made {
            warn!(reservation = %reservation, error = %e, "launch failed; removing what it made");
            for (rec, _) in &launches {
                if let Err(u) = self.undo_launch(rec).await {
                    warn!(instance = %rec.id, error = %u, "could not undo the launch; the next start will");
                }
            }
            return Err(e);
        }
        let mut out = Vec::new();
        for (mut rec, _) in launches {
            // Sizes of volumes made from snapshots are known only now.
            for d in &mut rec.devices {
                if let Some(v) = d.volume.as_ref().and_then(|n| self.engine.get(n).ok()) {
                    d.size = v.size();
                }
            }
            rec.launching = false;
            rec.state = InstanceState::Running;
            rec.state_changed_at = unix_now();
            self.catalog.put_instance(&rec).await.map_err(Error::from)?;
            info!(instance = %rec.id, image = %rec.image_id, devices = rec.devices.len(), "instance launched");
            out.push(rec);
        }
        Ok(out)
    }

    /// Creates one device's volume and attaches it to the instance.
    async fn make_device(
        &self,
        rec: &InstanceRecord,
        name: &VolumeName,
        make: &Make,
    ) -> Result<()> {
        let (req, attrs) = match make {
            Make::Ebs {
                snapshot,
                size,
                attrs,
                encrypted,
                key,
            } => (
                CreateVolume {
                    name: name.clone(),
                    size: *size,
                    ephemeral: false,
                    from_snapshot: snapshot.clone(),
                    chunk_size: None,
                    hydrate: None,
                    encrypted: *encrypted,
                    key: key.clone(),
                },
                VolumeOptions {
                    volume_id: Some(name.to_string()),
                    tags: attrs.tags.clone(),
                },
            ),
            Make::InstanceStore { size } => (
                CreateVolume {
                    name: name.clone(),
                    size: Some(*size),
                    ephemeral: true,
                    from_snapshot: None,
                    chunk_size: None,
                    hydrate: None,
                    encrypted: None,
                    key: None,
                },
                VolumeOptions::default(),
            ),
        };
        self.engine.create_with(req, attrs).await?;
        self.attach_to(rec, name).await
    }

    /// Attaches volume `name` to instance `rec` (exports it); the device
    /// it is attached as is the instance record's.
    pub(super) async fn attach_to(&self, rec: &InstanceRecord, name: &VolumeName) -> Result<()> {
        self.engine
            .attach(
                name,
                AttachVolume {
                    instance: Some(rec.id.clone()),
                },
            )
            .await?;
        Ok(())
    }

    /// Removes every volume a launch of `rec` may have made, then the
    /// record. Idempotent: a restart runs it again on what is left.
    pub(super) async fn undo_launch(&self, rec: &InstanceRecord) -> Result<()> {
        for d in &rec.devices {
            if let Some(name) = &d.volume {
                self.remove_volume(name).await?;
            }
        }
        self.catalog
            .remove_instance(&rec.id)
            .await
            .map_err(Error::from)?;
        info!(instance = %rec.id, "launch undone");
        Ok(())
    }

    /// Detaches and deletes volume `name`, if it still exists.
    pub(super) async fn remove_volume(&self, name: &VolumeName) -> Result<()> {
        let Ok(vol) = self.engine.get(name) else {
            return Ok(());
        };
        if vol.record().attachment.is_some() {
            match self.engine.detach(name).await {
                Ok((_, true)) => return Ok(()),
                Ok((_, false)) | Err(Error::VolumeNotAttached(_)) => {}
                Err(Error::VolumeNotFound(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        match self.engine.delete(name).await {
            Ok(()) | Err(Error::VolumeNotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

pub(super) fn volume_name(raw: &str) -> Result<VolumeName> {
    VolumeName::parse(raw).map_err(|reason| {
        Error::InvalidName {
            name: raw.to_owned(),
            reason,
        }
        .into()
    })
}

/// The volume of an instance-store device: `INSTANCE-ephemeralN`.
pub(super) fn store_volume_name(instance: &str, virtual_name: &str) -> Result<VolumeName> {
    volume_name(&format!("{instance}-{virtual_name}"))
}
