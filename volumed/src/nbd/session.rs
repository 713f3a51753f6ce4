//! The transmission phase of one connection. It only moves bytes: the
//! rules are in `nbd_proto` (`validate` for requests, `Reply::encode` for the
//! wire bytes of replies) and the data path is the export's `Backend` (a
//! volume, or a read-only snapshot).
//!
//! One task serves the connection, and everything it does is a future it
//! polls: the read of the next request, every request in flight (a
//! `FuturesUnordered`), and the write of queued replies. Replies go out as
//! requests complete, in any order, and whatever is ready leaves in one
//! `writev`. An earlier design gave every request its own task and the
//! replies a writer task behind a channel: a 4 KiB request then woke three
//! tasks, often on both workers and contending for the socket's lock. Here
//! a read the page cache answers completes in its first poll (the ring
//! runs it inline at submit) and its reply is written in the same pass.
//!
//! The in-flight window (`window.rs`) is bounded twice: by a count of
//! requests and by a budget of payload bytes. When either is exhausted the
//! read of the next request waits, which is backpressure on the client,
//! never an error. Every reply holds its request's share of the window
//! until it is written to the socket (`output.rs`), refusals and block
//! status included: a client that pipelines requests and never reads its
//! replies stops being read once the window is full, instead of growing
//! the daemon's memory.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use nbd_proto::{
    BlockExtent, CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, Command, EINVAL,
    EPERM, MAX_PAYLOAD, Piece, ProtoError, REQUEST_HEADER_LEN, Reply, ReplyBody, Request,
    STATE_DIRTY, STATE_HOLE, STATE_ZERO, SessionOptions, validate,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::errno_of;
use super::handshake::MetaContext;
use super::output::Output;
use super::poll::Quiet;
use super::window::{Budget, InFlight, Window};
use crate::disk::SyncOn;
use crate::disk::engine::INLINE_WRITE_MAX;
use crate::engine::{Backend, Extent, ReadPiece};
use crate::metrics;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("i/o")]
    Io(#[from] std::io::Error),
}

/// What the reader hands over.
enum Incoming {
    Request {
        req: Request,
        data: Vec<u8>,
        permit: InFlight,
    },
    /// A write over the maximum payload: its bytes were skipped.
    Oversized { cookie: u64, permit: InFlight },
    /// The client sent NBD_CMD_DISC or closed its side.
    End,
}

/// A request done: its reply, and the window share it keeps until written.
struct Finished {
    reply: Reply,
    permit: InFlight,
    timing: Timing,
}

type Work = Pin<Box<dyn Future<Output = Finished> + Send>>;

/// How a session's surroundings steer it.
pub struct Control {
    /// Fired on detach and shutdown: the session stops reading requests.
    pub cancel: CancellationToken,
    /// The session's side of its read half's polling (`nbd/poll.rs`).
    pub quiet: Quiet,
}

/// A session's read half: bytes, and whether anyone else would wait on
/// the thread if it blocked.
pub trait Reader: AsyncRead + Unpin + Send {
    /// Whether blocking the thread now would hold anyone up: bytes this
    /// client sent that are not read yet, another connection on the thread.
    /// When it cannot tell: yes.
    fn others_wait(&self) -> bool {
        true
    }
}

impl<R: AsyncRead + Unpin + Send> Reader for tokio::io::BufReader<super::poll::Polled<R>> {
    fn others_wait(&self) -> bool {
        !self.buffer().is_empty() || self.get_ref().others_wait()
    }
}

