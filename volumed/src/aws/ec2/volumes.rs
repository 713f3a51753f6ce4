//! EC2's volume actions: CreateVolume, DescribeVolumes, ModifyVolume,
//! DeleteVolume, AttachVolume, DetachVolume. A volume created here is named
//! by its id; every volume of the host is visible, by its `volume_id`.

use std::sync::Arc;

use volumed_api::filter::{ec2_status, matches_all, size_gib};
use volumed_api::{AttachVolume, CreateVolume, ModifyVolume, VolumeFilter, VolumeName};

use super::xml::Xml;
use super::{Cx, Ec2Error, Ec2Result, max_results, page, volume_types};
use crate::aws::{AwsState, availability_zone, iso8601, parse_rfc3339};
use crate::engine::volume_id::{is_volume_id, new_volume_id};
use crate::engine::{Volume, VolumeOptions};
use crate::present::views;

/// The tag that carries an attached volume's NBD URI.
pub const NBD_URI_TAG: &str = "volumed:nbd-uri";
/// EC2's largest volume, 64 TiB, in GiB (also ours).
const MAX_SIZE_GIB: u64 = 64 << 10;

/// The control API's view of a volume with the tags EC2 shows: its own and
/// the NBD URI while attached.
pub fn view(state: &AwsState, vol: &Volume) -> volumed_api::Volume {
    let mut v = views::volume(&state.engine, state.attrs.catalog(), &state.endpoints, vol);
    // A launched instance's device and DeleteOnTermination are its own.
    if let Some(a) = v.attachment.as_mut()
        && let Some((_, d)) = state.machines.device_of(&v.name)
    {
        a.device = Some(d.device_name);
        a.delete_on_termination = d.delete_on_termination;
        // A launched volume's type is its mapping's, unless set since.
        if v.volume_type.is_none() {
            v.volume_type = d.volume_type;
            v.iops = d.iops;
            v.throughput = d.throughput;
        }
    }
    if let Some(uri) = &v.uri {
        v.tags.insert(NBD_URI_TAG.to_owned(), uri.clone());
    }
    v
}

/// The volume with EC2 id `id`, which must be well formed.
pub fn lookup(state: &AwsState, id: &str) -> Ec2Result<Arc<Volume>> {
    if !is_volume_id(id) {
        return Err(Ec2Error::new(
            "InvalidVolumeID.Malformed",
            format!("Invalid id: \"{id}\" (expecting \"vol-...\")"),
        ));
    }
    state
        .engine
        .find_volume_id(id)
        .ok_or_else(|| Ec2Error::volume_not_found(id))
}

