//! EC2's snapshot actions: CreateSnapshot, DescribeSnapshots,
//! DeleteSnapshot. Every snapshot the host can see is listed (its own and
//! any in the shared store); EBS direct uploads in progress are this
//! host's pending snapshots.

use std::collections::BTreeMap;

use snapshot::SnapshotId;
use volumed_api::filter::{size_gib, wildcard};
use volumed_api::{CreateSnapshot, SnapshotState};

use super::xml::Xml;
use super::{Cx, Describe, Ec2Error, Ec2Result, max_results};
use crate::aws::{AwsState, OWNER_ID, iso8601, parse_rfc3339};
use crate::catalog::AwsSnapshotRecord;
use crate::engine::volume_id::is_volume_id;
use crate::lifecycle::Removed;
use crate::present::views;

/// What EC2 shows of a snapshot.
#[derive(Debug, Clone)]
pub struct Ec2Snapshot {
    pub id: String,
    pub volume_id: String,
    pub state: &'static str,
    pub start_time: u64,
    pub progress: u64,
    pub size_gib: u64,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub encryption: Option<volumed_api::EncryptionInfo>,
}

/// The tag EC2 shows on each snapshot of a set (CreateSnapshots,
/// CreateImage, `vol snapshot create --set`): the set's id.
pub const SET_TAG: &str = "volumed:snapshot-set";

/// The volume id EC2 shows for a snapshot whose volume is unknown, as AWS
/// does for snapshots not taken from a volume.
pub const UNKNOWN_VOLUME: &str = "vol-ffffffff";

pub fn snapshot_id(s: &str) -> Ec2Result<SnapshotId> {
    SnapshotId::parse(s).ok_or_else(|| {
        Ec2Error::new(
            "InvalidSnapshotID.Malformed",
            format!("Invalid id: \"{s}\" (expecting \"snap-...\")"),
        )
    })
}

