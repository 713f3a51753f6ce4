//! EC2's tag actions on volumes, snapshots, images and instances:
//! CreateTags, DeleteTags, DescribeTags. Every resource is resolved before any is changed, so a
//! request naming one unknown resource changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use volumed_api::filter::wildcard;

use super::snapshots::{self, snapshot_id};
use super::volumes;
use super::xml::Xml;
use super::{Cx, Ec2Error, Ec2Result, max_results, page};
use crate::aws::AwsState;
use crate::catalog::AwsSnapshotRecord;
use crate::engine::Volume;

enum Resource {
    Volume(Arc<Volume>),
    Snapshot(Box<snapshots::Ec2Snapshot>),
    Image(crate::catalog::ImageRecord),
    Instance(crate::catalog::InstanceRecord),
}

impl Resource {
    fn tags(&self) -> BTreeMap<String, String> {
        match self {
            Resource::Volume(v) => v.record().tags,
            // The set tag is shown, not kept: it is no tag of the record.
            Resource::Snapshot(s) => {
                let mut t = s.tags.clone();
                t.remove(snapshots::SET_TAG);
                t
            }
            Resource::Image(i) => i.tags.clone(),
            Resource::Instance(i) => i.tags.clone(),
        }
    }
}

async fn resolve(state: &AwsState, ids: &[String]) -> Ec2Result<Vec<Resource>> {
    if ids.is_empty() {
        return Err(Ec2Error::missing("ResourceId"));
    }
    let mut snaps: Option<Vec<snapshots::Ec2Snapshot>> = None;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if id.starts_with("vol-") {
            out.push(Resource::Volume(volumes::lookup(state, id)?));
        } else if id.starts_with("snap-") {
            snapshot_id(id)?;
            if snaps.is_none() {
                snaps = Some(snapshots::all(state).await?);
            }
            let s = snaps
                .as_ref()
                .and_then(|all| all.iter().find(|s| &s.id == id))
                .filter(|s| s.state == "completed" || s.state == "pending")
                .ok_or_else(|| Ec2Error::snapshot_not_found(id))?;
            if state.engine.is_uploading(&snapshot_id(id)?) {
                return Err(Ec2Error::new(
                    "IncorrectState",
                    format!("Snapshot '{id}' is being written; tag it when it completes"),
                ));
            }
            out.push(Resource::Snapshot(Box::new(s.clone())));
        } else if id.starts_with("ami-") {
            out.push(Resource::Image(state.machines.image(id).await?));
        } else if id.starts_with("i-") {
            out.push(Resource::Instance(state.machines.instance(id).await?));
        } else {
            return Err(Ec2Error::new(
                "InvalidID",
                format!(
                    "The ID '{id}' is not valid: only volumes, snapshots, images and instances have tags here"
                ),
            ));
        }
    }
    Ok(out)
}

/// Sets `set` and removes `remove` on every resource.
async fn retag(
    state: &AwsState,
    resources: Vec<Resource>,
    set: &BTreeMap<String, String>,
    remove: &[(String, Option<String>)],
) -> Ec2Result<()> {
    // Checked on each resource first, so one that would break the limit
    // changes nothing anywhere.
    for r in &resources {
        crate::engine::volume_id::retag(&r.tags(), set, remove)?;
    }
    for r in resources {
        match r {
            Resource::Volume(v) => {
                let name = v.record().name.clone();
                state.engine.tag_volume(&name, set, remove).await?;
            }
            r @ Resource::Snapshot(_) => {
                let current = r.tags();
                let Resource::Snapshot(s) = r else {
                    unreachable!("matched just above")
                };
                let id = snapshot_id(&s.id)?;
                // Reserved keys (`volumed:policy`, a set's id) come from the
                // snapshot's labels and are shown from there; only the
                // user's tags are the endpoint's to keep.
                let current: BTreeMap<String, String> =
                    current.into_iter().filter(|(k, _)| !reserved(k)).collect();
                let tags = crate::engine::volume_id::retag(&current, set, remove)?;
                let meta = AwsSnapshotRecord {
                    volume_id: Some(s.volume_id.clone()),
                    description: s.description.clone(),
                    tags,
                };
                state.attrs.put_snapshot(&id, &meta).await?;
            }
            Resource::Image(i) => state.machines.tag_image(&i.id, set, remove).await?,
            Resource::Instance(i) => state.machines.tag_instance(&i.id, set, remove).await?,
        }
    }
    Ok(())
}

