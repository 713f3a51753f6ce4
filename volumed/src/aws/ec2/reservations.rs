//! EC2's instance actions on instances launched here: RunInstances,
//! DescribeInstances (reservations, filters, paging), StopInstances,
//! StartInstances, RebootInstances, and TerminateInstances of launched
//! instances (`instances.rs` keeps the older meaning for ids that only
//! name an attachment).

use std::collections::BTreeMap;

use volumed_api::InstanceState;
use volumed_api::filter::wildcard;

use super::xml::Xml;
use super::{Cx, Ec2Error, Ec2Result, images, mappings, max_results, page};
use crate::aws::{AwsState, OWNER_ID, availability_zone, iso8601};
use crate::catalog::InstanceRecord;
use crate::machines::launch::Launch;

/// RunInstances' parameters that change nothing here: networking, keys and
/// user data belong to a hypervisor; accepted so scripts run unchanged.
const IGNORED: &[&str] = &[
    "KeyName",
    "SecurityGroup",
    "SecurityGroupId",
    "SubnetId",
    "UserData",
    "Monitoring",
    "EbsOptimized",
];

fn state_xml(x: &mut Xml, tag: &str, s: InstanceState) {
    x.open(tag)
        .elem("code", s.code())
        .elem("name", s.as_str())
        .close(tag);
}

fn write_instance(x: &mut Xml, state: &AwsState, i: &InstanceRecord) {
    x.elem("instanceId", &i.id).elem("imageId", &i.image_id);
    state_xml(x, "instanceState", i.state);
    x.elem("privateDnsName", "")
        .elem("dnsName", "")
        .elem(
            "reason",
            match i.state {
                InstanceState::Stopped => "User initiated",
                InstanceState::Terminated => "User initiated",
                _ => "",
            },
        )
        .elem("amiLaunchIndex", i.launch_index)
        .elem("productCodes", "")
        .elem("instanceType", &i.instance_type)
        .elem("launchTime", iso8601(i.launched_at))
        .open("placement")
        .elem("availabilityZone", availability_zone(&state.region))
        .elem("tenancy", "default")
        .close("placement")
        .open("monitoring")
        .elem("state", "disabled")
        .close("monitoring")
        .elem("architecture", &i.architecture)
        .elem("rootDeviceType", "ebs")
        .elem("rootDeviceName", &i.root_device_name);
    // EBS devices only, as EC2 shows them: instance store is not listed.
    x.open("blockDeviceMapping");
    for d in i.devices.iter().filter(|d| d.virtual_name.is_none()) {
        let Some(name) = &d.volume else { continue };
        let Ok(vol) = state.engine.get(name) else {
            continue;
        };
        x.open("item")
            .elem("deviceName", &d.device_name)
            .open("ebs")
            .elem("volumeId", state.engine.volume_id(&vol.record()))
            .elem("status", "attached")
            .elem("attachTime", iso8601(d.attached_at))
            .elem("deleteOnTermination", d.delete_on_termination)
            .close("ebs")
            .close("item");
    }
    x.close("blockDeviceMapping");
    x.elem("virtualizationType", "hvm")
        .elem("hypervisor", "xen")
        .elem("ebsOptimized", false)
        .elem("enaSupport", true)
        .open("groupSet")
        .close("groupSet")
        .tag_set(&i.tags);
    if matches!(i.state, InstanceState::Stopped | InstanceState::Terminated) {
        x.open("stateReason")
            .elem("code", "Client.UserInitiatedShutdown")
            .elem(
                "message",
                "Client.UserInitiatedShutdown: User initiated shutdown",
            )
            .close("stateReason");
    }
}

fn write_reservation(x: &mut Xml, state: &AwsState, id: &str, instances: &[&InstanceRecord]) {
    x.elem("reservationId", id)
        .elem("ownerId", OWNER_ID)
        .open("groupSet")
        .close("groupSet")
        .open("instancesSet");
    for i in instances {
        x.open("item");
        write_instance(x, state, i);
        x.close("item");
    }
    x.close("instancesSet");
}

