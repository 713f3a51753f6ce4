//! The two instance actions that concern volumes: ModifyInstanceAttribute
//! with `BlockDeviceMapping.N.Ebs.DeleteOnTermination`, and
//! TerminateInstances, which detaches every volume attached to the
//! instance and deletes those marked DeleteOnTermination (ephemeral
//! volumes go at detach anyway). An instance exists here exactly while
//! some volume is attached to it.

use std::sync::Arc;

use super::volumes::instance_id;
use super::xml::Xml;
use super::{Cx, Ec2Error, Ec2Result};
use crate::aws::AwsState;
use crate::engine::Volume;

/// The volumes attached to `instance`.
fn attached_to(state: &AwsState, instance: &str) -> Vec<Arc<Volume>> {
    state
        .engine
        .list()
        .into_iter()
        .filter(|v| {
            v.record()
                .attachment
                .is_some_and(|a| a.instance.as_deref() == Some(instance))
        })
        .collect()
}

fn not_found(id: &str) -> Ec2Error {
    Ec2Error::new(
        "InvalidInstanceID.NotFound",
        format!("The instance ID '{id}' does not exist"),
    )
}

pub async fn modify_attribute(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["InstanceId", "BlockDeviceMapping"])?;
    let instance = instance_id(cx.p.required("InstanceId")?)?;
    let mappings = cx.p.block_device_mappings()?;
    if mappings.is_empty() {
        return Err(Ec2Error::new(
            "UnsupportedOperation",
            "Only BlockDeviceMapping.N.Ebs.DeleteOnTermination can be modified here",
        ));
    }
    if cx.state.machines.knows_instance(instance) {
        let mut changes = Vec::with_capacity(mappings.len());
        for (device, dot) in mappings {
            let dot = dot.ok_or_else(|| {
                Ec2Error::missing(&format!(
                    "BlockDeviceMapping.N.Ebs.DeleteOnTermination for {device}"
                ))
            })?;
            changes.push((device, dot));
        }
        cx.state
            .machines
            .set_delete_on_termination(instance, &changes)
            .await
            .map_err(|e| match e {
                crate::machines::MachineError::Invalid(m) => {
                    Ec2Error::new("InvalidInstanceAttributeValue", m)
                }
                e => e.into(),
            })?;
        let mut x = Xml::response("ModifyInstanceAttribute", cx.rid);
        x.elem("return", true);
        return Ok(x.finish("ModifyInstanceAttribute"));
    }
    let vols = attached_to(cx.state, instance);
    if vols.is_empty() {
        return Err(not_found(instance));
    }
    // Every device is found before any volume changes.
    let mut devices = Vec::with_capacity(vols.len());
    for v in &vols {
        let att = v.record().attachment;
        let ec2 = cx.state.attrs.volume(v)?;
        let device = att
            .as_ref()
            .and_then(|a| ec2.attachment_of(a))
            .and_then(|e| e.device.clone());
        devices.push((v, device));
    }
    let mut plan = Vec::with_capacity(mappings.len());
    for (device, dot) in &mappings {
        let vol = devices
            .iter()
            .find(|(_, d)| d.as_deref() == Some(device.as_str()))
            .map(|(v, _)| *v)
            .ok_or_else(|| {
                Ec2Error::new(
                    "InvalidInstanceAttributeValue",
                    format!("No device is currently mapped at {device}"),
                )
            })?;
        let dot = dot.ok_or_else(|| {
            Ec2Error::missing(&format!(
                "BlockDeviceMapping.N.Ebs.DeleteOnTermination for {device}"
            ))
        })?;
        plan.push((Arc::clone(vol), dot));
    }
    for (vol, dot) in plan {
        cx.state
            .attrs
            .set_attachment(&vol, |a| a.delete_on_termination = dot)
            .await?;
    }
    let mut x = Xml::response("ModifyInstanceAttribute", cx.rid);
    x.elem("return", true);
    Ok(x.finish("ModifyInstanceAttribute"))
}

pub async fn terminate(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["InstanceId"])?;
    let ids = cx.p.list("InstanceId")?;
    if ids.is_empty() {
        return Err(Ec2Error::missing("InstanceId"));
    }
    for id in &ids {
        instance_id(id)?;
    }
    // Instances launched here end through the machines layer (which
    // checks every id before ending any); other ids name attachments.
    let (launched, attached): (Vec<String>, Vec<String>) = ids
        .into_iter()
        .partition(|id| cx.state.machines.knows_instance(id));
    let mut plan = Vec::with_capacity(attached.len());
    for id in &attached {
        let vols = attached_to(cx.state, id);
        if vols.is_empty() {
            return Err(not_found(id));
        }
        plan.push((id.clone(), vols));
    }
    let ended = if launched.is_empty() {
        Vec::new()
    } else {
        cx.state.machines.terminate_instances(&launched).await?
    };
    let engine = &cx.state.engine;
    for (id, vols) in &plan {
        for vol in vols {
            let rec = vol.record();
            let ec2 = cx.state.attrs.volume(vol)?;
            let dot = rec
                .attachment
                .as_ref()
                .and_then(|a| ec2.attachment_of(a))
                .is_some_and(|a| a.delete_on_termination);
            let (_, deleted) = engine.detach(&rec.name).await?;
            if dot && !deleted {
                engine.delete(&rec.name).await?;
            }
            if dot || deleted {
                cx.state.attrs.remove_volume(rec.id).await?;
            }
            tracing::info!(instance = %id, volume = %rec.name, deleted = dot || deleted,
                           "instance terminated: volume detached");
        }
    }
    let mut x = Xml::response("TerminateInstances", cx.rid);
    if !ended.is_empty() {
        super::reservations::write_changes(&mut x, &ended);
        // One instancesSet: the attachment ids' items follow in it.
        x.reopen("instancesSet");
    } else {
        x.open("instancesSet");
    }
    for (id, _) in &plan {
        x.open("item")
            .elem("instanceId", id)
            .open("currentState")
            .elem("code", 32)
            .elem("name", "shutting-down")
            .close("currentState")
            .open("previousState")
            .elem("code", 16)
            .elem("name", "running")
            .close("previousState")
            .close("item");
    }
    x.close("instancesSet");
    Ok(x.finish("TerminateInstances"))
}
