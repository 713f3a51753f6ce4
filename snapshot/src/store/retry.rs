//! Retries, in one place: a store wrapper that tries an operation again
//! when its error says that may help ([`StoreError::is_transient`]), with
//! jittered exponential backoff, a cap on attempts, a total deadline per
//! operation and a cancellation token.
//!
//! Every operation of the trait is safe to repeat: objects are immutable,
//! a `put` of the same key writes the same bytes, deleting a missing object
//! is not an error, and a `put_if_absent` whose reply was lost answers
//! `AlreadyExists` the second time, which the repository checks by reading
//! the object back (see `Repo::put_manifest`).
//!
//! The backend may retry too (the S3 SDK does, within one attempt here);
//! this layer is what outlasts a store that is down for seconds, and what
//! stops waiting when the daemon shuts down.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{BoxFuture, ErrorKind, ObjectInfo, ObjectStore, PutOutcome, StoreError};

/// How hard [`Retrying`] tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 0 counts as 1.
    pub attempts: u32,
    /// The ceiling of the first wait; each later ceiling doubles.
    pub base_delay: Duration,
    /// No wait's ceiling exceeds this.
    pub max_delay: Duration,
    /// The whole operation, attempts and waits together, ends by then: an
    /// attempt still running is abandoned and the operation fails.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    /// Four attempts with waits of up to 0.25, 0.5 and 1 s, spread by
    /// jitter so hosts and chunk uploads that failed together do not retry
    /// together. The deadline bounds one operation on a store that hangs.
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(4),
            deadline: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait after `failed` attempts (1 or more): uniform in zero to
    /// `min(max_delay, base_delay * 2^(failed - 1))` ("full jitter"), with
    /// `random` picking the point.
    fn delay(&self, failed: u32, random: u64) -> Duration {
        let doublings = failed.saturating_sub(1).min(31);
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay);
        let nanos = ceiling.as_nanos();
        let pick = u128::from(random) % nanos.saturating_add(1);
        Duration::from_nanos(u64::try_from(pick).unwrap_or(u64::MAX))
    }
}

/// A random number for jitter; it needs to differ between calls and hosts,
/// not to be unpredictable. `RandomState` is seeded per process and thread.
fn random() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(SEQ.fetch_add(1, Ordering::Relaxed))
}

/// An [`ObjectStore`] that retries its inner store's transient failures.
pub struct Retrying {
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
    cancel: CancellationToken,
}

impl Retrying {
    pub fn new(inner: Arc<dyn ObjectStore>, policy: RetryPolicy) -> Self {
        Retrying {
            inner,
            policy,
            cancel: CancellationToken::new(),
        }
    }

