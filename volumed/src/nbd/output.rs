//! The replies of one connection waiting for the socket, in the order
//! they completed. Small replies are copied into staging buffers so many
//! leave in one slice; a reply with large data is written from its own
//! buffers, never copied. Each step of output is one `writev` of up to
//! [`MAX_SLICES`] slices, or a flush once everything is written (TLS holds
//! records back until then). A reply keeps its request's share of the
//! window (`window::InFlight`) until its last byte is written.

use std::collections::VecDeque;
use std::io::IoSlice;

use nbd_proto::{Encoded, Reply};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::window::InFlight;

/// Small replies are copied into staging buffers of up to this many bytes,
/// so that many of them leave in one slice; larger ones are written from
/// their own buffers. Queued replies keep their window share until written,
/// so staging is not memory a client that does not read can grow.
pub(super) const WRITE_BUFFER: usize = 256 << 10;

/// A reply at most this long is copied into staging.
const COPY_REPLY: usize = 16 << 10;

/// Slices handed to one `writev`.
const MAX_SLICES: usize = 64;

/// Replies waiting for the socket, in the order they completed.
pub(super) struct Output {
    structured: bool,
    segs: VecDeque<Seg>,
    /// Bytes queued and bytes written over the session; a reply's window
    /// share is released once `written` reaches the end of its bytes.
    queued: u64,
    written: u64,
    permits: VecDeque<(u64, InFlight)>,
    /// Written since the last flush (TLS holds records back until then).
    unflushed: bool,
    /// A written staging buffer, kept for the next one.
    spare: Vec<u8>,
    /// A reply that could not be encoded (a bug): the stream cannot go on
    /// without it, so the next write fails with this.
    broken: Option<std::io::Error>,
}

enum Seg {
    /// Small replies, copied; `pos` bytes of it are written.
    Staged { buf: Vec<u8>, pos: usize },
    /// A reply with large data, written from its own buffers.
    Reply {
        reply: Reply,
        len: usize,
        pos: usize,
    },
}

impl Seg {
    fn left(&self) -> usize {
        match self {
            Seg::Staged { buf, pos } => buf.len() - pos,
            Seg::Reply { len, pos, .. } => len - pos,
        }
    }
}

impl Output {
    pub(super) fn new(structured: bool) -> Self {
        Output {
            structured,
            segs: VecDeque::new(),
            queued: 0,
            written: 0,
            permits: VecDeque::new(),
            unflushed: false,
            spare: Vec::new(),
            broken: None,
        }
    }

    /// Nothing to write and nothing to flush.
    pub(super) fn is_idle(&self) -> bool {
        self.segs.is_empty() && !self.unflushed && self.broken.is_none()
    }

    pub(super) fn clear(&mut self) {
        self.segs.clear();
        self.permits.clear();
        self.unflushed = false;
    }

    /// Queues a reply; `permit` is released once its last byte is written.
    pub(super) fn push(&mut self, reply: Reply, permit: InFlight) {
        let encoded = match encode(&reply, self.structured) {
            Ok(e) => e,
            Err(e) => {
                self.broken = Some(e);
                return;
            }
        };
        let len: usize = encoded.slices().map(<[u8]>::len).sum();
        if len <= COPY_REPLY {
            let fits = matches!(self.segs.back(),
                Some(Seg::Staged { buf, .. }) if buf.len() + len <= WRITE_BUFFER);
            if !fits {
                let mut buf = std::mem::take(&mut self.spare);
                buf.reserve(COPY_REPLY * 4);
                self.segs.push_back(Seg::Staged { buf, pos: 0 });
            }
            let Some(Seg::Staged { buf, .. }) = self.segs.back_mut() else {
                unreachable!("the last segment is a staging buffer")
            };
            encoded.slices().for_each(|s| buf.extend_from_slice(s));
        } else {
            drop(encoded);
            self.segs.push_back(Seg::Reply { reply, len, pos: 0 });
        }
        self.queued += len as u64;
        self.permits.push_back((self.queued, permit));
    }

    /// One step of output: a `writev` of what is queued (up to
    /// `MAX_SLICES` slices), or a flush once everything is written.
    /// Cancel-safe: a write that did not complete wrote nothing.
    pub(super) async fn drive<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        if let Some(e) = self.broken.take() {
            return Err(e);
        }
        if self.segs.is_empty() {
            w.flush().await?;
            self.unflushed = false;
            return Ok(());
        }
        let n = {
            let encoded = self
                .segs
                .iter()
                .take(MAX_SLICES)
                .filter_map(|s| match s {
                    Seg::Reply { reply, .. } => Some(encode(reply, self.structured)),
                    Seg::Staged { .. } => None,
                })
                .collect::<std::io::Result<Vec<_>>>()?;
            let mut encoded = encoded.iter();
            let mut slices = Vec::with_capacity(MAX_SLICES);
            for seg in &self.segs {
                match seg {
                    Seg::Staged { buf, pos } => slices.push(IoSlice::new(&buf[*pos..])),
                    Seg::Reply { pos, .. } => {
                        let enc = encoded.next().expect("encoded in the same order");
                        let mut skip = *pos;
                        for s in enc.slices() {
                            if skip >= s.len() {
                                skip -= s.len();
                                continue;
                            }
                            slices.push(IoSlice::new(&s[skip..]));
                            skip = 0;
                            if slices.len() == MAX_SLICES {
                                break;
                            }
                        }
                    }
                }
                if slices.len() >= MAX_SLICES {
                    break;
                }
            }
            w.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        self.advance(n);
        Ok(())
    }

