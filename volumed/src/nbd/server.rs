//! Listeners for NBD over TCP and over a Unix socket, and the connection
//! task that runs handshake, TLS upgrade and session in turn. The engine is
//! reached only through [`ExportLookup`], implemented for it here.
//!
//! What a client can hold before it is served is bounded by [`Limits`]: a
//! cap on open connections, counted from accept to close, and a deadline on
//! negotiation. Connections turned away are logged, at most one line per
//! second per reason with a count of those left out.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nbd_proto::SessionOptions;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use tokio_rustls::TlsAcceptor;

use super::handshake::{
    BoxFuture, ExportLookup, HandshakeError, MetaContext, Negotiated, Refused, negotiate, options,
};
use super::io_threads::IoThreads;
use super::poll::{Polled, Quiet};
use super::refusals::{Reason, RefusalLog};
use super::session;
use crate::engine::{Engine, Export};
use crate::tls::Tls;

impl ExportLookup for Engine {
    fn export(&self, name: &str) -> Option<Export> {
        Engine::export(self, name)
    }

    fn export_names(&self) -> Vec<String> {
        Engine::export_names(self)
    }

    fn changed_since<'a>(
        &'a self,
        export: &'a Export,
        from: &'a str,
    ) -> BoxFuture<'a, Option<MetaContext>> {
        Box::pin(async move {
            if let Some(vol) = export.backend.volume() {
                // A live volume: against its last completed snapshot only.
                let last = vol.record().last_snapshot.is_some();
                return (from == LAST && last).then_some(MetaContext::LiveChanged);
            }
            Engine::changed_since(self, export, from)
                .await
                .map(MetaContext::Changed)
        })
    }

    fn changed_candidates<'a>(&'a self, export: &'a Export) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            if let Some(vol) = export.backend.volume() {
                return match vol.record().last_snapshot {
                    Some(_) => vec![LAST.to_owned()],
                    None => Vec::new(),
                };
            }
            Engine::changed_candidates(self, export).await
        })
    }
}

/// The dirty-bitmap name of a live volume's last completed snapshot.
const LAST: &str = "LAST";

/// Bounds on what clients hold of the daemon (`--nbd-max-connections`,
/// `--nbd-handshake-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once over TCP and the Unix socket together,
    /// negotiating or in transmission; more are closed as they are accepted.
    pub max_connections: usize,
    /// A client must finish negotiation, TLS handshake included, within
    /// this; an idle half-open connection otherwise holds a task forever.
    pub handshake_timeout: Duration,
    /// How long a quiet session polls for its next request (`nbd/poll.rs`);
    /// zero: never.
    pub poll: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            poll: super::poll::POLL_MAX,
        }
    }
}

pub struct NbdServer {
    tcp: TcpListener,
    unix: UnixListener,
    exports: Arc<dyn ExportLookup>,
    /// Required on TCP, offered on the Unix socket.
    tls: Option<TlsAcceptor>,
    limits: Limits,
    /// Where connections are served; without them, on the caller's runtime.
    threads: Option<IoThreads>,
}

