//! A connection's in-flight window, bounded twice: by a count of requests
//! ([`MAX_IN_FLIGHT`]) and by a budget of payload bytes (256 MiB, in KiB
//! permits). The session takes a request's share after its header and
//! before its payload, and the share is released only when the request's
//! reply has been written to the socket: a client that pipelines requests
//! and never reads its replies stops being read once the window is full,
//! which is backpressure, never an error, and never the daemon's memory.
//!
//! [`Budget`] sizes a share: a read's or write's payload, or for block
//! status the largest reply it can get.

use std::sync::Arc;

use nbd_proto::{CMD_FLAG_REQ_ONE, Command, MAX_PAYLOAD, Request};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Requests in flight per connection (fio and qemu use up to 128).
pub(super) const MAX_IN_FLIGHT: usize = 128;

/// Payload bytes in flight per connection, counted in KiB permits.
const PAYLOAD_BUDGET_KIB: u32 = 256 << 10;

/// Bytes of a block-status extent on the wire (length and flags).
const EXTENT_LEN: u64 = 8;

/// A request's share of the window; released when it is dropped, which
/// the session does once the request's reply is written.
pub(super) struct InFlight {
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

#[derive(Clone)]
pub(super) struct Window {
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl Window {
    pub(super) fn new() -> Self {
        Window {
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            bytes: Arc::new(Semaphore::new(PAYLOAD_BUDGET_KIB as usize)),
        }
    }

    /// Waits for a slot and `payload` bytes (at least 1 KiB, at most the
    /// whole budget, so any request fits an empty window).
    pub(super) async fn acquire(&self, payload: u32) -> InFlight {
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
}

/// What sizes a request's share of the window on one connection.
#[derive(Clone, Copy)]
pub(super) struct Budget {
    /// Metadata contexts a BLOCK_STATUS answers (at least one).
    contexts: u64,
    /// The export's chunk size: at most one extent per chunk.
    chunk: u64,
}

impl Budget {
    pub(super) fn new(contexts: usize, chunk_size: u64) -> Self {
        Budget {
            contexts: contexts.max(1) as u64,
            chunk: chunk_size.max(1),
        }
    }

    /// The bytes of the window a request takes: its payload, or for block
    /// status the largest reply it can get (per context, one extent per
    /// chunk it spans, plus one for a range that starts inside a chunk).
    /// Other replies are small and take the minimum.
    pub(super) fn of_request(&self, req: &Request) -> u32 {
        match req.command {
            Command::Read | Command::Write => req.length.min(MAX_PAYLOAD),
            Command::BlockStatus if req.flags & CMD_FLAG_REQ_ONE != 0 => {
                u32::try_from(EXTENT_LEN * self.contexts).unwrap_or(u32::MAX)
            }
            Command::BlockStatus => {
                let extents = u64::from(req.length).div_ceil(self.chunk).saturating_add(1);
                let bytes = extents
                    .saturating_mul(EXTENT_LEN)
                    .saturating_mul(self.contexts);
                u32::try_from(bytes).unwrap_or(u32::MAX)
            }
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn request(command: Command, flags: u16, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 1,
            offset: 0,
            length,
        }
    }

    /// Whether `acquire(payload)` completes at once.
    async fn fits(w: &Window, payload: u32) -> Option<InFlight> {
        tokio::time::timeout(Duration::from_millis(20), w.acquire(payload))
            .await
            .ok()
    }

    #[tokio::test]
    async fn the_count_bounds_small_requests() {
        let w = Window::new();
        let mut held = Vec::new();
        for _ in 0..MAX_IN_FLIGHT {
            held.push(fits(&w, 0).await.expect("a free slot"));
        }
        assert!(fits(&w, 0).await.is_none(), "the window is full");
        // A reply written: its share comes back, and one more fits.
        held.pop();
        assert!(fits(&w, 0).await.is_some());
    }

    #[tokio::test]
    async fn the_budget_bounds_payloads() {
        let w = Window::new();
        let big = MAX_PAYLOAD;
        let n = (PAYLOAD_BUDGET_KIB as usize * 1024) / big as usize;
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(fits(&w, big).await.expect("room in the budget"));
        }
        assert!(fits(&w, big).await.is_none(), "the budget is spent");
        assert!(fits(&w, 1).await.is_none(), "even 1 KiB waits");
        drop(held.pop());
        assert!(fits(&w, big).await.is_some());
    }

    #[tokio::test]
    async fn any_request_fits_an_empty_window() {
        let w = Window::new();
        assert!(fits(&w, u32::MAX).await.is_some());
    }

    #[test]
    fn block_status_takes_its_largest_reply() {
        let b = Budget::new(2, 64 << 10);
        assert_eq!(b.of_request(&request(Command::Read, 0, 4096)), 4096);
        assert_eq!(
            b.of_request(&request(Command::Write, 0, u32::MAX)),
            MAX_PAYLOAD
        );
        assert_eq!(b.of_request(&request(Command::Flush, 0, 0)), 0);
        // One extent per context.
        let one = request(Command::BlockStatus, CMD_FLAG_REQ_ONE, 1 << 30);
        assert_eq!(b.of_request(&one), 16);
        // 16 chunks, plus one for a start inside a chunk, per context.
        let all = request(Command::BlockStatus, 0, 1 << 20);
        assert_eq!(b.of_request(&all), 17 * 8 * 2);
        // Arithmetic at the edges saturates instead of wrapping.
        let tiny = Budget::new(usize::MAX, 1);
        assert_eq!(
            tiny.of_request(&request(Command::BlockStatus, 0, u32::MAX)),
            u32::MAX
        );
    }
}
