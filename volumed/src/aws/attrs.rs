//! The AWS endpoint's own records, and their one writer: the EC2 attributes
//! of volumes (`volume_type`, `iops`, `throughput`, an attachment's device
//! and DeleteOnTermination) and of snapshots (tags, description, source
//! volume id), in the catalog trees `aws_volumes` and `aws_snapshots`.
//!
//! A volume's attributes are keyed by its id, never its name, and an
//! attachment's by the attachment's id: a volume deleted and created again
//! under its name, or attached again, never inherits them. Records of
//! volumes and snapshots that are gone are never shown; a volume's are
//! removed when the endpoint deletes it and swept at start.

use std::sync::Arc;

use tracing::info;
use volumed_api::validate_tags;

use crate::catalog::{
    AwsSnapshotRecord, AwsVolumeRecord, Catalog, CatalogError, VolumeModificationRecord,
};
use crate::engine::{Error, Volume};

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
