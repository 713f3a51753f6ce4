//! The store's entries of deregistered images in the recycle bin
//! (`snapshot::bin`): a third `impl Engine`, because the engine owns the
//! repository. The records are opaque bytes here; `machines/` is their
//! one writer and reader, and it alone decides what an entry means.

use bytes::Bytes;
use snapshot::bin::ImageBinEntry;

use super::{Engine, Error, Result};

impl Engine {
    /// Keeps image `image`'s record in the store's recycle bin until
    /// `expires` (seconds since the epoch).
    pub async fn bin_image_record(&self, image: &str, expires: u64, record: Bytes) -> Result<()> {
        self.snapshots
            .known
            .repo()
            .bin_image(image, expires, record)
            .await
            .map_err(|e| Error::store(format!("put image {image} in the recycle bin"), e))
    }

    /// Every image in the store's recycle bin with its record; an entry
    /// removed between the listing and the read is left out.
    pub async fn binned_image_records(&self) -> Result<Vec<(ImageBinEntry, Bytes)>> {
        let repo = self.snapshots.known.repo();
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
    pub async fn unbin_image_record(&self, image: &str) -> Result<()> {
        self.snapshots
            .known
            .repo()
            .unbin_image(image)
            .await
            .map_err(|e| Error::store(format!("remove image {image} from the recycle bin"), e))
    }
}
