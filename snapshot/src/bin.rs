//! The store's side of snapshot lifecycles: the recycle bin, protection,
//! and claims on scheduled work. All three are plain objects under their
//! own prefixes (see `keys`), so every host sharing the store, and gc on
//! any of them, sees the same thing.
//!
//! **The recycle bin.** Deleting a snapshot into the bin moves its manifest
//! object, as stored (sealed in an encrypted store, bound to its snapshot
//! id like the trash), to `bin/<id>/<expiry>`, then removes the manifest:
//! the snapshot is gone from every listing at once. gc honours a bin entry
//! like a young trash entry until its expiry has passed by the grace
//! period, so every chunk and page it names stays; after that gc removes
//! the entry and sweeps what only it named. Restoring writes the manifest
//! back create-if-absent, then moves the entry to the trash and removes it.
//!
//! Why gc never loses a chunk to a move between `manifests/` and `bin/`:
//! gc lists manifests, then holds, then the bin, then the trash. A delete
//! writes the bin entry before it removes the manifest, so a gc that missed
//! the manifest finds the entry later. A restore writes the manifest, then
//! a trash entry, and only then removes the bin entry, so a gc that missed
//! the new manifest finds the bin entry or, failing that, the young trash
//! entry. A restore is refused once the entry has expired, and gc keeps an
//! expired entry for the grace period more, so a restore that began in
//! time never races a sweep.
//!
//! A crash between two steps leaves the snapshot in both places (a
//! manifest and a bin entry): the snapshot exists, and the stray entry
//! only keeps chunks alive until it expires. Deleting or restoring again
//! finishes the move.
//!
//! **Images in the bin.** A deregistered image's record goes, as the
//! daemon's opaque bytes, to `bin-images/<image id>/<expiry>`. Its
//! snapshots keep their manifests while it waits there, so gc honours
//! them without reading these entries; the daemon refuses to delete them,
//! restores the record from here, and when the retention ends deletes the
//! snapshots only the image used, then the entry.
//!
//! **Protection** is an empty `protected/<id>` object. The daemon refuses
//! to delete a protected snapshot; gc does not read it (a protected
//! snapshot has its manifest, which gc honours anyway).
//!
//! **Claims** make one host do a piece of scheduled work: the first
//! `put_if_absent` of `claims/<scope>/<slot>` wins, and every other host
//! that tries the same slot finds it taken and skips it.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::keys;
use crate::manifest::{SnapshotId, StoredManifest};
use crate::repo::{Repo, RepoError};
use crate::store::PutOutcome;

/// A snapshot in the recycle bin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinEntry {
    pub id: SnapshotId,
    /// Seconds since the epoch: until then it can be restored.
    pub expires: u64,
    /// When it entered the bin, by the store's clock.
    pub entered: SystemTime,
    /// The object's key.
    pub key: String,
}

impl BinEntry {
    pub fn expires_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.expires)
    }
}

/// A deregistered image in the recycle bin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBinEntry {
    pub image: String,
    /// Seconds since the epoch: until then it can be restored.
    pub expires: u64,
    /// When it entered the bin, by the store's clock.
    pub entered: SystemTime,
    /// The object's key.
    pub key: String,
}

/// Who took a claim, and when by the store's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub slot: u64,
    pub holder: String,
    pub taken: SystemTime,
    pub key: String,
}

impl Repo {
    /// Deletes snapshot `id` into the recycle bin until `expires` (seconds
    /// since the epoch).
    pub async fn bin_manifest(&self, id: &SnapshotId, expires: u64) -> Result<(), RepoError> {
        let key = keys::manifest_key(id);
        let bytes = self
            .store()
            .get(&key)
            .await?
            .ok_or_else(|| RepoError::MissingManifest(id.to_string()))?;
        self.store()
            .put(&keys::binned_manifest_key(id, expires), bytes)
            .await?;
        self.store().delete(&key).await?;
        Ok(())
    }

    /// Every snapshot in the recycle bin, by id; a snapshot with more than
    /// one entry (a delete repeated after a crash) shows the latest expiry.
    pub async fn list_binned(&self) -> Result<Vec<BinEntry>, RepoError> {
        let listed = self.store().list(keys::BIN).await?;
        Ok(latest_per_id(listed.into_iter().filter_map(|o| {
            let (id, expires) = keys::binned_of_key(&o.key)?;
            Some(BinEntry {
                id,
                expires,
                entered: o.modified,
                key: o.key,
            })
        })))
    }

    /// Snapshot `id`'s entries in the recycle bin, latest expiry last.
    async fn bin_entries(&self, id: &SnapshotId) -> Result<Vec<BinEntry>, RepoError> {
        let mut out: Vec<BinEntry> = self
            .store()
            .list(&keys::bin_prefix_of(id))
            .await?
            .into_iter()
            .filter_map(|o| {
                let (found, expires) = keys::binned_of_key(&o.key)?;
                (found == *id).then_some(BinEntry {
                    id: found,
                    expires,
                    entered: o.modified,
                    key: o.key,
                })
            })
            .collect();
        out.sort_by_key(|e| e.expires);
        Ok(out)
    }