pub async fn run(cx: Cx<'_>) -> Ec2Result<String> {
    let mut known = vec![
        "ImageId",
        "InstanceType",
        "MinCount",
        "MaxCount",
        "BlockDeviceMapping",
        "TagSpecification",
        "ClientToken",
        "Placement",
    ];
    known.extend_from_slice(IGNORED);
    cx.only(&known)?;
    let p = cx.p;
    if let Some(z) = p.get("Placement.AvailabilityZone")
        && z != availability_zone(&cx.state.region)
    {
        return Err(Ec2Error::new(
            "InvalidParameterValue",
            format!(
                "Invalid availability zone: [{z}]; this host is {}",
                availability_zone(&cx.state.region)
            ),
        ));
    }
    let count = |name: &str| -> Ec2Result<u32> {
        let v = p.u64(name)?.ok_or_else(|| Ec2Error::missing(name))?;
        u32::try_from(v).map_err(|_| Ec2Error::invalid_value(name, &v.to_string(), "Too large."))
    };
    let mut specs = images::tag_specs(p, &["instance", "volume"])?;
    let launch = Launch {
        image_id: p.required("ImageId")?.to_owned(),
        instance_type: p.get("InstanceType").map(str::to_owned),
        min_count: count("MinCount")?,
        max_count: count("MaxCount")?,
        mappings: mappings::parse(p, "BlockDeviceMapping")?,
        tags: specs.remove("instance").unwrap_or_default(),
        volume_tags: specs.remove("volume").unwrap_or_default(),
        client_token: p.get("ClientToken").map(str::to_owned),
    };
    let recs = cx.state.machines.run_instances(launch).await?;
    let reservation = recs
        .first()
        .map(|r| r.reservation_id.clone())
        .unwrap_or_default();
    let mut x = Xml::response("RunInstances", cx.rid);
    // EC2 answers while the instances are still pending.
    let shown: Vec<InstanceRecord> = recs
        .into_iter()
        .map(|mut r| {
            r.state = InstanceState::Pending;
            r
        })
        .collect();
    let refs: Vec<&InstanceRecord> = shown.iter().collect();
    write_reservation(&mut x, cx.state, &reservation, &refs);
    Ok(x.finish("RunInstances"))
}

fn matches(state: &AwsState, name: &str, values: &[String], i: &InstanceRecord) -> Ec2Result<bool> {
    let ebs = || {
        i.devices
            .iter()
            .filter(|d| d.virtual_name.is_none() && d.volume.is_some())
    };
    let candidates: Vec<String> = match name {
        "instance-id" => vec![i.id.clone()],
        "image-id" => vec![i.image_id.clone()],
        "instance-type" => vec![i.instance_type.clone()],
        "instance-state-name" => vec![i.state.as_str().to_owned()],
        "instance-state-code" => vec![i.state.code().to_string()],
        "reservation-id" => vec![i.reservation_id.clone()],
        "owner-id" => vec![OWNER_ID.to_owned()],
        "architecture" => vec![i.architecture.clone()],
        "root-device-name" => vec![i.root_device_name.clone()],
        "root-device-type" => vec!["ebs".into()],
        "availability-zone" => vec![availability_zone(&state.region)],
        "block-device-mapping.device-name" => ebs().map(|d| d.device_name.clone()).collect(),
        "block-device-mapping.volume-id" => ebs()
            .filter_map(|d| state.engine.get(d.volume.as_ref()?).ok())
            .map(|v| state.engine.volume_id(&v.record()))
            .collect(),
        "block-device-mapping.delete-on-termination" => {
            ebs().map(|d| d.delete_on_termination.to_string()).collect()
        }
        "block-device-mapping.status" => ebs().map(|_| "attached".to_owned()).collect(),
        "tag-key" => i.tags.keys().cloned().collect(),
        other => match other.strip_prefix("tag:") {
            Some(k) if !k.is_empty() => i.tags.get(k).cloned().into_iter().collect(),
            _ => {
                return Err(Ec2Error::invalid_parameter(format!(
                    "The filter '{name}' is invalid"
                )));
            }
        },
    };
    Ok(candidates
        .iter()
        .any(|c| values.iter().any(|p| wildcard(p, c))))
}