/// The EC2 view of a snapshot as the control API reports it.
pub fn ec2_view(state: &AwsState, s: volumed_api::Snapshot) -> Ec2Result<Ec2Snapshot> {
    let id = snapshot_id(&s.id)?;
    let meta = state.attrs.snapshot(&id)?;
    let volume_id = meta
        .as_ref()
        .and_then(|m| m.volume_id.clone())
        .or_else(|| {
            let name = volumed_api::VolumeName::parse(&s.volume).ok()?;
            let vol = state.engine.get(&name).ok()?;
            Some(state.engine.volume_id(&vol.record()))
        })
        .or_else(|| is_volume_id(&s.volume).then(|| s.volume.clone()))
        .unwrap_or_else(|| UNKNOWN_VOLUME.to_owned());
    let (description, mut tags) = match meta {
        // The service's own labels (a policy's) show beside the user's tags.
        Some(m) => {
            let mut tags = m.tags;
            for (k, v) in &s.labels {
                if super::tags::reserved(k) {
                    tags.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            (m.description, tags)
        }
        None => (
            s.labels.get("description").cloned().unwrap_or_default(),
            s.labels.clone(),
        ),
    };
    if let Some(set) = state.engine.snapshot_set_of(&id) {
        tags.insert(SET_TAG.to_owned(), set);
    }
    Ok(Ec2Snapshot {
        id: s.id,
        volume_id,
        state: s.state.as_str(),
        start_time: parse_rfc3339(&s.created_at).unwrap_or(0),
        // Whole percent, as EC2 writes it; the float is within 0..=1.
        progress: (s.progress.clamp(0.0, 1.0) * 100.0) as u64,
        size_gib: size_gib(s.size),
        description,
        tags,
        encryption: s.encryption,
    })
}

pub fn write_snapshot(x: &mut Xml, s: &Ec2Snapshot) {
    x.elem("snapshotId", &s.id)
        .elem("volumeId", &s.volume_id)
        .elem("status", s.state)
        .elem("startTime", iso8601(s.start_time))
        .elem("progress", format!("{}%", s.progress))
        .elem("ownerId", OWNER_ID)
        .elem("volumeSize", s.size_gib)
        .elem("description", &s.description)
        .elem("encrypted", s.encryption.is_some())
        .opt(
            "kmsKeyId",
            s.encryption.as_ref().map(|e| e.kms_key_id.as_str()),
        )
        .opt(
            "dataEncryptionKeyId",
            s.encryption.as_ref().map(|e| e.data_key_id.as_str()),
        )
        .elem("storageTier", "standard")
        .tag_set(&s.tags);
}

/// Every snapshot EC2 shows: completed, pending and failed ones of this
/// host (direct uploads in progress among them) and the store's.
pub async fn all(state: &AwsState) -> Ec2Result<Vec<Ec2Snapshot>> {
    let mut out = Vec::new();
    for s in state.engine.snapshots(None).await? {
        out.push(ec2_view(
            state,
            views::snapshot(&state.engine, &state.endpoints, s),
        )?);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out.dedup_by(|a, b| a.id == b.id);
    Ok(out)
}

fn matches(name: &str, values: &[String], s: &Ec2Snapshot) -> Ec2Result<bool> {
    let candidates: Vec<String> = match name {
        "status" => vec![s.state.to_owned()],
        "snapshot-id" => vec![s.id.clone()],
        "volume-id" => vec![s.volume_id.clone()],
        "volume-size" => vec![s.size_gib.to_string()],
        "owner-id" => vec![OWNER_ID.to_owned()],
        "description" => vec![s.description.clone()],
        "progress" => vec![format!("{}%", s.progress)],
        "encrypted" => vec![s.encryption.is_some().to_string()],
        "kms-key-id" => s.encryption.iter().map(|e| e.kms_key_id.clone()).collect(),
        "tag-key" => s.tags.keys().cloned().collect(),
        other => match other.strip_prefix("tag:") {
            Some(k) if !k.is_empty() => s.tags.get(k).cloned().into_iter().collect(),
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

pub async fn create(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["VolumeId", "Description", "TagSpecification"])?;
    let vol = super::volumes::lookup(cx.state, cx.p.required("VolumeId")?)?;
    let description = cx.p.get("Description").unwrap_or("").to_owned();
    if description.chars().count() > 255 || description.chars().any(char::is_control) {
        return Err(Ec2Error::invalid_value(
            "Description",
            &description,
            "Expecting at most 255 printable characters.",
        ));
    }
    let tags = cx.p.tag_specifications("snapshot")?;
    volumed_api::validate_tags(&tags).map_err(|e| Ec2Error::invalid_parameter(e.to_string()))?;
    let rec = vol.record();
    let volume_id = cx.state.engine.volume_id(&rec);
    let snap = cx
        .state
        .engine
        .create_snapshot(&rec.name, CreateSnapshot::default())
        .await?;
    let meta = AwsSnapshotRecord {
        volume_id: Some(volume_id.clone()),
        description: description.clone(),
        tags: tags.clone(),
    };
    cx.state.attrs.put_snapshot(&snap.id, &meta).await?;
    let s = Ec2Snapshot {
        id: snap.id.to_string(),
        volume_id,
        state: SnapshotState::Pending.as_str(),
        start_time: snap.created_at,
        progress: 0,
        size_gib: size_gib(snap.size),
        description,
        tags,
        encryption: views::encryption(&cx.state.engine, rec.encryption.as_ref()),
    };
    let mut x = Xml::response("CreateSnapshot", cx.rid);
    write_snapshot(&mut x, &s);
    Ok(x.finish("CreateSnapshot"))
}

pub async fn describe(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&[
        "SnapshotId",
        "Owner",
        "RestorableBy",
        "Filter",
        "MaxResults",
        "NextToken",
    ])?;
    let p = cx.p;
    let ids = p.list("SnapshotId")?;
    for id in &ids {
        snapshot_id(id)?;
    }
    let max = max_results(p, 5, 1000)?;
    if !ids.is_empty() && max.is_some() {
        return Err(Ec2Error::new(
            "InvalidParameterCombination",
            "The parameter snapshotSet cannot be used with the parameter maxResults",
        ));
    }
    let owners = p.list("Owner")?;
    let ours = owners.is_empty() || owners.iter().any(|o| o == "self" || o == OWNER_ID);
    let filters = p.filters()?;
    let all = all(cx.state).await?;
    for id in &ids {
        if !all.iter().any(|s| &s.id == id) {
            return Err(Ec2Error::snapshot_not_found(id));
        }
    }
    Describe {
        action: "DescribeSnapshots",
        set: "snapshotSet",
        rid: cx.rid,
        ours,
        ids: &ids,
        filters: &filters,
        token: p.get("NextToken"),
        max,
    }
    .answer(all, |s| s.id.as_str(), matches, write_snapshot)
}

pub async fn delete(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["SnapshotId"])?;
    let id = snapshot_id(cx.p.required("SnapshotId")?)?;
    if cx.state.engine.is_uploading(&id) {
        return Err(Ec2Error::new(
            "IncorrectState",
            format!("Snapshot '{id}' is being written through the EBS direct APIs"),
        ));
    }
    // Refused while a registered image uses it (InvalidSnapshot.InUse).
    // Into the recycle bin, its EC2 attributes kept for a restore, or gone
    // for good with them.
    if cx.state.lifecycle.delete_snapshot(&id).await? == Removed::Deleted {
        cx.state.attrs.remove_snapshot(&id).await?;
    }
    let mut x = Xml::response("DeleteSnapshot", cx.rid);
    x.elem("return", true);
    Ok(x.finish("DeleteSnapshot"))
}
