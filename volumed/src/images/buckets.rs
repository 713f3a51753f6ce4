//! S3 buckets named by tasks (ImportSnapshot's `UserBucket`, ExportImage's
//! `S3ExportLocation`): a client for any bucket, through the same
//! object-store client (`snapshot::store::S3Store`) and retry wrapper
//! (`Retrying`) as the snapshot store, with the store's endpoint and
//! credentials (the standard AWS variables) unless `--tasks-s3-endpoint`
//! names another endpoint.
//!
//! Objects are user data, not the store's: their keys are used as given
//! (S3 keys may hold any character), and a large one is read a range at a
//! time into a file, never held whole in memory.

use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;
use snapshot::ObjectStore;
use snapshot::store::{RetryPolicy, Retrying, S3Settings, S3Store, StoreError};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// Bytes per ranged GET of a download: large enough that request overhead
/// is small, small enough that the ranges in flight stay a few MiB each.
const RANGE: u64 = 8 << 20;
/// Ranged GETs in flight per download.
const RANGES_IN_FLIGHT: usize = 4;

/// Why a bucket or an object could not be used; the message names both.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("invalid S3 bucket name {0:?}")]
    InvalidName(String),
    #[error("S3 bucket {0:?} does not exist")]
    NoSuchBucket(String),
    #[error("S3 object s3://{bucket}/{key} does not exist")]
    NoSuchKey { bucket: String, key: String },
    #[error("access to S3 object s3://{bucket}/{key} was denied ({message})")]
    AccessDenied {
        bucket: String,
        key: String,
        message: String,
    },
    #[error("S3 object s3://{bucket}/{key}: {message}")]
    Store {
        bucket: String,
        key: String,
        message: String,
    },
    #[error("S3 object s3://{bucket}/{key} is {size} bytes; the limit is {limit}")]
    TooLarge {
        bucket: String,
        key: String,
        size: u64,
        limit: u64,
    },
    #[error("S3 object s3://{bucket}/{key} changed size while it was read")]
    Changed { bucket: String, key: String },
    #[error("S3 for tasks is not configured: {0}")]
    NotConfigured(String),
    #[error("write the downloaded object to {path}")]
    Local {
        path: String,
        source: std::io::Error,
    },
    #[error("cancelled")]
    Cancelled,
}

/// The S3 endpoint and credentials tasks use; built once at start.
pub struct Buckets {
    /// `--tasks-s3-endpoint`; else the standard AWS variables' endpoint.
    endpoint: Option<String>,
    /// Ends retry waits at shutdown.
    cancel: CancellationToken,
}

/// A client of one bucket.
pub struct Bucket {
    name: String,
    s3: Arc<S3Store>,
    store: Arc<dyn ObjectStore>,
}

impl Buckets {
    pub fn new(endpoint: Option<String>, cancel: CancellationToken) -> Self {
        Buckets { endpoint, cancel }
    }

    /// A client for `bucket` (nothing is sent yet: a missing bucket is
    /// found by the first request).
    pub fn open(&self, bucket: &str) -> Result<Bucket, BucketError> {
        if !valid_bucket(bucket) {
            return Err(BucketError::InvalidName(bucket.to_owned()));
        }
        let mut settings =
            S3Settings::from_env(bucket, "").map_err(|e| BucketError::NotConfigured(e.message))?;
        if let Some(ep) = &self.endpoint {
            settings.endpoint = Some(ep.clone());
        }
        let s3 = Arc::new(S3Store::new(settings));
        let store = Retrying::new(
            Arc::clone(&s3) as Arc<dyn ObjectStore>,
            RetryPolicy::default(),
        )
        .with_cancel(self.cancel.child_token());
        Ok(Bucket {
            name: bucket.to_owned(),
            s3,
            store: Arc::new(store),
        })
    }
}

// Imports read through `size` and `download`; exports write through
// `store` and `s3` (multipart).
#[allow(dead_code)]
impl Bucket {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The concrete client, for what the trait does not offer (multipart).
    pub fn s3(&self) -> &Arc<S3Store> {
        &self.s3
    }

    /// The bucket through the retry wrapper: what every plain call uses.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// An error of `key` in this bucket as a `BucketError`.
    pub fn error(&self, key: &str, e: StoreError) -> BucketError {
        if e.is_cancelled() {
            return BucketError::Cancelled;
        }
        let bucket = self.name.clone();
        let key = key.to_owned();
        if e.message.contains("NoSuchBucket") {
            BucketError::NoSuchBucket(bucket)
        } else if e.message.contains("HTTP 403") || e.message.contains("AccessDenied") {
            BucketError::AccessDenied {
                bucket,
                key,
                message: e.message,
            }
        } else {
            BucketError::Store {
                bucket,
                key,
                message: e.message,
            }
        }
    }

    /// The size of object `key`: missing bucket, missing key and denied
    /// access each told as such.
    pub async fn size(&self, key: &str) -> Result<u64, BucketError> {
        match self.store.head(key).await {
            Ok(Some(info)) => Ok(info.size),
            Ok(None) => {
                // A HEAD says 404 for a missing bucket too; a listing
                // names which is missing.
                if let Err(e) = self.store.list(key).await {
                    return Err(self.error(key, e));
                }
                Err(BucketError::NoSuchKey {
                    bucket: self.name.clone(),
                    key: key.to_owned(),
                })
            }
            Err(e) => Err(self.error(key, e)),
        }
    }

