//! A store wrapper for tests that breaks the next few operations in a
//! chosen way, and counts every operation that reaches it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;

use super::{BoxFuture, ErrorKind, ObjectInfo, ObjectStore, PutOutcome, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Fails with a transient error without doing anything.
    Transient,
    /// Fails with a permanent error without doing anything.
    Permanent,
    /// Never answers.
    Hang,
    /// Does the operation, then fails transiently: the reply was lost.
    LostReply,
}

pub(crate) struct Faulty {
    inner: Box<dyn ObjectStore>,
    /// The fault and how many more operations get it.
    plan: Mutex<(Fault, u32)>,
    calls: AtomicU32,
}

impl Faulty {
    pub(crate) fn new(inner: impl ObjectStore + 'static) -> Self {
        Faulty {
            inner: Box::new(inner),
            plan: Mutex::new((Fault::Transient, 0)),
            calls: AtomicU32::new(0),
        }
    }

    /// The next `n` operations get `fault`.
    pub(crate) fn fail_next(&self, n: u32, fault: Fault) {
        *self.plan.lock().unwrap() = (fault, n);
    }

    /// Operations that reached this store, broken or not.
    pub(crate) fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    fn next_fault(&self) -> Option<Fault> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut plan = self.plan.lock().unwrap();
        if plan.1 == 0 {
            return None;
        }
        plan.1 -= 1;
        Some(plan.0)
    }

    async fn run<'a, T>(
        &'a self,
        op: &'static str,
        key: &'a str,
        f: BoxFuture<'a, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let fail = |kind| StoreError::new(op, key, kind, "injected fault");
        // A real store answers later: let other tasks run in between, so
        // callers that race do race here.
        tokio::task::yield_now().await;
        match self.next_fault() {
            None => f.await,
            Some(Fault::Transient) => Err(fail(ErrorKind::Transient)),
            Some(Fault::Permanent) => Err(fail(ErrorKind::Permanent)),
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::LostReply) => {
                f.await?;
                Err(fail(ErrorKind::Transient))
            }
        }
    }
}

impl ObjectStore for Faulty {
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.run("put", key, self.inner.put(key, data)))
    }

    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
        Box::pin(self.run("put_if_absent", key, self.inner.put_if_absent(key, data)))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(self.run("get", key, self.inner.get(key)))
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<ObjectInfo>, StoreError>> {
        Box::pin(self.run("head", key, self.inner.head(key)))
    }

    fn touch<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.run("touch", key, self.inner.touch(key)))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectInfo>, StoreError>> {
        Box::pin(self.run("list", prefix, self.inner.list(prefix)))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.run("delete", key, self.inner.delete(key)))
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