/// Serves requests until the client disconnects, breaks the protocol, or
/// `control.cancel` fires (detach, shutdown). In every case the requests
/// already in flight complete and their replies are sent before the
/// connection closes.
pub async fn serve<R, W>(
    reader: R,
    mut writer: W,
    backend: Backend,
    size: u64,
    options: SessionOptions,
    contexts: Vec<(u32, MetaContext)>,
    control: Control,
) -> Result<(), SessionError>
where
    R: Reader,
    W: AsyncWrite + Unpin,
{
    let ctx = Ctx {
        backend,
        size,
        options,
        contexts: contexts.into(),
    };
    let window = Window::new();
    let budget = Budget::new(ctx.contexts.len(), ctx.backend.chunk_size());
    // The read of the next request lives across the loop's passes, so a
    // request is never dropped half read; it is replaced in place when done.
    let mut reading = Some(Box::pin(read_next(reader, window.clone(), budget)));
    let mut inflight: FuturesUnordered<Work> = FuturesUnordered::new();
    let mut out = Output::new(options.structured);
    let mut writable = true;
    let mut result = Ok(());
    let Control { cancel, quiet } = control;
    // Whether the last request read completes on this thread
    // (`done_here`; see `quiet` below).
    let mut last_inline = false;
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        // Nothing in flight and nothing left to write.
        let drained = inflight.is_empty() && (out.is_idle() || !writable);
        if reading.is_none() && drained {
            break;
        }
        // Nothing to do but wait for the next request: the read may poll.
        // Not after a request whose I/O goes to another thread (a large
        // write, a flush on the ring: io-wq), which needs the CPU the poll
        // would hold (4k writes at QD1 went from 11.1-12.1k to 9.7-10.5k
        // IOPS when polling followed them while they still went to io-wq).
        quiet.set(last_inline && drained);
        // Completions, then requests the client has already sent, and only
        // then the socket write: whatever is ready leaves in one `writev`
        // (a write per reply woke the client per reply). Reading stops when
        // the input runs dry or the window is full, so replies never wait
        // long.
        tokio::select! {
            biased;
            _ = &mut cancelled, if reading.is_some() => reading = None,
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                metrics::finish(done.timing.0, done.timing.1);
                if writable {
                    out.push(done.reply, done.permit);
                }
            }
            (r, next) = next_of(&mut reading) => {
                let again = match next {
                    Ok(Incoming::End) => false,
                    Err(e) => {
                        result = Err(e);
                        false
                    }
                    Ok(Incoming::Oversized { cookie, permit }) => {
                        let body = error(EINVAL, "write larger than the maximum payload");
                        out.push(Reply { cookie, body }, permit);
                        true
                    }
                    Ok(Incoming::Request { req, data, permit }) => {
                        let alone = inflight.is_empty() && out.is_idle() && !r.others_wait();
                        let sync_on = sync_place(&req, alone);
                        last_inline = done_here(&req, sync_on);
                        match start(&ctx, req, data, permit, sync_on) {
                            Started::Now(reply, permit) => out.push(reply, permit),
                            Started::Later(work) => inflight.push(work),
                        }
                        true
                    }
                };
                match reading.as_mut() {
                    Some(f) if again && writable => f.set(read_next(r, window.clone(), budget)),
                    _ => reading = None,
                }
            }
            r = out.drive(&mut writer), if writable && !out.is_idle() => {
                if let Err(e) = r {
                    // The client is gone. What is in flight still runs to
                    // its end (its I/O is the volume's), unanswered.
                    debug!(error = %e, "reply writer stopped");
                    writable = false;
                    out.clear();
                    reading = None;
                }
            }
        }
    }
    if writable {
        let _ = writer.shutdown().await;
    }
    result
}

/// Where a request's sync waits: a FLUSH (or a FUA's sync) the client
/// waits for, with nothing else for this thread to do (`alone`), waits on
/// the thread; any other on the ring.
fn sync_place(req: &Request, alone: bool) -> SyncOn {
    let syncs = req.command == Command::Flush
        || (req.flags & CMD_FLAG_FUA != 0
            && matches!(req.command, Command::Write | Command::WriteZeroes));
    if syncs && alone {
        SyncOn::Caller
    } else {
        SyncOn::Ring
    }
}

/// Whether a request completes on this thread, all its I/O inline: a READ,
/// a small WRITE (its FUA's sync, if any, here too), a FLUSH synced here.
fn done_here(req: &Request, sync_on: SyncOn) -> bool {
    let here = sync_on == SyncOn::Caller;
    match req.command {
        Command::Read => true,
        Command::Write => {
            (req.flags & CMD_FLAG_FUA == 0 || here) && req.length as usize <= INLINE_WRITE_MAX
        }
        Command::Flush => here,
        _ => false,
    }
}

