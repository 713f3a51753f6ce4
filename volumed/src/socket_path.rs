//! Unix socket files the daemon listens on: taking over one a dead daemon
//! left behind, never one a live daemon still answers on.
//!
//! Its own module because both listeners (`nbd::server` and `api::server`)
//! need it and `daemon` wires those listeners up: living in `daemon` it made
//! an import cycle.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{} is in use: is another volumed running on this data dir?", .0.display())]
    InUse(PathBuf),
    #[error("remove stale socket {}", path.display())]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Removes a socket file left by a daemon that died, but refuses to steal
/// one that a live daemon still answers on.
pub async fn remove_stale_socket(path: &Path) -> Result<(), SocketError> {
    if !path.exists() {
        return Ok(());
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(SocketError::InUse(path.to_owned()));
    }
    std::fs::remove_file(path).map_err(|source| SocketError::Remove {
        path: path.to_owned(),
        source,
    })
}