    /// Snapshot `id` in the recycle bin, if it is there.
    pub async fn binned(&self, id: &SnapshotId) -> Result<Option<BinEntry>, RepoError> {
        Ok(self.bin_entries(id).await?.pop())
    }

    /// The manifest a bin entry keeps, as stored (for format 2 the root).
    pub async fn binned_manifest(&self, entry: &BinEntry) -> Result<StoredManifest, RepoError> {
        self.get_stored_at(&entry.key)
            .await?
            .ok_or_else(|| RepoError::NotInBin(entry.id.to_string()))
    }

    /// Restores snapshot `id` from the recycle bin, unless its entry has
    /// expired by `now`. Its manifest comes back exactly as it was.
    pub async fn restore_binned(&self, id: &SnapshotId, now: SystemTime) -> Result<(), RepoError> {
        let entries = self.bin_entries(id).await?;
        let Some(latest) = entries.last() else {
            return Err(RepoError::NotInBin(id.to_string()));
        };
        if latest.expires_at() <= now {
            return Err(RepoError::BinExpired(id.to_string()));
        }
        let bytes = self
            .store()
            .get(&latest.key)
            .await?
            .ok_or_else(|| RepoError::NotInBin(id.to_string()))?;
        // The object is the manifest as it was committed: decoding it checks
        // it names this snapshot before it goes back.
        self.get_stored_at(&latest.key).await?;
        match self
            .store()
            .put_if_absent(&keys::manifest_key(id), bytes.clone())
            .await?
        {
            PutOutcome::Created => {}
            // A restore or a delete cut short left it there: the snapshot
            // exists, and finishing the move is all that is left.
            PutOutcome::AlreadyExists => {}
        }
        for e in &entries {
            self.store()
                .put(&keys::trashed_manifest_key(id), bytes.clone())
                .await?;
            self.store().delete(&e.key).await?;
        }
        Ok(())
    }

    /// Keeps image `image`'s record (`record`, the daemon's bytes) in the
    /// recycle bin until `expires` (seconds since the epoch).
    pub async fn bin_image(
        &self,
        image: &str,
        expires: u64,
        record: Bytes,
    ) -> Result<(), RepoError> {
        self.store()
            .put(&keys::binned_image_key(image, expires), record)
            .await?;
        Ok(())
    }

    /// Every image in the recycle bin, by id; an image with more than one
    /// entry (a deregistration repeated) shows the latest expiry.
    pub async fn list_binned_images(&self) -> Result<Vec<ImageBinEntry>, RepoError> {
        let mut by_id: std::collections::BTreeMap<String, ImageBinEntry> = Default::default();
        for o in self.store().list(keys::IMAGE_BIN).await? {
            let Some((image, expires)) = keys::binned_image_of_key(&o.key) else {
                continue;
            };
            if by_id.get(image).is_some_and(|old| old.expires >= expires) {
                continue;
            }
            by_id.insert(
                image.to_owned(),
                ImageBinEntry {
                    image: image.to_owned(),
                    expires,
                    entered: o.modified,
                    key: o.key.clone(),
                },
            );
        }
        Ok(by_id.into_values().collect())
    }

    /// The record a bin entry keeps; `None` if it went meanwhile.
    pub async fn binned_image(&self, entry: &ImageBinEntry) -> Result<Option<Bytes>, RepoError> {
        Ok(self.store().get(&entry.key).await?)
    }

    /// Removes every bin entry of image `image` (restored, or expired and
    /// its snapshots deleted).
    pub async fn unbin_image(&self, image: &str) -> Result<(), RepoError> {
        for o in self.store().list(&keys::image_bin_prefix_of(image)).await? {
            if keys::binned_image_of_key(&o.key).is_some_and(|(i, _)| i == image) {
                self.store().delete(&o.key).await?;
            }
        }
        Ok(())
    }

    /// Marks snapshot `id` protected, or not.
    pub async fn set_protected(&self, id: &SnapshotId, protected: bool) -> Result<(), RepoError> {
        let key = keys::protected_key(id);
        if protected {
            self.store().put(&key, Bytes::new()).await?;
        } else {
            self.store().delete(&key).await?;
        }
        Ok(())
    }

    pub async fn is_protected(&self, id: &SnapshotId) -> Result<bool, RepoError> {
        Ok(self.store().exists(&keys::protected_key(id)).await?)
    }

    /// Every protected snapshot's id.
    pub async fn list_protected(&self) -> Result<BTreeSet<SnapshotId>, RepoError> {
        Ok(self
            .store()
            .list(keys::PROTECTED)
            .await?
            .iter()
            .filter_map(|o| keys::protected_of_key(&o.key))
            .collect())
    }