/// The output of the future in `reading`; never ready when there is none.
async fn next_of<F: Future + Unpin>(reading: &mut Option<F>) -> F::Output {
    match reading.as_mut() {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Reads one request (and a write's payload), taking its share of the
/// window between the header and the payload. Owns the reader, so the
/// session can keep the future across its passes, and gives it back.
async fn read_next<R: AsyncRead + Unpin>(
    mut r: R,
    window: Window,
    budget: Budget,
) -> (R, Result<Incoming, SessionError>) {
    let next = read_one(&mut r, &window, budget).await;
    (r, next)
}

async fn read_one<R: AsyncRead + Unpin>(
    r: &mut R,
    window: &Window,
    budget: Budget,
) -> Result<Incoming, SessionError> {
    let mut hdr = [0u8; REQUEST_HEADER_LEN];
    match r.read_exact(&mut hdr).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Incoming::End),
        Err(e) => return Err(e.into()),
    }
    let req = Request::parse(&hdr)?;
    if req.command == Command::Disc {
        return Ok(Incoming::End);
    }
    let permit = window.acquire(budget.of_request(&req)).await;
    let mut data = Vec::new();
    if req.command == Command::Write {
        if req.length > MAX_PAYLOAD {
            // Consume the payload so the stream stays aligned on the next
            // header, without buffering it.
            let mut sink = (&mut *r).take(u64::from(req.length));
            let n = tokio::io::copy(&mut sink, &mut tokio::io::sink()).await?;
            if n < u64::from(req.length) {
                return Ok(Incoming::End);
            }
            return Ok(Incoming::Oversized {
                cookie: req.cookie,
                permit,
            });
        }
        data = read_payload(r, req.length as usize).await?;
    }
    Ok(Incoming::Request { req, data, permit })
}

struct Ctx {
    backend: Backend,
    size: u64,
    options: SessionOptions,
    /// The metadata contexts BLOCK_STATUS answers, by id.
    contexts: Arc<[(u32, MetaContext)]>,
}

/// How a validated request goes on.
enum Started {
    /// Answered at once (refused, or nothing to wait for).
    Now(Reply, InFlight),
    /// Its I/O, polled by the session until it answers.
    Later(Work),
}

/// A request's command and, while metrics are on, when it was read.
type Timing = (metrics::Op, Option<std::time::Instant>);

fn later<F>(cookie: u64, permit: InFlight, timing: Timing, work: F) -> Started
where
    F: Future<Output = ReplyBody> + Send + 'static,
{
    Started::Later(Box::pin(async move {
        let body = work.await;
        Finished {
            reply: Reply { cookie, body },
            permit,
            timing,
        }
    }))
}

/// Checks a request and starts it; a FLUSH or a FUA's sync waits where
/// `sync_on` says.
fn start(ctx: &Ctx, req: Request, data: Vec<u8>, permit: InFlight, sync_on: SyncOn) -> Started {
    let now = |body, permit| {
        Started::Now(
            Reply {
                cookie: req.cookie,
                body,
            },
            permit,
        )
    };
    if let Err(refusal) = validate(&req, ctx.size, ctx.options) {
        let (errno, msg) = (refusal.errno, refusal.message);
        debug!(
            export = ctx.backend.name(),
            ?req,
            errno,
            msg,
            "request refused"
        );
        return now(error(errno, msg), permit);
    }
    let Some(op) = metric_op(req.command) else {
        return now(error(EINVAL, "unknown command"), permit);
    };
    use metrics::Op;
    let timing: Timing = (op, metrics::start());
    let backend = ctx.backend.clone();
    if let Some(vol) = backend.volume() {
        let moved = match op {
            Op::Read | Op::Write | Op::Trim | Op::WriteZeroes => u64::from(req.length),
            _ => 0,
        };
        vol.stats.record(op, moved);
    }
    let (off, len) = (req.offset, u64::from(req.length));
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match op {
        Op::Read => {
            let df = req.flags & CMD_FLAG_DF != 0;
            later(req.cookie, permit, timing, async move {
                match backend.read(off, len).await {
                    Ok(read) => ReplyBody::Read {
                        offset: off,
                        pieces: pieces(read),
                        df,
                    },
                    Err(e) => io_failure(&backend, "read", &req, &e),
                }
            })
        }
        Op::Write | Op::WriteZeroes | Op::Trim => {
            // Validation refuses these on a read-only export; this is the
            // second lock on the same door.
            let Some(vol) = backend.volume().cloned() else {
                return now(error(EPERM, "the export is read-only"), permit);
            };
            if req.command == Command::Write {
                return later(req.cookie, permit, timing, async move {
                    match vol.write(off, data, fua.then_some(sync_on)).await {
                        Ok(()) => ReplyBody::Done,
                        Err(e) => io_failure(&backend, "write", &req, &e),
                    }
                });
            }
            let no_hole = req.command == Command::WriteZeroes && req.flags & CMD_FLAG_NO_HOLE != 0;
            later(req.cookie, permit, timing, async move {
                match vol
                    .write_zeroes(off, len, no_hole, fua.then_some(sync_on))
                    .await
                {
                    Ok(()) => ReplyBody::Done,
                    Err(e) => io_failure(&backend, "zero", &req, &e),
                }
            })
        }
        Op::Flush => later(req.cookie, permit, timing, async move {
            match backend.flush(sync_on).await {
                Ok(()) => ReplyBody::Done,
                Err(e) => io_failure(&backend, "flush", &req, &e),
            }
        }),
        Op::Cache => later(req.cookie, permit, timing, async move {
            match backend.cache(off, len).await {
                Ok(()) => ReplyBody::Done,
                Err(e) => io_failure(&backend, "cache", &req, &e),
            }
        }),
        Op::BlockStatus => {
            let one = req.flags & CMD_FLAG_REQ_ONE != 0;
            let contexts = Arc::clone(&ctx.contexts);
            later(req.cookie, permit, timing, async move {
                block_status(&backend, &contexts, off, len, one)
                    .await
                    .unwrap_or_else(|e| io_failure(&backend, "block status", &req, &e))
            })
        }
    }
}

fn metric_op(c: Command) -> Option<metrics::Op> {
    use metrics::Op;
    Some(match c {
        Command::Read => Op::Read,
        Command::Write => Op::Write,
        Command::Trim => Op::Trim,
        Command::WriteZeroes => Op::WriteZeroes,
        Command::Flush => Op::Flush,
        Command::Cache => Op::Cache,
        Command::BlockStatus => Op::BlockStatus,
        Command::Disc | Command::Unknown(_) => return None,
    })
}

/// Exactly `len` bytes into a new buffer, which is not zeroed first: the
/// payload overwrites it, and a memset of every megabyte written was a
/// visible share of a bulk write's CPU.
pub(crate) async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        // `read_buf` fills only the spare capacity: never past `len`.
        if r.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "early eof",
            ));
        }
    }
    Ok(buf)
}

