//! The AWS endpoint's own records, and their one writer: the EC2 attributes
//! of volumes (`volume_type`, `iops`, `throughput`, an attachment's device
//! and DeleteOnTermination) and of snapshots (tags, description, source
//! volume id), in the catalog trees `aws_volumes` and `aws_snapshots`.
//!
//! A volume's attributes are keyed by its id, never its name, and an
//! attachment's by the attachment's id: a volume deleted and created again
//! under its name, or attached again, never inherits them. Records of
//! volumes and snapshots that are gone are never shown; a volume's are
//! removed when the endpoint deletes it and swept at start. A snapshot's
//! are removed when the endpoint deletes it for good, and swept when it
//! went another way: at start, whenever the lifecycle layer deleted
//! snapshots (`vol`, prune, a recycle-bin entry or image that expired),
//! and every [`SNAPSHOT_SWEEP_EVERY`] (another host). A snapshot in the
//! recycle bin keeps them for its restore.

use std::sync::Arc;

use tracing::info;
use volumed_api::validate_tags;

use crate::catalog::{
    AwsSnapshotRecord, AwsVolumeRecord, Catalog, CatalogError, VolumeModificationRecord,
};
use crate::engine::{Engine, Error, Volume};

/// How often the attributes of snapshots deleted other than through the
/// endpoint are swept. Nothing shows them meanwhile (every answer starts
/// from the engine's snapshots); the sweep only keeps the tree from
/// growing with deletions.
pub const SNAPSHOT_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

pub struct Ec2Attributes {
    catalog: Arc<Catalog>,
    /// Read-modify-writes of these trees take turns.
    writes: tokio::sync::Mutex<()>,
}

