//! Listeners for NBD over TCP and over a Unix socket, and the connection
//! task that runs handshake, TLS upgrade and session in turn. The engine is
//! reached only through [`ExportLookup`], implemented for it here.

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

use tokio_rustls::TlsAcceptor;

use super::handshake::{ExportLookup, HandshakeError, Negotiated, negotiate, options};
use super::proto::SessionOptions;
use super::session;
use super::tls::Tls;
use crate::engine::{Engine, Export};

impl ExportLookup for Engine {
    fn export(&self, name: &str) -> Option<Export> {
        Engine::export(self, name)
    }

    fn export_names(&self) -> Vec<String> {
        Engine::export_names(self)
            .into_iter()
            .map(|n| n.as_str().to_owned())
            .collect()
    }
}

/// A client must finish option haggling (and any TLS handshake) within
/// this time; an idle half-open connection otherwise holds a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct NbdServer {
    tcp: TcpListener,
    unix: UnixListener,
    exports: Arc<dyn ExportLookup>,
    /// Required on TCP, offered on the Unix socket.
    tls: Option<TlsAcceptor>,
}

impl NbdServer {
    /// Takes the TCP listener already bound (the daemon binds it before the
    /// engine opens, to know the real port) and binds the Unix socket.
    /// `exports` is the `Engine` in the daemon.
    pub async fn bind<E: ExportLookup + 'static>(
        exports: Arc<E>,
        tcp: std::net::TcpListener,
        socket: &Path,
        tls: Option<TlsAcceptor>,
    ) -> anyhow::Result<Self> {
        tcp.set_nonblocking(true)
            .context("set NBD listener non-blocking")?;
        let tcp = TcpListener::from_std(tcp).context("register NBD listener")?;
        crate::socket_path::remove_stale_socket(socket).await?;
        let unix = UnixListener::bind(socket)
            .with_context(|| format!("bind NBD socket {}", socket.display()))?;
        Ok(NbdServer {
            tcp,
            unix,
            exports,
            tls,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accepts until `shutdown` fires. Connections in handshake are dropped
    /// then; sessions end through their export's token (see Engine::shutdown).
    pub async fn run(self, shutdown: CancellationToken, socket_path: PathBuf) {
        let conns = TaskTracker::new();
        info!(tcp = %self.tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(),
              unix = %socket_path.display(), tls = self.tls.is_some(), "NBD server listening");
        let (tcp_tls, unix_tls) = match self.tls {
            Some(_) => (Tls::Required, Tls::Offered),
            None => (Tls::Off, Tls::Off),
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.tcp.accept() => match r {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let ctx = Ctx { peer: peer.to_string(), exports: Arc::clone(&self.exports), tls: self.tls.clone(), mode: tcp_tls };
                        conns.spawn(handle(stream, ctx, shutdown.clone()));
                    }
                    Err(e) => accept_failed(e).await,
                },
                r = self.unix.accept() => match r {
                    Ok((stream, _)) => {
                        let ctx = Ctx { peer: "unix".into(), exports: Arc::clone(&self.exports), tls: self.tls.clone(), mode: unix_tls };
                        conns.spawn(handle(stream, ctx, shutdown.clone()));
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

/// A TLS stream has no owned split; `tokio::io::split` locks between the
/// halves, which costs little next to the encryption itself.
impl<S> Connection for tokio_rustls::server::TlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// Read buffer per connection: one recv picks up many pipelined request
/// headers; payloads larger than it bypass it.
const READ_BUFFER: usize = 128 << 10;

/// What a connection's task needs besides its stream.
struct Ctx {
    peer: String,
    exports: Arc<dyn ExportLookup>,
    tls: Option<TlsAcceptor>,
    mode: Tls,
}

async fn handle<S: Connection>(mut stream: S, ctx: Ctx, shutdown: CancellationToken) {
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let first = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, negotiate(&mut stream, &*ctx.exports, ctx.mode)) => r,
    };
    let client = match outcome(first, &ctx.peer) {
        Some(Negotiated::Export {
            export,
            size,
            options,
        }) => return serve(stream, &ctx.peer, false, export, size, options).await,
        Some(Negotiated::StartTls(client)) => client,
        Some(Negotiated::Closed) | None => return,
    };
    let Some(acceptor) = ctx.tls else {
        // negotiate acknowledges STARTTLS only in a TLS mode.
        return warn!(peer = %ctx.peer, "STARTTLS acknowledged without TLS configured");
    };
    let upgrade = async {
        let mut tls = acceptor.accept(stream).await?;
        let n = options(&mut tls, &*ctx.exports, client, Tls::Active).await?;
        Ok::<_, HandshakeError>((tls, n))
    };
    let second = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, upgrade) => r,
    };
    if let Some((
        tls,
        Negotiated::Export {
            export,
            size,
            options,
        },
    )) = outcome(second, &ctx.peer)
    {
        serve(tls, &ctx.peer, true, export, size, options).await;
    }
}

/// Logs why a handshake (or TLS upgrade) ended without an outcome.
fn outcome<T>(
    r: Result<Result<T, HandshakeError>, tokio::time::error::Elapsed>,
    peer: &str,
) -> Option<T> {
    match r {
        Ok(Ok(n)) => Some(n),
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "NBD handshake ended");
            None
        }
        Err(_) => {
            debug!(%peer, "NBD handshake timed out");
            None
        }
    }
}

async fn serve<C: Connection>(
    stream: C,
    peer: &str,
    tls: bool,
    export: Export,
    size: u64,
    options: SessionOptions,
) {
    let volume = Arc::clone(&export.volume);
    info!(%peer, volume = %volume.name, size, structured = options.structured, tls,
          "NBD client connected");
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
