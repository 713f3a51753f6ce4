//! The transmission phase of one connection.
//!
//! The reader (this task) parses requests and starts one task per request;
//! each task sends its reply through a channel to the writer task, so
//! replies go out as requests complete, in any order. The in-flight window
//! is bounded twice: by a count of requests and by a budget of payload
//! bytes. When either is exhausted the reader stops reading, which is
//! backpressure on the client, never an error.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::handshake::{MAX_PAYLOAD, SessionOptions};
use super::proto::*;
use crate::engine::{Extent, ReadPiece, Volume};

/// Requests in flight per connection (fio and qemu use up to 128).
pub const MAX_IN_FLIGHT: usize = 128;

/// Payload bytes in flight per connection, counted in KiB permits.
const PAYLOAD_BUDGET_KIB: u32 = 256 << 10;

/// Zeros for simple replies to reads of holes, written in slices of this.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// What a request's task hands to the writer.
enum Body {
    /// Success with no payload.
    Done,
    /// An errno, with a message for structured replies.
    Error(u32, String),
    /// A read's data, starting at `offset`; `df` forbids fragmenting it.
    Read {
        offset: u64,
        pieces: Vec<ReadPiece>,
        df: bool,
    },
    BlockStatus(Vec<Extent>),
}

struct Reply {
    cookie: u64,
    body: Body,
    /// Released once the reply is on the wire, so read buffers count against
    /// the budget until they are sent.
    _permit: Option<InFlight>,
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
    volume: Arc<Volume>,
    size: u64,
    options: SessionOptions,
    cancel: CancellationToken,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer_task = tokio::spawn(write_replies(writer, rx, options.structured));
    let window = Window::new();
    let ctx = Ctx {
        tx,
        volume,
        size,
        options,
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
    tx: mpsc::UnboundedSender<Reply>,
    volume: Arc<Volume>,
    size: u64,
    options: SessionOptions,
}

impl Ctx {
    fn reply_now(&self, cookie: u64, body: Body) {
        let _ = self.tx.send(Reply {
            cookie,
            body,
            _permit: None,
        });
    }

    /// Runs `work` on its own task and sends what it returns.
    fn spawn<F>(&self, req: Request, permit: InFlight, work: F)
    where
        F: std::future::Future<Output = Body> + Send + 'static,
    {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let body = work.await;
            let _ = tx.send(Reply {
                cookie: req.cookie,
                body,
                _permit: Some(permit),
            });
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
        let payload = match req.command {
            Command::Read | Command::Write => req.length.min(MAX_PAYLOAD),
            _ => 0,
        };
        let permit = window.acquire(payload).await;

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
                    Body::Error(EINVAL, "write larger than the maximum payload".into()),
                );
                continue;
            }
            data = vec![0u8; req.length as usize];
            reader.read_exact(&mut data).await?;
        }
        if let Err((errno, msg)) = validate(&req, ctx.size, ctx.options) {
            debug!(volume = %ctx.volume.name, ?req, errno, msg, "request refused");
            ctx.reply_now(req.cookie, Body::Error(errno, msg.into()));
            continue;
        }
        dispatch(ctx, req, data, permit);
    }
}

