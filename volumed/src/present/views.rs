//! What the front-ends show: every JSON document the control API answers
//! with is built here from engine state (the AWS endpoint starts from the
//! same views). The engine knows nothing of its presentation.

use std::time::Duration;

use snapshot::ManifestHeader;
use volumed_api::{VolumeName, VolumeState};

use super::NbdEndpoints;
use crate::catalog::{Catalog, JobSpec, SnapshotRecord, SnapshotState, rfc3339};
use crate::engine::{Engine, FetchStats, SnapshotInfo, Volume};
use crate::images::registry::JobHandle;

/// The API's view of a volume, with the EC2 attributes the AWS endpoint
/// keeps for it in `catalog`.
pub fn volume(
    engine: &Engine,
    catalog: &Catalog,
    ep: &NbdEndpoints,
    vol: &Volume,
) -> volumed_api::Volume {
    let rec = vol.record();
    let aws = match catalog.aws_volume(rec.id) {
        Ok(a) => a.unwrap_or_default(),
        Err(e) => {
            tracing::warn!(volume = %rec.name, error = %volumed_api::error_chain(&e), "EC2 attributes unreadable");
            Default::default()
        }
    };
    let attached = rec.attachment.is_some();
    let name: &VolumeName = &rec.name;
    let (uri, unix_uri) = if attached {
        (
            Some(ep.tcp_uri(name.as_str())),
            Some(ep.unix_uri(name.as_str())),
        )
    } else {
        (None, None)
    };
    volumed_api::Volume {
        name: rec.name.clone(),
        size: rec.size,
        chunk_size: rec.chunk_size,
        ephemeral: rec.ephemeral,
        state: if rec.importing.is_some() {
            VolumeState::Importing
        } else if attached {
            VolumeState::Attached
        } else {
            VolumeState::Available
        },
        uri,
        unix_uri,
        source_snapshot: rec.source_snapshot.as_ref().map(ToString::to_string),
        instance: rec.attachment.as_ref().and_then(|a| a.instance.clone()),
        created_at: rfc3339(rec.created_at),
        attached_at: rec.attachment.as_ref().map(|a| rfc3339(a.attached_at)),
        allocated_bytes: vol.data().allocated_bytes(),
        hydration: hydration(engine, vol),
        health: match vol.failure() {
            Some(_) => volumed_api::VolumeHealth::Failed,
            None => volumed_api::VolumeHealth::Ok,
        },
        health_reason: vol.failure().map(str::to_owned),
        volume_id: engine.volume_id(&rec),
        tags: rec.tags.clone(),
        attachment: rec.attachment.as_ref().map(|a| {
            let ec2 = aws.attachment_of(a);
            volumed_api::Attachment {
                instance: a.instance.clone(),
                device: ec2.and_then(|e| e.device.clone()),
                delete_on_termination: ec2.is_some_and(|e| e.delete_on_termination),
                attached_at: rfc3339(a.attached_at),
            }
        }),
        volume_type: aws.volume_type.clone(),
        iops: aws.iops,
        throughput: aws.throughput,
        encrypted: rec.encryption.is_some(),
        encryption: encryption(engine, rec.encryption.as_ref()),
        memory_key: rec.memory_key,
    }
}

/// How a volume or snapshot is encrypted: its key as this host knows it.
pub fn encryption(
    engine: &Engine,
    enc: Option<&snapshot::Encryption>,
) -> Option<volumed_api::EncryptionInfo> {
    let enc = enc?;
    let keys = engine.keys().ok();
    Some(volumed_api::EncryptionInfo {
        key_id: enc.key.clone(),
        key: keys.and_then(|k| k.resolve(&enc.key).ok()).map(|k| k.name),
        kms_key_id: keys.map_or_else(|| enc.key.clone(), |k| k.arn(&enc.key)),
        data_key_id: enc.domain.to_string(),
        problem: keys.and_then(|k| {
            use snapshot::MasterKeys;
            k.check(&enc.key).err().map(|e| e.to_string())
        }),
    })
}

