//! Tests of the transmission phase: raw request bytes over an in-memory
//! pipe to `session::serve` on a real volume in a temporary directory;
//! replies are read back with `nbd_proto`'s reply decoder.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nbd_proto::decode::{Meaning, Wire, header, header_rest, meaning};
use nbd_proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use tokio::task::JoinHandle;

use super::handshake::MetaContext;
use super::session::{self, SessionError};
use super::testutil::{CHUNK, engine_with};
use crate::engine::{Engine, Export};

const SIZE: u64 = 16 * CHUNK;

/// An in-memory pipe cannot tell what is queued: the session takes it that
/// someone waits, and its flushes go to the ring.
impl session::Reader for tokio::io::ReadHalf<DuplexStream> {}

const READ: u16 = CMD_READ;
const WRITE: u16 = CMD_WRITE;
const DISC: u16 = CMD_DISC;
const FLUSH: u16 = CMD_FLUSH;
const TRIM: u16 = CMD_TRIM;
const BLOCK_STATUS: u16 = CMD_BLOCK_STATUS;

struct Harness {
    c: DuplexStream,
    structured: bool,
    /// Reads in flight: cookie -> (offset, length), to make sense of replies.
    reads: HashMap<u64, (u64, u32)>,
    export: Export,
    task: JoinHandle<Result<(), SessionError>>,
    _engine: Arc<Engine>,
    _dir: tempfile::TempDir,
}

async fn start(options: SessionOptions) -> Harness {
    start_with(options, 4 << 20).await
}

/// A session whose pipe holds `pipe` bytes each way.
async fn start_with(options: SessionOptions, pipe: usize) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(dir.path(), &[("v", SIZE)]).await;
    let export = engine.export("v").unwrap();
    let (c, s) = duplex(pipe);
    let (r, w) = tokio::io::split(s);
    let task = tokio::spawn(session::serve(
        r,
        w,
        export.backend.clone(),
        SIZE,
        options,
        if options.block_status {
            vec![(META_BASE_ALLOCATION_ID, MetaContext::BaseAllocation)]
        } else {
            Vec::new()
        },
        session::Control {
            cancel: export.cancel.clone(),
            quiet: Default::default(),
        },
    ));
    Harness {
        c,
        structured: options.structured,
        reads: HashMap::new(),
        export,
        task,
        _engine: engine,
        _dir: dir,
    }
}

const STRUCTURED: SessionOptions = SessionOptions {
    structured: true,
    block_status: true,
    read_only: false,
};

impl Harness {
    async fn send(
        &mut self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        if cmd == READ {
            self.reads.insert(cookie, (offset, len));
        }
        let req = Request {
            flags,
            command: Command::from_wire(cmd),
            cookie,
            offset,
            length: len,
        };
        let mut b = req.encode().to_vec();
        b.extend_from_slice(data);
        self.c.write_all(&b).await.unwrap();
    }

    async fn unit(&mut self) -> Wire {
        let mut magic = [0u8; 4];
        self.c.read_exact(&mut magic).await.unwrap();
        let mut h = magic.to_vec();
        h.resize(4 + header_rest(magic).expect("a reply magic"), 0);
        self.c.read_exact(&mut h[4..]).await.unwrap();
        let (mut w, len) = header(&h).unwrap();
        if let Wire::Chunk { payload, .. } = &mut w {
            payload.resize(len, 0);
            self.c.read_exact(payload).await.unwrap();
        }
        w
    }

