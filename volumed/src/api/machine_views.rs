//! JSON answers about images, instances and snapshot sets, built from the
//! machines layer's records and the engine's volumes.

use volumed_api::{Image, Instance, InstanceDevice, SetMember, SnapshotSet, SnapshotSetState};

use crate::catalog::{ImageRecord, InstanceRecord, SetState, SnapshotSetRecord, rfc3339};
use crate::engine::Engine;
use crate::present::NbdEndpoints;

pub fn image(rec: ImageRecord) -> Image {
    Image {
        id: rec.id,
        name: rec.name,
        description: rec.description,
        architecture: rec.architecture,
        root_device_name: rec.root_device_name,
        mappings: rec.mappings,
        state: rec.state,
        created_at: rfc3339(rec.created_at),
        tags: rec.tags,
        source_instance: rec.source_instance,
        error: rec.error,
    }
}

pub fn instance(engine: &Engine, ep: &NbdEndpoints, rec: InstanceRecord) -> Instance {
    let devices = rec
        .devices
        .iter()
        .map(|d| {
            let vol = d.volume.as_ref().and_then(|n| engine.get(n).ok());
            let attached = vol
                .as_ref()
                .is_some_and(|v| v.record().attachment.is_some());
            let export = d.volume.as_ref().map(|n| n.as_str());
            InstanceDevice {
                device_name: d.device_name.clone(),
                volume: d.volume.as_ref().map(ToString::to_string),
                volume_id: match (&d.virtual_name, &vol) {
                    (None, Some(v)) => Some(engine.volume_id(&v.record())),
                    _ => None,
                },
                virtual_name: d.virtual_name.clone(),
                size: vol.as_ref().map_or(d.size, |v| v.size()),
                delete_on_termination: d.delete_on_termination,
                uri: export.filter(|_| attached).map(|e| ep.tcp_uri(e)),
                unix_uri: export.filter(|_| attached).map(|e| ep.unix_uri(e)),
            }
        })
        .collect();
    Instance {
        id: rec.id,
        reservation_id: rec.reservation_id,
        image_id: rec.image_id,
        instance_type: rec.instance_type,
        state: rec.state,
        launched_at: rfc3339(rec.launched_at),
        root_device_name: rec.root_device_name,
        devices,
        tags: rec.tags,
    }
}

pub fn snapshot_set(rec: SnapshotSetRecord) -> SnapshotSet {
    SnapshotSet {
        id: rec.id,
        name: rec.name,
        state: match rec.state {
            SetState::Creating => SnapshotSetState::Pending,
            SetState::Completed => SnapshotSetState::Completed,
            SetState::Failed => SnapshotSetState::Failed,
        },
        created_at: rfc3339(rec.created_at),
        members: rec
            .members
            .into_iter()
            .map(|m| SetMember {
                volume: m.volume.to_string(),
                snapshot: m.snapshot.to_string(),
            })
            .collect(),
        error: rec.error,
    }
}
