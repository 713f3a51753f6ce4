//! The S3 store on aws-sdk-s3: path-style addressing (for S3-compatible
//! servers), a timeout on every operation, the SDK's standard retries with
//! backoff on throttling and 5xx, and a bound on requests in flight.
//!
//! Create-if-absent writes send `If-None-Match: *`, which S3 honours
//! atomically (412 when the key exists). A server that answers 501 to the
//! header gets a HEAD then a PUT instead: not atomic against a concurrent
//! writer of the same key, which for manifests means two hosts writing one
//! snapshot id, which ids make practically impossible.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, MetadataDirective};
use aws_smithy_http_client::tls;
use bytes::Bytes;
use tokio::sync::Semaphore;
use tracing::warn;

use super::{BoxFuture, ErrorKind, ObjectInfo, ObjectStore, PutOutcome, StoreError};

/// Requests in flight per store: enough to fill a link with 512 KiB
/// chunks, few enough not to be throttled by a small server.
const MAX_IN_FLIGHT: usize = 32;

#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
    /// Whole operation, retries included.
    pub operation_timeout: Duration,
    /// One attempt.
    pub attempt_timeout: Duration,
    pub max_attempts: u32,
}

impl S3Settings {
    /// Endpoint, region and credentials from the standard AWS variables.
    pub fn from_env(bucket: &str, prefix: &str) -> Result<Self, StoreError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let missing = |k: &str| {
            StoreError::new(
                "configure",
                bucket,
                ErrorKind::Permanent,
                format!("{k} is not set; S3 stores need it"),
            )
        };
        Ok(S3Settings {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            endpoint: var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL")),
            region: var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
            access_key: var("AWS_ACCESS_KEY_ID").ok_or_else(|| missing("AWS_ACCESS_KEY_ID"))?,
            secret_key: var("AWS_SECRET_ACCESS_KEY")
                .ok_or_else(|| missing("AWS_SECRET_ACCESS_KEY"))?,
            session_token: var("AWS_SESSION_TOKEN"),
            operation_timeout: secs("VOLUMED_S3_OPERATION_TIMEOUT", 60),
            attempt_timeout: secs("VOLUMED_S3_ATTEMPT_TIMEOUT", 20),
            max_attempts: var("VOLUMED_S3_MAX_ATTEMPTS")
                .and_then(|v| v.parse().ok())
                .filter(|n| *n >= 1)
                .unwrap_or(4),
        })
    }
}

/// A duration in whole seconds from the environment, else the default.
fn secs(key: &str, default: u64) -> Duration {
    let v = std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0);
    Duration::from_secs(v.unwrap_or(default))
}

pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    permits: Arc<Semaphore>,
    /// Set once the server has refused `If-None-Match` on PUT.
    no_conditional_put: AtomicBool,
}

impl S3Store {
    pub fn new(s: S3Settings) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let creds = Credentials::new(
            s.access_key,
            s.secret_key,
            s.session_token,
            None,
            "volumed-environment",
        );
        let mut conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(s.region))
            .credentials_provider(creds)
            .force_path_style(true)
            // Chunks, pages and manifests are verified against the blake3
            // in their names or their own checksums when read, so the SDK's
            // CRC of each response body is a second pass over every byte
            // (4 % of hydration's CPU) that proves nothing more. Uploads keep
            // theirs: a body damaged on the way is refused before it is
            // stored.
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .http_client(http)
            .retry_config(RetryConfig::standard().with_max_attempts(s.max_attempts))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_timeout(s.operation_timeout)
                    .operation_attempt_timeout(s.attempt_timeout)
                    .build(),
            );
        if let Some(ep) = s.endpoint {
            conf = conf.endpoint_url(ep);
        }
        S3Store {
            client: aws_sdk_s3::Client::from_conf(conf.build()),
            bucket: s.bucket,
            prefix: s.prefix,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            no_conditional_put: AtomicBool::new(false),
        }
    }

    /// Create-if-absent for servers without conditional writes.
    async fn head_then_put(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        if self.head(key).await?.is_some() {
            return Ok(PutOutcome::AlreadyExists);
        }
        self.put(key, data).await?;
        Ok(PutOutcome::Created)
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{}", self.prefix, key)
        }
    }

    fn strip(&self, full: &str) -> Option<String> {
        if self.prefix.is_empty() {
            return Some(full.to_owned());
        }
        full.strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('/'))
            .map(str::to_owned)
    }
}