/// The API's view of a key.
pub fn key(k: crate::keys::KeyInfo) -> volumed_api::Key {
    volumed_api::Key {
        state: match (&k.unavailable, k.enabled) {
            (Some(_), _) => "unavailable",
            (None, true) => "enabled",
            (None, false) => "disabled",
        }
        .into(),
        reason: k.unavailable,
        id: k.id,
        name: k.name,
        arn: k.arn,
        aliases: k.aliases,
        version: k.version,
        created_at: k.created_at,
        description: k.description,
        source: k.source.into(),
        default: k.default,
    }
}

/// A restored volume's hydration; null for other volumes.
fn hydration(engine: &Engine, vol: &Volume) -> Option<volumed_api::Hydration> {
    engine.hydration(vol).map(|h| volumed_api::Hydration {
        state: h.state.as_str().into(),
        hydrated_bytes: h.hydrated_bytes,
        total_bytes: h.total_bytes,
        error: h.error,
    })
}

/// The API's view of a snapshot, with its NBD export while attached.
pub fn snapshot(engine: &Engine, ep: &NbdEndpoints, s: SnapshotInfo) -> volumed_api::Snapshot {
    let export = engine
        .snapshot_attached_at(s.id())
        .map(|at| volumed_api::SnapshotExport {
            uri: ep.tcp_uri(s.id().as_str()),
            unix_uri: ep.unix_uri(s.id().as_str()),
            attached_at: rfc3339(at),
        });
    let enc = encryption(engine, s.encryption());
    let mut view = match s {
        SnapshotInfo::Recorded { rec, live } => recorded(rec, live),
        SnapshotInfo::Stored(h) => stored(h),
    };
    view.export = export;
    view.encrypted = enc.is_some();
    view.encryption = enc;
    view
}

fn recorded(rec: SnapshotRecord, live: Option<(u64, u64)>) -> volumed_api::Snapshot {
    let (done, total) = match (rec.state, live) {
        (SnapshotState::Pending, Some(p)) => p,
        _ => (rec.chunks_done, rec.chunks_total),
    };
    let progress = match rec.state {
        SnapshotState::Completed => 1.0,
        _ if total == 0 => 0.0,
        _ => done as f64 / total as f64,
    };
    volumed_api::Snapshot {
        id: rec.id.to_string(),
        volume: rec.volume,
        state: match rec.state {
            SnapshotState::Pending => volumed_api::SnapshotState::Pending,
            SnapshotState::Completed => volumed_api::SnapshotState::Completed,
            SnapshotState::Error => volumed_api::SnapshotState::Error,
        },
        size: rec.size,
        chunk_size: rec.chunk_size,
        parent: rec.parent.map(|p| p.to_string()),
        created_at: rfc3339(rec.created_at),
        completed_at: rec.completed_at.map(rfc3339),
        labels: rec.labels,
        changed_chunks: rec.changed_chunks,
        logical_bytes: rec.logical_bytes,
        uploaded_bytes: rec.uploaded_bytes,
        progress,
        chunks_done: done,
        chunks_total: total,
        error: rec.error,
        protected: false,
        protection_unknown: false,
        export: None,
        encrypted: false,
        encryption: None,
    }
}

/// A snapshot known only from its manifest: only completed ones have one.
fn stored(h: ManifestHeader) -> volumed_api::Snapshot {
    volumed_api::Snapshot {
        id: h.id.to_string(),
        volume: h.volume,
        state: volumed_api::SnapshotState::Completed,
        size: h.size,
        chunk_size: h.chunk_size,
        parent: h.parent.map(|p| p.to_string()),
        created_at: h.created_at,
        completed_at: None,
        labels: h.labels,
        changed_chunks: h.changed_chunks,
        logical_bytes: h.logical_bytes,
        uploaded_bytes: h.uploaded_bytes,
        progress: 1.0,
        chunks_done: h.changed_chunks,
        chunks_total: h.changed_chunks,
        error: None,
        protected: false,
        protection_unknown: false,
        export: None,
        encrypted: false,
        encryption: None,
    }
}