    /// Claims slot `slot` of `scope` for `holder`. `Ok(None)` means this
    /// call took it; `Ok(Some(claim))` means someone already had.
    pub async fn claim(
        &self,
        scope: &str,
        slot: u64,
        holder: &str,
    ) -> Result<Option<Claim>, RepoError> {
        let key = keys::claim_key(scope, slot);
        match self
            .store()
            .put_if_absent(&key, Bytes::from(holder.to_owned()))
            .await?
        {
            PutOutcome::Created => Ok(None),
            PutOutcome::AlreadyExists => {
                let holder = self
                    .store()
                    .get(&key)
                    .await?
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                // A lost reply to our own put looks like this too: the
                // holder is then us, and the caller sees that.
                let taken = self
                    .store()
                    .head(&key)
                    .await?
                    .map_or(SystemTime::UNIX_EPOCH, |i| i.modified);
                Ok(Some(Claim {
                    slot,
                    holder,
                    taken,
                    key,
                }))
            }
        }
    }

    /// The claims of `scope`, oldest slot first (holders not read).
    pub async fn list_claims(&self, scope: &str) -> Result<Vec<Claim>, RepoError> {
        let mut out: Vec<Claim> = self
            .store()
            .list(&keys::claims_of(scope))
            .await?
            .into_iter()
            .filter_map(|o| {
                let (s, slot) = keys::claim_of_key(&o.key)?;
                (s == scope).then_some(Claim {
                    slot,
                    holder: String::new(),
                    taken: o.modified,
                    key: o.key,
                })
            })
            .collect();
        out.sort_by_key(|c| c.slot);
        Ok(out)
    }

    /// Removes a claim whose slot is long past.
    pub async fn drop_claim(&self, claim: &Claim) -> Result<(), RepoError> {
        Ok(self.store().delete(&claim.key).await?)
    }
}

