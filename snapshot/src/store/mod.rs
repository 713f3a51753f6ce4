//! Object stores: a flat namespace of immutable objects, written once.
//!
//! Backends sit behind one small trait so the repository above them (and
//! tests' fault wrappers) never care which one they talk to. Each error says
//! whether trying again may help; [`Retrying`] is the one place that acts
//! on it.

#[cfg(test)]
pub(crate) mod faulty;
mod local;
mod memory;
mod retry;
mod s3;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

pub use local::LocalStore;
pub use memory::MemoryStore;
pub use retry::{RetryPolicy, Retrying};
pub use s3::{S3Settings, S3Store};

use crate::StoreUrl;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a listing or a HEAD tells about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// When the object was last written or touched, by the store's clock:
    /// what gc's grace period is measured against.
    pub modified: std::time::SystemTime,
}

/// Whether an operation may succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Timeouts, connection failures, throttling, 5xx.
    Transient,
    /// Bad credentials, missing bucket, a corrupt local file, ...
    Permanent,
    /// The caller gave up (shutdown): not worth retrying in this process.
    Cancelled,
}

/// What a create-if-absent write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object did not exist and now holds the given bytes.
    Created,
    /// An object was already there and was left alone; its bytes may
    /// differ from the ones given.
    AlreadyExists,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("store {op} {key:?}: {message}")]
pub struct StoreError {
    pub op: &'static str,
    pub key: String,
    pub kind: ErrorKind,
    pub message: String,
}

impl StoreError {
    pub fn new(op: &'static str, key: &str, kind: ErrorKind, message: impl Into<String>) -> Self {
        StoreError {
            op,
            key: key.to_owned(),
            kind,
            message: message.into(),
        }
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    pub fn is_cancelled(&self) -> bool {
        self.kind == ErrorKind::Cancelled
    }
}

pub trait ObjectStore: Send + Sync {
    /// Stores `data` under `key`, replacing nothing visible half-written: a
    /// reader sees the whole object or none.
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Stores `data` under `key` only if no object is there, atomically
    /// with respect to other writers: of two racing calls exactly one gets
    /// `Created`. This is how commit points are written.
    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>>;
    /// The object's bytes, or `None` if there is no such object.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>>;
    /// `len` bytes of the object from `offset` (fewer where it ends), or
    /// `None` if there is no such object. Large objects are read this way,
    /// a range at a time, so none is held whole. The default reads the
    /// whole object and slices it; stores that can do better do.
    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let Some(all) = self.get(key).await? else {
                return Ok(None);
            };
            let size = all.len() as u64;
            let start = offset.min(size);
            let end = offset.saturating_add(len).min(size);
            // Both are at most `size`, which came from a `usize`.
            Ok(Some(all.slice(start as usize..end as usize)))
        })
    }
    /// The object's size and age, or `None` if there is no such object.
    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<ObjectInfo>, StoreError>>;
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move { Ok(self.head(key).await?.is_some()) })
    }
    /// Makes the object's modification time now, without changing it, so
    /// gc counts it as young again.
    fn touch<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Objects whose key starts with `prefix`, in no particular order.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectInfo>, StoreError>>;
    /// Removes the object; removing a missing one is not an error.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
    /// For logs and status: `file:///...` or `s3://bucket/prefix`.
    fn describe(&self) -> String;

    /// Starts a multipart upload of `key` (an object too large to hold in
    /// memory, written in parts); returns the upload's id. Only S3 takes
    /// them: other stores refuse with a permanent error.
    fn create_multipart<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<String, StoreError>> {
        Box::pin(async move { Err(no_multipart("create_multipart", key, &self.describe())) })
    }
    /// Uploads part number `part` (1 to 10000) of `upload`; returns its
    /// ETag. Uploading a part again replaces it, so a retry is safe.
    fn upload_part<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        part: i32,
        data: Bytes,
    ) -> BoxFuture<'a, Result<String, StoreError>> {
        let _ = (upload, part, data);
        Box::pin(async move { Err(no_multipart("upload_part", key, &self.describe())) })
    }
    /// Makes the object of `upload` from its `parts` (number, ETag), in
    /// order: only now does `key` exist.
    fn complete_multipart<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        parts: &'a [(i32, String)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let _ = (upload, parts);
        Box::pin(async move { Err(no_multipart("complete_multipart", key, &self.describe())) })
    }
    /// Drops `upload` and the parts it holds; an upload already gone is not
    /// an error.
    fn abort_multipart<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let _ = upload;
        Box::pin(async move { Err(no_multipart("abort_multipart", key, &self.describe())) })
    }
}

fn no_multipart(op: &'static str, key: &str, store: &str) -> StoreError {
    StoreError::new(
        op,
        key,
        ErrorKind::Permanent,
        format!("store {store} does not take multipart uploads (S3 only)"),
    )
}

/// Opens the store a URL names; S3 settings come from the AWS environment.
pub fn open(url: &StoreUrl) -> Result<Arc<dyn ObjectStore>, StoreError> {
    match url {
        StoreUrl::File(dir) => Ok(Arc::new(LocalStore::open(dir)?)),
        StoreUrl::S3 { bucket, prefix } => {
            let settings = S3Settings::from_env(bucket, prefix)?;
            Ok(Arc::new(S3Store::new(settings)))
        }
    }
}

/// Keys are ours, but they become file paths in the local store: only
/// `[a-z0-9._-]` components separated by single slashes.
pub(crate) fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ranges_are_slices_and_a_missing_object_is_none() {
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        mem.put("objects/a", Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        let store = Retrying::new(Arc::clone(&mem), RetryPolicy::default());
        let get = |off, len| store.get_range("objects/a", off, len);
        assert_eq!(get(2, 3).await.unwrap().unwrap(), &b"234"[..]);
        assert_eq!(get(8, 5).await.unwrap().unwrap(), &b"89"[..]);
        assert!(get(10, 5).await.unwrap().unwrap().is_empty());
        assert!(get(u64::MAX, u64::MAX).await.unwrap().unwrap().is_empty());
        assert_eq!(store.get_range("objects/b", 0, 1).await.unwrap(), None);
    }

    #[test]
    fn keys() {
        assert!(valid_key("chunks/ab/abcdef"));
        assert!(valid_key("manifests/snap-1"));
        for bad in ["", "/x", "x/", "a//b", "../x", "a/./b", "A", "a b"] {
            assert!(!valid_key(bad), "{bad}");
        }
    }
}
