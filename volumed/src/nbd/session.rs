//! The transmission phase of one connection. It only moves bytes: the
//! rules are in `proto` (`validate` for requests, `Reply::encode` for the
//! wire bytes of replies) and the data path is the export's `Backend` (a
//! volume, or a read-only snapshot).
//!
//! The reader (this task) parses requests and starts one task per request;
//! each task sends its reply through a channel to the writer task, so
//! replies go out as requests complete, in any order. The in-flight window
//! is bounded twice: by a count of requests and by a budget of payload
//! bytes. When either is exhausted the reader stops reading, which is
//! backpressure on the client, never an error.
//!
//! Every reply holds its request's share of the window until the writer has
//! written it, refusals and block status included: a client that pipelines
//! requests and never reads its replies stops being read once the window is
//! full, instead of growing the daemon's memory. The reply channel holds at
//! most one entry per slot of the window.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::handshake::MetaContext;
use super::proto::{
    BlockExtent, CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, Command, EINVAL,
    EPERM, MAX_PAYLOAD, Piece, ProtoError, REQUEST_HEADER_LEN, Reply, ReplyBody, Request,
    STATE_DIRTY, STATE_HOLE, STATE_ZERO, SessionOptions, errno_of, validate,
};
use crate::engine::{Backend, Extent, ReadPiece};
use crate::metrics;

/// Requests in flight per connection (fio and qemu use up to 128).
pub const MAX_IN_FLIGHT: usize = 128;

/// Payload bytes in flight per connection, counted in KiB permits.
const PAYLOAD_BUDGET_KIB: u32 = 256 << 10;

/// Encoded replies the writer gathers before a flush. Beyond the window,
/// this is all the memory replies a client does not read can hold.
pub(crate) const WRITE_BUFFER: usize = 256 << 10;

/// Bytes of a block-status extent on the wire (length and flags).
const EXTENT_LEN: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// What a request's task hands to the writer.
struct Outgoing {
    reply: Reply,
    /// Released once the reply is written, so read buffers and queued
    /// replies count against the window until they are sent.
    _permit: InFlight,
}

struct InFlight {
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

struct Window {
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl Window {
    fn new() -> Self {
        Window {
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            bytes: Arc::new(Semaphore::new(PAYLOAD_BUDGET_KIB as usize)),
        }
    }

    async fn acquire(&self, payload: u32) -> InFlight {
        let kib = payload.div_ceil(1024).clamp(1, PAYLOAD_BUDGET_KIB);
        let slot = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .expect("the window is never closed");
        let bytes = Arc::clone(&self.bytes)
            .acquire_many_owned(kib)
            .await
            .expect("the window is never closed");
        InFlight {
            _slot: slot,
            _bytes: bytes,
        }
    }

    /// Waits until every request in flight has had its reply written (or
    /// dropped because the writer is gone).
    async fn drain(&self) {
        let _ = self.slots.acquire_many(MAX_IN_FLIGHT as u32).await;
    }
}

/// Serves requests until the client disconnects, breaks the protocol, or
/// `cancel` fires (detach, shutdown). In every case the requests already in
/// flight complete and their replies are sent before the connection closes.
pub async fn serve<R, W>(
    mut reader: R,
    writer: W,
    backend: Backend,
    size: u64,
    options: SessionOptions,
    contexts: Vec<(u32, MetaContext)>,
    cancel: CancellationToken,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Every entry holds a slot of the window, so a send never waits on
    // capacity; the bound is there so the channel cannot outgrow it.
    let (tx, rx) = mpsc::channel::<Outgoing>(MAX_IN_FLIGHT);
    let writer_task = tokio::spawn(write_replies(writer, rx, options.structured));
    let window = Window::new();
    let ctx = Ctx {
        tx,
        backend,
        size,
        options,
        contexts: contexts.into(),
    };
    let result = read_requests(&mut reader, &ctx, &window, &cancel).await;
    window.drain().await;
    drop(ctx);
    match writer_task.await {
        Ok(Err(e)) => debug!(error = %e, "reply writer stopped"),
        Err(e) => warn!(error = %e, "reply writer task failed"),
        Ok(Ok(())) => {}
    }
    result
}

struct Ctx {
    tx: mpsc::Sender<Outgoing>,
    backend: Backend,
    size: u64,
    options: SessionOptions,
    /// The metadata contexts BLOCK_STATUS answers, by id.
    contexts: Arc<[(u32, MetaContext)]>,
}

impl Ctx {
    /// Queues a reply the reader made itself; it keeps `permit` until
    /// written, like any other. A closed channel means the writer has
    /// stopped (the client is gone): the reply is dropped with its permit.
    async fn reply_now(&self, cookie: u64, body: ReplyBody, permit: InFlight) {
        let _ = self
            .tx
            .send(Outgoing {
                reply: Reply { cookie, body },
                _permit: permit,
            })
            .await;
    }