    /// Once `token` is cancelled no new attempt starts and a wait between
    /// attempts ends at once, with an error of kind `Cancelled`. An attempt
    /// already running is left to finish (bounded by the deadline): its
    /// outcome is the caller's, whether it waits or not.
    pub fn with_cancel(mut self, token: CancellationToken) -> Self {
        self.cancel = token;
        self
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    async fn run<'a, T>(
        &'a self,
        op: &'static str,
        key: &'a str,
        mut attempt: impl FnMut() -> BoxFuture<'a, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let cancelled = || StoreError::new(op, key, ErrorKind::Cancelled, "cancelled");
        if self.cancel.is_cancelled() {
            return Err(cancelled());
        }
        let attempts = self.policy.attempts.max(1);
        let deadline = Instant::now() + self.policy.deadline;
        let mut failed = 0u32;
        loop {
            let result = match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(StoreError::new(
                        op,
                        key,
                        ErrorKind::Transient,
                        format!(
                            "no answer within the deadline; deadline_secs={} attempts={}",
                            self.policy.deadline.as_secs_f64(),
                            failed + 1
                        ),
                    ));
                }
            };
            let mut err = match result {
                Err(e) if e.is_transient() => e,
                done => return done,
            };
            failed += 1;
            let delay = self.policy.delay(failed, random());
            if failed >= attempts || Instant::now() + delay >= deadline {
                err.message = format!("{}; attempts={failed}", err.message);
                return Err(err);
            }
            warn!(op, key, attempt = failed, delay_ms = delay.as_millis() as u64, error = %err,
                  "store operation failed; retrying");
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(cancelled()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

impl ObjectStore for Retrying {
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        // `Bytes` clones share the buffer: a retry copies nothing.
        Box::pin(self.run("put", key, move || self.inner.put(key, data.clone())))
    }

    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
        Box::pin(self.run("put_if_absent", key, move || {
            self.inner.put_if_absent(key, data.clone())
        }))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(self.run("get", key, || self.inner.get(key)))
    }

    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(self.run("get_range", key, move || {
            self.inner.get_range(key, offset, len)
        }))
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<ObjectInfo>, StoreError>> {
        Box::pin(self.run("head", key, || self.inner.head(key)))
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.run("exists", key, || self.inner.exists(key)))
    }

    fn touch<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.run("touch", key, || self.inner.touch(key)))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectInfo>, StoreError>> {
        Box::pin(self.run("list", prefix, || self.inner.list(prefix)))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.run("delete", key, || self.inner.delete(key)))
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    // A create whose answer was lost and is tried again leaves an upload
    // nobody completes: S3's lifecycle rule for incomplete uploads (or an
    // abort by prefix) is what removes it; the object never appears.
    fn create_multipart<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<String, StoreError>> {
        Box::pin(self.run("create_multipart", key, || self.inner.create_multipart(key)))
    }

    fn upload_part<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        part: i32,
        data: Bytes,
    ) -> BoxFuture<'a, Result<String, StoreError>> {
        Box::pin(self.run("upload_part", key, move || {
            self.inner.upload_part(key, upload, part, data.clone())
        }))
    }

    fn complete_multipart<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
        parts: &'a [(i32, String)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.run("complete_multipart", key, move || {
            self.inner.complete_multipart(key, upload, parts)
        }))
    }

    fn abort_multipart<'a>(
        &'a self,
        key: &'a str,
        upload: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.run("abort_multipart", key, move || {
            self.inner.abort_multipart(key, upload)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::store::faulty::{Fault, Faulty};

    fn policy(attempts: u32, base_ms: u64, deadline_secs: u64) -> RetryPolicy {
        RetryPolicy {
            attempts,
            base_delay: Duration::from_millis(base_ms),
            max_delay: Duration::from_secs(4),
            deadline: Duration::from_secs(deadline_secs),
        }
    }

    fn wrap(f: &Arc<Faulty>, p: RetryPolicy) -> Retrying {
        Retrying::new(Arc::clone(f) as Arc<dyn ObjectStore>, p)
    }

    #[test]
    fn delays_are_jittered_under_a_doubling_ceiling() {
        let p = RetryPolicy::default();
        for failed in 1..40 {
            let ceiling = Duration::from_millis(250)
                .saturating_mul(1 << (failed - 1).min(31))
                .min(Duration::from_secs(4));
            assert_eq!(p.delay(failed, 0), Duration::ZERO);
            assert!(p.delay(failed, u64::MAX) <= ceiling);
            for _ in 0..50 {
                assert!(p.delay(failed, random()) <= ceiling);
            }
        }
        assert_eq!(
            p.delay(3, 1_000_000_000),
            Duration::from_nanos(1_000_000_000)
        );
        let spread: std::collections::HashSet<Duration> =
            (0..20).map(|_| p.delay(4, random())).collect();
        assert!(spread.len() > 10, "jitter varies: {spread:?}");
        let zero = RetryPolicy {
            base_delay: Duration::ZERO,
            ..p
        };
        assert_eq!(zero.delay(5, u64::MAX), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_until_one_succeeds() {
        let f = Arc::new(Faulty::new(MemoryStore::new()));
        let s = wrap(&f, policy(4, 250, 60));
        s.put("manifests/snap-1", Bytes::from_static(b"m"))
            .await
            .unwrap();
        f.fail_next(3, Fault::Transient);
        assert_eq!(s.get("manifests/snap-1").await.unwrap().unwrap(), &b"m"[..]);
        assert_eq!(f.calls(), 1 + 4);

        // One failure more than the attempts allow: the last error, saying
        // how many attempts were made, and still transient.
        f.fail_next(4, Fault::Transient);
        let e = s.get("manifests/snap-1").await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(e.message.ends_with("attempts=4"), "{e}");
        assert_eq!(f.calls(), 1 + 4 + 4);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let f = Arc::new(Faulty::new(MemoryStore::new()));
        let s = wrap(&f, policy(4, 250, 60));
        f.fail_next(1, Fault::Permanent);
        let e = s.list("chunks/").await.unwrap_err();
        assert!(!e.is_transient());
        assert_eq!(f.calls(), 1);
        // An invalid key is the inner store's permanent error, passed on.
        assert!(s.put("../x", Bytes::new()).await.is_err());
        assert_eq!(f.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_bounds_waits_and_hung_attempts() {
        let f = Arc::new(Faulty::new(MemoryStore::new()));
        let s = wrap(
            &f,
            RetryPolicy {
                attempts: 1000,
                base_delay: Duration::from_secs(1),
                max_delay: Duration::from_secs(1),
                deadline: Duration::from_secs(5),
            },
        );
        f.fail_next(u32::MAX, Fault::Transient);
        let t = Instant::now();
        let e = s.head("chunks/ab/cd").await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(t.elapsed() <= Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(f.calls() > 1 && f.calls() < 1000, "{}", f.calls());

        // An attempt that never answers is abandoned at the deadline.
        f.fail_next(1, Fault::Hang);
        let calls = f.calls();
        let t = Instant::now();
        let e = s.get("chunks/ab/cd").await.unwrap_err();
        assert_eq!(t.elapsed(), Duration::from_secs(5));
        assert!(e.is_transient() && e.message.contains("deadline"), "{e}");
        assert_eq!(f.calls(), calls + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_ends_the_wait_at_once() {
        let f = Arc::new(Faulty::new(MemoryStore::new()));
        let token = CancellationToken::new();
        let s = Arc::new(
            Retrying::new(
                Arc::clone(&f) as Arc<dyn ObjectStore>,
                RetryPolicy {
                    attempts: 10,
                    base_delay: Duration::from_secs(30),
                    max_delay: Duration::from_secs(30),
                    deadline: Duration::from_secs(600),
                },
            )
            .with_cancel(token.clone()),
        );
        f.fail_next(u32::MAX, Fault::Transient);
        let waiting = {
            let s = Arc::clone(&s);
            tokio::spawn(async move { s.delete("chunks/ab/cd").await })
        };
        // It fails once and starts its 30 s wait; the clock only moves when
        // every task is idle, so this sleep ends while it waits.
        let t = Instant::now();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(f.calls(), 1);
        token.cancel();
        let e = waiting.await.unwrap().unwrap_err();
        assert!(e.is_cancelled() && !e.is_transient(), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(f.calls(), 1);
        // Once cancelled, nothing more is attempted.
        assert!(s.get("chunks/ab/cd").await.unwrap_err().is_cancelled());
        assert_eq!(f.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_reply_to_put_if_absent_is_found_on_retry() {
        let f = Arc::new(Faulty::new(MemoryStore::new()));
        let s = wrap(&f, policy(4, 250, 60));
        f.fail_next(1, Fault::LostReply);
        assert_eq!(
            s.put_if_absent("manifests/snap-1", Bytes::from_static(b"m"))
                .await
                .unwrap(),
            PutOutcome::AlreadyExists
        );
        assert_eq!(f.calls(), 2);
        assert_eq!(s.describe(), "memory:");
    }
}