pub async fn describe(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["InstanceId", "Filter", "MaxResults", "NextToken"])?;
    let p = cx.p;
    let ids = p.list("InstanceId")?;
    let max = max_results(p, 5, 1000)?;
    if !ids.is_empty() && max.is_some() {
        return Err(Ec2Error::new(
            "InvalidParameterCombination",
            "The parameter instancesSet cannot be used with the parameter maxResults",
        ));
    }
    let filters = p.filters()?;
    let all = cx.state.machines.instances().await?;
    for id in &ids {
        super::volumes::instance_id(id)?;
        if !all.iter().any(|i| &i.id == id) {
            return Err(Ec2Error::new(
                "InvalidInstanceID.NotFound",
                format!("The instance ID '{id}' does not exist"),
            ));
        }
    }
    let mut selected = Vec::new();
    for i in all {
        if !ids.is_empty() && !ids.contains(&i.id) {
            continue;
        }
        let mut keep = true;
        for (name, values) in &filters {
            keep &= matches(cx.state, name, values, &i)?;
        }
        if keep {
            selected.push(i);
        }
    }
    let (selected, next) = page(selected, |i| i.id.as_str(), p.get("NextToken"), max)?;
    // The page's instances grouped by reservation, in the page's order.
    let mut groups: BTreeMap<&str, Vec<&InstanceRecord>> = BTreeMap::new();
    let mut order = Vec::new();
    for i in &selected {
        if !groups.contains_key(i.reservation_id.as_str()) {
            order.push(i.reservation_id.as_str());
        }
        groups.entry(&i.reservation_id).or_default().push(i);
    }
    let mut x = Xml::response("DescribeInstances", cx.rid);
    x.open("reservationSet");
    for r in order {
        x.open("item");
        write_reservation(&mut x, cx.state, r, &groups[r]);
        x.close("item");
    }
    x.close("reservationSet");
    x.opt("nextToken", next);
    Ok(x.finish("DescribeInstances"))
}

fn ids(cx: &Cx<'_>) -> Ec2Result<Vec<String>> {
    let ids = cx.p.list("InstanceId")?;
    if ids.is_empty() {
        return Err(Ec2Error::missing("InstanceId"));
    }
    for id in &ids {
        super::volumes::instance_id(id)?;
    }
    Ok(ids)
}

/// `<instancesSet>` of (previous state, instance) state changes.
pub fn write_changes(x: &mut Xml, changes: &[(InstanceState, InstanceRecord)]) {
    x.open("instancesSet");
    for (before, i) in changes {
        x.open("item").elem("instanceId", &i.id);
        state_xml(x, "currentState", i.state);
        state_xml(x, "previousState", *before);
        x.close("item");
    }
    x.close("instancesSet");
}

pub async fn stop(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["InstanceId", "Force", "Hibernate"])?;
    cx.p.bool("Force")?;
    if cx.p.bool("Hibernate")? == Some(true) {
        return Err(Ec2Error::new(
            "UnsupportedOperation",
            "Hibernation is not supported",
        ));
    }
    let changes = cx.state.machines.stop_instances(&ids(&cx)?).await?;
    let mut x = Xml::response("StopInstances", cx.rid);
    write_changes(&mut x, &changes);
    Ok(x.finish("StopInstances"))
}

pub async fn start(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["InstanceId", "AdditionalInfo"])?;
    let changes = cx.state.machines.start_instances(&ids(&cx)?).await?;
    let mut x = Xml::response("StartInstances", cx.rid);
    write_changes(&mut x, &changes);
    Ok(x.finish("StartInstances"))
}

pub async fn reboot(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["InstanceId"])?;
    cx.state.machines.reboot_instances(&ids(&cx)?).await?;
    let mut x = Xml::response("RebootInstances", cx.rid);
    x.elem("return", true);
    Ok(x.finish("RebootInstances"))
}
