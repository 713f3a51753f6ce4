//! Images and the recycle bin: DeregisterImage asks this host's rules for
//! the image's retention and has `Machines` move it into the bin or remove
//! it; the bin's listing and restore of images; and collection, which
//! first deletes the images whose retention ended (with the snapshots
//! only they used) and then runs gc, so their chunks go in the same call.

use std::time::Duration;

use volumed_api::{BinEntry, BinResource};

use super::{Lifecycle, Removed, Result, bin};
use crate::catalog::{ImageRecord, rfc3339, unix_now};
use crate::machines::bin::{BinnedImage, ImageExpiry};

/// What DeregisterImage did: where the image went, and what happened to
/// each of its snapshots (`Err` says why one was kept).
pub struct Deregistration {
    pub removed: Removed,
    pub snapshots: Vec<(String, std::result::Result<(), String>)>,
}

/// Why a binned image's snapshot was not deleted with it.
pub const KEPT_IN_BIN: &str = "kept with the image in the recycle bin";

impl Lifecycle {
    /// Deregisters image `id` the way every front-end does: into the
    /// recycle bin, its snapshots kept, when a rule of this host keeps it;
    /// else for good, with `delete_snapshots` honoured.
    pub async fn deregister_image(
        &self,
        id: &str,
        delete_snapshots: bool,
    ) -> Result<Deregistration> {
        let rules = self.catalog.bin_rules()?;
        let retention = if rules.iter().any(|r| r.spec.resource == BinResource::Image) {
            let img = self.machines.image(id).await?;
            bin::retention_for(&rules, BinResource::Image, &img.tags)
        } else {
            None
        };
        let Some(r) = retention else {
            let snapshots = self.machines.deregister_image(id, delete_snapshots).await?;
            return Ok(Deregistration {
                removed: Removed::Deleted,
                snapshots,
            });
        };
        let img = self
            .machines
            .recycle_image(id, unix_now().saturating_add(r))
            .await?;
        let snapshots = if delete_snapshots {
            crate::machines::images::snapshots_of(&img)
                .into_iter()
                .map(|s| (s, Err(KEPT_IN_BIN.to_owned())))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Deregistration {
            removed: Removed::Binned,
            snapshots,
        })
    }

    /// Every image in the store's recycle bin, as the bin lists entries.
    pub async fn bin_list_images(&self) -> Result<Vec<BinEntry>> {
        Ok(self
            .machines
            .binned_images()
            .await?
            .iter()
            .map(image_entry)
            .collect())
    }

    /// The images in the bin with their records, for EC2's answers.
    pub async fn binned_images(&self) -> Result<Vec<BinnedImage>> {
        Ok(self.machines.binned_images().await?)
    }

    /// Restores an image from the recycle bin, as it was registered.
    pub async fn bin_restore_image(&self, id: &str) -> Result<ImageRecord> {
        Ok(self.machines.restore_image(id).await?)
    }

    /// Deletes the images whose retention ended (and the snapshots only
    /// they used), then collects the store's garbage.
    pub async fn collect(
        &self,
        grace: Option<Duration>,
    ) -> Result<(Duration, snapshot::gc::GcReport, ImageExpiry)> {
        let images = self.machines.expire_binned_images(unix_now()).await?;
        let (grace, report) = self.engine.gc(grace).await?;
        if images.snapshots > 0 || report.bin_expired > 0 {
            self.note_removed();
        }
        Ok((grace, report, images))
    }
}

fn image_entry(b: &BinnedImage) -> BinEntry {
    let r = &b.record;
    let root_size = r
        .mappings
        .iter()
        .find(|m| m.device_name == r.root_device_name)
        .and_then(|m| m.ebs.as_ref()?.volume_size)
        .map_or(0, |gib| gib << 30);
    BinEntry {
        id: r.id.clone(),
        resource: BinResource::Image,
        state: "recoverable".into(),
        volume: String::new(),
        size: root_size,
        created_at: rfc3339(r.created_at),
        entered_at: rfc3339(
            b.entered
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        ),
        expires_at: rfc3339(b.expires),
        labels: r.tags.clone(),
        name: Some(r.name.clone()),
    }
}
