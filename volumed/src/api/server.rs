//! Serves the router on the control socket (mode 0600).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::{ApiState, router};
use crate::socket_path::{SocketError, remove_stale_socket};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("bind control socket {}", path.display())]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("chmod 0600 {}", path.display())]
    Chmod {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control API server")]
    Serve(#[source] std::io::Error),
}

pub async fn bind(socket: &Path) -> Result<UnixListener, ServerError> {
    remove_stale_socket(socket).await?;
    let listener = UnixListener::bind(socket).map_err(|source| ServerError::Bind {
        path: socket.to_owned(),
        source,
    })?;
    // The umask already makes it 0600; set it explicitly so that holds even
    // when the daemon is embedded with another umask.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ServerError::Chmod {
            path: socket.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Who is on the other end of a control connection (`SO_PEERCRED`), for
/// handlers that make something that person should own (an export's file).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<crate::catalog::Requester>);

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        Peer(
            stream
                .io()
                .peer_cred()
                .ok()
                .map(|c| crate::catalog::Requester {
                    uid: c.uid(),
                    gid: c.gid(),
                }),
        )
    }
}

/// Serves until `shutdown` fires, then lets requests in progress finish.
pub async fn serve(
    listener: UnixListener,
    state: ApiState,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let app = router(state).into_make_service_with_connect_info::<Peer>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(ServerError::Serve)
}