/// Each selected context's runs of `[off, off + len)`.
async fn block_status(
    backend: &Backend,
    contexts: &[(u32, MetaContext)],
    off: u64,
    len: u64,
    one: bool,
) -> std::io::Result<ReplyBody> {
    let mut out = Vec::with_capacity(contexts.len());
    for (id, context) in contexts {
        let mut extents = match context {
            MetaContext::BaseAllocation => base_allocation(backend.extents(off, len).await?),
            MetaContext::Changed(diff) => dirty_bitmap(diff.runs(off, len)),
            MetaContext::LiveChanged => match backend.volume() {
                Some(vol) => dirty_bitmap(vol.changed_runs(off, len)),
                // Selected only on a volume's export.
                None => dirty_bitmap(vec![(len, true)]),
            },
        };
        if one {
            extents.truncate(1);
        }
        out.push((*id, extents));
    }
    Ok(ReplyBody::BlockStatus { contexts: out })
}

fn error(errno: u32, message: &str) -> ReplyBody {
    ReplyBody::Error {
        errno,
        message: message.into(),
    }
}

fn io_failure(backend: &Backend, op: &str, req: &Request, e: &std::io::Error) -> ReplyBody {
    tracing::error!(export = backend.name(), op, offset = req.offset, length = req.length, error = %e, "I/O failed");
    ReplyBody::Error {
        errno: errno_of(e),
        message: format!("{op} failed: {e}"),
    }
}

/// A read's answer in the protocol's terms; the data moves, never copies.
fn pieces(read: Vec<ReadPiece>) -> Vec<Piece> {
    read.into_iter()
        .map(|p| match p {
            ReadPiece::Data(d) => Piece::Data(d),
            ReadPiece::Zero(n) => Piece::Zero(n),
        })
        .collect()
}

/// (length, changed) runs as a dirty-bitmap context reports them.
fn dirty_bitmap(runs: Vec<(u64, bool)>) -> Vec<BlockExtent> {
    runs.into_iter()
        .map(|(len, changed)| BlockExtent {
            len,
            flags: if changed { STATE_DIRTY } else { 0 },
        })
        .collect()
}

/// The chunk map's extents as base:allocation reports them.
fn base_allocation(extents: Vec<Extent>) -> Vec<BlockExtent> {
    extents
        .into_iter()
        .map(|e| BlockExtent {
            len: e.len,
            flags: if e.zero { STATE_HOLE | STATE_ZERO } else { 0 },
        })
        .collect()
}
