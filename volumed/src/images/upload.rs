//! An object written to a bucket as a multipart upload: bytes are taken in
//! order, cut into parts and sent while the next part fills, so an image of
//! any size passes through a few parts of memory. Nothing is visible under
//! the key until the upload completes; an upload cut short is aborted,
//! which drops the parts already sent.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use snapshot::{ObjectStore, StoreError};
use tokio::task::JoinHandle;

/// The smallest part: S3 refuses smaller ones except the last.
const MIN_PART: u64 = 8 << 20;
/// S3 takes at most 10000 parts; the size leaves room below it.
const MAX_PARTS: u64 = 9_000;
/// Parts on their way while the next fills: two keep a link busy; each is
/// a part's worth of memory.
const PARTS_IN_FLIGHT: usize = 2;

/// The part size for an object of about `total` bytes: 8 MiB, or larger
/// (whole MiB) so that the object fits in [`MAX_PARTS`] parts.
pub fn part_size(total: u64) -> usize {
    let need = total.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    usize::try_from(need.max(MIN_PART)).unwrap_or(usize::MAX)
}

type PartResult = Result<(i32, String), StoreError>;

/// A multipart upload in progress. Either [`finish`](Self::finish) or
/// [`abort`](Self::abort) ends it; dropped otherwise, its parts stay in
/// the bucket until the upload is aborted (the job's record names it, and
/// a restart aborts it).
pub struct ObjectUpload {
    store: Arc<dyn ObjectStore>,
    key: String,
    upload: String,
    part_size: usize,
    buf: Vec<u8>,
    next_part: i32,
    sending: FuturesUnordered<JoinHandle<PartResult>>,
    parts: Vec<(i32, String)>,
    written: u64,
}

impl ObjectUpload {
    /// Starts the upload of `key`, an object of about `total` bytes.
    pub async fn start(
        store: Arc<dyn ObjectStore>,
        key: &str,
        total: u64,
    ) -> Result<Self, StoreError> {
        let upload = store.create_multipart(key).await?;
        Ok(ObjectUpload {
            store,
            key: key.to_owned(),
            upload,
            part_size: part_size(total),
            buf: Vec::new(),
            next_part: 1,
            sending: FuturesUnordered::new(),
            parts: Vec::new(),
            written: 0,
        })
    }

    /// The upload's id, for the job's record.
    pub fn id(&self) -> &str {
        &self.upload
    }

    /// Appends `data`; full parts go out as they fill.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        self.written += data.len() as u64;
        while !data.is_empty() {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(self.part_size);
            }
            let room = self.part_size - self.buf.len();
            let n = room.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == self.part_size {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    /// Appends `n` zero bytes (a hole of the image).
    pub async fn write_zeros(&mut self, mut n: u64) -> Result<(), StoreError> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..k]).await?;
            n -= k as u64;
        }
        Ok(())
    }

    async fn send_part(&mut self) -> Result<(), StoreError> {
        while self.sending.len() >= PARTS_IN_FLIGHT {
            self.collect_one().await?;
        }
        let data = Bytes::from(std::mem::take(&mut self.buf));
        let part = self.next_part;
        self.next_part += 1;
        let store = Arc::clone(&self.store);
        let (key, upload) = (self.key.clone(), self.upload.clone());
        self.sending.push(tokio::spawn(async move {
            let etag = store.upload_part(&key, &upload, part, data).await?;
            Ok((part, etag))
        }));
        Ok(())
    }

    async fn collect_one(&mut self) -> Result<(), StoreError> {
        if let Some(r) = self.sending.next().await {
            let done = r.map_err(|e| {
                StoreError::new(
                    "upload_part",
                    &self.key,
                    snapshot::store::ErrorKind::Permanent,
                    format!("the part's task ended: {e}"),
                )
            })??;
            self.parts.push(done);
        }
        Ok(())
    }

    /// Sends the last part and completes the upload: the object exists now.
    /// Returns its size.
    pub async fn finish(mut self) -> Result<u64, StoreError> {
        if !self.buf.is_empty() || self.next_part == 1 {
            self.send_part().await?;
        }
        while !self.sending.is_empty() {
            self.collect_one().await?;
        }
        self.parts.sort_by_key(|(n, _)| *n);
        self.store
            .complete_multipart(&self.key, &self.upload, &self.parts)
            .await?;
        Ok(self.written)
    }

    /// Drops the upload and every part sent.
    pub async fn abort(self) -> Result<(), StoreError> {
        for t in &self.sending {
            t.abort();
        }
        abort(&*self.store, &self.key, &self.upload).await
    }
}

/// Drops upload `upload` of `key` (also one a previous run left).
pub async fn abort(store: &dyn ObjectStore, key: &str, upload: &str) -> Result<(), StoreError> {
    store.abort_multipart(key, upload).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_fit_s3s_limits() {
        assert_eq!(part_size(0), 8 << 20);
        assert_eq!(part_size(1 << 30), 8 << 20);
        // 1 TiB needs larger parts, still under 10000 of them.
        let p = part_size(1 << 40) as u64;
        assert!(p > 8 << 20 && p.is_multiple_of(1 << 20));
        assert!((1u64 << 40).div_ceil(p) <= 10_000);
        for total in [1u64, 5 << 30, 75 << 30, 76 << 30, 16 << 40, u64::MAX / 2] {
            let p = part_size(total) as u64;
            assert!(total.div_ceil(p) <= 10_000, "total={total} part={p}");
        }
    }

    #[tokio::test]
    async fn an_object_is_made_of_its_parts_in_order_or_not_at_all() {
        let mem = Arc::new(snapshot::store::MemoryStore::new());
        let store: Arc<dyn ObjectStore> = Arc::clone(&mem) as _;
        let want: Vec<u8> = (0..(20u32 << 20) + 123).map(|i| (i % 251) as u8).collect();
        let mut up = ObjectUpload::start(Arc::clone(&store), "out/a.raw", want.len() as u64)
            .await
            .unwrap();
        // Odd-sized writes and a hole cross part boundaries.
        let (head, tail) = want.split_at(5 << 20);
        for piece in head.chunks(777_777) {
            up.write(piece).await.unwrap();
        }
        up.write(tail).await.unwrap();
        up.write_zeros(3).await.unwrap();
        assert_eq!(
            mem.get("out/a.raw").await.unwrap(),
            None,
            "visible before completion"
        );
        assert_eq!(up.finish().await.unwrap(), want.len() as u64 + 3);
        let got = mem.get("out/a.raw").await.unwrap().unwrap();
        assert_eq!(&got[..want.len()], &want[..]);
        assert_eq!(&got[want.len()..], &[0, 0, 0]);
        assert_eq!(mem.uploads_in_progress(), 0);

        let mut up = ObjectUpload::start(Arc::clone(&store), "out/b.raw", 1 << 30)
            .await
            .unwrap();
        up.write(&want).await.unwrap();
        up.abort().await.unwrap();
        assert_eq!(mem.get("out/b.raw").await.unwrap(), None);
        assert_eq!(mem.uploads_in_progress(), 0);
    }
}