/// `i-` and 8 or 17 lowercase hex digits.
pub fn instance_id(id: &str) -> Ec2Result<&str> {
    let ok = id.strip_prefix("i-").is_some_and(|h| {
        (h.len() == 8 || h.len() == 17)
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(id)
    } else {
        Err(Ec2Error::new(
            "InvalidInstanceID.Malformed",
            format!("Invalid id: \"{id}\" (expecting \"i-...\")"),
        ))
    }
}

/// A device name EC2 accepts for an EBS volume (`/dev/sdf`, `xvdf`...).
fn device_name(d: &str) -> Ec2Result<&str> {
    if volumed_api::machine::valid_device_name(d) {
        Ok(d)
    } else {
        Err(Ec2Error::invalid_parameter(format!(
            "Value ({d}) for parameter device is invalid. {d} is not a valid EBS device name."
        )))
    }
}

fn name_of(vol: &Volume) -> VolumeName {
    vol.record().name.clone()
}

/// One `<item>` of a volume set (also the body of CreateVolume's answer).
pub fn write_volume(x: &mut Xml, v: &volumed_api::Volume, region: &str) {
    x.elem("volumeId", &v.volume_id)
        .elem("size", size_gib(v.size))
        .elem("snapshotId", v.source_snapshot.as_deref().unwrap_or(""))
        .elem("availabilityZone", availability_zone(region))
        .elem("status", ec2_status(v.state))
        .elem(
            "createTime",
            iso8601(parse_rfc3339(&v.created_at).unwrap_or(0)),
        );
    x.open("attachmentSet");
    if let Some(a) = &v.attachment {
        x.open("item");
        write_attachment(x, v, a, "attached");
        x.close("item");
    }
    x.close("attachmentSet");
    let vtype = v
        .volume_type
        .as_deref()
        .unwrap_or(volume_types::DEFAULT_TYPE);
    let (iops, throughput) = volume_types::reported(vtype, size_gib(v.size), v.iops, v.throughput);
    x.tag_set(&v.tags)
        .elem("volumeType", vtype)
        .opt("iops", iops)
        .opt("throughput", throughput)
        .elem("encrypted", v.encrypted)
        .opt(
            "kmsKeyId",
            v.encryption.as_ref().map(|e| e.kms_key_id.as_str()),
        )
        .elem("multiAttachEnabled", false);
}

fn write_attachment(
    x: &mut Xml,
    v: &volumed_api::Volume,
    a: &volumed_api::Attachment,
    status: &str,
) {
    x.elem("volumeId", &v.volume_id)
        .elem("instanceId", a.instance.as_deref().unwrap_or(""))
        .elem("device", a.device.as_deref().unwrap_or(""))
        .elem("status", status)
        .elem(
            "attachTime",
            iso8601(parse_rfc3339(&a.attached_at).unwrap_or(0)),
        )
        .elem("deleteOnTermination", a.delete_on_termination);
}

pub async fn create(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&[
        "Size",
        "SnapshotId",
        "AvailabilityZone",
        "VolumeType",
        "Iops",
        "Throughput",
        "TagSpecification",
        "Encrypted",
        "KmsKeyId",
        "MultiAttachEnabled",
        "ClientToken",
    ])?;
    let p = cx.p;
    let zone = availability_zone(&cx.state.region);
    if let Some(z) = p.get("AvailabilityZone")
        && z != zone
    {
        return Err(Ec2Error::new(
            "InvalidZone.NotFound",
            format!("The zone '{z}' does not exist; this host is {zone}."),
        ));
    }
    let (encrypted, key) = super::encryption::params(p)?;
    if p.bool("MultiAttachEnabled")? == Some(true) {
        return Err(Ec2Error::invalid_value(
            "MultiAttachEnabled",
            "true",
            "Multi-attach is not supported.",
        ));
    }
    let size = match p.u64("Size")? {
        Some(g) if (1..=MAX_SIZE_GIB).contains(&g) => Some(g << 30),
        Some(g) => {
            return Err(Ec2Error::invalid_value(
                "Size",
                &g.to_string(),
                "Expecting 1 to 65536 GiB.",
            ));
        }
        None => None,
    };
    let snapshot = p.get("SnapshotId").map(str::to_owned);
    if let Some(s) = &snapshot
        && snapshot::SnapshotId::parse(s).is_none()
    {
        return Err(Ec2Error::new(
            "InvalidSnapshotID.Malformed",
            format!("Invalid id: \"{s}\" (expecting \"snap-...\")"),
        ));
    }
    if size.is_none() && snapshot.is_none() {
        return Err(Ec2Error::missing("Size"));
    }
    let volume_type = p.get("VolumeType").unwrap_or(volume_types::DEFAULT_TYPE);
    let vtype = volume_types::lookup(volume_type)?;
    let volume_type = volume_type.to_owned();
    let (iops, throughput) = (p.u64("Iops")?, p.u64("Throughput")?);
    vtype.check_performance(iops, throughput)?;
    let gib = match (size, &snapshot) {
        (Some(b), _) => Some(b >> 30),
        // As large as the snapshot; an unknown one is refused below.
        (None, Some(s)) => match snapshot::SnapshotId::parse(s) {
            Some(id) => cx.state.engine.snapshot_header(&id).await.ok(),
            None => None,
        }
        .map(|h| h.size.div_ceil(1 << 30)),
        (None, None) => None,
    };
    if let Some(g) = gib {
        vtype.check_size(g)?;
    }
    let tags = p.tag_specifications("volume")?;
    volumed_api::validate_tags(&tags).map_err(|e| Ec2Error::invalid_parameter(e.to_string()))?;
    let id = new_volume_id();
    let name = VolumeName::parse(&id).map_err(|e| Ec2Error::new("InternalError", e.to_string()))?;
    let opts = VolumeOptions {
        volume_id: Some(id),
        tags,
    };
    let req = CreateVolume {
        name,
        size,
        ephemeral: false,
        from_snapshot: snapshot,
        chunk_size: None,
        hydrate: None,
        encrypted,
        key,
    };
    let vol = cx.state.engine.create_with(req, opts).await?;
    cx.state
        .attrs
        .update_volume(&vol, |a| {
            a.volume_type = Some(volume_type);
            a.iops = iops;
            a.throughput = throughput;
        })
        .await?;
    let mut x = Xml::response("CreateVolume", cx.rid);
    write_volume(&mut x, &view(cx.state, &vol), &cx.state.region);
    Ok(x.finish("CreateVolume"))
}