/// Why the server could not start listening.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("set NBD listener non-blocking")]
    NonBlocking(#[source] std::io::Error),
    #[error("register NBD listener")]
    Register(#[source] std::io::Error),
    #[error(transparent)]
    Socket(#[from] crate::socket_path::SocketError),
    #[error("bind NBD socket {}", .path.display())]
    Bind {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
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
    ) -> Result<Self, BindError> {
        tcp.set_nonblocking(true).map_err(BindError::NonBlocking)?;
        let tcp = TcpListener::from_std(tcp).map_err(BindError::Register)?;
        crate::socket_path::remove_stale_socket(socket).await?;
        let unix = UnixListener::bind(socket).map_err(|source| BindError::Bind {
            path: socket.to_owned(),
            source,
        })?;
        Ok(NbdServer {
            tcp,
            unix,
            exports,
            tls,
            limits: Limits::default(),
            threads: None,
        })
    }

    /// Serves every connection on one of `threads` (see `io_threads`).
    pub fn with_threads(mut self, threads: IoThreads) -> Self {
        self.threads = Some(threads);
        self
    }

    /// Replaces the default [`Limits`].
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accepts until `shutdown` fires. Connections in handshake are dropped
    /// then; sessions end through their export's token (see Engine::shutdown).
    pub async fn run(self, shutdown: CancellationToken, socket_path: PathBuf) {
        let conns = TaskTracker::new();
        info!(tcp = %self.tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(),
              unix = %socket_path.display(), tls = self.tls.is_some(),
              max_connections = self.limits.max_connections,
              handshake_timeout = ?self.limits.handshake_timeout, "NBD server listening");
        let (tcp_tls, unix_tls) = match self.tls {
            Some(_) => (Tls::Required, Tls::Offered),
            None => (Tls::Off, Tls::Off),
        };
        // More permits than a semaphore holds would panic; no host gets near.
        let cap = self.limits.max_connections.min(Semaphore::MAX_PERMITS);
        let open = Arc::new(Semaphore::new(cap));
        let log = Arc::new(RefusalLog::default());
        let mut tick = tokio::time::interval(RefusalLog::INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ctx = |peer: String, mode: Tls, slot: OwnedSemaphorePermit| Ctx {
            peer,
            exports: Arc::clone(&self.exports),
            tls: self.tls.clone(),
            mode,
            handshake_timeout: self.limits.handshake_timeout,
            poll: self.limits.poll,
            log: Arc::clone(&log),
            _slot: slot,
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => log.flush(Instant::now()),
                r = self.tcp.accept() => match r {
                    Ok((stream, peer)) => {
                        // Dropping the stream closes it before anything is
                        // read or written.
                        let Some(slot) = admit(&open, &log, &peer.to_string(), self.limits) else { continue };
                        let _ = stream.set_nodelay(true);
                        let ctx = ctx(peer.to_string(), tcp_tls, slot);
                        self.start(&conns, stream, ctx, &shutdown);
                    }
                    Err(e) => accept_failed(e).await,
                },
                r = self.unix.accept() => match r {
                    Ok((stream, _)) => {
                        let Some(slot) = admit(&open, &log, "unix", self.limits) else { continue };
                        let ctx = ctx("unix".into(), unix_tls, slot);
                        self.start(&conns, stream, ctx, &shutdown);
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

impl NbdServer {
    /// Starts a connection's task: on an NBD thread, its socket moved to
    /// that thread's reactor, or here when there are none.
    fn start<S: Movable>(
        &self,
        conns: &TaskTracker,
        stream: S,
        ctx: Ctx,
        shutdown: &CancellationToken,
    ) {
        let shutdown = shutdown.clone();
        let Some(threads) = &self.threads else {
            conns.spawn(handle(stream, ctx, shutdown));
            return;
        };
        let moved = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                return warn!(peer = %ctx.peer, error = %e, "NBD connection cannot be handed over");
            }
        };
        let token = conns.token();
        let job: super::io_threads::Job = Box::new(move || {
            Box::pin(async move {
                let _token = token;
                match S::from_std(moved) {
                    Ok(stream) => handle(stream, ctx, shutdown).await,
                    Err(e) => {
                        warn!(peer = %ctx.peer, error = %e, "NBD connection cannot be registered")
                    }
                }
            })
        });
        if threads.spawn(job).is_err() {
            warn!("NBD threads are gone; connection dropped");
        }
    }
}

/// A tokio stream that can leave its reactor for another thread's.
trait Movable: Connection + Sized {
    type Std: Send + 'static;
    fn into_std(self) -> std::io::Result<Self::Std>;
    fn from_std(s: Self::Std) -> std::io::Result<Self>;
}

impl Movable for tokio::net::TcpStream {
    type Std = std::net::TcpStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        tokio::net::TcpStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> std::io::Result<Self> {
        tokio::net::TcpStream::from_std(s)
    }
}

impl Movable for tokio::net::UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        tokio::net::UnixStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> std::io::Result<Self> {
        tokio::net::UnixStream::from_std(s)
    }
}

/// A slot for a new connection, or `None` (logged) when every slot is taken.
fn admit(
    open: &Arc<Semaphore>,
    log: &RefusalLog,
    peer: &str,
    limits: Limits,
) -> Option<OwnedSemaphorePermit> {
    match Arc::clone(open).try_acquire_owned() {
        Ok(slot) => Some(slot),
        Err(_) => {
            log.refused(
                Reason::ConnectionLimit,
                peer,
                &format!("max_connections={}", limits.max_connections),
            );
            None
        }
    }
}

/// EMFILE and friends are transient; back off instead of spinning.
async fn accept_failed(e: std::io::Error) {
    warn!(error = %e, "NBD accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// A connection that splits into independent owned halves: the session
/// keeps the read of the next request pending while it writes replies, and
/// owned halves never lock each other as `tokio::io::split`'s would.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn halves(self) -> (Self::Read, Self::Write);
    /// The socket, for a session to poll before it sleeps; `None` for
    /// streams whose bytes are not the socket's (TLS).
    fn socket_fd(&self) -> Option<RawFd> {
        None
    }
}

impl Connection for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn socket_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

impl Connection for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn socket_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
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
    handshake_timeout: Duration,
    poll: Duration,
    log: Arc<RefusalLog>,
    /// This connection's place under `max_connections`, given back when the
    /// task ends, whatever phase it ended in.
    _slot: OwnedSemaphorePermit,
}

/// How negotiation (or the part of it after STARTTLS) ended.
enum Step<T> {
    Done(T),
    /// The server refused the client, which then left.
    Refused(Reason, String),
    /// Ended otherwise: the client left, broke the protocol or was cut off
    /// by shutdown. Logged at debug where it happens.
    Ended,
}

async fn handle<S: Connection>(mut stream: S, ctx: Ctx, shutdown: CancellationToken) {
    let deadline = Instant::now() + ctx.handshake_timeout;
    let first = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, negotiate(&mut stream, &*ctx.exports, ctx.mode)) => r,
    };
    let client = match negotiated(first, &ctx) {
        Step::Done(Negotiated::Export {
            export,
            size,
            options,
            contexts,
        }) => return serve(stream, &ctx, false, export, size, options, contexts).await,
        Step::Done(Negotiated::StartTls(client)) => client,
        Step::Done(Negotiated::Refused(r)) => return ctx.refused_in_handshake(&r),
        Step::Done(Negotiated::Closed) | Step::Ended => return,
        Step::Refused(reason, detail) => return ctx.log.refused(reason, &ctx.peer, &detail),
    };
    let Some(acceptor) = ctx.tls.clone() else {
        // negotiate acknowledges STARTTLS only in a TLS mode.
        return warn!(peer = %ctx.peer, "STARTTLS acknowledged without TLS configured");
    };
    let accepted = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => r,
    };
    let mut tls = match accepted {
        Ok(Ok(tls)) => tls,
        // A bad or missing client certificate ends here too.
        Ok(Err(e)) => {
            return ctx
                .log
                .refused(Reason::TlsHandshake, &ctx.peer, &e.to_string());
        }
        Err(_) => return ctx.timed_out(),
    };
    let second = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, options(&mut tls, &*ctx.exports, client, Tls::Active)) => r,
    };
    match negotiated(second, &ctx) {
        Step::Done(Negotiated::Export {
            export,
            size,
            options,
            contexts,
        }) => serve(tls, &ctx, true, export, size, options, contexts).await,
        Step::Done(Negotiated::Refused(r)) => ctx.refused_in_handshake(&r),
        Step::Refused(reason, detail) => ctx.log.refused(reason, &ctx.peer, &detail),
        Step::Done(Negotiated::StartTls(_) | Negotiated::Closed) | Step::Ended => {}
    }
}