/// One entry per snapshot, the one with the latest expiry, by id.
fn latest_per_id(entries: impl Iterator<Item = BinEntry>) -> Vec<BinEntry> {
    let mut by_id: std::collections::BTreeMap<SnapshotId, BinEntry> = Default::default();
    for e in entries {
        match by_id.get(&e.id) {
            Some(old) if old.expires >= e.expires => {}
            _ => {
                by_id.insert(e.id.clone(), e);
            }
        }
    }
    by_id.into_values().collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::codec;
    use crate::hash::ChunkHash;
    use crate::manifest::{Manifest, ManifestHeader};
    use crate::store::MemoryStore;

    fn manifest() -> Manifest {
        let mut m = Manifest::new(ManifestHeader {
            id: SnapshotId::generate(),
            volume: "v".into(),
            size: 4 << 20,
            chunk_size: 1 << 20,
            parent: None,
            created_at: "2026-12-01T00:00:00Z".into(),
            labels: [("k".to_owned(), "v".to_owned())].into(),
            changed_chunks: 1,
            logical_bytes: 1 << 20,
            uploaded_bytes: 0,
            encryption: None,
        });
        m.push(1, Some(ChunkHash::of(b"one")));
        m
    }

    fn secs(t: SystemTime) -> u64 {
        t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
    }

    #[tokio::test]
    async fn a_binned_snapshot_is_gone_listed_and_restored_as_it_was() {
        let repo = Repo::new(Arc::new(MemoryStore::new()), codec::DEFAULT_LEVEL);
        let m = manifest();
        let id = m.header.id.clone();
        repo.put_manifest(&m).await.unwrap();
        let before = repo.store().get(&keys::manifest_key(&id)).await.unwrap();
        let now = SystemTime::now();
        let expires = secs(now) + 3600;
        repo.bin_manifest(&id, expires).await.unwrap();
        assert!(repo.list_snapshots().await.unwrap().is_empty());
        let listed = repo.list_binned().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((&listed[0].id, listed[0].expires), (&id, expires));
        let stored = repo.binned_manifest(&listed[0]).await.unwrap();
        assert_eq!(stored.header(), &m.header);

        repo.restore_binned(&id, now).await.unwrap();
        assert_eq!(repo.get_manifest(&id).await.unwrap(), m);
        assert_eq!(
            repo.store().get(&keys::manifest_key(&id)).await.unwrap(),
            before,
            "the very object comes back"
        );
        assert!(repo.list_binned().await.unwrap().is_empty());
        // The move leaves a trash entry behind for gc's grace period.
        assert!(
            repo.store()
                .exists(&keys::trashed_manifest_key(&id))
                .await
                .unwrap()
        );
        assert!(matches!(
            repo.restore_binned(&id, now).await,
            Err(RepoError::NotInBin(_))
        ));
    }

    #[tokio::test]
    async fn an_expired_entry_is_not_restored() {
        let repo = Repo::new(Arc::new(MemoryStore::new()), codec::DEFAULT_LEVEL);
        let m = manifest();
        let id = m.header.id.clone();
        repo.put_manifest(&m).await.unwrap();
        let now = SystemTime::now();
        repo.bin_manifest(&id, secs(now) + 10).await.unwrap();
        let later = now + Duration::from_secs(11);
        assert!(matches!(
            repo.restore_binned(&id, later).await,
            Err(RepoError::BinExpired(_))
        ));
        assert!(repo.list_snapshots().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_move_cut_short_is_finished_by_either_side() {
        let repo = Repo::new(Arc::new(MemoryStore::new()), codec::DEFAULT_LEVEL);
        let m = manifest();
        let id = m.header.id.clone();
        repo.put_manifest(&m).await.unwrap();
        let bytes = repo
            .store()
            .get(&keys::manifest_key(&id))
            .await
            .unwrap()
            .unwrap();
        let now = SystemTime::now();
        // A delete that crashed after writing the bin entry: the snapshot
        // is still there; restoring finishes by removing the entry.
        let early = secs(now) + 100;
        repo.store()
            .put(&keys::binned_manifest_key(&id, early), bytes.clone())
            .await
            .unwrap();
        assert_eq!(
            repo.list_snapshots().await.unwrap(),
            std::slice::from_ref(&id)
        );
        // Deleting again writes a second entry with a later expiry.
        repo.bin_manifest(&id, early + 50).await.unwrap();
        let listed = repo.list_binned().await.unwrap();
        assert_eq!(listed.len(), 1, "one entry per snapshot");
        assert_eq!(listed[0].expires, early + 50);
        repo.restore_binned(&id, now).await.unwrap();
        assert!(repo.list_binned().await.unwrap().is_empty());
        assert!(
            repo.store()
                .list(&keys::bin_prefix_of(&id))
                .await
                .unwrap()
                .is_empty(),
            "every entry of the snapshot goes"
        );
        assert_eq!(repo.get_manifest(&id).await.unwrap(), m);
    }

    #[tokio::test]
    async fn images_in_the_bin_are_listed_once_and_removed_whole() {
        let repo = Repo::new(Arc::new(MemoryStore::new()), codec::DEFAULT_LEVEL);
        let a = "ami-0123456789abcdef0";
        let b = "ami-0123456789abcdef1";
        repo.bin_image(a, 100, Bytes::from_static(b"first"))
            .await
            .unwrap();
        repo.bin_image(a, 200, Bytes::from_static(b"again"))
            .await
            .unwrap();
        repo.bin_image(b, 150, Bytes::from_static(b"other"))
            .await
            .unwrap();
        let listed = repo.list_binned_images().await.unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|e| (e.image.as_str(), e.expires))
                .collect::<Vec<_>>(),
            [(a, 200), (b, 150)]
        );
        assert_eq!(
            repo.binned_image(&listed[0]).await.unwrap().unwrap(),
            Bytes::from_static(b"again")
        );
        // Image entries are not snapshots in the bin.
        assert!(repo.list_binned().await.unwrap().is_empty());
        repo.unbin_image(a).await.unwrap();
        let left = repo.list_binned_images().await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].image, b);
        assert_eq!(repo.binned_image(&listed[0]).await.unwrap(), None);
    }

    #[tokio::test]
    async fn protection_and_claims() {
        let repo = Repo::new(Arc::new(MemoryStore::new()), codec::DEFAULT_LEVEL);
        let id = SnapshotId::generate();
        assert!(!repo.is_protected(&id).await.unwrap());
        repo.set_protected(&id, true).await.unwrap();
        repo.set_protected(&id, true).await.unwrap();
        assert!(repo.is_protected(&id).await.unwrap());
        assert_eq!(
            repo.list_protected()
                .await
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            std::slice::from_ref(&id)
        );
        repo.set_protected(&id, false).await.unwrap();
        assert!(!repo.is_protected(&id).await.unwrap());

        assert_eq!(repo.claim("p-1", 60, "host-a").await.unwrap(), None);
        let taken = repo.claim("p-1", 60, "host-b").await.unwrap().unwrap();
        assert_eq!((taken.slot, taken.holder.as_str()), (60, "host-a"));
        assert_eq!(repo.claim("p-1", 120, "host-b").await.unwrap(), None);
        assert_eq!(repo.claim("p-2", 60, "host-b").await.unwrap(), None);
        let claims = repo.list_claims("p-1").await.unwrap();
        assert_eq!(claims.iter().map(|c| c.slot).collect::<Vec<_>>(), [60, 120]);
        repo.drop_claim(&claims[0]).await.unwrap();
        assert_eq!(repo.list_claims("p-1").await.unwrap().len(), 1);
    }
}
