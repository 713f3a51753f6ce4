//! Named crash points for crash tests.
//!
//! `VOLUMED_FAILPOINTS=name[,name...]` makes the daemon kill itself with
//! SIGKILL when it reaches one of those points, exactly as `kill -9` at that
//! instant would; `name=MS` instead makes a delay point wait that many
//! milliseconds, so a test can hold a background job at a known step (or,
//! for a counting point, is the count: see [`value`]); `name=eio` makes an
//! error point fail with EIO every time it is reached, `name=eio@N` only
//! the Nth time (counting from 1). Points sit on control paths, background
//! jobs and the flush (never on a read or write), so the lookup costs
//! nothing that matters.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

enum Action {
    Kill,
    Delay(u64),
    /// Fail the Nth hit only, or every hit.
    Eio {
        nth: Option<u64>,
        hits: AtomicU64,
    },
}

fn parse(value: &str) -> Action {
    if let Ok(ms) = value.parse() {
        return Action::Delay(ms);
    }
    match value.strip_prefix("eio") {
        Some("") => Action::Eio {
            nth: None,
            hits: AtomicU64::new(0),
        },
        Some(rest) => match rest.strip_prefix('@').and_then(|n| n.parse().ok()) {
            Some(n) => Action::Eio {
                nth: Some(n),
                hits: AtomicU64::new(0),
            },
            None => Action::Kill,
        },
        None => Action::Kill,
    }
}

fn armed() -> &'static HashMap<String, Action> {
    static ARMED: OnceLock<HashMap<String, Action>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("VOLUMED_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| match s.split_once('=') {
                        Some((n, v)) => (n.to_owned(), parse(v)),
                        None => (s.to_owned(), Action::Kill),
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Waits here if `name` is armed with a delay.
pub async fn delay(name: &str) {
    if let Some(Action::Delay(ms)) = armed().get(name) {
        tracing::info!(failpoint = name, ms, "failpoint: delaying");
        tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
    }
}

/// The number `name` is armed with (`name=N`), for points that count
/// rather than wait: `io-uring-enter-error=N` fails the ring's N-th enter.
pub fn value(name: &str) -> Option<u64> {
    match armed().get(name) {
        Some(Action::Delay(n)) => Some(*n),
        _ => None,
    }
}

/// Dies here if `name` is armed.
pub fn hit(name: &str) {
    if matches!(armed().get(name), Some(Action::Kill)) {
        tracing::warn!(failpoint = name, "failpoint reached: killing the daemon");
        // SAFETY: kill(2) on our own pid has no memory effects.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Fails with EIO here if `name` is armed with `eio` (at this hit).
pub fn io_error(name: &str) -> std::io::Result<()> {
    let Some(Action::Eio { nth, hits }) = armed().get(name) else {
        return Ok(());
    };
    let hit = hits.fetch_add(1, Ordering::Relaxed).saturating_add(1);
    if nth.is_none_or(|n| n == hit) {
        tracing::warn!(failpoint = name, hit, "failpoint: injecting EIO");
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Action, parse};

    #[test]
    fn values_parse_into_actions() {
        assert!(matches!(parse("250"), Action::Delay(250)));
        assert!(matches!(parse("eio"), Action::Eio { nth: None, .. }));
        assert!(matches!(parse("eio@3"), Action::Eio { nth: Some(3), .. }));
        // Anything else kills, as a bare name always did.
        assert!(matches!(parse("eio@x"), Action::Kill));
        assert!(matches!(parse("whatever"), Action::Kill));
    }
}