/// Starts a validated request.
fn dispatch(ctx: &Ctx, req: Request, data: Vec<u8>, permit: InFlight) {
    let vol = Arc::clone(&ctx.volume);
    let (off, len) = (req.offset, u64::from(req.length));
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.command {
        Command::Read => {
            let df = req.flags & CMD_FLAG_DF != 0;
            ctx.spawn(req, permit, async move {
                match vol.read(off, len).await {
                    Ok(pieces) => Body::Read {
                        offset: off,
                        pieces,
                        df,
                    },
                    Err(e) => io_failure(&vol, "read", &req, &e),
                }
            });
        }
        Command::Write => ctx.spawn(req, permit, async move {
            match vol.write(off, data, fua).await {
                Ok(()) => Body::Done,
                Err(e) => io_failure(&vol, "write", &req, &e),
            }
        }),
        Command::WriteZeroes | Command::Trim => {
            let no_hole = req.command == Command::WriteZeroes && req.flags & CMD_FLAG_NO_HOLE != 0;
            ctx.spawn(req, permit, async move {
                match vol.write_zeroes(off, len, no_hole, fua).await {
                    Ok(()) => Body::Done,
                    Err(e) => io_failure(&vol, "zero", &req, &e),
                }
            });
        }
        Command::Flush => ctx.spawn(req, permit, async move {
            match vol.flush().await {
                Ok(()) => Body::Done,
                Err(e) => io_failure(&vol, "flush", &req, &e),
            }
        }),
        Command::Cache => ctx.spawn(req, permit, async move {
            match vol.cache(off, len).await {
                Ok(()) => Body::Done,
                Err(e) => io_failure(&vol, "cache", &req, &e),
            }
        }),
        Command::BlockStatus => {
            let mut extents = vol.extents(off, len);
            if req.flags & CMD_FLAG_REQ_ONE != 0 {
                extents.truncate(1);
            }
            ctx.reply_now(req.cookie, Body::BlockStatus(extents));
            drop(permit);
        }
        Command::Disc | Command::Unknown(_) => {
            ctx.reply_now(req.cookie, Body::Error(EINVAL, "unknown command".into()));
        }
    }
}

/// Checks a request against the protocol and the export; the error is the
/// errno and a message for the client.
fn validate(req: &Request, size: u64, opts: SessionOptions) -> Result<(), (u32, &'static str)> {
    let (allowed, max_len) = match req.command {
        Command::Read => (
            CMD_FLAG_FUA | if opts.structured { CMD_FLAG_DF } else { 0 },
            MAX_PAYLOAD,
        ),
        Command::Write => (CMD_FLAG_FUA, MAX_PAYLOAD),
        Command::WriteZeroes => (
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            u32::MAX,
        ),
        Command::Trim | Command::Cache => (CMD_FLAG_FUA, u32::MAX),
        Command::Flush => (CMD_FLAG_FUA, u32::MAX),
        Command::BlockStatus => {
            if !opts.base_allocation {
                return Err((EINVAL, "no metadata context was negotiated"));
            }
            (CMD_FLAG_FUA | CMD_FLAG_REQ_ONE, u32::MAX)
        }
        Command::Disc | Command::Unknown(_) => return Err((EINVAL, "unknown command")),
    };
    if req.flags & !allowed != 0 {
        return Err((EINVAL, "command flags not valid for this command"));
    }
    if req.command == Command::Flush {
        return Ok(());
    }
    if req.length == 0 {
        return Err((EINVAL, "zero-length request"));
    }
    if req.length > max_len {
        return Err((
            if opts.structured { EOVERFLOW } else { EINVAL },
            "request larger than the maximum payload",
        ));
    }
    match check_range(req.offset, req.length, size) {
        Ok(()) => Ok(()),
        // The spec: ENOSPC for a write past the end, EINVAL for the rest.
        Err(RangeError::PastEnd)
            if matches!(req.command, Command::Write | Command::WriteZeroes) =>
        {
            Err((ENOSPC, "write past the end of the export"))
        }
        Err(RangeError::PastEnd) => Err((EINVAL, "request past the end of the export")),
        Err(RangeError::Overflow) => Err((EINVAL, "offset + length overflows")),
    }
}

fn io_failure(volume: &Volume, op: &str, req: &Request, e: &std::io::Error) -> Body {
    tracing::error!(volume = %volume.name, op, offset = req.offset, length = req.length, error = %e, "I/O failed");
    Body::Error(errno_of(e), format!("{op} failed: {e}"))
}

async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    structured: bool,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, writer);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Batch whatever else is ready into one flush.
        while let Some(r) = next {
            if structured {
                write_structured(&mut w, r.cookie, &r.body).await?;
            } else {
                write_simple(&mut w, r.cookie, &r.body).await?;
            }
            drop(r);
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    w.shutdown().await
}

