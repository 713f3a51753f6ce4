//! EC2's image actions: RegisterImage, DescribeImages (owners, filters,
//! paging), DeregisterImage (with DeleteAssociatedSnapshots), CreateImage.
//! The rules are the machines layer's; this file speaks EC2.

use std::collections::BTreeMap;

use volumed_api::filter::wildcard;
use volumed_api::{ImageState, RegisterImage};

use super::mappings;
use super::params::Params;
use super::xml::Xml;
use super::{Cx, Describe, Ec2Error, Ec2Result, max_results};
use crate::aws::{AwsState, OWNER_ID, iso8601};
use crate::catalog::{AwsSnapshotRecord, ImageRecord};
use crate::machines::capture::CaptureImage;

/// `TagSpecification.N` for several resource types: the tags of each.
pub fn tag_specs(
    p: &Params,
    allowed: &[&str],
) -> Ec2Result<BTreeMap<String, BTreeMap<String, String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for n in p.indices("TagSpecification")? {
        let t = p.required(&format!("TagSpecification.{n}.ResourceType"))?;
        if !allowed.contains(&t) {
            return Err(Ec2Error::invalid_value(
                "TagSpecification.ResourceType",
                t,
                &format!("Expecting one of {}.", allowed.join(", ")),
            ));
        }
        let tags = p.tag_map(&format!("TagSpecification.{n}.Tag"))?;
        volumed_api::validate_tags(&tags)
            .map_err(|e| Ec2Error::invalid_parameter(e.to_string()))?;
        out.entry(t.to_owned()).or_default().extend(tags);
    }
    Ok(out)
}

pub async fn register(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&[
        "Name",
        "Description",
        "Architecture",
        "RootDeviceName",
        "BlockDeviceMapping",
        "VirtualizationType",
        "EnaSupport",
        "SriovNetSupport",
        "BootMode",
        "ImdsSupport",
        "TpmSupport",
        "TagSpecification",
        "ImageLocation",
    ])?;
    let p = cx.p;
    if p.get("ImageLocation").is_some() {
        return Err(Ec2Error::new(
            "UnsupportedOperation",
            "Instance-store-backed AMIs (ImageLocation) are not supported; register an EBS-backed image with a root snapshot",
        ));
    }
    if let Some(v) = p.get("VirtualizationType")
        && v != "hvm"
    {
        return Err(Ec2Error::invalid_value(
            "VirtualizationType",
            v,
            "Only hvm images are supported.",
        ));
    }
    p.bool("EnaSupport")?;
    let root = p.required("RootDeviceName")?.to_owned();
    let mappings = mappings::parse(p, "BlockDeviceMapping")?;
    let tags = tag_specs(p, &["image"])?
        .remove("image")
        .unwrap_or_default();
    let img = cx
        .state
        .machines
        .register_image(RegisterImage {
            name: p.required("Name")?.to_owned(),
            description: p.get("Description").unwrap_or("").to_owned(),
            architecture: p.get("Architecture").map(str::to_owned),
            root_device_name: root,
            mappings,
            tags,
        })
        .await?;
    let mut x = Xml::response("RegisterImage", cx.rid);
    x.elem("imageId", &img.id);
    Ok(x.finish("RegisterImage"))
}

