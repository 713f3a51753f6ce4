//! Deregistered images in the recycle bin. The image's record moves from
//! this host's `images` tree to a store object (`snapshot::bin`), so every
//! host sharing the store lists it, refuses to delete its snapshots and
//! can restore it; its snapshots keep their manifests, so gc keeps their
//! chunks without knowing about images. When the retention ends, the
//! snapshots only it used are deleted through the engine, then the entry.
//!
//! Moves are ordered so a crash leaves the image in both places, never in
//! neither: deregistering writes the entry before removing the record,
//! restoring writes the record before removing the entry. A registered
//! image wins over its entry: the entry is not listed, and expiry or a
//! second restore only removes it.
//!
//! Whether an image goes to the bin, and for how long, is the lifecycle
//! layer's decision (its rules); this layer only carries it out.

use std::collections::BTreeSet;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use snapshot::SnapshotId;
use tracing::{info, warn};

use super::images::snapshots_of;
use super::{MachineError, Machines, Result, is_id};
use crate::catalog::{ImageRecord, unix_now};
use crate::engine::Error;

/// The version of [`StoredImage`] this code writes.
const FORMAT: u32 = 1;

/// What a bin entry holds: the image's record as it was registered.
#[derive(Debug, Serialize, Deserialize)]
struct StoredImage {
    format: u32,
    image: ImageRecord,
}

/// An image in the recycle bin.
#[derive(Debug, Clone)]
pub struct BinnedImage {
    pub record: ImageRecord,
    /// Seconds since the epoch: until then it can be restored.
    pub expires: u64,
    /// When it entered the bin, by the store's clock.
    pub entered: SystemTime,
}

/// What one expiry pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImageExpiry {
    pub images: u64,
    pub snapshots: u64,
}

fn decode(bytes: &[u8]) -> std::result::Result<ImageRecord, String> {
    let s: StoredImage = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if s.format != FORMAT {
        return Err(format!("format {} is not understood", s.format));
    }
    Ok(s.image)
}

fn encode(img: &ImageRecord) -> Vec<u8> {
    serde_json::to_vec(&StoredImage {
        format: FORMAT,
        image: img.clone(),
    })
    .expect("an image record always serializes")
}

impl Machines {
    /// Moves image `id` into the recycle bin until `expires` (seconds since
    /// the epoch): gone from DescribeImages, its snapshots kept.
    pub async fn recycle_image(&self, id: &str, expires: u64) -> Result<ImageRecord> {
        let img = self.image(id).await?;
        let _guard = self.lock.lock().await;
        self.engine
            .image_bin()
            .put(&img.id, expires, encode(&img).into())
            .await?;
        crate::failpoint::hit("image-bin-after-entry");
        self.catalog
            .remove_image(&img.id)
            .await
            .map_err(Error::from)?;
        info!(image = %img.id, expires, "image moved to the recycle bin");
        Ok(img)
    }

    /// Every entry of the store's image bin, decoded; an unreadable one is
    /// left out and logged.
    pub(super) async fn bin_entries(&self) -> Result<Vec<BinnedImage>> {
        let mut out = Vec::new();
        for (e, bytes) in self.engine.image_bin().list().await? {
            match decode(&bytes) {
                Ok(record) if record.id == e.image => out.push(BinnedImage {
                    record,
                    expires: e.expires,
                    entered: e.entered,
                }),
                Ok(record) => {
                    warn!(image = %e.image, named = %record.id, "recycle-bin entry names another image; left out")
                }
                Err(why) => {
                    warn!(image = %e.image, error = %why, "unreadable recycle-bin entry left out")
                }
            }
        }
        Ok(out)
    }