    /// Runs `work` on its own task and sends what it returns.
    fn spawn<F>(&self, req: Request, permit: InFlight, timing: Timing, work: F)
    where
        F: std::future::Future<Output = ReplyBody> + Send + 'static,
    {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let body = work.await;
            metrics::finish(timing.0, timing.1);
            let _ = tx
                .send(Outgoing {
                    reply: Reply {
                        cookie: req.cookie,
                        body,
                    },
                    _permit: permit,
                })
                .await;
        });
    }
}

async fn read_requests<R: AsyncRead + Unpin>(
    reader: &mut R,
    ctx: &Ctx,
    window: &Window,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let mut hdr = [0u8; REQUEST_HEADER_LEN];
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            r = reader.read_exact(&mut hdr) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            },
        }
        let req = Request::parse(&hdr)?;
        if req.command == Command::Disc {
            return Ok(());
        }
        // A full window waits for the client to read replies; a detach must
        // not wait for that.
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            p = window.acquire(reply_budget(&req, ctx)) => p,
        };

        let mut data = Vec::new();
        if req.command == Command::Write {
            if req.length > MAX_PAYLOAD {
                // Consume the payload so the stream stays aligned on the
                // next header, without buffering it.
                let mut sink = (&mut *reader).take(u64::from(req.length));
                let n = tokio::io::copy(&mut sink, &mut tokio::io::sink()).await?;
                if n < u64::from(req.length) {
                    return Ok(());
                }
                ctx.reply_now(
                    req.cookie,
                    error(EINVAL, "write larger than the maximum payload"),
                    permit,
                )
                .await;
                continue;
            }
            data = read_payload(reader, req.length as usize).await?;
        }
        if let Err(refusal) = validate(&req, ctx.size, ctx.options) {
            let (errno, msg) = (refusal.errno, refusal.message);
            debug!(
                export = ctx.backend.name(),
                ?req,
                errno,
                msg,
                "request refused"
            );
            ctx.reply_now(req.cookie, error(errno, msg), permit).await;
            continue;
        }
        dispatch(ctx, req, data, permit).await;
    }
}

/// The bytes of the window a request takes: its payload, or for block
/// status the largest reply it can get (per context, one extent per chunk
/// it spans, plus one for a range that starts inside a chunk). Other
/// replies are small and take the minimum.
fn reply_budget(req: &Request, ctx: &Ctx) -> u32 {
    let contexts = ctx.contexts.len().max(1) as u64;
    match req.command {
        Command::Read | Command::Write => req.length.min(MAX_PAYLOAD),
        Command::BlockStatus if req.flags & CMD_FLAG_REQ_ONE != 0 => {
            u32::try_from(EXTENT_LEN * contexts).unwrap_or(u32::MAX)
        }
        Command::BlockStatus => {
            let chunk = ctx.backend.chunk_size().max(1);
            let extents = u64::from(req.length).div_ceil(chunk).saturating_add(1);
            let bytes = extents.saturating_mul(EXTENT_LEN).saturating_mul(contexts);
            u32::try_from(bytes).unwrap_or(u32::MAX)
        }
        _ => 0,
    }
}

