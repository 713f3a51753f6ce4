//! Serves the router on the control socket (mode 0600).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::{ApiState, router};

pub async fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    crate::socket_path::remove_stale_socket(socket).await?;
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("bind control socket {}", socket.display()))?;
    // The umask already makes it 0600; set it explicitly so that holds even
    // when the daemon is embedded with another umask.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", socket.display()))?;
    Ok(listener)
}

/// Serves until `shutdown` fires, then lets requests in progress finish.
pub async fn serve(
    listener: UnixListener,
    state: ApiState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("control API server")
}