    fn registered_ids(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .catalog
            .images()
            .map_err(Error::from)?
            .into_iter()
            .map(|i| i.id)
            .collect())
    }

    /// Every image in the recycle bin (any host put it there), by id.
    pub async fn binned_images(&self) -> Result<Vec<BinnedImage>> {
        let registered = self.registered_ids()?;
        let mut all = self.bin_entries().await?;
        all.retain(|b| !registered.contains(&b.record.id));
        Ok(all)
    }

    /// The binned image that uses snapshot `id`, if any. Reads the store:
    /// when it cannot, the caller refuses the delete.
    pub(super) async fn binned_image_using(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .bin_entries()
            .await?
            .into_iter()
            .find(|b| snapshots_of(&b.record).iter().any(|s| s == id))
            .map(|b| b.record.id))
    }

    /// Restores image `id` from the recycle bin, with its id, mappings and
    /// tags, unless its retention has ended or its name was taken since.
    pub async fn restore_image(&self, id: &str) -> Result<ImageRecord> {
        if !is_id("ami", id) {
            return Err(MachineError::ImageIdMalformed(id.to_owned()));
        }
        let _guard = self.lock.lock().await;
        let entry = self
            .bin_entries()
            .await?
            .into_iter()
            .filter(|b| b.record.id == id)
            .max_by_key(|b| b.expires);
        let Some(entry) = entry else {
            return Err(MachineError::ImageNotInBin(id.to_owned()));
        };
        if self.registered_ids()?.contains(id) {
            // A restore cut short: the image is back, only its entry is left.
            self.engine.image_bin().remove(id).await?;
            return Err(MachineError::ImageNotInBin(id.to_owned()));
        }
        if entry.expires <= unix_now() {
            return Err(MachineError::ImageBinExpired(id.to_owned()));
        }
        self.check_name_free(&entry.record.name)?;
        self.catalog
            .put_image(&entry.record)
            .await
            .map_err(Error::from)?;
        crate::failpoint::hit("image-restore-after-record");
        self.engine.image_bin().remove(id).await?;
        info!(image = %id, "image restored from the recycle bin");
        Ok(entry.record)
    }

    /// Deletes for good every image whose retention ended by `now`, with
    /// the snapshots no registered or binned image still uses (through the
    /// engine's delete; a protected one stays). The entry goes last, so a
    /// pass cut short is finished by the next.
    pub async fn expire_binned_images(&self, now: u64) -> Result<ImageExpiry> {
        let _guard = self.lock.lock().await;
        let registered = self.catalog.images().map_err(Error::from)?;
        let mut binned = self.bin_entries().await?;
        binned.sort_by_key(|b| b.expires);
        let mut done = ImageExpiry::default();
        let mut gone: BTreeSet<String> = BTreeSet::new();
        for b in &binned {
            let id = &b.record.id;
            if b.expires > now || gone.contains(id) {
                continue;
            }
            if registered.iter().any(|r| &r.id == id) {
                self.engine.image_bin().remove(id).await?;
                gone.insert(id.clone());
                continue;
            }
            let others: Vec<&ImageRecord> = registered
                .iter()
                .chain(
                    binned
                        .iter()
                        .map(|o| &o.record)
                        .filter(|o| &o.id != id && !gone.contains(&o.id)),
                )
                .collect();
            for snap in own_snapshots(&b.record, &others) {
                let Some(sid) = SnapshotId::parse(&snap) else {
                    continue;
                };
                match self.engine.delete_snapshot(&sid).await {
                    Ok(()) => {
                        done.snapshots += 1;
                        crate::failpoint::hit("image-expire-after-snapshot");
                    }
                    Err(Error::SnapshotNotFound(_)) => {}
                    Err(Error::SnapshotProtected(_)) => {
                        warn!(image = %id, snapshot = %snap, "snapshot of an expired image is protected; kept")
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            self.engine.image_bin().remove(id).await?;
            gone.insert(id.clone());
            done.images += 1;
            info!(image = %id, "image deleted from the recycle bin for good");
        }
        Ok(done)
    }
}

/// The snapshots of `img` that none of `others` names: what goes with it.
fn own_snapshots(img: &ImageRecord, others: &[&ImageRecord]) -> Vec<String> {
    let used: BTreeSet<String> = others.iter().flat_map(|o| snapshots_of(o)).collect();
    let mut out: Vec<String> = snapshots_of(img)
        .into_iter()
        .filter(|s| !used.contains(s))
        .collect();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use volumed_api::ImageState;

    fn image(id: &str, snaps: &[&str]) -> ImageRecord {
        ImageRecord {
            id: id.into(),
            name: "web".into(),
            description: String::new(),
            architecture: "x86_64".into(),
            root_device_name: "/dev/xvda".into(),
            mappings: snaps
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    serde_json::from_value(serde_json::json!({
                        "device_name": format!("/dev/xvd{}", (b'a' + i as u8) as char),
                        "ebs": {"snapshot_id": s},
                    }))
                    .unwrap()
                })
                .collect(),
            state: ImageState::Available,
            created_at: 1,
            tags: [("k".to_owned(), "v".to_owned())].into(),
            source_instance: None,
            snapshot_set: None,
            error: None,
        }
    }

    #[test]
    fn an_expired_image_takes_only_the_snapshots_no_other_image_names() {
        let img = image("ami-00000001", &["snap-a", "snap-b", "snap-c"]);
        let registered = image("ami-00000002", &["snap-b"]);
        let binned = image("ami-00000003", &["snap-c", "snap-d"]);
        assert_eq!(
            own_snapshots(&img, &[&registered, &binned]),
            ["snap-a".to_owned()]
        );
        assert_eq!(own_snapshots(&img, &[]).len(), 3);
        assert!(own_snapshots(&image("ami-00000004", &[]), &[&img]).is_empty());
    }

    #[test]
    fn a_stored_image_round_trips_and_other_formats_are_refused() {
        let img = image("ami-0123456789abcdef0", &["snap-0123456789abcdef"]);
        assert_eq!(decode(&encode(&img)).unwrap(), img);
        let other = serde_json::to_vec(&serde_json::json!({"format": 2, "image": img})).unwrap();
        assert!(decode(&other).unwrap_err().contains("format 2"));
        assert!(decode(b"{").is_err());
    }
}