/// A request's command and, while metrics are on, when it was read.
type Timing = (metrics::Op, Option<std::time::Instant>);

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

/// Starts a validated request.
async fn dispatch(ctx: &Ctx, req: Request, data: Vec<u8>, permit: InFlight) {
    let backend = ctx.backend.clone();
    let (off, len) = (req.offset, u64::from(req.length));
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let Some(op) = metric_op(req.command) else {
        ctx.reply_now(req.cookie, error(EINVAL, "unknown command"), permit)
            .await;
        return;
    };
    use metrics::Op;
    let timing: Timing = (op, metrics::start());
    if let Some(vol) = backend.volume() {
        let moved = match op {
            Op::Read | Op::Write | Op::Trim | Op::WriteZeroes => len,
            _ => 0,
        };
        vol.stats.record(op, moved);
    }
    match op {
        Op::Read => {
            let df = req.flags & CMD_FLAG_DF != 0;
            ctx.spawn(req, permit, timing, async move {
                match backend.read(off, len).await {
                    Ok(read) => ReplyBody::Read {
                        offset: off,
                        pieces: pieces(read),
                        df,
                    },
                    Err(e) => io_failure(&backend, "read", &req, &e),
                }
            });
        }
        Op::Write | Op::WriteZeroes | Op::Trim => {
            // Validation refuses these on a read-only export; this is the
            // second lock on the same door.
            let Some(vol) = backend.volume().cloned() else {
                ctx.reply_now(req.cookie, error(EPERM, "the export is read-only"), permit)
                    .await;
                return;
            };
            if req.command == Command::Write {
                ctx.spawn(req, permit, timing, async move {
                    match vol.write(off, data, fua).await {
                        Ok(()) => ReplyBody::Done,
                        Err(e) => io_failure(&backend, "write", &req, &e),
                    }
                });
                return;
            }
            let no_hole = req.command == Command::WriteZeroes && req.flags & CMD_FLAG_NO_HOLE != 0;
            ctx.spawn(req, permit, timing, async move {
                match vol.write_zeroes(off, len, no_hole, fua).await {
                    Ok(()) => ReplyBody::Done,
                    Err(e) => io_failure(&backend, "zero", &req, &e),
                }
            });
        }
        Op::Flush => ctx.spawn(req, permit, timing, async move {
            match backend.flush().await {
                Ok(()) => ReplyBody::Done,
                Err(e) => io_failure(&backend, "flush", &req, &e),
            }
        }),
        Op::Cache => ctx.spawn(req, permit, timing, async move {
            match backend.cache(off, len).await {
                Ok(()) => ReplyBody::Done,
                Err(e) => io_failure(&backend, "cache", &req, &e),
            }
        }),
        Op::BlockStatus => {
            let one = req.flags & CMD_FLAG_REQ_ONE != 0;
            let body = block_status(&backend, &ctx.contexts, off, len, one)
                .await
                .unwrap_or_else(|e| io_failure(&backend, "block status", &req, &e));
            metrics::finish(timing.0, timing.1);
            ctx.reply_now(req.cookie, body, permit).await;
        }
    }
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

async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::Receiver<Outgoing>,
    structured: bool,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, writer);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Batch whatever else is ready into one flush.
        while let Some(out) = next {
            send(&mut w, &out.reply, structured).await?;
            drop(out);
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    w.shutdown().await
}

/// Writes one reply. Slices at least as large as the buffer go straight to
/// the socket, so a read's data is never copied on the way out.
async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    reply: &Reply,
    structured: bool,
) -> std::io::Result<()> {
    let encoded = reply.encode(structured).map_err(|e| {
        // Validation keeps every reply encodable: this is a bug, and the
        // stream cannot go on without the reply.
        tracing::error!(cookie = reply.cookie, error = %e, "NBD reply cannot be encoded");
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    })?;
    for s in encoded.slices() {
        w.write_all(s).await?;
    }
    Ok(())
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
