//! Unix socket files the daemon listens on: taking over one a dead daemon
//! left behind, never one a live daemon still answers on.
//!
//! Its own module because both listeners (`nbd::server` and `api::server`)
//! need it and `daemon` wires those listeners up: living in `daemon` it made
//! an import cycle.

use std::path::Path;

use anyhow::{Context, bail};

/// Removes a socket file left by a daemon that died, but refuses to steal
/// one that a live daemon still answers on.
pub async fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        bail!(
            "{} is in use: is another volumed running on this data dir?",
            path.display()
        );
    }
    std::fs::remove_file(path).with_context(|| format!("remove stale socket {}", path.display()))
}
