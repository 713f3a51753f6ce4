//! Volume modifications: what ModifyVolume records and
//! DescribeVolumesModifications answers. A resize here is complete when
//! ModifyVolume returns, so every modification is `completed` with
//! progress 100; EC2 keeps the most recent one per volume, and so do we
//! (catalog tree `volume_modifications`, written only here).

use volumed_api::filter::{size_gib, wildcard};

use super::xml::Xml;
use super::{Cx, Ec2Error, Ec2Result, max_results, page, volume_types};
use crate::aws::{AwsState, iso8601};
use crate::catalog::{AwsVolumeRecord, VolumeModificationRecord, VolumeRecord};

/// The modification from `before` to `after` (one volume's records, whose
/// EC2 attributes are `attrs`), started at `start`, ended now: recorded,
/// and returned for the answer.
pub async fn record(
    state: &AwsState,
    before: &VolumeRecord,
    after: &VolumeRecord,
    attrs: &AwsVolumeRecord,
    start: u64,
) -> Ec2Result<VolumeModificationRecord> {
    let volume_id = state.engine.volume_id(after);
    // Only the size changes: the type and performance are the volume's.
    let vtype = attrs
        .volume_type
        .clone()
        .unwrap_or_else(|| volume_types::DEFAULT_TYPE.to_owned());
    let perf = |r: &VolumeRecord| {
        volume_types::reported(&vtype, size_gib(r.size), attrs.iops, attrs.throughput)
    };
    let (original_iops, original_throughput) = perf(before);
    let (target_iops, target_throughput) = perf(after);
    let rec = VolumeModificationRecord {
        volume_id,
        original_size: before.size,
        target_size: after.size,
        original_volume_type: vtype.clone(),
        target_volume_type: vtype.clone(),
        original_iops,
        target_iops,
        original_throughput,
        target_throughput,
        start_time: start,
        end_time: crate::catalog::unix_now(),
    };
    state.attrs.put_volume_modification(&rec).await?;
    Ok(rec)
}

/// Forgets a deleted volume's modification.
pub async fn forget(state: &AwsState, volume_id: &str) -> Ec2Result<()> {
    state.attrs.remove_volume_modification(volume_id).await?;
    Ok(())
}

/// The fields of one modification, inside its element.
pub fn write(x: &mut Xml, m: &VolumeModificationRecord) {
    x.elem("volumeId", &m.volume_id)
        .elem("modificationState", "completed")
        .elem("targetSize", size_gib(m.target_size))
        .opt("targetIops", m.target_iops)
        .elem("targetVolumeType", &m.target_volume_type)
        .opt("targetThroughput", m.target_throughput)
        .elem("targetMultiAttachEnabled", false)
        .elem("originalSize", size_gib(m.original_size))
        .opt("originalIops", m.original_iops)
        .elem("originalVolumeType", &m.original_volume_type)
        .opt("originalThroughput", m.original_throughput)
        .elem("originalMultiAttachEnabled", false)
        .elem("progress", 100)
        .elem("startTime", iso8601(m.start_time))
        .elem("endTime", iso8601(m.end_time));
}

/// The values filter `name` compares, or EC2's refusal of the name.
fn field(name: &str, m: &VolumeModificationRecord) -> Ec2Result<Vec<String>> {
    let opt = |v: Option<u64>| v.map(|n| n.to_string()).into_iter().collect();
    Ok(match name {
        "volume-id" => vec![m.volume_id.clone()],
        "modification-state" => vec!["completed".into()],
        "original-size" => vec![size_gib(m.original_size).to_string()],
        "target-size" => vec![size_gib(m.target_size).to_string()],
        "original-volume-type" => vec![m.original_volume_type.clone()],
        "target-volume-type" => vec![m.target_volume_type.clone()],
        "original-iops" => opt(m.original_iops),
        "target-iops" => opt(m.target_iops),
        "target-throughput" => opt(m.target_throughput),
        "start-time" => vec![iso8601(m.start_time)],
        "originalMultiAttachEnabled" | "targetMultiAttachEnabled" => vec!["false".into()],
        _ => {
            return Err(Ec2Error::invalid_parameter(format!(
                "The filter '{name}' is invalid"
            )));
        }
    })
}

pub async fn describe(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["VolumeId", "Filter", "MaxResults", "NextToken"])?;
    let p = cx.p;
    let ids = p.list("VolumeId")?;
    let max = max_results(p, 1, 500)?;
    let filters = p.filters()?;
    let known = cx.state.attrs.volume_modifications()?;
    // Only modifications of volumes that still exist.
    let mut all: Vec<VolumeModificationRecord> = known
        .into_iter()
        .filter(|m| cx.state.engine.find_volume_id(&m.volume_id).is_some())
        .collect();
    for id in &ids {
        super::volumes::lookup(cx.state, id)?;
        if !all.iter().any(|m| &m.volume_id == id) {
            return Err(Ec2Error::new(
                "InvalidVolumeModification.NotFound",
                format!("Modification for volume '{id}' does not exist."),
            ));
        }
    }
    if !ids.is_empty() {
        all.retain(|m| ids.contains(&m.volume_id));
    }
    let mut selected = Vec::with_capacity(all.len());
    for m in all {
        let mut keep = true;
        for (name, values) in &filters {
            let have = field(name, &m)?;
            keep &= have.iter().any(|h| values.iter().any(|v| wildcard(v, h)));
        }
        if keep {
            selected.push(m);
        }
    }
    selected.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
    let (selected, next) = page(selected, |m| m.volume_id.as_str(), p.get("NextToken"), max)?;
    let mut x = Xml::response("DescribeVolumesModifications", cx.rid);
    x.open("volumeModificationSet");
    for m in &selected {
        x.open("item");
        write(&mut x, m);
        x.close("item");
    }
    x.close("volumeModificationSet");
    x.opt("nextToken", next);
    Ok(x.finish("DescribeVolumesModifications"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> VolumeModificationRecord {
        VolumeModificationRecord {
            volume_id: "vol-0123456789abcdef0".into(),
            original_size: 1 << 30,
            target_size: 100 << 30,
            original_volume_type: "gp2".into(),
            target_volume_type: "gp2".into(),
            original_iops: Some(100),
            target_iops: Some(300),
            original_throughput: None,
            target_throughput: None,
            start_time: 0,
            end_time: 1,
        }
    }

    #[test]
    fn filters_compare_ec2_values() {
        let m = rec();
        assert_eq!(field("target-size", &m).unwrap(), ["100"]);
        assert_eq!(field("original-iops", &m).unwrap(), ["100"]);
        assert!(field("target-throughput", &m).unwrap().is_empty());
        assert_eq!(field("modification-state", &m).unwrap(), ["completed"]);
        assert_eq!(
            field("bogus", &m).unwrap_err().code,
            "InvalidParameterValue"
        );
    }
}