    /// The next `n` complete replies, by cookie.
    async fn replies(&mut self, n: usize) -> HashMap<u64, Meaning> {
        let mut done = HashMap::new();
        let mut partial: HashMap<u64, Vec<Wire>> = HashMap::new();
        while done.len() < n {
            let w = self.unit().await;
            let cookie = w.cookie();
            let (offset, len) = self.reads.get(&cookie).copied().unwrap_or((0, 0));
            let m = match w {
                Wire::Simple { errno: 0, .. } if !self.structured && len > 0 => {
                    let mut data = vec![0; len as usize];
                    self.c.read_exact(&mut data).await.unwrap();
                    Meaning::Read { data, chunks: 1 }
                }
                w if !w.done() => {
                    partial.entry(cookie).or_default().push(w);
                    continue;
                }
                w => {
                    let mut units = partial.remove(&cookie).unwrap_or_default();
                    units.push(w);
                    meaning(&units, offset, len as usize).expect("a well-formed reply")
                }
            };
            self.reads.remove(&cookie);
            assert!(done.insert(cookie, m).is_none(), "two replies for {cookie}");
        }
        done
    }

    async fn reply(&mut self) -> Meaning {
        self.replies(1).await.into_values().next().unwrap()
    }

    async fn call(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Meaning {
        self.send(cmd, flags, 1, offset, len, data).await;
        self.reply().await
    }
}

fn errno(m: &Meaning) -> Option<u32> {
    match m {
        Meaning::Error { errno, .. } => Some(*errno),
        _ => None,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[tokio::test]
async fn write_then_read_round_trips_in_both_reply_modes() {
    for options in [SessionOptions::default(), STRUCTURED] {
        let mut h = start(options).await;
        let data = pattern(8192, 7);
        let m = h.call(WRITE, CMD_FLAG_FUA, 4096, 8192, &data).await;
        assert_eq!(m, Meaning::Done);

        // Chunk 0 has data, chunks 1 and 2 are holes.
        let len = 3 * CHUNK as usize;
        let mut want = vec![0u8; len];
        want[4096..4096 + 8192].copy_from_slice(&data);
        let Meaning::Read { data: got, chunks } = h.call(READ, 0, 0, len as u32, &[]).await else {
            panic!("not a read");
        };
        assert_eq!(got, want);
        if options.structured {
            assert_eq!(chunks, 2, "one data chunk and one hole");
            let Meaning::Read { data: got, chunks } =
                h.call(READ, CMD_FLAG_DF, 0, len as u32, &[]).await
            else {
                panic!("not a read");
            };
            assert_eq!((got, chunks), (want, 1));
        } else {
            // DF exists only with structured replies.
            let m = h.call(READ, CMD_FLAG_DF, 0, 512, &[]).await;
            assert_eq!(errno(&m), Some(EINVAL));
        }
    }
}

#[tokio::test]
async fn flush_succeeds() {
    let mut h = start(STRUCTURED).await;
    h.call(WRITE, 0, 0, 512, &[1; 512]).await;
    assert_eq!(h.call(FLUSH, 0, 0, 0, &[]).await, Meaning::Done);
    assert_eq!(h.call(FLUSH, CMD_FLAG_FUA, 0, 0, &[]).await, Meaning::Done);
}

#[tokio::test]
async fn trim_then_block_status() {
    let mut h = start(STRUCTURED).await;
    let two = 2 * CHUNK as u32;
    let three = 3 * CHUNK as u32;
    let c = CHUNK as u32;
    h.call(WRITE, 0, 0, two, &pattern(two as usize, 1)).await;
    let hole = STATE_HOLE | STATE_ZERO;
    let status = |extents: Vec<(u32, u32)>| Meaning::BlockStatus {
        contexts: vec![(META_BASE_ALLOCATION_ID, extents)],
    };
    assert_eq!(
        h.call(BLOCK_STATUS, 0, 0, three, &[]).await,
        status(vec![(two, 0), (c, hole)])
    );
    assert_eq!(h.call(TRIM, 0, 0, c, &[]).await, Meaning::Done);
    assert_eq!(
        h.call(BLOCK_STATUS, 0, 0, three, &[]).await,
        status(vec![(c, hole), (c, 0), (c, hole)])
    );
    assert_eq!(
        h.call(BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, three, &[]).await,
        status(vec![(c, hole)])
    );
    let Meaning::Read { data, .. } = h.call(READ, 0, 0, c, &[]).await else {
        panic!("not a read");
    };
    assert!(data.iter().all(|&b| b == 0));

    // Without base:allocation negotiated, BLOCK_STATUS is refused.
    let mut h = start(SessionOptions {
        block_status: false,
        ..STRUCTURED
    })
    .await;
    assert_eq!(
        errno(&h.call(BLOCK_STATUS, 0, 0, c, &[]).await),
        Some(EINVAL)
    );
}

#[tokio::test]
async fn refused_requests_get_an_errno_and_the_session_goes_on() {
    let mut h = start(STRUCTURED).await;
    let m = h.call(READ, 0, SIZE, 512, &[]).await;
    assert_eq!(
        m,
        Meaning::Error {
            errno: EINVAL,
            message: b"request past the end of the export".to_vec()
        }
    );
    // A write's payload is consumed even when it is refused.
    let m = h.call(WRITE, 0, SIZE - 256, 512, &[9; 512]).await;
    assert_eq!(errno(&m), Some(ENOSPC));
    let m = h.call(READ, 0, u64::MAX, 1, &[]).await;
    assert_eq!(errno(&m), Some(EINVAL));
    let m = h.call(42, 0, 0, 512, &[]).await;
    assert_eq!(
        m,
        Meaning::Error {
            errno: EINVAL,
            message: b"unknown command".to_vec()
        }
    );
    let m = h.call(READ, 0, 0, MAX_PAYLOAD + 1, &[]).await;
    assert_eq!(errno(&m), Some(EOVERFLOW));
    assert!(matches!(
        h.call(READ, 0, 0, 512, &[]).await,
        Meaning::Read { .. }
    ));
}

#[tokio::test]
async fn an_oversized_write_is_drained_and_refused() {
    let mut h = start(SessionOptions::default()).await;
    let len = MAX_PAYLOAD + 1;
    h.send(WRITE, 0, 5, 0, len, &vec![3; len as usize]).await;
    assert_eq!(errno(&h.reply().await), Some(EINVAL));
    // The stream is still aligned on the next header.
    let m = h.call(READ, 0, 0, 512, &[]).await;
    assert_eq!(
        m,
        Meaning::Read {
            data: vec![0; 512],
            chunks: 1
        }
    );
}

#[tokio::test]
async fn pipelined_replies_are_matched_by_cookie() {
    for options in [SessionOptions::default(), STRUCTURED] {
        let mut h = start(options).await;
        let n = 48u64;
        for i in 0..n {
            let data = pattern(4096, i as u8);
            h.send(WRITE, 0, i, i * CHUNK / 4, 4096, &data).await;
        }
        let writes = h.replies(n as usize).await;
        assert!((0..n).all(|i| writes[&i] == Meaning::Done));

        // Reads take a task each; block status and flushes interleave.
        for i in 0..n {
            h.send(READ, 0, 1000 + i, i * CHUNK / 4, 4096, &[]).await;
            if options.block_status {
                h.send(BLOCK_STATUS, 0, 2000 + i, 0, CHUNK as u32, &[])
                    .await;
            } else {
                h.send(FLUSH, 0, 2000 + i, 0, 0, &[]).await;
            }
        }
        let replies = h.replies(2 * n as usize).await;
        for i in 0..n {
            let want = pattern(4096, i as u8);
            assert!(
                matches!(&replies[&(1000 + i)], Meaning::Read { data, .. } if *data == want),
                "read {i}"
            );
            assert!(!matches!(replies[&(2000 + i)], Meaning::Error { .. }));
        }
    }
}

#[tokio::test]
async fn disc_and_detach_end_the_session_cleanly() {
    let mut h = start(STRUCTURED).await;
    h.send(DISC, 0, 1, 0, 0, &[]).await;
    assert!(h.task.await.unwrap().is_ok());

    let mut h = start(STRUCTURED).await;
    h.send(WRITE, 0, 1, 0, 512, &[1; 512]).await;
    assert_eq!(h.reply().await, Meaning::Done);
    h.export.cancel.cancel();
    assert!(h.task.await.unwrap().is_ok());
    // The writer closed its half once the session ended.
    let mut rest = Vec::new();
    h.c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

/// A client that pipelines requests and never reads: every reply, those the
/// reader makes itself (refusals, unknown commands, block status) included,
/// holds its share of the window until it is written, so the session stops
/// taking requests once the window and the writer's buffer are full. Each
/// time the client's writes stall, it has sent at most that many requests
/// beyond those it read the replies of.
#[tokio::test]
async fn replies_a_client_does_not_read_stay_within_the_window() {
    const PIPE: usize = 4096;
    const TOTAL: u64 = 100_000;
    let mut h = start_with(STRUCTURED, PIPE).await;
    let mut buf = Vec::with_capacity(TOTAL as usize * REQUEST_HEADER_LEN);
    for cookie in 0..TOTAL {
        let (cmd, offset) = match cookie % 3 {
            0 => (BLOCK_STATUS, 0),
            1 => (42, 0),
            _ => (READ, SIZE),
        };
        let req = Request {
            flags: 0,
            command: Command::from_wire(cmd),
            cookie,
            offset,
            length: CHUNK as u32,
        };
        buf.extend_from_slice(&req.encode());
    }
    // The smallest reply here, a one-extent block status, is 32 bytes; the
    // pipe holds the last requests sent, not yet read.
    let bound = super::window::MAX_IN_FLIGHT
        + (super::output::WRITE_BUFFER + PIPE) / 32
        + PIPE / REQUEST_HEADER_LEN
        + 1;
    let (mut pos, mut answered, mut stalls, mut most) = (0, 0u64, 0, 0);
    while pos < buf.len() {
        match tokio::time::timeout(Duration::from_millis(100), h.c.write(&buf[pos..])).await {
            Ok(n) => pos += n.unwrap(),
            Err(_) => {
                stalls += 1;
                let sent = (pos / REQUEST_HEADER_LEN) as u64;
                let unread = (sent - answered) as usize;
                assert!(
                    unread <= bound,
                    "{unread} requests taken unanswered, bound {bound}"
                );
                most = most.max(unread);
                let replies = h.replies(unread).await;
                assert!(replies.keys().all(|c| (answered..sent).contains(c)));
                answered = sent;
            }
        }
    }
    // Without the bound every request is taken at once and nothing stalls.
    assert!(
        stalls as u64 >= TOTAL / bound as u64,
        "{stalls} stalls, at most {most} unread"
    );
    let replies = h.replies((TOTAL - answered) as usize).await;
    for (cookie, m) in replies {
        match cookie % 3 {
            0 => assert!(matches!(m, Meaning::BlockStatus { .. }), "{m:?}"),
            _ => assert_eq!(errno(&m), Some(EINVAL), "{cookie}"),
        }
    }
    // The session goes on.
    assert!(matches!(
        h.call(READ, 0, 0, 512, &[]).await,
        Meaning::Read { .. }
    ));
}

/// A payload arrives in pieces (a duplex pipe of 7 bytes): it is read
/// whole, exactly its length, and what follows it stays unread; a stream
/// that ends early is an `UnexpectedEof`.
#[tokio::test]
async fn read_payload_takes_exactly_its_length() {
    let (mut tx, mut rx) = duplex(7);
    let sent: Vec<u8> = (0..200u8).collect();
    let writer = tokio::spawn(async move {
        tx.write_all(&sent).await.unwrap();
        tx.write_all(b"next").await.unwrap();
    });
    let got = session::read_payload(&mut rx, 200).await.unwrap();
    assert_eq!(got, (0..200u8).collect::<Vec<_>>());
    let mut next = [0u8; 4];
    rx.read_exact(&mut next).await.unwrap();
    assert_eq!(&next, b"next");
    writer.await.unwrap();

    let (mut tx, mut rx) = duplex(64);
    tx.write_all(b"short").await.unwrap();
    drop(tx);
    let err = session::read_payload(&mut rx, 10).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
}