    /// `n` bytes from the front were written.
    fn advance(&mut self, mut n: usize) {
        self.written += n as u64;
        self.unflushed = true;
        while n > 0 {
            let Some(front) = self.segs.front_mut() else {
                break;
            };
            let left = front.left();
            if n < left {
                match front {
                    Seg::Staged { pos, .. } | Seg::Reply { pos, .. } => *pos += n,
                }
                break;
            }
            n -= left;
            if let Some(Seg::Staged { mut buf, .. }) = self.segs.pop_front() {
                buf.clear();
                self.spare = buf;
            }
        }
        while self
            .permits
            .front()
            .is_some_and(|(end, _)| *end <= self.written)
        {
            self.permits.pop_front();
        }
    }
}

/// A reply's wire bytes. Validation keeps every reply encodable, so a
/// failure is a bug, and the stream cannot go on without the reply.
fn encode(reply: &Reply, structured: bool) -> std::io::Result<Encoded<'_>> {
    reply.encode(structured).map_err(|e| {
        tracing::error!(cookie = reply.cookie, error = %e, "NBD reply cannot be encoded");
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    })
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use nbd_proto::{Piece, ReplyBody};

    use super::*;
    use crate::nbd::window::Window;

    /// A socket that takes at most `max` bytes per write and counts calls.
    struct Sink {
        out: Vec<u8>,
        max: usize,
        writes: usize,
        flushes: usize,
    }

    impl Sink {
        fn new(max: usize) -> Self {
            Sink {
                out: Vec::new(),
                max,
                writes: 0,
                flushes: 0,
            }
        }
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let me = self.get_mut();
            let n = buf.len().min(me.max);
            me.out.extend_from_slice(&buf[..n]);
            me.writes += 1;
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let me = self.get_mut();
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(me.max - n);
                me.out.extend_from_slice(&b[..take]);
                n += take;
                if n == me.max {
                    break;
                }
            }
            me.writes += 1;
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn done(cookie: u64) -> Reply {
        Reply {
            cookie,
            body: ReplyBody::Done,
        }
    }

    fn read(cookie: u64, data: Vec<u8>) -> Reply {
        Reply {
            cookie,
            body: ReplyBody::Read {
                offset: 0,
                pieces: vec![Piece::Data(data)],
                df: false,
            },
        }
    }

    fn wire(reply: &Reply, structured: bool) -> Vec<u8> {
        let e = reply.encode(structured).unwrap();
        e.slices().flat_map(|s| s.iter().copied()).collect()
    }

    async fn drain(out: &mut Output, w: &mut Sink) {
        while !out.is_idle() {
            out.drive(w).await.unwrap();
        }
    }

    #[tokio::test]
    async fn small_replies_leave_in_one_write_then_a_flush() {
        let window = Window::new();
        let mut out = Output::new(false);
        let mut want = Vec::new();
        for c in 0..3 {
            out.push(done(c), window.acquire(0).await);
            want.extend(wire(&done(c), false));
        }
        let mut w = Sink::new(usize::MAX);
        drain(&mut out, &mut w).await;
        assert_eq!(w.out, want);
        assert_eq!((w.writes, w.flushes), (1, 1), "one writev, then one flush");
    }

    #[tokio::test]
    async fn large_data_is_written_from_its_own_buffer_in_order() {
        let window = Window::new();
        let mut out = Output::new(true);
        let big = read(7, vec![0xab; 1 << 20]);
        let mut want = wire(&done(6), true);
        want.extend(wire(&big, true));
        want.extend(wire(&done(8), true));
        out.push(done(6), window.acquire(0).await);
        out.push(read(7, vec![0xab; 1 << 20]), window.acquire(1 << 20).await);
        out.push(done(8), window.acquire(0).await);
        assert!(
            matches!(out.segs.get(1), Some(Seg::Reply { .. })),
            "a large reply is not copied"
        );
        let mut w = Sink::new(100_000);
        drain(&mut out, &mut w).await;
        assert_eq!(w.out, want);
    }

    #[tokio::test]
    async fn a_reply_keeps_its_share_until_its_last_byte_is_written() {
        let window = Window::new();
        // Every slot taken: two by queued replies, the rest held here.
        let mut out = Output::new(false);
        out.push(read(1, vec![1; 100]), window.acquire(100).await);
        out.push(done(2), window.acquire(0).await);
        let mut rest = Vec::new();
        for _ in 2..crate::nbd::window::MAX_IN_FLIGHT {
            rest.push(window.acquire(0).await);
        }
        let free = || async {
            tokio::time::timeout(Duration::from_millis(20), window.acquire(0))
                .await
                .is_ok()
        };
        let first = wire(&read(1, vec![1; 100]), false).len();
        // Ten bytes at a time: nothing is released before the first reply's
        // last byte.
        let mut w = Sink::new(10);
        while w.out.len() + 10 < first {
            out.drive(&mut w).await.unwrap();
            assert!(!free().await, "released after {} bytes", w.out.len());
        }
        while w.out.len() < first {
            out.drive(&mut w).await.unwrap();
        }
        assert!(
            free().await,
            "the first reply is written: its share is back"
        );
        drain(&mut out, &mut w).await;
    }

    #[tokio::test]
    async fn cleared_output_is_idle() {
        let window = Window::new();
        let mut out = Output::new(false);
        out.push(done(1), window.acquire(0).await);
        assert!(!out.is_idle());
        out.clear();
        assert!(out.is_idle());
    }
}