    /// Copies object `key` (at most `limit` bytes) into a new file `dest`
    /// by ranged GETs, a few in flight, written in order; `progress` is
    /// told each range's length. Returns the object's size.
    pub async fn download(
        &self,
        key: &str,
        dest: &Path,
        limit: u64,
        cancel: &CancellationToken,
        progress: impl Fn(u64),
    ) -> Result<u64, BucketError> {
        let size = self.size(key).await?;
        if size > limit {
            return Err(BucketError::TooLarge {
                bucket: self.name.clone(),
                key: key.to_owned(),
                size,
                limit,
            });
        }
        let local = |source| BucketError::Local {
            path: dest.display().to_string(),
            source,
        };
        let mut file = tokio::fs::File::create(dest).await.map_err(local)?;
        let ranges = (0..size.div_ceil(RANGE)).map(|i| {
            let off = i * RANGE;
            (off, RANGE.min(size - off))
        });
        let mut parts = futures_util::stream::iter(ranges)
            .map(|(off, len)| async move { (len, self.store.get_range(key, off, len).await) })
            .buffered(RANGES_IN_FLIGHT);
        loop {
            let next = tokio::select! {
                n = parts.next() => n,
                () = cancel.cancelled() => return Err(BucketError::Cancelled),
            };
            let Some((len, got)) = next else { break };
            let bytes = match got {
                Ok(Some(b)) => b,
                Ok(None) => {
                    return Err(BucketError::NoSuchKey {
                        bucket: self.name.clone(),
                        key: key.to_owned(),
                    });
                }
                Err(e) => return Err(self.error(key, e)),
            };
            if bytes.len() as u64 != len {
                return Err(BucketError::Changed {
                    bucket: self.name.clone(),
                    key: key.to_owned(),
                });
            }
            file.write_all(&bytes).await.map_err(local)?;
            progress(len);
        }
        file.sync_all().await.map_err(local)?;
        Ok(size)
    }
}

/// S3's bucket naming rules, loosely: 3 to 63 of lowercase letters,
/// digits, dots and dashes (underscores too, which older buckets have).
pub fn valid_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
        && !name.starts_with(['.', '-'])
}

/// S3's rules for buckets made today: [`valid_bucket`] without the
/// underscores of older buckets, and a letter or digit at each end.
pub fn valid_current_bucket(name: &str) -> bool {
    valid_bucket(name) && !name.contains('_') && !name.ends_with(['.', '-'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names() {
        assert!(valid_bucket("imports"));
        assert!(valid_bucket("my.bucket-1"));
        for bad in ["", "ab", "Upper", "a/b", "-x-", &"x".repeat(64)] {
            assert!(!valid_bucket(bad), "{bad}");
        }
        assert!(valid_bucket("old_bucket") && !valid_current_bucket("old_bucket"));
        assert!(valid_bucket("abc-") && !valid_current_bucket("abc-"));
        assert!(valid_current_bucket("my.bucket-1"));
    }

    /// A client that is never called: the tests read through `store`.
    fn unused_s3() -> Arc<S3Store> {
        Arc::new(S3Store::new(S3Settings {
            bucket: "imports".into(),
            prefix: String::new(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: "us-east-1".into(),
            access_key: "a".into(),
            secret_key: "b".into(),
            session_token: None,
            operation_timeout: std::time::Duration::from_secs(1),
            attempt_timeout: std::time::Duration::from_secs(1),
            max_attempts: 1,
        }))
    }

    #[test]
    fn store_errors_are_named() {
        let b = Bucket {
            name: "imports".into(),
            s3: unused_s3(),
            store: Arc::new(snapshot::store::MemoryStore::new()),
        };
        let e = |m: &str| StoreError::new("head", "k", snapshot::store::ErrorKind::Permanent, m);
        let msg = b
            .error("disk.vmdk", e("HTTP 403 AccessDenied: no"))
            .to_string();
        assert!(msg.contains("s3://imports/disk.vmdk") && msg.contains("denied"));
        let msg = b.error("k", e("HTTP 404 NoSuchBucket: gone")).to_string();
        assert_eq!(msg, "S3 bucket \"imports\" does not exist");
    }

    #[tokio::test]
    async fn a_download_is_ranged_and_whole() {
        let mem = Arc::new(snapshot::store::MemoryStore::new());
        let data: Vec<u8> = (0..(2 * RANGE + 5)).map(|i| (i % 251) as u8).collect();
        mem.put("disks/a.raw", bytes::Bytes::from(data.clone()))
            .await
            .unwrap();
        let b = Bucket {
            name: "imports".into(),
            s3: unused_s3(),
            store: mem,
        };
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.raw");
        let seen = std::sync::atomic::AtomicU64::new(0);
        let n = b
            .download(
                "disks/a.raw",
                &dest,
                u64::MAX,
                &CancellationToken::new(),
                |n| {
                    seen.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                },
            )
            .await
            .unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(seen.into_inner(), n);
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        let small = b
            .download("disks/a.raw", &dest, 10, &CancellationToken::new(), |_| {})
            .await
            .unwrap_err();
        assert!(small.to_string().contains("the limit is 10"), "{small}");
        let missing = b
            .download("nope", &dest, u64::MAX, &CancellationToken::new(), |_| {})
            .await
            .unwrap_err();
        assert_eq!(
            missing.to_string(),
            "S3 object s3://imports/nope does not exist"
        );
    }
}