impl Ec2Attributes {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Ec2Attributes {
            catalog,
            writes: tokio::sync::Mutex::new(()),
        }
    }

    /// The catalog, to read: the views show these attributes too.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// `vol`'s attributes (all unset if none were given).
    pub fn volume(&self, vol: &Volume) -> Result<AwsVolumeRecord, CatalogError> {
        Ok(self.catalog.aws_volume(vol.id)?.unwrap_or_default())
    }

    /// Changes `vol`'s attributes with `change`.
    pub async fn update_volume(
        &self,
        vol: &Volume,
        change: impl FnOnce(&mut AwsVolumeRecord),
    ) -> Result<(), CatalogError> {
        let _turn = self.writes.lock().await;
        let mut rec = self.volume(vol)?;
        change(&mut rec);
        self.catalog.put_aws_volume(vol.id, &rec).await
    }

    /// Sets what the current attachment of `vol` was attached as.
    pub async fn set_attachment(
        &self,
        vol: &Volume,
        change: impl FnOnce(&mut crate::catalog::AwsAttachmentRecord),
    ) -> Result<(), Error> {
        let Some(att) = vol.record().attachment else {
            return Err(Error::VolumeNotAttached(vol.name.clone()));
        };
        self.update_volume(vol, |rec| {
            let mut a = rec
                .attachment
                .take()
                .filter(|a| a.attachment == att.id)
                .unwrap_or_default();
            a.attachment = att.id;
            change(&mut a);
            rec.attachment = Some(a);
        })
        .await?;
        Ok(())
    }

    /// Forgets the attributes of the volume with id `id` (deleted).
    pub async fn remove_volume(&self, id: u64) -> Result<(), CatalogError> {
        let _turn = self.writes.lock().await;
        self.catalog.remove_aws_volume(id).await
    }

    /// At start: forgets the attributes of volumes the catalog no longer
    /// records (deleted other than through the endpoint). A volume whose
    /// files failed to open is still recorded, and keeps them.
    pub async fn sweep(&self) -> Result<(), CatalogError> {
        let live: std::collections::HashSet<u64> =
            self.catalog.volumes()?.iter().map(|r| r.id).collect();
        let mut gone = 0;
        for id in self.catalog.aws_volume_ids()? {
            if !live.contains(&id) {
                self.remove_volume(id).await?;
                gone += 1;
            }
        }
        if gone > 0 {
            info!(
                volumes = gone,
                "forgot the EC2 attributes of deleted volumes"
            );
        }
        Ok(())
    }

    /// Forgets the attributes of snapshots that are neither visible to the
    /// engine nor in the recycle bin. Returns how many went and how many
    /// stay. A store that cannot answer stops the sweep: nothing goes on a
    /// guess.
    ///
    /// Each candidate is asked about twice, before and after the bin is
    /// listed, so a snapshot moving into the bin (entry written, then the
    /// manifest removed) or out of it (manifest written, then the entry
    /// removed) is seen in one place or the other.
    pub async fn sweep_snapshots(&self, engine: &Engine) -> Result<(u64, u64), Error> {
        let ids = self.catalog.aws_snapshot_ids()?;
        let mut candidates = Vec::new();
        for raw in &ids {
            let Some(id) = snapshot::SnapshotId::parse(raw) else {
                continue;
            };
            match engine.snapshot(&id).await {
                Ok(_) => {}
                Err(Error::SnapshotNotFound(_)) => candidates.push(id),
                Err(e) => return Err(e),
            }
        }
        if candidates.is_empty() {
            return Ok((0, ids.len() as u64));
        }
        let binned: std::collections::HashSet<snapshot::SnapshotId> = engine
            .binned_snapshots()
            .await?
            .into_iter()
            .map(|(e, _)| e.id)
            .collect();
        let mut gone = 0;
        for id in candidates.into_iter().filter(|id| !binned.contains(id)) {
            match engine.snapshot(&id).await {
                Ok(_) => continue,
                Err(Error::SnapshotNotFound(_)) => {}
                Err(e) => return Err(e),
            }
            self.remove_snapshot(&id).await?;
            gone += 1;
        }
        Ok((gone, ids.len() as u64 - gone))
    }

    /// The sweep, logged; run at start, after the lifecycle layer deleted
    /// snapshots for good (a delete, a prune, an expiry), and every
    /// [`SNAPSHOT_SWEEP_EVERY`] for the rest (another host), until
    /// `shutdown`.
    pub async fn sweep_snapshots_every(
        &self,
        engine: &Engine,
        lifecycle: &crate::lifecycle::Lifecycle,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            match self.sweep_snapshots(engine).await {
                Ok((0, _)) => {}
                Ok((removed, kept)) => info!(
                    removed,
                    kept, "forgot the EC2 attributes of deleted snapshots"
                ),
                // The daemon stopping cancels the store's calls under it.
                Err(Error::Store { source, .. }) if source.is_cancelled() => return,
                Err(_) if shutdown.is_cancelled() => return,
                Err(e) => tracing::warn!(
                    error = %volumed_api::error_chain(&e),
                    "could not sweep the EC2 attributes of deleted snapshots; trying again later"
                ),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SNAPSHOT_SWEEP_EVERY) => {}
                _ = lifecycle.snapshot_removed() => {}
            }
        }
    }

    /// The EC2 metadata of a snapshot, if any was set.
    pub fn snapshot(
        &self,
        id: &snapshot::SnapshotId,
    ) -> Result<Option<AwsSnapshotRecord>, CatalogError> {
        self.catalog.aws_snapshot(id.as_str())
    }

    pub async fn put_snapshot(
        &self,
        id: &snapshot::SnapshotId,
        rec: &AwsSnapshotRecord,
    ) -> Result<(), Error> {
        validate_tags(&rec.tags).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let _turn = self.writes.lock().await;
        self.catalog.put_aws_snapshot(id.as_str(), rec).await?;
        Ok(())
    }

    /// Forgets a deleted snapshot's metadata.
    pub async fn remove_snapshot(&self, id: &snapshot::SnapshotId) -> Result<(), CatalogError> {
        let _turn = self.writes.lock().await;
        self.catalog.remove_aws_snapshot(id.as_str()).await
    }

    /// Records a volume's most recent modification (ModifyVolume).
    pub async fn put_volume_modification(
        &self,
        rec: &VolumeModificationRecord,
    ) -> Result<(), CatalogError> {
        let _turn = self.writes.lock().await;
        self.catalog.put_volume_modification(rec).await
    }

    /// Forgets a deleted volume's modification.
    pub async fn remove_volume_modification(&self, volume_id: &str) -> Result<(), CatalogError> {
        let _turn = self.writes.lock().await;
        self.catalog.remove_volume_modification(volume_id).await
    }

    pub fn volume_modifications(&self) -> Result<Vec<VolumeModificationRecord>, CatalogError> {
        self.catalog.volume_modifications()
    }
}
