//! `vol snapshot diff`: changed blocks between two snapshots, for people (a
//! summary and a table) and for backup tools in three JSON shapes: ours,
//! `rbd diff --format json`, and EBS ListChangedBlocks.

use serde::Serialize;
use volumed_api::{SnapshotDiff, format_size};

use crate::args::DiffFormat;
use crate::client::Client;
use crate::output::Out;

/// The block size of the EBS direct APIs.
const EBS_BLOCK: u64 = 512 << 10;

/// One entry of `rbd diff --format json`: `exists` is a string there.
#[derive(Serialize)]
struct RbdExtent {
    offset: u64,
    length: u64,
    exists: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct EbsBlock {
    block_index: u64,
}

/// The shape of EBS ListChangedBlocks' answer.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct EbsChangedBlocks {
    block_size: u64,
    /// GiB, rounded up.
    volume_size: u64,
    changed_blocks: Vec<EbsBlock>,
}

pub async fn run(
    client: &Client,
    out: &Out,
    from: Option<String>,
    to: String,
    format: Option<DiffFormat>,
) -> anyhow::Result<()> {
    let path = match &from {
        Some(f) => format!("/v1/snapshots/{to}/diff?from={f}"),
        None => format!("/v1/snapshots/{to}/diff"),
    };
    let d: SnapshotDiff = client.get(&path).await?;
    match format {
        Some(DiffFormat::Json) => Ok(out.json(&d)?),
        None if out.json => Ok(out.json(&d)?),
        Some(DiffFormat::Rbd) => Ok(out.compact_json(&rbd(&d))?),
        Some(DiffFormat::Ebs) => Ok(out.compact_json(&ebs(&d)?)?),
        None => human(out, &d),
    }
}

fn rbd(d: &SnapshotDiff) -> Vec<RbdExtent> {
    d.extents
        .iter()
        .map(|e| RbdExtent {
            offset: e.offset,
            length: e.length,
            exists: if e.zero { "false" } else { "true" },
        })
        .collect()
}

fn ebs(d: &SnapshotDiff) -> anyhow::Result<EbsChangedBlocks> {
    if d.chunk_size != EBS_BLOCK {
        anyhow::bail!(
            "snapshot {} has {} chunks; --format ebs needs 512 KiB chunks, the EBS block size",
            d.to,
            format_size(d.chunk_size)
        );
    }
    let changed_blocks = d
        .extents
        .iter()
        .flat_map(|e| e.offset / EBS_BLOCK..(e.offset + e.length).div_ceil(EBS_BLOCK))
        .map(|block_index| EbsBlock { block_index })
        .collect();
    Ok(EbsChangedBlocks {
        block_size: EBS_BLOCK,
        volume_size: d.volume_size.div_ceil(1 << 30),
        changed_blocks,
    })
}

fn human(out: &Out, d: &SnapshotDiff) -> anyhow::Result<()> {
    let what = match &d.from {
        Some(f) => format!("from {f} to {}", d.to),
        None => format!("allocated in {}", d.to),
    };
    out.line(format!(
        "{what}: {} in {} extents ({} chunks)",
        format_size(d.changed_bytes),
        d.extents.len(),
        format_size(d.chunk_size)
    ))?;
    if d.extents.is_empty() {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = d
        .extents
        .iter()
        .map(|e| {
            vec![
                e.offset.to_string(),
                e.length.to_string(),
                if e.zero { "zero" } else { "data" }.to_owned(),
            ]
        })
        .collect();
    out.table(&["OFFSET", "LENGTH", "KIND"], &rows)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use volumed_api::DiffExtent;

    fn d(chunk: u64, extents: Vec<DiffExtent>) -> SnapshotDiff {
        SnapshotDiff {
            from: Some("snap-a".into()),
            to: "snap-b".into(),
            volume_size: 3 << 30,
            chunk_size: chunk,
            changed_bytes: extents.iter().map(|e| e.length).sum(),
            extents,
        }
    }

    #[test]
    fn shapes() {
        let x = d(
            EBS_BLOCK,
            vec![
                DiffExtent {
                    offset: 0,
                    length: 2 * EBS_BLOCK,
                    zero: false,
                },
                DiffExtent {
                    offset: 10 * EBS_BLOCK,
                    length: EBS_BLOCK,
                    zero: true,
                },
            ],
        );
        assert_eq!(
            serde_json::to_string(&rbd(&x)).unwrap(),
            r#"[{"offset":0,"length":1048576,"exists":"true"},{"offset":5242880,"length":524288,"exists":"false"}]"#
        );
        assert_eq!(
            serde_json::to_string(&ebs(&x).unwrap()).unwrap(),
            r#"{"BlockSize":524288,"VolumeSize":3,"ChangedBlocks":[{"BlockIndex":0},{"BlockIndex":1},{"BlockIndex":10}]}"#
        );
        let e = ebs(&d(64 << 10, vec![])).err().unwrap().to_string();
        assert!(e.contains("512 KiB"), "{e}");
    }
}
