//! Listeners for NBD over TCP and over a Unix socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::handshake::{Negotiated, negotiate};
use super::session;
use crate::engine::Engine;

/// A client must finish option haggling within this time; an idle
/// half-open connection otherwise holds a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct NbdServer {
    tcp: TcpListener,
    unix: UnixListener,
    engine: Arc<Engine>,
}

impl NbdServer {
    /// Takes the TCP listener already bound (the daemon binds it before the
    /// engine opens, to know the real port) and binds the Unix socket.
    pub async fn bind(
        engine: Arc<Engine>,
        tcp: std::net::TcpListener,
        socket: &Path,
    ) -> anyhow::Result<Self> {
        tcp.set_nonblocking(true)
            .context("set NBD listener non-blocking")?;
        let tcp = TcpListener::from_std(tcp).context("register NBD listener")?;
        crate::daemon::remove_stale_socket(socket).await?;
        let unix = UnixListener::bind(socket)
            .with_context(|| format!("bind NBD socket {}", socket.display()))?;
        Ok(NbdServer { tcp, unix, engine })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accepts until `shutdown` fires. Connections in handshake are dropped
    /// then; sessions end through their export's token (see Engine::shutdown).
    pub async fn run(self, shutdown: CancellationToken, socket_path: PathBuf) {
        let conns = TaskTracker::new();
        info!(tcp = %self.tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(),
              unix = %socket_path.display(), "NBD server listening");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.tcp.accept() => match r {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        conns.spawn(handle(stream, peer.to_string(), Arc::clone(&self.engine), shutdown.clone()));
                    }
                    Err(e) => accept_failed(e).await,
                },
                r = self.unix.accept() => match r {
                    Ok((stream, _)) => {
                        conns.spawn(handle(stream, "unix".into(), Arc::clone(&self.engine), shutdown.clone()));
                    }
                    Err(e) => accept_failed(e).await,
                },
            }
        }
        conns.close();
        conns.wait().await;
        let _ = std::fs::remove_file(&socket_path);
    }
}

/// EMFILE and friends are transient; back off instead of spinning.
async fn accept_failed(e: std::io::Error) {
    warn!(error = %e, "NBD accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// A connection that splits into independent owned halves, so the reader
/// and the writer task never contend for a lock as `tokio::io::split` would.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn halves(self) -> (Self::Read, Self::Write);
}

impl Connection for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl Connection for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

/// Read buffer per connection: one recv picks up many pipelined request
/// headers; payloads larger than it bypass it.
const READ_BUFFER: usize = 128 << 10;

async fn handle<S: Connection>(
    mut stream: S,
    peer: String,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
) {
    let negotiated = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(&mut stream, &engine)) => r,
    };
    let (export, size, options) = match negotiated {
        Ok(Ok(Negotiated::Export {
            export,
            size,
            options,
        })) => (export, size, options),
        Ok(Ok(Negotiated::Closed)) => return,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "NBD handshake ended");
            return;
        }
        Err(_) => {
            debug!(%peer, "NBD handshake timed out");
            return;
        }
    };
    let volume = Arc::clone(&export.volume);
    info!(%peer, volume = %volume.name, size, structured = options.structured, "NBD client connected");
    let (r, w) = stream.halves();
    let r = tokio::io::BufReader::with_capacity(READ_BUFFER, r);
    // Tracked by the export so detach and shutdown wait for this session.
    let session = session::serve(
        r,
        w,
        Arc::clone(&volume),
        size,
        options,
        export.cancel.clone(),
    );
    match export.sessions.track_future(session).await {
        Ok(()) => info!(%peer, volume = %volume.name, "NBD client disconnected"),
        Err(e) => warn!(%peer, volume = %volume.name, error = %e, "NBD session closed on error"),
    }
}
