//! Store request latency and errors, measured under the retry loop so each
//! attempt counts: a store that needs three tries shows three requests and
//! two errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Bytes;
use snapshot::store::{BoxFuture, ErrorKind, ObjectInfo};
use snapshot::{ObjectStore, PutOutcome, StoreError};

use super::Histogram;

/// A store operation, as metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Put,
    PutIfAbsent,
    Get,
    Head,
    Touch,
    List,
    Delete,
}

impl StoreOp {
    pub const ALL: [StoreOp; 7] = [
        StoreOp::Put,
        StoreOp::PutIfAbsent,
        StoreOp::Get,
        StoreOp::Head,
        StoreOp::Touch,
        StoreOp::List,
        StoreOp::Delete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Put => "put",
            StoreOp::PutIfAbsent => "put_if_absent",
            StoreOp::Get => "get",
            StoreOp::Head => "head",
            StoreOp::Touch => "touch",
            StoreOp::List => "list",
            StoreOp::Delete => "delete",
        }
    }
}

pub const ERROR_KINDS: [ErrorKind; 3] = [
    ErrorKind::Transient,
    ErrorKind::Permanent,
    ErrorKind::Cancelled,
];

pub fn kind_str(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::Transient => "transient",
        ErrorKind::Permanent => "permanent",
        ErrorKind::Cancelled => "cancelled",
    }
}

fn kind_index(k: ErrorKind) -> usize {
    match k {
        ErrorKind::Transient => 0,
        ErrorKind::Permanent => 1,
        ErrorKind::Cancelled => 2,
    }
}

/// Per store operation: latency of every attempt, and errors by kind.
pub struct StoreStats {
    pub latency: [Histogram; 7],
    errors: [[AtomicU64; 3]; 7],
}

impl StoreStats {
    pub const fn new() -> Self {
        StoreStats {
            latency: [const { Histogram::new() }; 7],
            errors: [const { [const { AtomicU64::new(0) }; 3] }; 7],
        }
    }

    pub fn errors(&self, op: StoreOp, kind: ErrorKind) -> u64 {
        self.errors[op as usize][kind_index(kind)].load(Ordering::Relaxed)
    }
}

impl Default for StoreStats {
    fn default() -> Self {
        Self::new()
    }
}

pub static STORE: StoreStats = StoreStats::new();

/// Wraps the raw store; the retry loop goes around this.
pub struct MeteredStore {
    inner: Arc<dyn ObjectStore>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        MeteredStore { inner }
    }
}

async fn measured<T>(
    op: StoreOp,
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let t = Instant::now();
    let r = f.await;
    let nanos = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    STORE.latency[op as usize].observe_nanos(nanos);
    if let Err(e) = &r {
        STORE.errors[op as usize][kind_index(e.kind)].fetch_add(1, Ordering::Relaxed);
    }
    r
}

impl ObjectStore for MeteredStore {
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(measured(StoreOp::Put, self.inner.put(key, data)))
    }

    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
        Box::pin(measured(
            StoreOp::PutIfAbsent,
            self.inner.put_if_absent(key, data),
        ))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(measured(StoreOp::Get, self.inner.get(key)))
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<ObjectInfo>, StoreError>> {
        Box::pin(measured(StoreOp::Head, self.inner.head(key)))
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(measured(StoreOp::Head, self.inner.exists(key)))
    }

    fn touch<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(measured(StoreOp::Touch, self.inner.touch(key)))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectInfo>, StoreError>> {
        Box::pin(measured(StoreOp::List, self.inner.list(prefix)))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(measured(StoreOp::Delete, self.inner.delete(key)))
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn create_multipart<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<String, StoreError>> {
        Box::pin(measured(StoreOp::Put, self.inner.create_multipart(key)))
    }

    fn upload_part<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        part: i32,
        data: Bytes,
    ) -> BoxFuture<'a, Result<String, StoreError>> {
        Box::pin(measured(
            StoreOp::Put,
            self.inner.upload_part(key, upload, part, data),
        ))
    }

    fn complete_multipart<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        parts: &'a [(i32, String)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(measured(
            StoreOp::Put,
            self.inner.complete_multipart(key, upload, parts),
        ))
    }

    fn abort_multipart<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(measured(
            StoreOp::Delete,
            self.inner.abort_multipart(key, upload),
        ))
    }
}