/// An S3 timestamp; a missing or unrepresentable one counts as now, which
/// errs on the side of keeping an object.
fn system_time(t: Option<&aws_sdk_s3::primitives::DateTime>) -> std::time::SystemTime {
    t.and_then(|t| std::time::SystemTime::try_from(*t).ok())
        .unwrap_or_else(std::time::SystemTime::now)
}

/// Classifies an SDK error: anything on the way (timeouts, connection) and
/// 5xx/429 replies are transient; the rest is permanent.
fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    op: &'static str,
    key: &str,
    e: SdkError<E>,
) -> StoreError {
    let (kind, msg) = match &e {
        SdkError::TimeoutError(_) => (ErrorKind::Transient, "timed out".to_owned()),
        SdkError::DispatchFailure(d) => (ErrorKind::Transient, format!("dispatch failed: {d:?}")),
        SdkError::ResponseError(_) => (ErrorKind::Transient, "unreadable response".to_owned()),
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or("unknown");
            let kind = if status >= 500 || status == 429 {
                ErrorKind::Transient
            } else {
                ErrorKind::Permanent
            };
            (
                kind,
                format!("HTTP {status} {code}: {}", se.err().message().unwrap_or("")),
            )
        }
        other => (ErrorKind::Permanent, format!("{other}")),
    };
    StoreError::new(op, key, kind, msg)
}