pub fn verify_report(r: snapshot::verify::VerifyReport) -> volumed_api::VerifyReport {
    let bad = |b: snapshot::verify::BadChunk| volumed_api::BadChunk {
        hash: b.hash.to_hex(),
        indices: b.indices,
        error: b.error,
    };
    volumed_api::VerifyReport {
        snapshot: r.snapshot.to_string(),
        // A check of the framing alone is not a verified snapshot.
        ok: r.is_ok() && r.framing_only.is_none(),
        chunks: r.chunks,
        objects: r.objects,
        ok_objects: r.ok_objects,
        missing: r.missing.into_iter().map(bad).collect(),
        damaged: r.damaged.into_iter().map(bad).collect(),
        framing_only: r.framing_only,
    }
}

pub fn gc_report(grace: Duration, r: snapshot::gc::GcReport) -> volumed_api::GcReport {
    volumed_api::GcReport {
        grace_secs: grace.as_secs(),
        manifests: r.manifests,
        holds: r.holds,
        trash_honoured: r.trash_honoured,
        trash_expired: r.trash_expired,
        bin_honoured: r.bin_honoured,
        bin_expired: r.bin_expired,
        images_expired: 0,
        image_snapshots_deleted: 0,
        pending_snapshots: r.pending_snapshots,
        pending_expired: r.pending_expired,
        chunks_seen: r.chunks_seen,
        chunks_referenced: r.chunks_referenced,
        chunks_young: r.chunks_young,
        chunks_deleted: r.chunks_deleted,
        bytes_deleted: r.bytes_deleted,
        pages_seen: r.pages_seen,
        pages_referenced: r.pages_referenced,
        pages_young: r.pages_young,
        pages_deleted: r.pages_deleted,
    }
}

/// The daemon's status: fixed facts from start-up and live counts.
pub fn status(base: &volumed_api::Status, engine: &Engine) -> volumed_api::Status {
    let FetchStats {
        fetches,
        fetched_bytes,
        cache_bytes,
        cache_hits,
    } = engine.fetch_stats();
    volumed_api::Status {
        volumes: engine.list().len(),
        store_fetches: fetches,
        store_fetched_bytes: fetched_bytes,
        cache_bytes,
        cache_hits,
        ..base.clone()
    }
}

/// The API's view of a diff.
pub fn snapshot_diff(d: snapshot::diff::Diff) -> volumed_api::SnapshotDiff {
    volumed_api::SnapshotDiff {
        from: d.from.map(|f| f.to_string()),
        to: d.to.to_string(),
        volume_size: d.volume_size,
        chunk_size: d.chunk_size,
        changed_bytes: d.changed_bytes,
        extents: d
            .extents
            .into_iter()
            .map(|e| volumed_api::DiffExtent {
                offset: e.offset,
                length: e.length,
                zero: e.zero,
            })
            .collect(),
    }
}

/// Changed blocks per page unless the client asks for fewer or more.
pub const CHANGED_BLOCKS_PAGE: usize = 1000;
pub const CHANGED_BLOCKS_MAX_PAGE: usize = 10_000;

/// One page of a diff's extents from byte `start` on, at most `max` of
/// them, the first clipped to `start`. The token of the next page is the
/// byte it starts at.
pub fn changed_blocks(
    d: &snapshot::diff::Diff,
    start: u64,
    max: usize,
) -> volumed_api::ChangedBlocks {
    let mut rest = d
        .extents
        .iter()
        .filter(|e| e.offset.saturating_add(e.length) > start)
        .map(|e| {
            let from = e.offset.max(start);
            volumed_api::BlockMetadata {
                byte_offset: from,
                size_bytes: e.offset + e.length - from,
            }
        })
        .peekable();
    let block_metadata: Vec<_> = rest.by_ref().take(max).collect();
    let next_token = match (rest.peek(), block_metadata.last()) {
        (Some(_), Some(last)) => Some((last.byte_offset + last.size_bytes).to_string()),
        _ => None,
    };
    volumed_api::ChangedBlocks {
        block_metadata_type: "VARIABLE_LENGTH".into(),
        volume_capacity_bytes: d.volume_size,
        block_metadata,
        next_token,
    }
}

