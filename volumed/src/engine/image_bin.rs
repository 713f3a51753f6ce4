//! The store's entries of deregistered images in the recycle bin
//! (`snapshot::bin`), reached through `Engine::image_bin`, because the
//! engine owns the repository. The records are opaque bytes here;
//! `machines/` is their one writer and reader, and it alone decides what
//! an entry means.

use bytes::Bytes;
use snapshot::bin::ImageBinEntry;

use super::snapshot_catalog::SnapshotCatalog;
use super::{Error, Result};

/// The image bin of the engine's store.
pub struct ImageBin<'a> {
    known: &'a SnapshotCatalog,
}

impl<'a> ImageBin<'a> {
    pub(super) fn new(known: &'a SnapshotCatalog) -> Self {
        ImageBin { known }
    }

    /// Keeps image `image`'s record in the store's recycle bin until
    /// `expires` (seconds since the epoch).
    pub async fn put(&self, image: &str, expires: u64, record: Bytes) -> Result<()> {
        self.known
            .repo()
            .bin_image(image, expires, record)
            .await
            .map_err(|e| Error::store(format!("put image {image} in the recycle bin"), e))
    }

    /// Every image in the store's recycle bin with its record; an entry
    /// removed between the listing and the read is left out.
    pub async fn list(&self) -> Result<Vec<(ImageBinEntry, Bytes)>> {
        let repo = self.known.repo();
        let entries = repo
            .list_binned_images()
            .await
            .map_err(|e| Error::store("list images in the recycle bin", e))?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let got = repo.binned_image(&e).await.map_err(|err| {
                Error::store(format!("read image {} in the recycle bin", e.image), err)
            })?;
            if let Some(bytes) = got {
                out.push((e, bytes));
            }
        }
        Ok(out)
    }

    /// Removes image `image`'s entries from the store's recycle bin.
    pub async fn remove(&self, image: &str) -> Result<()> {
        self.known
            .repo()
            .unbin_image(image)
            .await
            .map_err(|e| Error::store(format!("remove image {image} from the recycle bin"), e))
    }
}