fn matches(name: &str, values: &[String], i: &ImageRecord) -> Ec2Result<bool> {
    let snaps = || {
        i.mappings
            .iter()
            .filter_map(|m| m.ebs.as_ref()?.snapshot_id.clone())
            .collect::<Vec<_>>()
    };
    let candidates: Vec<String> = match name {
        "image-id" => vec![i.id.clone()],
        "name" => vec![i.name.clone()],
        "state" => vec![i.state.as_str().to_owned()],
        "description" => vec![i.description.clone()],
        "architecture" => vec![i.architecture.clone()],
        "owner-id" => vec![OWNER_ID.to_owned()],
        "root-device-name" => vec![i.root_device_name.clone()],
        "root-device-type" => vec!["ebs".into()],
        "image-type" => vec!["machine".into()],
        "is-public" => vec!["false".into()],
        "virtualization-type" => vec!["hvm".into()],
        "block-device-mapping.snapshot-id" => snaps(),
        "block-device-mapping.device-name" => {
            i.mappings.iter().map(|m| m.device_name.clone()).collect()
        }
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

fn write_image(x: &mut Xml, i: &ImageRecord) {
    x.elem("imageId", &i.id)
        .elem("imageLocation", format!("{OWNER_ID}/{}", i.name))
        .elem("imageState", i.state.as_str())
        .elem("imageOwnerId", OWNER_ID)
        .elem("creationDate", iso8601(i.created_at))
        .elem("isPublic", false)
        .elem("architecture", &i.architecture)
        .elem("imageType", "machine")
        .elem("platformDetails", "Linux/UNIX")
        .elem("usageOperation", "RunInstances")
        .elem("name", &i.name)
        .elem("description", &i.description)
        .elem("rootDeviceType", "ebs")
        .elem("rootDeviceName", &i.root_device_name);
    mappings::write(x, &i.mappings);
    x.elem("virtualizationType", "hvm")
        .elem("hypervisor", "xen")
        .elem("enaSupport", true)
        .opt("sourceInstanceId", i.source_instance.as_deref())
        .tag_set(&i.tags);
    if i.state == ImageState::Failed {
        x.open("stateReason")
            .elem("code", "Client.SnapshotFailed")
            .elem("message", i.error.as_deref().unwrap_or("a snapshot failed"))
            .close("stateReason");
    }
}

pub async fn describe(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&[
        "ImageId",
        "Owner",
        "ExecutableBy",
        "Filter",
        "MaxResults",
        "NextToken",
        "IncludeDeprecated",
        "IncludeDisabled",
    ])?;
    let p = cx.p;
    let ids = p.list("ImageId")?;
    let max = max_results(p, 5, 1000)?;
    if !ids.is_empty() && max.is_some() {
        return Err(Ec2Error::new(
            "InvalidParameterCombination",
            "The parameter imagesSet cannot be used with the parameter maxResults",
        ));
    }
    p.bool("IncludeDeprecated")?;
    p.bool("IncludeDisabled")?;
    let owners = p.list("Owner")?;
    let users = p.list("ExecutableBy")?;
    // Every image here is this account's own and private.
    let ours = owners.is_empty() || owners.iter().any(|o| o == "self" || o == OWNER_ID);
    let ours = ours && (users.is_empty() || users.iter().any(|u| u == "self" || u == OWNER_ID));
    let filters = p.filters()?;
    let all = cx.state.machines.images().await?;
    for id in &ids {
        if !crate::machines::is_id("ami", id) {
            return Err(Ec2Error::new(
                "InvalidAMIID.Malformed",
                format!("Invalid id: \"{id}\" (expecting \"ami-...\")"),
            ));
        }
        if !all.iter().any(|i| &i.id == id) {
            return Err(Ec2Error::new(
                "InvalidAMIID.NotFound",
                format!("The image id '[{id}]' does not exist"),
            ));
        }
    }
    Describe {
        action: "DescribeImages",
        set: "imagesSet",
        rid: cx.rid,
        ours,
        ids: &ids,
        filters: &filters,
        token: p.get("NextToken"),
        max,
    }
    .answer(all, |i| i.id.as_str(), matches, write_image)
}

use crate::lifecycle::images::KEPT_IN_BIN;

pub async fn deregister(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["ImageId", "DeleteAssociatedSnapshots"])?;
    let id = cx.p.required("ImageId")?;
    let delete = cx.p.bool("DeleteAssociatedSnapshots")?.unwrap_or(false);
    let results = cx
        .state
        .lifecycle
        .deregister_image(id, delete)
        .await?
        .snapshots;
    let mut x = Xml::response("DeregisterImage", cx.rid);
    x.elem("return", true);
    if delete {
        x.open("deleteSnapshotResultSet");
        for (snap, r) in &results {
            let code = match r {
                Ok(()) => "success",
                Err(why) if why.starts_with("in use by") || why == KEPT_IN_BIN => "skipped",
                Err(_) => "client-error",
            };
            x.open("item")
                .elem("snapshotId", snap)
                .elem("returnCode", code)
                .close("item");
        }
        x.close("deleteSnapshotResultSet");
    }
    Ok(x.finish("DeregisterImage"))
}

/// The quiesce hook's URI of an attached volume: its Unix socket export.
pub fn hook_uri(state: &AwsState) -> impl Fn(&crate::engine::Volume) -> Option<String> + Sync + '_ {
    move |v| {
        v.record()
            .attachment
            .is_some()
            .then(|| state.endpoints.unix_uri(v.name.as_str()))
    }
}

pub async fn create(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&[
        "InstanceId",
        "Name",
        "Description",
        "NoReboot",
        "BlockDeviceMapping",
        "TagSpecification",
    ])?;
    let p = cx.p;
    let instance_id = p.required("InstanceId")?.to_owned();
    let mut specs = tag_specs(p, &["image", "snapshot"])?;
    let req = CaptureImage {
        instance_id: instance_id.clone(),
        name: p.required("Name")?.to_owned(),
        description: p.get("Description").unwrap_or("").to_owned(),
        no_reboot: p.bool("NoReboot")?.unwrap_or(false),
        mappings: mappings::parse(p, "BlockDeviceMapping")?,
        tags: specs.remove("image").unwrap_or_default(),
    };
    let snapshot_tags = specs.remove("snapshot").unwrap_or_default();
    let uri = hook_uri(cx.state);
    let (img, set) = cx.state.machines.create_image(req, &uri).await?;
    // EC2's description of the snapshots CreateImage takes.
    for m in &set.members {
        let volume_id = cx
            .state
            .engine
            .get(&m.volume)
            .map(|v| cx.state.engine.volume_id(&v.record()))
            .unwrap_or_default();
        let meta = AwsSnapshotRecord {
            description: format!(
                "Created by CreateImage({instance_id}) for {} from {volume_id}",
                img.id
            ),
            volume_id: Some(volume_id),
            tags: snapshot_tags.clone(),
        };
        cx.state.attrs.put_snapshot(&m.snapshot, &meta).await?;
    }
    let mut x = Xml::response("CreateImage", cx.rid);
    x.elem("imageId", &img.id);
    Ok(x.finish("CreateImage"))
}