/// A key the service keeps for itself (`aws:`, `volumed:`).
pub fn reserved(k: &str) -> bool {
    volumed_api::filter::RESERVED_TAG_PREFIXES
        .iter()
        .any(|p| k.starts_with(p))
}

fn check_keys<'a>(keys: impl IntoIterator<Item = &'a String>) -> Ec2Result<()> {
    for k in keys {
        if reserved(k) {
            return Err(Ec2Error::invalid_parameter(format!(
                "Tag keys starting with 'aws:' or 'volumed:' are reserved: {k}"
            )));
        }
    }
    Ok(())
}

pub async fn create(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["ResourceId", "Tag"])?;
    let ids = cx.p.list("ResourceId")?;
    let set = cx.p.tag_map("Tag")?;
    if set.is_empty() {
        return Err(Ec2Error::missing("Tag"));
    }
    check_keys(set.keys())?;
    volumed_api::validate_tags(&set).map_err(|e| Ec2Error::invalid_parameter(e.to_string()))?;
    let resources = resolve(cx.state, &ids).await?;
    retag(cx.state, resources, &set, &[]).await?;
    let mut x = Xml::response("CreateTags", cx.rid);
    x.elem("return", true);
    Ok(x.finish("CreateTags"))
}

pub async fn delete(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["ResourceId", "Tag"])?;
    let ids = cx.p.list("ResourceId")?;
    let mut remove = cx.p.tags("Tag")?;
    check_keys(remove.iter().map(|(k, _)| k))?;
    let resources = resolve(cx.state, &ids).await?;
    if remove.is_empty() {
        // No Tag parameter: every tag of each resource goes, as in EC2.
        for r in &resources {
            remove.extend(r.tags().into_keys().map(|k| (k, None)));
        }
    }
    retag(cx.state, resources, &BTreeMap::new(), &remove).await?;
    let mut x = Xml::response("DeleteTags", cx.rid);
    x.elem("return", true);
    Ok(x.finish("DeleteTags"))
}

struct TagRow {
    resource_id: String,
    resource_type: &'static str,
    key: String,
    value: String,
    /// Orders rows by resource, then key: ids hold no spaces.
    sort: String,
}

pub async fn describe(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["Filter", "MaxResults", "NextToken"])?;
    let max = max_results(cx.p, 5, 1000)?;
    let filters = cx.p.filters()?;
    for (name, _) in &filters {
        if !matches!(
            name.as_str(),
            "resource-id" | "resource-type" | "key" | "value"
        ) {
            return Err(Ec2Error::invalid_parameter(format!(
                "The filter '{name}' is invalid"
            )));
        }
    }
    let mut rows = Vec::new();
    let mut push = |id: &str, kind: &'static str, tags: &BTreeMap<String, String>| {
        for (k, v) in tags {
            rows.push(TagRow {
                resource_id: id.to_owned(),
                resource_type: kind,
                key: k.clone(),
                value: v.clone(),
                sort: format!("{id} {k}"),
            });
        }
    };
    for vol in cx.state.engine.list() {
        let v = volumes::view(cx.state, &vol);
        push(&v.volume_id, "volume", &v.tags);
    }
    for s in snapshots::all(cx.state).await? {
        push(&s.id, "snapshot", &s.tags);
    }
    for i in cx.state.machines.images().await? {
        push(&i.id, "image", &i.tags);
    }
    for i in cx.state.machines.instances().await? {
        push(&i.id, "instance", &i.tags);
    }
    rows.retain(|r| {
        filters.iter().all(|(name, values)| {
            let c = match name.as_str() {
                "resource-id" => r.resource_id.as_str(),
                "resource-type" => r.resource_type,
                "key" => r.key.as_str(),
                _ => r.value.as_str(),
            };
            values.iter().any(|p| wildcard(p, c))
        })
    });
    rows.sort_by(|a, b| a.sort.cmp(&b.sort));
    let (rows, next) = page(rows, |r| r.sort.as_str(), cx.p.get("NextToken"), max)?;
    let mut x = Xml::response("DescribeTags", cx.rid);
    x.open("tagSet");
    for r in &rows {
        x.open("item")
            .elem("resourceId", &r.resource_id)
            .elem("resourceType", r.resource_type)
            .elem("key", &r.key)
            .elem("value", &r.value)
            .close("item");
    }
    x.close("tagSet");
    x.opt("nextToken", next);
    Ok(x.finish("DescribeTags"))
}