impl ObjectStore for S3Store {
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let _permit = self.permits.acquire().await.expect("never closed");
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .body(ByteStream::from(data))
                .send()
                .await
                .map_err(|e| classify("put", key, e))?;
            Ok(())
        })
    }

    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
        Box::pin(async move {
            if self.no_conditional_put.load(Ordering::Relaxed) {
                return self.head_then_put(key, data).await;
            }
            let sent = {
                let _permit = self.permits.acquire().await.expect("never closed");
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(self.full_key(key))
                    .if_none_match("*")
                    .body(ByteStream::from(data.clone()))
                    .send()
                    .await
            };
            let err = match sent {
                Ok(_) => return Ok(PutOutcome::Created),
                Err(e) => e,
            };
            let status = match &err {
                SdkError::ServiceError(se) => se.raw().status().as_u16(),
                _ => 0,
            };
            match status {
                412 => Ok(PutOutcome::AlreadyExists),
                // S3 answers 409 when another conditional write of the key
                // is in flight: trying again gets a clear answer.
                409 => Err(StoreError::new(
                    "put_if_absent",
                    key,
                    ErrorKind::Transient,
                    "HTTP 409: a concurrent conditional write of the key",
                )),
                501 => {
                    if !self.no_conditional_put.swap(true, Ordering::Relaxed) {
                        warn!(store = %self.describe(),
                              "the store does not support conditional PUT (If-None-Match); \
                               manifests are written after a HEAD instead");
                    }
                    self.head_then_put(key, data).await
                }
                _ => Err(classify("put_if_absent", key, err)),
            }
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let _permit = self.permits.acquire().await.expect("never closed");
            let out = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .send()
                .await
            {
                Ok(o) => o,
                Err(SdkError::ServiceError(se)) if se.err().is_no_such_key() => return Ok(None),
                Err(e) => return Err(classify("get", key, e)),
            };
            let body = out.body.collect().await.map_err(|e| {
                StoreError::new(
                    "get",
                    key,
                    ErrorKind::Transient,
                    format!("reading the body: {e}"),
                )
            })?;
            Ok(Some(body.into_bytes()))
        })
    }

    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            if len == 0 {
                return Ok(self.head(key).await?.map(|_| Bytes::new()));
            }
            let last = offset.saturating_add(len - 1);
            let _permit = self.permits.acquire().await.expect("never closed");
            let out = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .range(format!("bytes={offset}-{last}"))
                .send()
                .await
            {
                Ok(o) => o,
                Err(SdkError::ServiceError(se)) if se.err().is_no_such_key() => return Ok(None),
                // A range that starts at or past the end: nothing there.
                Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 416 => {
                    return Ok(Some(Bytes::new()));
                }
                Err(e) => return Err(classify("get_range", key, e)),
            };
            let body = out.body.collect().await.map_err(|e| {
                StoreError::new(
                    "get_range",
                    key,
                    ErrorKind::Transient,
                    format!("reading the body: {e}"),
                )
            })?;
            Ok(Some(body.into_bytes()))
        })
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<ObjectInfo>, StoreError>> {
        Box::pin(async move {
            let _permit = self.permits.acquire().await.expect("never closed");
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .send()
                .await
            {
                Ok(o) => Ok(Some(ObjectInfo {
                    key: key.to_owned(),
                    size: o.content_length().unwrap_or(0).max(0) as u64,
                    modified: system_time(o.last_modified()),
                })),
                Err(SdkError::ServiceError(se))
                    if se.err().is_not_found() || se.raw().status().as_u16() == 404 =>
                {
                    Ok(None)
                }
                Err(e) => Err(classify("head", key, e)),
            }
        })
    }

    fn touch<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let _permit = self.permits.acquire().await.expect("never closed");
            // Copying an object onto itself needs a change; replacing its
            // metadata is the usual one, and it resets LastModified.
            self.client
                .copy_object()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .copy_source(format!("{}/{}", self.bucket, self.full_key(key)))
                .metadata_directive(MetadataDirective::Replace)
                .metadata("touched", "1")
                .send()
                .await
                .map_err(|e| classify("touch", key, e))?;
            Ok(())
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectInfo>, StoreError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(self.full_key(prefix))
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| classify("list", prefix, e))?;
                for obj in page.contents() {
                    if let Some(k) = obj.key().and_then(|k| self.strip(k)) {
                        out.push(ObjectInfo {
                            key: k,
                            size: obj.size().unwrap_or(0).max(0) as u64,
                            modified: system_time(obj.last_modified()),
                        });
                    }
                }
            }
            Ok(out)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let _permit = self.permits.acquire().await.expect("never closed");
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .send()
                .await
                .map_err(|e| classify("delete", key, e))?;
            Ok(())
        })
    }

    fn create_multipart<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<String, StoreError>> {
        Box::pin(async move {
            let _permit = self.permits.acquire().await.expect("never closed");
            let out = self
                .client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .send()
                .await
                .map_err(|e| classify("create_multipart", key, e))?;
            out.upload_id().map(str::to_owned).ok_or_else(|| {
                StoreError::new(
                    "create_multipart",
                    key,
                    ErrorKind::Permanent,
                    "the answer named no upload id",
                )
            })
        })
    }

    fn upload_part<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        part: i32,
        data: Bytes,
    ) -> BoxFuture<'a, Result<String, StoreError>> {
        Box::pin(async move {
            let _permit = self.permits.acquire().await.expect("never closed");
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .upload_id(upload)
                .part_number(part)
                .body(ByteStream::from(data))
                .send()
                .await
                .map_err(|e| classify("upload_part", key, e))?;
            Ok(out.e_tag().unwrap_or_default().to_owned())
        })
    }

    fn complete_multipart<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        parts: &'a [(i32, String)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let _permit = self.permits.acquire().await.expect("never closed");
            let parts = parts
                .iter()
                .map(|(n, etag)| CompletedPart::builder().part_number(*n).e_tag(etag).build())
                .collect();
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .upload_id(upload)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| classify("complete_multipart", key, e))?;
            Ok(())
        })
    }

    fn abort_multipart<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let _permit = self.permits.acquire().await.expect("never closed");
            match self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .upload_id(upload)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 404 => Ok(()),
                Err(e) => Err(classify("abort_multipart", key, e)),
            }
        })
    }

    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}