impl Ctx {
    fn timed_out(&self) {
        let detail = format!("no export chosen within {:?}", self.handshake_timeout);
        self.log
            .refused(Reason::HandshakeTimeout, &self.peer, &detail);
    }

    fn refused_in_handshake(&self, r: &Refused) {
        let (reason, detail) = refusal(r);
        self.log.refused(reason, &self.peer, &detail);
    }
}

/// Sorts out how a handshake (or TLS upgrade) ended; timeouts are logged
/// here, refusals by the caller.
fn negotiated(
    r: Result<Result<Negotiated, HandshakeError>, tokio::time::error::Elapsed>,
    ctx: &Ctx,
) -> Step<Negotiated> {
    match r {
        Ok(Ok(n)) => Step::Done(n),
        Ok(Err(e)) => match e.refused() {
            Some(r) => {
                let (reason, detail) = refusal(&r);
                Step::Refused(reason, detail)
            }
            None => {
                debug!(peer = %ctx.peer, error = %volumed_api::error_chain(&e), "NBD handshake ended");
                Step::Ended
            }
        },
        Err(_) => {
            ctx.timed_out();
            Step::Ended
        }
    }
}

fn refusal(r: &Refused) -> (Reason, String) {
    match r {
        Refused::TlsRequired => (
            Reason::TlsRequired,
            "the client did not start TLS".to_owned(),
        ),
        Refused::UnknownExport(name) => {
            // The name is the client's: bounded, cut on a character boundary.
            let mut end = name.len().min(MAX_LOGGED_NAME);
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            (Reason::UnknownExport, format!("export={:?}", &name[..end]))
        }
    }
}

/// Bytes of a client's export name that go into a log line.
const MAX_LOGGED_NAME: usize = 128;

async fn serve<C: Connection>(
    stream: C,
    ctx: &Ctx,
    tls: bool,
    export: Export,
    size: u64,
    options: SessionOptions,
    contexts: Vec<(u32, MetaContext)>,
) {
    let (peer, poll) = (&ctx.peer, ctx.poll);
    let name = export.backend.name().to_owned();
    let _counted = crate::metrics::ConnectionGauge::new();
    info!(%peer, export = %name, size, structured = options.structured, read_only = options.read_only,
          tls, "NBD client connected");
    let fd = stream.socket_fd();
    let (r, w) = stream.halves();
    // The read half owns the socket, so `fd` stays open as long as it does.
    let quiet = Quiet::default();
    let r = Polled::new(r, fd, quiet.clone(), poll);
    let r = tokio::io::BufReader::with_capacity(READ_BUFFER, r);
    // Tracked by the export so detach and shutdown wait for this session.
    let session = session::serve(
        r,
        w,
        export.backend.clone(),
        size,
        options,
        contexts,
        session::Control {
            cancel: export.cancel.clone(),
            quiet,
        },
    );
    match export.sessions.track_future(session).await {
        Ok(()) => info!(%peer, export = %name, "NBD client disconnected"),
        Err(e) => {
            warn!(%peer, export = %name, error = %volumed_api::error_chain(&e), "NBD session closed on error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_export_names_are_cut_on_a_character_boundary() {
        let name = "é".repeat(200);
        let (reason, detail) = refusal(&Refused::UnknownExport(name));
        assert_eq!(reason, Reason::UnknownExport);
        assert!(detail.len() <= MAX_LOGGED_NAME + 16, "{detail}");
    }
}