pub async fn describe(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["VolumeId", "Filter", "MaxResults", "NextToken"])?;
    let p = cx.p;
    let ids = p.list("VolumeId")?;
    let max = max_results(p, 5, 1000)?;
    if !ids.is_empty() && max.is_some() {
        return Err(Ec2Error::new(
            "InvalidParameterCombination",
            "The parameter volumeSet cannot be used with the parameter maxResults",
        ));
    }
    let filters = p
        .filters()?
        .into_iter()
        .map(|(n, v)| {
            VolumeFilter::new(&n, v)
                .map_err(|_| Ec2Error::invalid_parameter(format!("The filter '{n}' is invalid")))
        })
        .collect::<Ec2Result<Vec<_>>>()?;
    let mut wanted = Vec::with_capacity(ids.len());
    for id in &ids {
        wanted.push(lookup(cx.state, id)?);
    }
    let vols = if ids.is_empty() {
        // Instance-store volumes are an instance's, not EBS volumes: EC2
        // does not list them.
        cx.state
            .engine
            .list()
            .into_iter()
            .filter(|v| !cx.state.machines.is_instance_store(&v.name))
            .collect()
    } else {
        wanted
    };
    let mut views: Vec<volumed_api::Volume> = vols
        .iter()
        .map(|v| view(cx.state, v))
        .filter(|v| matches_all(&filters, v))
        .collect();
    views.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
    views.dedup_by(|a, b| a.volume_id == b.volume_id);
    let (views, next) = page(views, |v| v.volume_id.as_str(), p.get("NextToken"), max)?;
    let mut x = Xml::response("DescribeVolumes", cx.rid);
    x.open("volumeSet");
    for v in &views {
        x.open("item");
        write_volume(&mut x, v, &cx.state.region);
        x.close("item");
    }
    x.close("volumeSet");
    x.opt("nextToken", next);
    Ok(x.finish("DescribeVolumes"))
}

pub async fn modify(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["VolumeId", "Size"])?;
    let vol = lookup(cx.state, cx.p.required("VolumeId")?)?;
    let before = vol.record();
    let size = match cx.p.u64("Size")? {
        Some(g) if (1..=MAX_SIZE_GIB).contains(&g) => g << 30,
        Some(g) => {
            return Err(Ec2Error::invalid_value(
                "Size",
                &g.to_string(),
                "Expecting 1 to 65536 GiB.",
            ));
        }
        None => return Err(Ec2Error::missing("Size")),
    };
    let attrs = cx.state.attrs.volume(&vol)?;
    let vtype = attrs.volume_type.as_deref();
    volume_types::lookup(vtype.unwrap_or(volume_types::DEFAULT_TYPE))?.check_size(size >> 30)?;
    let start = crate::catalog::unix_now();
    let vol = cx
        .state
        .engine
        .modify(
            &name_of(&vol),
            ModifyVolume {
                size: Some(size),
                ephemeral: None,
            },
        )
        .await?;
    let m = super::modifications::record(cx.state, &before, &vol.record(), &attrs, start).await?;
    let mut x = Xml::response("ModifyVolume", cx.rid);
    x.open("volumeModification");
    super::modifications::write(&mut x, &m);
    x.close("volumeModification");
    Ok(x.finish("ModifyVolume"))
}

