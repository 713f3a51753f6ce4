//! Named crash points for crash tests.
//!
//! `VOLUMED_FAILPOINTS=name[,name...]` makes the daemon kill itself with
//! SIGKILL when it reaches one of those points, exactly as `kill -9` at that
//! instant would. Points sit only on control paths that write state (never
//! on the data path), so the lookup costs nothing that matters.

use std::collections::HashSet;
use std::sync::OnceLock;

fn armed() -> &'static HashSet<String> {
    static ARMED: OnceLock<HashSet<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("VOLUMED_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Dies here if `name` is armed.
pub fn hit(name: &str) {
    if armed().contains(name) {
        tracing::warn!(failpoint = name, "failpoint reached: killing the daemon");
        // SAFETY: kill(2) on our own pid has no memory effects.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
