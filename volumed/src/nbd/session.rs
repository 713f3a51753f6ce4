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

use super::handshake::MAX_PAYLOAD;
use super::proto::*;
use crate::engine::Volume;

/// Requests in flight per connection (fio and qemu use up to 128).
pub const MAX_IN_FLIGHT: usize = 128;

/// Payload bytes in flight per connection, counted in KiB permits.
const PAYLOAD_BUDGET_KIB: u32 = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Vec<u8>>,
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
    cancel: CancellationToken,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer_task = tokio::spawn(write_replies(writer, rx));
    let window = Window::new();
    let result = read_requests(&mut reader, &tx, &window, &volume, size, &cancel).await;
    window.drain().await;
    drop(tx);
    match writer_task.await {
        Ok(Err(e)) => debug!(volume = %volume.name, error = %e, "reply writer stopped"),
        Err(e) => warn!(volume = %volume.name, error = %e, "reply writer task failed"),
        Ok(Ok(())) => {}
    }
    result
}

async fn read_requests<R: AsyncRead + Unpin>(
    reader: &mut R,
    tx: &mpsc::UnboundedSender<Reply>,
    window: &Window,
    volume: &Arc<Volume>,
    size: u64,
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
        let permit = window.acquire(req.length.min(MAX_PAYLOAD)).await;
        let reply_err = |error: u32| Reply {
            cookie: req.cookie,
            error,
            data: None,
            _permit: None,
        };

        match req.command {
            Command::Disc => return Ok(()),
            Command::Write => {
                if req.length > MAX_PAYLOAD {
                    // Consume the payload so the stream stays aligned on the
                    // next header, without buffering it.
                    let mut sink = (&mut *reader).take(u64::from(req.length));
                    let n = tokio::io::copy(&mut sink, &mut tokio::io::sink()).await?;
                    if n < u64::from(req.length) {
                        return Ok(());
                    }
                    let _ = tx.send(reply_err(EINVAL));
                    continue;
                }
                let mut payload = vec![0u8; req.length as usize];
                reader.read_exact(&mut payload).await?;
                if let Some(err) = validate(&req, size, CMD_FLAG_FUA) {
                    let _ = tx.send(reply_err(err));
                    continue;
                }
                let (tx, volume) = (tx.clone(), Arc::clone(volume));
                tokio::spawn(async move {
                    let fua = req.flags & CMD_FLAG_FUA != 0;
                    let error = match volume.write(req.offset, payload, fua).await {
                        Ok(()) => 0,
                        Err(e) => io_failure(&volume, "write", &req, &e),
                    };
                    let _ = tx.send(Reply {
                        cookie: req.cookie,
                        error,
                        data: None,
                        _permit: Some(permit),
                    });
                });
            }
            Command::Read => {
                if let Some(err) = validate(&req, size, 0) {
                    let _ = tx.send(reply_err(err));
                    continue;
                }
                let (tx, volume) = (tx.clone(), Arc::clone(volume));
                tokio::spawn(async move {
                    let reply = match volume.read(req.offset, req.length as usize).await {
                        Ok(data) => Reply {
                            cookie: req.cookie,
                            error: 0,
                            data: Some(data),
                            _permit: Some(permit),
                        },
                        Err(e) => {
                            let error = io_failure(&volume, "read", &req, &e);
                            Reply {
                                cookie: req.cookie,
                                error,
                                data: None,
                                _permit: Some(permit),
                            }
                        }
                    };
                    let _ = tx.send(reply);
                });
            }
            Command::Flush => {
                if req.flags & !CMD_FLAG_FUA != 0 {
                    let _ = tx.send(reply_err(EINVAL));
                    continue;
                }
                let (tx, volume) = (tx.clone(), Arc::clone(volume));
                tokio::spawn(async move {
                    let error = match volume.flush().await {
                        Ok(()) => 0,
                        Err(e) => io_failure(&volume, "flush", &req, &e),
                    };
                    let _ = tx.send(Reply {
                        cookie: req.cookie,
                        error,
                        data: None,
                        _permit: Some(permit),
                    });
                });
            }
            // Not advertised in the transmission flags, so a client that
            // sends them broke the protocol; the spec asks for EINVAL.
            Command::Trim
            | Command::Cache
            | Command::WriteZeroes
            | Command::BlockStatus
            | Command::Unknown(_) => {
                debug!(volume = %volume.name, command = ?req.command, "unsupported NBD command");
                let _ = tx.send(reply_err(EINVAL));
            }
        }
    }
}

/// The errno for a request that must not be executed, if any.
fn validate(req: &Request, size: u64, allowed_flags: u16) -> Option<u32> {
    if req.flags & !allowed_flags != 0 {
        return Some(EINVAL);
    }
    if req.length == 0 || req.length > MAX_PAYLOAD {
        return Some(EINVAL);
    }
    match check_range(req.offset, req.length, size) {
        Ok(()) => None,
        // The spec: ENOSPC for a write past the end, EINVAL for the rest.
        Err(RangeError::PastEnd) if req.command == Command::Write => Some(ENOSPC),
        Err(_) => Some(EINVAL),
    }
}

fn io_failure(volume: &Volume, op: &str, req: &Request, e: &std::io::Error) -> u32 {
    tracing::error!(volume = %volume.name, op, offset = req.offset, length = req.length, error = %e, "I/O failed");
    errno_of(e)
}

async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, writer);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Batch whatever else is ready into one flush.
        while let Some(r) = next {
            w.write_all(&encode_simple_reply(r.cookie, r.error)).await?;
            if let Some(data) = &r.data {
                w.write_all(data).await?;
            }
            drop(r);
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    w.shutdown().await
}
