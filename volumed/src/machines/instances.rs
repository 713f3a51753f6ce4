//! Instances after launch: stop, start, reboot, terminate, the
//! DeleteOnTermination of their devices, volumes attached to them later,
//! and what a restart finishes.
//!
//! Each change is recorded first as the state the instance is becoming
//! (`stopping`, `pending`, `shutting-down`), then made on the volumes
//! (each step idempotent), then recorded done. A restart that finds an
//! instance in one of those states runs the same steps again (`settle`).
//!
//! - stop: instance-store volumes are discarded (detached, which deletes
//!   them: they are ephemeral volumes); EBS volumes stay attached.
//! - start: instance-store volumes come back empty, of the type's size.
//! - reboot: nothing changes on any volume.
//! - terminate: every volume is detached; EBS volumes with
//!   DeleteOnTermination and instance-store volumes are deleted; the
//!   instance stays visible, `terminated`, for an hour.

use tracing::{info, warn};
use volumed_api::{CreateVolume, InstanceState, VolumeName};

use super::launch::store_volume_name;
use super::{MachineError, Machines, Result, TERMINATED_VISIBLE_SECS, is_id};
use crate::catalog::{DeviceRecord, InstanceRecord, unix_now};
use crate::engine::{Error, VolumeOptions};

impl Machines {
    /// Every instance but those still being launched, by id; terminated
    /// ones older than an hour are forgotten here.
    pub async fn instances(&self) -> Result<Vec<InstanceRecord>> {
        let now = unix_now();
        let all = self.catalog.instances().map_err(Error::from)?;
        if all.iter().any(|i| expired(i, now)) {
            let _guard = self.lock.lock().await;
            for i in self.catalog.instances().map_err(Error::from)? {
                if expired(&i, now) {
                    self.catalog
                        .remove_instance(&i.id)
                        .await
                        .map_err(Error::from)?;
                }
            }
        }
        let mut out: Vec<InstanceRecord> = self
            .catalog
            .instances()
            .map_err(Error::from)?
            .into_iter()
            .filter(|i| !i.launching)
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    pub async fn instance(&self, id: &str) -> Result<InstanceRecord> {
        if !is_id("i", id) {
            return Err(MachineError::InstanceIdMalformed(id.to_owned()));
        }
        self.catalog
            .instance(id)
            .map_err(Error::from)?
            .filter(|i| !i.launching)
            .ok_or_else(|| MachineError::InstanceNotFound(id.to_owned()))
    }

    /// Whether `id` is an instance this layer launched (an EC2 call about
    /// any other instance id is about volumes attached under that id).
    pub fn knows_instance(&self, id: &str) -> bool {
        self.catalog.instance(id).ok().flatten().is_some()
    }

    /// Whether volume `name` is one of an instance's instance-store
    /// volumes (EC2 does not list those among volumes).
    pub fn is_instance_store(&self, name: &VolumeName) -> bool {
        self.catalog.instances().is_ok_and(|all| {
            all.iter().any(|i| {
                i.devices
                    .iter()
                    .any(|d| d.virtual_name.is_some() && d.volume.as_ref() == Some(name))
            })
        })
    }

    /// The device and DeleteOnTermination of volume `name` as its instance
    /// records them, if an instance of this layer has it.
    pub fn device_of(&self, name: &VolumeName) -> Option<(String, DeviceRecord)> {
        let all = self.catalog.instances().ok()?;
        all.into_iter().find_map(|i| {
            let id = i.id;
            i.devices
                .into_iter()
                .find(|d| d.volume.as_ref() == Some(name))
                .map(|d| (id, d))
        })
    }

    /// Checks every id, then applies `change` to each instance in turn;
    /// returns (previous state, instance after) for each. An unknown id
    /// changes nothing (EC2 answers the whole call with its error).
    async fn each(
        &self,
        ids: &[String],
        what: &'static str,
        allowed: &[InstanceState],
    ) -> Result<Vec<InstanceRecord>> {
        let mut recs = Vec::with_capacity(ids.len());
        for id in ids {
            let rec = self.instance(id).await?;
            if !allowed.contains(&rec.state) {
                return Err(MachineError::IncorrectState {
                    id: rec.id,
                    state: rec.state.as_str(),
                    what,
                });
            }
            recs.push(rec);
        }
        Ok(recs)
    }

    pub async fn stop_instances(
        &self,
        ids: &[String],
    ) -> Result<Vec<(InstanceState, InstanceRecord)>> {
        use InstanceState::{Running, Stopped, Stopping};
        self.transition(ids, "stopped", (Running, Stopped), Stopping)
            .await
    }

    pub async fn start_instances(
        &self,
        ids: &[String],
    ) -> Result<Vec<(InstanceState, InstanceRecord)>> {
        use InstanceState::{Pending, Running, Stopped};
        self.transition(ids, "started", (Stopped, Running), Pending)
            .await
    }

    /// Moves each of `ids` that is in `from` to `via` (recorded first) and
    /// finishes the move; one already in `to` is left as it is. Returns
    /// (state before, instance after) for each.
    async fn transition(
        &self,
        ids: &[String],
        what: &'static str,
        (from, to): (InstanceState, InstanceState),
        via: InstanceState,
    ) -> Result<Vec<(InstanceState, InstanceRecord)>> {
        let _guard = self.lock.lock().await;
        let recs = self.each(ids, what, &[from, to]).await?;
        let mut out = Vec::new();
        for mut rec in recs {
            let before = rec.state;
            if before == from {
                self.set_state(&mut rec, via).await?;
                self.finish(&mut rec).await?;
            }
            out.push((before, rec));
        }
        Ok(out)
    }

    /// Reboots running instances: nothing changes on their volumes
    /// (instance-store data survives a reboot, as on EC2).
    pub async fn reboot_instances(&self, ids: &[String]) -> Result<()> {
        let _guard = self.lock.lock().await;
        for rec in self
            .each(ids, "rebooted", &[InstanceState::Running])
            .await?
        {
            info!(instance = %rec.id, "instance rebooted (no volume changes)");
        }
        Ok(())
    }

    pub async fn terminate_instances(
        &self,
        ids: &[String],
    ) -> Result<Vec<(InstanceState, InstanceRecord)>> {
        use InstanceState::*;
        let _guard = self.lock.lock().await;
        let recs = self
            .each(ids, "terminated", &[Running, Stopped, Terminated])
            .await?;
        let mut out = Vec::new();
        for mut rec in recs {
            let before = rec.state;
            if before != Terminated {
                self.set_state(&mut rec, ShuttingDown).await?;
                self.finish(&mut rec).await?;
            }
            out.push((before, rec));
        }
        Ok(out)
    }

    /// Sets `set` and removes `remove` on instance `id`'s tags.
    pub async fn tag_instance(
        &self,
        id: &str,
        set: &std::collections::BTreeMap<String, String>,
        remove: &[(String, Option<String>)],
    ) -> Result<()> {
        let _guard = self.lock.lock().await;
        let mut rec = self.instance(id).await?;
        rec.tags = crate::engine::volume_id::retag(&rec.tags, set, remove)?;
        self.catalog.put_instance(&rec).await.map_err(Error::from)?;
        Ok(())
    }

    /// Sets DeleteOnTermination of the instance's devices named in
    /// `changes`; every device is checked before any changes.
    pub async fn set_delete_on_termination(
        &self,
        id: &str,
        changes: &[(String, bool)],
    ) -> Result<()> {
        let _guard = self.lock.lock().await;
        let mut rec = self.instance(id).await?;
        for (dev, _) in changes {
            let ebs = rec
                .devices
                .iter()
                .any(|d| &d.device_name == dev && d.virtual_name.is_none() && d.volume.is_some());
            if !ebs {
                return Err(MachineError::Invalid(format!(
                    "No device is currently mapped at {dev}"
                )));
            }
        }
        for (dev, dot) in changes {
            for d in rec.devices.iter_mut().filter(|d| &d.device_name == dev) {
                d.delete_on_termination = *dot;
            }
        }
        self.catalog.put_instance(&rec).await.map_err(Error::from)?;
        Ok(())
    }

    /// Attaches volume `name` to instance `id` at `device` after launch:
    /// recorded with DeleteOnTermination false, as EC2 does for volumes
    /// attached later.
    pub async fn attach_volume(&self, id: &str, name: &VolumeName, device: &str) -> Result<()> {
        let _guard = self.lock.lock().await;
        let mut rec = self.instance(id).await?;
        if !matches!(rec.state, InstanceState::Running | InstanceState::Stopped) {
            return Err(MachineError::IncorrectState {
                id: rec.id,
                state: rec.state.as_str(),
                what: "attached to",
            });
        }
        if rec.devices.iter().any(|d| d.device_name == device) {
            return Err(MachineError::Invalid(format!(
                "Invalid value '{device}' for unixDevice. Attachment point {device} is already in use"
            )));
        }
        let size = self.engine.get(name)?.size();
        // Recorded first: a crash before the attach leaves a device whose
        // volume is simply not attached, which stop and terminate accept.
        rec.devices.push(DeviceRecord {
            device_name: device.to_owned(),
            volume: Some(name.clone()),
            virtual_name: None,
            size,
            delete_on_termination: false,
            attached_at: unix_now(),
            // The volume's own (the endpoint keeps them).
            volume_type: None,
            iops: None,
            throughput: None,
        });
        self.catalog.put_instance(&rec).await.map_err(Error::from)?;
        self.attach_to(&rec, name).await
    }

    /// Detaches volume `name` from its instance, if an instance of this
    /// layer has it; else does nothing and says so.
    pub async fn detach_volume(&self, name: &VolumeName) -> Result<bool> {
        let _guard = self.lock.lock().await;
        let Some((id, _)) = self.device_of(name) else {
            return Ok(false);
        };
        let mut rec = self.instance(&id).await?;
        match self.engine.detach(name).await {
            Ok(_) | Err(Error::VolumeNotAttached(_)) => {}
            Err(e) => return Err(e.into()),
        }
        rec.devices.retain(|d| d.volume.as_ref() != Some(name));
        self.catalog.put_instance(&rec).await.map_err(Error::from)?;
        Ok(true)
    }

    async fn set_state(&self, rec: &mut InstanceRecord, state: InstanceState) -> Result<()> {
        rec.state = state;
        rec.state_changed_at = unix_now();
        self.catalog.put_instance(rec).await.map_err(Error::from)?;
        Ok(())
    }

    /// Makes the volumes match a state being entered, then records the
    /// state reached: stopping -> stopped, pending -> running,
    /// shutting-down -> terminated. Each step may run again.
    async fn finish(&self, rec: &mut InstanceRecord) -> Result<()> {
        match rec.state {
            InstanceState::Stopping => {
                for d in rec.devices.iter_mut().filter(|d| d.virtual_name.is_some()) {
                    if let Some(name) = d.volume.take() {
                        self.remove_volume(&name).await?;
                    }
                }
                self.set_state(rec, InstanceState::Stopped).await?;
                info!(instance = %rec.id, "instance stopped: instance-store volumes discarded");
            }
            InstanceState::Pending => {
                for i in 0..rec.devices.len() {
                    self.bring_back(rec, i).await?;
                }
                self.set_state(rec, InstanceState::Running).await?;
                info!(instance = %rec.id, "instance started");
            }
            InstanceState::ShuttingDown => {
                for d in std::mem::take(&mut rec.devices) {
                    let Some(name) = d.volume else { continue };
                    if d.virtual_name.is_some() || d.delete_on_termination {
                        self.remove_volume(&name).await?;
                    } else {
                        match self.engine.detach(&name).await {
                            Ok(_) | Err(Error::VolumeNotAttached(_) | Error::VolumeNotFound(_)) => {
                            }
                            Err(e) => {
                                rec.devices.push(DeviceRecord {
                                    volume: Some(name),
                                    ..d
                                });
                                self.catalog.put_instance(rec).await.map_err(Error::from)?;
                                return Err(e.into());
                            }
                        }
                    }
                    // Recorded as it goes, so a failure leaves only what
                    // is still to do.
                    self.catalog.put_instance(rec).await.map_err(Error::from)?;
                }
                self.set_state(rec, InstanceState::Terminated).await?;
                info!(instance = %rec.id, "instance terminated");
            }
            _ => {}
        }
        Ok(())
    }

    /// Device `i` of a starting instance: an instance-store volume made
    /// again (empty), an EBS volume attached again if it was detached.
    async fn bring_back(&self, rec: &mut InstanceRecord, i: usize) -> Result<()> {
        let d = rec.devices[i].clone();
        let name = match (&d.virtual_name, &d.volume) {
            (Some(v), None) => {
                let name = store_volume_name(&rec.id, v)?;
                // Recorded before it is made, so a crash leaves nothing
                // unnamed.
                rec.devices[i].volume = Some(name.clone());
                self.catalog.put_instance(rec).await.map_err(Error::from)?;
                name
            }
            (_, Some(n)) => n.clone(),
            (None, None) => return Ok(()),
        };
        let exists = self.engine.get(&name).ok();
        if exists.is_none() {
            if d.virtual_name.is_none() {
                // An EBS volume deleted behind the instance's back stays
                // gone; the device goes with it.
                warn!(instance = %rec.id, volume = %name, "EBS volume of the instance is gone; dropping its device");
                rec.devices[i].volume = None;
                return Ok(());
            }
            self.engine
                .create_with(
                    CreateVolume {
                        name: name.clone(),
                        size: Some(d.size),
                        ephemeral: true,
                        from_snapshot: None,
                        chunk_size: None,
                        hydrate: None,
                        encrypted: None,
                        key: None,
                    },
                    VolumeOptions::default(),
                )
                .await?;
        }
        let attached = self
            .engine
            .get(&name)
            .is_ok_and(|v| v.record().attachment.is_some());
        if !attached {
            self.attach_to(rec, &name).await?;
        }
        Ok(())
    }

    /// At start: undoes launches cut short and finishes stops, starts and
    /// terminations a crash interrupted.
    pub(super) async fn settle(&self) {
        let _guard = self.lock.lock().await;
        let Ok(all) = self.catalog.instances() else {
            return;
        };
        for mut rec in all {
            let r = if rec.launching {
                self.undo_launch(&rec).await
            } else {
                self.finish(&mut rec).await
            };
            if let Err(e) = r {
                warn!(instance = %rec.id, error = %e, "could not finish the instance's change; trying again at the next start");
            }
        }
        // Pending images whose sets a restart failed or completed.
        drop(_guard);
        if let Err(e) = self.images().await {
            warn!(error = %e, "could not settle pending images");
        }
    }
}

fn expired(i: &InstanceRecord, now: u64) -> bool {
    i.state == InstanceState::Terminated
        && now.saturating_sub(i.state_changed_at) > TERMINATED_VISIBLE_SECS
}