/// The API's view of a job, with its live progress.
pub fn job(h: &JobHandle) -> volumed_api::Job {
    use std::sync::atomic::Ordering;
    let rec = h.record();
    let bytes_done = match rec.state {
        volumed_api::JobState::Completed => rec.bytes_total,
        _ => h.bytes_done.load(Ordering::Relaxed),
    };
    let (source, destination, sha256) = match &rec.spec {
        JobSpec::Import(i) => (i.request.source.clone(), None, i.sha256.clone()),
        JobSpec::Export(e) => (
            e.request.source.clone(),
            Some(e.request.destination.clone()),
            None,
        ),
    };
    let volumes = rec.volumes();
    let owner = rec.export().and_then(|e| e.owner.clone());
    let snapshot_kept = rec
        .export()
        .filter(|e| {
            rec.state.is_final()
                && (e.volume.is_some() || !e.disks.is_empty())
                && (rec.snapshot.is_some() || e.snapshot_removed)
        })
        .map(|e| !e.snapshot_removed);
    volumed_api::Job {
        id: rec.id.to_string(),
        kind: rec.kind(),
        state: rec.state,
        bytes_done,
        bytes_total: rec.bytes_total.max(bytes_done),
        volume: volumes.first().map(ToString::to_string),
        volumes: volumes.iter().map(ToString::to_string).collect(),
        error: rec.error.clone(),
        source,
        destination,
        owner,
        snapshot_kept,
        format: rec.format.clone(),
        snapshot: rec.snapshot.as_ref().map(ToString::to_string),
        sha256,
        created_at: rfc3339(rec.created_at),
        finished_at: rec.finished_at.map(rfc3339),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::{create_req, name, open_with_catalog};
    use snapshot::diff::{Diff, Extent};

    fn endpoints() -> NbdEndpoints {
        NbdEndpoints {
            tcp: "127.0.0.1:10809".parse().unwrap(),
            unix: "/tmp/nbd.sock".into(),
            tls: false,
        }
    }

    #[tokio::test]
    async fn an_attached_volume_shows_its_uris() {
        let dir = tempfile::tempdir().unwrap();
        let (e, catalog, _) = open_with_catalog(dir.path()).await;
        let catalog = &*catalog;
        e.create(create_req("a", 1 << 30, false)).await.unwrap();
        let attach = volumed_api::AttachVolume {
            instance: Some("i-1".into()),
        };
        e.attach(&name("a"), attach).await.unwrap();
        let v = volume(&e, catalog, &endpoints(), &e.get(&name("a")).unwrap());
        assert_eq!(v.uri.as_deref(), Some("nbd://127.0.0.1:10809/a"));
        assert_eq!(
            v.unix_uri.as_deref(),
            Some("nbd+unix:///a?socket=/tmp/nbd.sock")
        );
    }

    #[test]
    fn changed_blocks_pages_cover_every_extent_once() {
        let extents: Vec<Extent> = (0..25)
            .map(|i| Extent {
                offset: i * 1000,
                length: 500,
                zero: i % 3 == 0,
            })
            .collect();
        let d = Diff {
            from: None,
            to: snapshot::SnapshotId::parse("snap-x").unwrap(),
            volume_size: 25_000,
            chunk_size: 500,
            changed_bytes: 25 * 500,
            extents,
        };
        let mut start = 0;
        let mut seen = Vec::new();
        loop {
            let page = changed_blocks(&d, start, 7);
            assert!(page.block_metadata.len() <= 7);
            seen.extend(
                page.block_metadata
                    .iter()
                    .map(|b| (b.byte_offset, b.size_bytes)),
            );
            match page.next_token {
                Some(t) => start = t.parse().unwrap(),
                None => break,
            }
        }
        let want: Vec<_> = d.extents.iter().map(|e| (e.offset, e.length)).collect();
        assert_eq!(seen, want);
        // A start inside an extent clips it.
        let page = changed_blocks(&d, 1200, 2);
        assert_eq!(
            (
                page.block_metadata[0].byte_offset,
                page.block_metadata[0].size_bytes
            ),
            (1200, 300)
        );
        assert!(changed_blocks(&d, 25_000, 5).block_metadata.is_empty());
        assert!(changed_blocks(&d, u64::MAX, 5).next_token.is_none());
    }
}