pub async fn delete(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["VolumeId"])?;
    let id = cx.p.required("VolumeId")?;
    let vol = lookup(cx.state, id)?;
    if vol.record().attachment.is_some() {
        return Err(Ec2Error::new(
            "VolumeInUse",
            format!("Volume {id} is currently attached to an instance"),
        ));
    }
    cx.state.engine.delete(&name_of(&vol)).await?;
    super::modifications::forget(cx.state, id).await?;
    cx.state.attrs.remove_volume(vol.id).await?;
    let mut x = Xml::response("DeleteVolume", cx.rid);
    x.elem("return", true);
    Ok(x.finish("DeleteVolume"))
}

pub async fn attach(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["VolumeId", "InstanceId", "Device"])?;
    let p = cx.p;
    let id = p.required("VolumeId")?;
    let instance = instance_id(p.required("InstanceId")?)?.to_owned();
    let device = device_name(p.required("Device")?)?.to_owned();
    let vol = lookup(cx.state, id)?;
    if vol.record().attachment.is_some() {
        return Err(Ec2Error::new(
            "VolumeInUse",
            format!("{id} is already attached to an instance"),
        ));
    }
    let mut taken = false;
    for v in cx.state.engine.list() {
        let Some(a) = v.record().attachment else {
            continue;
        };
        if a.instance.as_deref() == Some(instance.as_str()) {
            let ec2 = cx.state.attrs.volume(&v)?;
            taken |= ec2
                .attachment_of(&a)
                .is_some_and(|e| e.device.as_deref() == Some(device.as_str()));
        }
    }
    if taken {
        return Err(Ec2Error::invalid_parameter(format!(
            "Invalid value '{device}' for unixDevice. Attachment point {device} is already in use"
        )));
    }
    if cx.state.machines.knows_instance(&instance) {
        // A launched instance records the device (DeleteOnTermination
        // false, as for any volume attached after launch).
        cx.state
            .machines
            .attach_volume(&instance, &name_of(&vol), &device)
            .await?;
        let v = view(cx.state, &vol);
        let mut x = Xml::response("AttachVolume", cx.rid);
        if let Some(a) = &v.attachment {
            write_attachment(&mut x, &v, a, "attaching");
        }
        return Ok(x.finish("AttachVolume"));
    }
    let vol = cx
        .state
        .engine
        .attach(
            &name_of(&vol),
            AttachVolume {
                instance: Some(instance),
            },
        )
        .await?;
    cx.state
        .attrs
        .set_attachment(&vol, |a| a.device = Some(device))
        .await?;
    let v = view(cx.state, &vol);
    let mut x = Xml::response("AttachVolume", cx.rid);
    if let Some(a) = &v.attachment {
        write_attachment(&mut x, &v, a, "attaching");
    }
    Ok(x.finish("AttachVolume"))
}

pub async fn detach(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["VolumeId", "InstanceId", "Device", "Force"])?;
    let p = cx.p;
    let id = p.required("VolumeId")?;
    let vol = lookup(cx.state, id)?;
    let v = view(cx.state, &vol);
    let Some(att) = v.attachment.clone() else {
        return Err(Ec2Error::new(
            "IncorrectState",
            format!("Volume '{id}' is in the 'available' state."),
        ));
    };
    if let Some(i) = p.get("InstanceId") {
        instance_id(i)?;
        if att.instance.as_deref() != Some(i) {
            return Err(Ec2Error::new(
                "InvalidAttachment.NotFound",
                format!("Volume '{id}' is not attached to instance '{i}'"),
            ));
        }
    }
    if let Some(d) = p.get("Device")
        && att.device.as_deref() != Some(d)
    {
        return Err(Ec2Error::new(
            "InvalidAttachment.NotFound",
            format!("Volume '{id}' is not attached at '{d}'"),
        ));
    }
    p.bool("Force")?;
    if !cx.state.machines.detach_volume(&name_of(&vol)).await? {
        cx.state.engine.detach(&name_of(&vol)).await?;
    }
    let mut x = Xml::response("DetachVolume", cx.rid);
    write_attachment(&mut x, &v, &att, "detaching");
    Ok(x.finish("DetachVolume"))
}
