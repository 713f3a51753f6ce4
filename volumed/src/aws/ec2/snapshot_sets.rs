//! EC2's CreateSnapshots: one crash-consistent snapshot of every EBS
//! volume of an instance (the engine's snapshot set), all with one
//! StartTime. The instance is one launched here, or, as for the other
//! instance actions, an id volumes are attached under.

use std::collections::BTreeMap;

use volumed_api::filter::size_gib;
use volumed_api::{SnapshotState, VolumeName};

use super::snapshots::{Ec2Snapshot, write_snapshot};
use super::xml::Xml;
use super::{Cx, Ec2Error, Ec2Result, images, volumes};
use crate::catalog::AwsSnapshotRecord;

/// Device names a root volume has when the instance is only an
/// attachment id (no launch recorded its root).
const ROOT_DEVICES: &[&str] = &["/dev/sda1", "/dev/xvda", "/dev/sda", "xvda"];

pub async fn create(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&[
        "InstanceSpecification",
        "Description",
        "TagSpecification",
        "CopyTagsFromSource",
    ])?;
    let p = cx.p;
    let instance =
        volumes::instance_id(p.required("InstanceSpecification.InstanceId")?)?.to_owned();
    for k in p.keys_under("InstanceSpecification.") {
        let ok = matches!(k, "InstanceId" | "ExcludeBootVolume")
            || k.starts_with("ExcludeDataVolumeId.");
        if !ok {
            return Err(Ec2Error::new(
                "UnknownParameter",
                format!("The parameter InstanceSpecification.{k} is not recognized"),
            ));
        }
    }
    let exclude_boot = p
        .bool("InstanceSpecification.ExcludeBootVolume")?
        .unwrap_or(false);
    let exclude = p.list("InstanceSpecification.ExcludeDataVolumeId")?;
    for v in &exclude {
        volumes::lookup(cx.state, v)?;
    }
    let copy_tags = match p.get("CopyTagsFromSource") {
        None => false,
        Some("volume") => true,
        Some(v) => {
            return Err(Ec2Error::invalid_value(
                "CopyTagsFromSource",
                v,
                "Expecting volume.",
            ));
        }
    };
    let description = p.get("Description").unwrap_or("").to_owned();
    if description.chars().count() > 255 || description.chars().any(char::is_control) {
        return Err(Ec2Error::invalid_value(
            "Description",
            &description,
            "Expecting at most 255 printable characters.",
        ));
    }
    let tags = images::tag_specs(p, &["snapshot"])?
        .remove("snapshot")
        .unwrap_or_default();
    let state = cx.state;
    let members: Vec<VolumeName> = if state.machines.knows_instance(&instance) {
        state
            .machines
            .instance_volumes(&instance, exclude_boot, &exclude)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    } else {
        let attached: Vec<_> = state
            .engine
            .list()
            .into_iter()
            .filter(|v| {
                v.record()
                    .attachment
                    .is_some_and(|a| a.instance.as_deref() == Some(instance.as_str()))
            })
            .collect();
        if attached.is_empty() {
            return Err(Ec2Error::new(
                "InvalidInstanceID.NotFound",
                format!("The instance ID '{instance}' does not exist"),
            ));
        }
        let mut out = Vec::new();
        for v in attached {
            let rec = v.record();
            let id = state.engine.volume_id(&rec);
            let root = state
                .machines
                .device_of(&v.name)
                .is_some_and(|(_, d)| ROOT_DEVICES.contains(&d.device_name.as_str()));
            if root && exclude.contains(&id) {
                return Err(Ec2Error::invalid_parameter(format!(
                    "The root volume {id} cannot be excluded with ExcludeDataVolumeId; use ExcludeBootVolume"
                )));
            }
            if (root && exclude_boot) || exclude.contains(&id) {
                continue;
            }
            out.push(rec.name);
        }
        out
    };
    if members.is_empty() {
        return Err(Ec2Error::invalid_parameter(format!(
            "Instance {instance} has no EBS volume left to snapshot"
        )));
    }
    let (set, snaps) = state
        .engine
        .create_snapshot_set(&instance, &members, BTreeMap::new())
        .await?;
    let mut out = Vec::new();
    for snap in snaps {
        let vol = state
            .engine
            .get(&VolumeName::parse(&snap.volume).map_err(|e| {
                Ec2Error::new(
                    "InternalError",
                    format!("member volume {}: {e}", snap.volume),
                )
            })?)?;
        let rec = vol.record();
        let volume_id = state.engine.volume_id(&rec);
        let mut t = BTreeMap::new();
        if copy_tags {
            t.extend(rec.tags.clone());
        }
        t.extend(tags.clone());
        let meta = AwsSnapshotRecord {
            volume_id: Some(volume_id.clone()),
            description: description.clone(),
            tags: t.clone(),
        };
        state.attrs.put_snapshot(&snap.id, &meta).await?;
        t.insert(super::snapshots::SET_TAG.to_owned(), set.id.clone());
        out.push(Ec2Snapshot {
            id: snap.id.to_string(),
            volume_id,
            state: SnapshotState::Pending.as_str(),
            // One StartTime for every snapshot of the request: the set's.
            start_time: set.created_at,
            progress: 0,
            size_gib: size_gib(snap.size),
            description: description.clone(),
            tags: t,
            encryption: crate::present::views::encryption(&state.engine, snap.encryption.as_ref()),
        });
    }
    let mut x = Xml::response("CreateSnapshots", cx.rid);
    x.open("snapshotSet");
    for s in &out {
        x.open("item");
        write_snapshot(&mut x, s);
        x.close("item");
    }
    x.close("snapshotSet");
    Ok(x.finish("CreateSnapshots"))
}
