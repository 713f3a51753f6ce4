//! EC2's Recycle Bin actions: ListSnapshotsInRecycleBin,
//! RestoreSnapshotFromRecycleBin, ListImagesInRecycleBin,
//! RestoreImageFromRecycleBin. The bin is the store's (`snapshot::bin`),
//! so every host sharing the store lists the same entries.
//!
//! Images come to the bin through DeregisterImage under an `EC2_IMAGE`
//! rule (`lifecycle::images`).

use super::snapshots::{ec2_view, snapshot_id, write_snapshot};
use super::xml::Xml;
use super::{Cx, Ec2Error, Ec2Result, max_results, page};
use crate::aws::{iso8601, parse_rfc3339};
use crate::lifecycle::LifecycleError;
use crate::present::views;

/// Lifecycle errors in EC2's words.
impl From<LifecycleError> for Ec2Error {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::Engine(e) => e.into(),
            LifecycleError::Machine(e) => e.into(),
            LifecycleError::Catalog(e) => e.into(),
            e => Ec2Error::invalid_parameter(volumed_api::error_chain(&e)),
        }
    }
}

pub async fn list_snapshots(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["MaxResults", "NextToken", "SnapshotId"])?;
    let max = max_results(cx.p, 5, 1000)?;
    let want = cx.p.list("SnapshotId")?;
    let mut entries = cx.state.lifecycle.bin_list_snapshots().await?;
    if !want.is_empty() {
        entries.retain(|e| want.contains(&e.id));
    }
    entries.sort_by(|a, b| a.id.cmp(&b.id));
    let (entries, next) = page(entries, |e| e.id.as_str(), cx.p.get("NextToken"), max)?;
    let mut x = Xml::response("ListSnapshotsInRecycleBin", cx.rid);
    x.open("snapshotSet");
    for e in &entries {
        let id = snapshot_id(&e.id)?;
        let meta = cx.state.attrs.snapshot(&id)?;
        let volume_id = meta
            .as_ref()
            .and_then(|m| m.volume_id.clone())
            .or_else(|| {
                e.labels
                    .get(crate::lifecycle::policy::VOLUME_LABEL)
                    .cloned()
            })
            .unwrap_or_else(|| super::snapshots::UNKNOWN_VOLUME.to_owned());
        let description = meta.map(|m| m.description).unwrap_or_default();
        x.open("item")
            .elem("snapshotId", &e.id)
            .elem(
                "recycleBinEnterTime",
                iso8601(parse_rfc3339(&e.entered_at).unwrap_or(0)),
            )
            .elem(
                "recycleBinExitTime",
                iso8601(parse_rfc3339(&e.expires_at).unwrap_or(0)),
            )
            .elem("description", description)
            .elem("volumeId", volume_id)
            .close("item");
    }
    x.close("snapshotSet");
    x.opt("nextToken", next);
    Ok(x.finish("ListSnapshotsInRecycleBin"))
}

pub async fn restore_snapshot(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["SnapshotId"])?;
    let id = snapshot_id(cx.p.required("SnapshotId")?)?;
    let info = cx.state.lifecycle.bin_restore(&id).await?;
    let s = ec2_view(
        cx.state,
        views::snapshot(&cx.state.engine, &cx.state.endpoints, info),
    )?;
    let mut x = Xml::response("RestoreSnapshotFromRecycleBin", cx.rid);
    write_snapshot(&mut x, &s);
    Ok(x.finish("RestoreSnapshotFromRecycleBin"))
}

pub async fn list_images(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["MaxResults", "NextToken", "ImageId"])?;
    let max = max_results(cx.p, 1, 1000)?;
    let want = cx.p.list("ImageId")?;
    let mut entries = cx.state.lifecycle.binned_images().await?;
    if !want.is_empty() {
        entries.retain(|e| want.contains(&e.record.id));
    }
    entries.sort_by(|a, b| a.record.id.cmp(&b.record.id));
    let (entries, next) = page(
        entries,
        |e| e.record.id.as_str(),
        cx.p.get("NextToken"),
        max,
    )?;
    let mut x = Xml::response("ListImagesInRecycleBin", cx.rid);
    x.open("imageSet");
    for e in &entries {
        let entered = e
            .entered
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        x.open("item")
            .elem("imageId", &e.record.id)
            .elem("name", &e.record.name)
            .elem("description", &e.record.description)
            .elem("recycleBinEnterTime", iso8601(entered))
            .elem("recycleBinExitTime", iso8601(e.expires))
            .close("item");
    }
    x.close("imageSet");
    x.opt("nextToken", next);
    Ok(x.finish("ListImagesInRecycleBin"))
}

pub async fn restore_image(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["ImageId"])?;
    let id = cx.p.required("ImageId")?;
    cx.state.lifecycle.bin_restore_image(id).await?;
    let mut x = Xml::response("RestoreImageFromRecycleBin", cx.rid);
    x.elem("return", true);
    Ok(x.finish("RestoreImageFromRecycleBin"))
}