async fn write_zeros<W: AsyncWrite + Unpin>(w: &mut W, mut n: u64) -> std::io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// A read's bytes, holes written out as zeros.
async fn write_pieces<W: AsyncWrite + Unpin>(
    w: &mut W,
    pieces: &[ReadPiece],
) -> std::io::Result<()> {
    for p in pieces {
        match p {
            ReadPiece::Data(d) => w.write_all(d).await?,
            ReadPiece::Zero(n) => write_zeros(w, *n).await?,
        }
    }
    Ok(())
}

async fn write_simple<W: AsyncWrite + Unpin>(
    w: &mut W,
    cookie: u64,
    body: &Body,
) -> std::io::Result<()> {
    match body {
        Body::Done => w.write_all(&encode_simple_reply(cookie, 0)).await,
        Body::Error(errno, _) => w.write_all(&encode_simple_reply(cookie, *errno)).await,
        Body::Read { pieces, .. } => {
            w.write_all(&encode_simple_reply(cookie, 0)).await?;
            write_pieces(w, pieces).await
        }
        // validate() refuses BLOCK_STATUS without structured replies.
        Body::BlockStatus(_) => w.write_all(&encode_simple_reply(cookie, EINVAL)).await,
    }
}

async fn write_structured<W: AsyncWrite + Unpin>(
    w: &mut W,
    cookie: u64,
    body: &Body,
) -> std::io::Result<()> {
    match body {
        // A simple reply is allowed for any command without payload.
        Body::Done => w.write_all(&encode_simple_reply(cookie, 0)).await,
        Body::Error(errno, msg) => {
            let p = error_payload(*errno, msg);
            w.write_all(&encode_structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                cookie,
                p.len() as u32,
            ))
            .await?;
            w.write_all(&p).await
        }
        Body::Read { offset, pieces, df } => {
            if *df && pieces.len() > 1 {
                // Don't fragment: one OFFSET_DATA chunk with holes filled in.
                let total: u64 = pieces.iter().map(piece_len).sum();
                let hdr = encode_structured_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    8 + total as u32,
                );
                w.write_all(&hdr).await?;
                w.write_all(&offset.to_be_bytes()).await?;
                return write_pieces(w, pieces).await;
            }
            let mut pos = *offset;
            for (i, p) in pieces.iter().enumerate() {
                let flags = if i + 1 == pieces.len() {
                    REPLY_FLAG_DONE
                } else {
                    0
                };
                match p {
                    ReadPiece::Data(d) => {
                        let hdr = encode_structured_header(
                            flags,
                            REPLY_TYPE_OFFSET_DATA,
                            cookie,
                            8 + d.len() as u32,
                        );
                        w.write_all(&hdr).await?;
                        w.write_all(&pos.to_be_bytes()).await?;
                        w.write_all(d).await?;
                    }
                    ReadPiece::Zero(n) => {
                        w.write_all(&encode_structured_header(
                            flags,
                            REPLY_TYPE_OFFSET_HOLE,
                            cookie,
                            12,
                        ))
                        .await?;
                        w.write_all(&pos.to_be_bytes()).await?;
                        w.write_all(&(*n as u32).to_be_bytes()).await?;
                    }
                }
                pos += piece_len(p);
            }
            Ok(())
        }
        Body::BlockStatus(extents) => {
            let mut p = Vec::with_capacity(4 + extents.len() * 8);
            p.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
            for e in extents {
                // Extents come from one request, so each fits its u32 length.
                p.extend_from_slice(&(e.len as u32).to_be_bytes());
                let flags = if e.zero { STATE_HOLE | STATE_ZERO } else { 0 };
                p.extend_from_slice(&flags.to_be_bytes());
            }
            let hdr = encode_structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                cookie,
                p.len() as u32,
            );
            w.write_all(&hdr).await?;
            w.write_all(&p).await
        }
    }
}

fn piece_len(p: &ReadPiece) -> u64 {
    match p {
        ReadPiece::Data(d) => d.len() as u64,
        ReadPiece::Zero(n) => *n,
    }
}
