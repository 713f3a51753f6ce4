//! Named crash points for crash tests.
//!
//! `VOLUMED_FAILPOINTS=name[,name...]` makes the daemon kill itself with
//! SIGKILL when it reaches one of those points, exactly as `kill -9` at that
//! instant would; `name=MS` instead makes a delay point wait that many
//! milliseconds, so a test can hold a background job at a known step
//! (or, for a counting point, is the count: see [`value`]). Points
//! sit only on control paths and background jobs (never on the client data
//! path), so the lookup costs nothing that matters.

use std::collections::HashMap;
use std::sync::OnceLock;

fn armed() -> &'static HashMap<String, Option<u64>> {
    static ARMED: OnceLock<HashMap<String, Option<u64>>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("VOLUMED_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| match s.split_once('=') {
                        Some((n, ms)) => (n.to_owned(), ms.parse().ok()),
                        None => (s.to_owned(), None),
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Waits here if `name` is armed with a delay.
pub async fn delay(name: &str) {
    if let Some(Some(ms)) = armed().get(name) {
        tracing::info!(failpoint = name, ms, "failpoint: delaying");
        tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
    }
}

/// The number `name` is armed with (`name=N`), for points that count
/// rather than wait: `io-uring-enter-error=N` fails the ring's N-th enter.
pub fn value(name: &str) -> Option<u64> {
    armed().get(name).copied().flatten()
}

/// Dies here if `name` is armed.
pub fn hit(name: &str) {
    if matches!(armed().get(name), Some(None)) {
        tracing::warn!(failpoint = name, "failpoint reached: killing the daemon");
        // SAFETY: kill(2) on our own pid has no memory effects.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
