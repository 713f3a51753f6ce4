//! The intent log: a FLUSH after small writes becomes one sequential write
//! and one sync of a small file, instead of a sync of the data files.
//!
//! Why: the fdatasync of a data file writes back every block dirtied since
//! the last one, scattered over the file, and waits for them all; with a
//! FLUSH every 32 writes (what a database guest does) that took 1.1-1.5 ms
//! here, and its completions cost a context switch per I/O. The log writes
//! the same bytes as one batch at its tail (docs/performance.md, "An
//! intent log for FLUSH").
//!
//! How: a write of up to [`RECORD_MAX`] bytes is recorded here, in memory,
//! as it reaches the data file. A FLUSH writes the records gathered since
//! the last one as one batch and syncs the log file only. The data files
//! are synced by a *checkpoint*: a FLUSH that finds a change the log does
//! not hold (a larger write, a trim, a zeroing) or the log full, or a
//! caller that syncs them itself. After the data files' sync the log starts
//! a new generation, so its old batches are never replayed over newer data.
//! At open, the current generation's batches are replayed into the data
//! files in order and synced: every write a FLUSH covered is back.
//!
//! The page cache stays the only cache: reads never look here, and the
//! data files are only ever written buffered. Records hold the bytes as
//! the data file holds them (encrypted, for an encrypted volume).
//!
//! Layout (docs/formats.md, "Intent log"): batches from offset 0, each at a
//! 4 KiB boundary, each a 64-byte header (magic, generation, sequence,
//! record bytes, record count, blake3 of the header's first 32 bytes and
//! the records) and its records (offset, length, bytes), zero-padded. A
//! generation starts with an empty batch of sequence 0 at offset 0; replay
//! follows batches while each is whole, of that generation and the next
//! sequence. Generations are random, so a stale batch of an older one
//! never continues a newer one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::engine::{IoEngine, SyncOn};
use super::op::OpKind;

/// The log's file in the volume's directory.
pub const LOG_FILE: &str = "intent.log";
/// Writes up to this size are logged; larger ones (fills, imports,
/// hydration) are left to a checkpoint, which they would fill anyway.
pub const RECORD_MAX: usize = 64 << 10;
/// Bytes of log before a FLUSH checkpoints instead: about a quarter of a
/// second of 4 KiB writes at the rates measured here.
pub const CAPACITY: u64 = 16 << 20;
/// A FLUSH covering fewer writes syncs the segments instead: for one write
/// the log writes two blocks (header and record) where the segment's sync
/// writes one, and a FLUSH after each 4 KiB write at QD1 ran 0.81-0.94 of
/// the segments' sync through the log (docs/performance.md).
pub const MIN_RECORDS: u32 = 4;

const MAGIC: [u8; 8] = *b"VDILOG01";
const HEADER: usize = 64;
const RECORD_HEADER: usize = 16;
const BLOCK: u64 = 4096;

/// Where the next batch goes.
#[derive(Debug)]
struct Tail {
    generation: u64,
    seq: u64,
    pos: u64,
}

pub(super) struct IntentLog {
    file: Arc<File>,
    /// Records of writes since the last commit. Held by a logged write
    /// across its data write and its record, so the records of two writes
    /// to the same bytes are in the order the data file saw them.
    pending: tokio::sync::Mutex<Pending>,
    /// Held by a commit or a checkpoint for all its I/O: one at a time.
    tail: tokio::sync::Mutex<Tail>,
    /// The data files changed in a way the log does not hold: the next
    /// FLUSH must checkpoint. Set once such a change is done.
    unlogged: AtomicBool,
}

/// Records not yet in the log, laid out as the batch that will hold them:
/// room for the header, then the records, so a commit writes the header
/// in place instead of copying every record into a new buffer.
pub(super) struct Pending {
    bytes: Vec<u8>,
    count: u32,
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            bytes: vec![0; HEADER],
            count: 0,
        }
    }
}

impl Pending {
    /// Bytes of records held.
    pub fn len(&self) -> usize {
        self.bytes.len() - HEADER
    }

    /// Appends the record of a write of `data` at `offset`.
    pub fn push(&mut self, offset: u64, data: &[u8]) {
        self.bytes.extend_from_slice(&offset.to_le_bytes());
        self.bytes
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(&0u32.to_le_bytes());
        self.bytes.extend_from_slice(data);
        self.count += 1;
    }

    /// The bytes a batch of these records takes in the log.
    fn batch_len(&self) -> u64 {
        (self.bytes.len() as u64).next_multiple_of(BLOCK)
    }

    /// The batch's bytes: header, records, zeros up to a 4 KiB boundary.
    pub fn into_batch(self, generation: u64, seq: u64) -> Vec<u8> {
        let len = self.batch_len() as usize;
        let records = self.len() as u32;
        let mut b = self.bytes;
        b[..8].copy_from_slice(&MAGIC);
        b[8..16].copy_from_slice(&generation.to_le_bytes());
        b[16..24].copy_from_slice(&seq.to_le_bytes());
        b[24..28].copy_from_slice(&records.to_le_bytes());
        b[28..32].copy_from_slice(&self.count.to_le_bytes());
        let mut h = blake3::Hasher::new();
        h.update(&b[..32]);
        h.update(&b[HEADER..]);
        let sum = *h.finalize().as_bytes();
        b[32..64].copy_from_slice(&sum);
        b.resize(len, 0);
        b
    }
}

/// The records of the log's current generation, in order: what replay
/// writes into the data files.
pub(super) type Replay = Vec<(u64, Vec<u8>)>;

impl IntentLog {
    /// Opens the log in `dir` (creating it if missing, then syncing `dir`)
    /// and reads its current generation. The caller replays the records,
    /// syncs the data files, then calls [`Self::restart_blocking`].
    pub fn open(dir: &Path, engine: &IoEngine) -> io::Result<(Self, Replay)> {
        let path = dir.join(LOG_FILE);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if !existed {
            super::data_file::sync_dir(dir)?;
        }
        let replay = if existed {
            read_generation(&file)?
        } else {
            Vec::new()
        };
        engine.hold(&file);
        let log = IntentLog {
            file: Arc::new(file),
            pending: tokio::sync::Mutex::new(Pending::default()),
            tail: tokio::sync::Mutex::new(Tail {
                generation: 0,
                seq: 0,
                pos: 0,
            }),
            unlogged: AtomicBool::new(false),
        };
        Ok((log, replay))
    }

    /// Starts a new generation, durably; for open, once what the log held
    /// is in the synced data files.
    pub fn restart_blocking(&self, engine: &IoEngine) -> io::Result<()> {
        let mut tail = self
            .tail
            .try_lock()
            .map_err(|_| io::Error::other("intent log busy while its volume opens"))?;
        let (generation, batch) = start_batch();
        self.file.write_all_at(&batch, 0)?;
        engine.sync_blocking(&self.file)?;
        *tail = Tail {
            generation,
            seq: 1,
            pos: BLOCK,
        };
        Ok(())
    }

    /// The lock a logged write holds across its data write and [`record`].
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, Pending> {
        self.pending.lock().await
    }

    /// The next FLUSH must sync the data files: called once a change the
    /// log does not hold is done (or failed), before it is acknowledged. Not
    /// before it starts: a FLUSH that came in meanwhile would clear the mark
    /// and the FLUSH after the change would find none.
    pub fn mark_unlogged(&self) {
        self.unlogged.store(true, Ordering::Release);
    }

    /// Makes every write completed so far durable: by one batch when the log
    /// holds them all and has room, else by `sync_data` (the data files'
    /// sync) and a new generation. `metadata`: the caller needs the data
    /// files' fsync whatever the log holds.
    pub async fn flush<F>(
        &self,
        engine: &IoEngine,
        on: SyncOn,
        metadata: bool,
        sync_data: F,
    ) -> io::Result<()>
    where
        F: Future<Output = io::Result<()>>,
    {
        let mut tail = self.tail.lock().await;
        let unlogged = self.unlogged.swap(false, Ordering::AcqRel);
        let records = std::mem::take(&mut *self.pending.lock().await);
        if !metadata && !unlogged {
            if records.count == 0 {
                return Ok(());
            }
            let len = records.batch_len();
            if records.count >= MIN_RECORDS && tail.pos + len <= CAPACITY {
                let batch = records.into_batch(tail.generation, tail.seq);
                let at = tail.pos;
                // Counted before it is written: whatever reached the file,
                // a checkpoint must now start a new generation.
                tail.pos += len;
                tail.seq += 1;
                let written = engine
                    .run(Arc::clone(&self.file), at, OpKind::Write(batch))
                    .await
                    .0;
                let r = match written {
                    Ok(()) => engine.sync(Arc::clone(&self.file), true, on).await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(()) => return Ok(()),
                    // The log is a shortcut: a full disk (the log grows
                    // until its first wrap) or a failed log write falls
                    // back to syncing the data files, whose own errors are
                    // the ones that matter.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
                        tracing::debug!("intent log full disk; syncing the data files instead");
                    }
                    Err(e) => tracing::warn!(error = %e,
                        "intent log write failed; syncing the data files instead"),
                }
            }
        }
        // A checkpoint. The records taken are of writes already in the page
        // cache, which the data files' sync covers; later ones stay pending.
        self.checkpoint(&mut tail, engine, on, sync_data).await
    }

    /// Syncs the data files through `sync_data`, then starts a new
    /// generation if the current one holds any batch.
    async fn checkpoint<F>(
        &self,
        tail: &mut Tail,
        engine: &IoEngine,
        on: SyncOn,
        sync_data: F,
    ) -> io::Result<()>
    where
        F: Future<Output = io::Result<()>>,
    {
        if let Err(e) = sync_data.await {
            self.mark_unlogged();
            return Err(e);
        }
        if tail.seq <= 1 {
            return Ok(());
        }
        let (generation, batch) = start_batch();
        engine
            .run(Arc::clone(&self.file), 0, OpKind::Write(batch))
            .await
            .0?;
        engine.sync(Arc::clone(&self.file), true, on).await?;
        *tail = Tail {
            generation,
            seq: 1,
            pos: BLOCK,
        };
        Ok(())
    }

    /// A checkpoint, blocking, for a volume being opened: nothing else
    /// holds the log yet.
    pub fn checkpoint_blocking(
        &self,
        engine: &IoEngine,
        sync_data: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        *self
            .pending
            .try_lock()
            .map_err(|_| io::Error::other("intent log busy while its volume opens"))? =
            Pending::default();
        sync_data()?;
        self.restart_blocking(engine)
    }

    /// Appends the record of a write of `data` at `offset` to `pending`
    /// (the guard from [`Self::lock`]). Past what one batch can hold, the
    /// records go and the next FLUSH checkpoints: memory stays bounded when
    /// a client writes and never flushes.
    pub fn record(&self, pending: &mut Pending, offset: u64, data: &[u8]) {
        if self.unlogged.load(Ordering::Acquire) {
            return;
        }
        if (HEADER + pending.len() + RECORD_HEADER + data.len()) as u64 > CAPACITY - BLOCK {
            *pending = Pending::default();
            self.mark_unlogged();
            return;
        }
        pending.push(offset, data);
    }

    /// The file, for the data file's release at drop.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// A new random generation and its empty first batch.
fn start_batch() -> (u64, Vec<u8>) {
    use ring::rand::SecureRandom;
    let mut g = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut g)
        .expect("the operating system's random generator works");
    let generation = u64::from_le_bytes(g);
    (generation, Pending::default().into_batch(generation, 0))
}

/// The records of the generation that starts at offset 0, up to the first
/// batch that is torn, of another generation or out of sequence.
fn read_generation(file: &File) -> io::Result<Replay> {
    let size = file.metadata()?.len();
    let mut out = Vec::new();
    let mut pos = 0u64;
    let mut generation = None;
    let mut seq = 0u64;
    while pos + HEADER as u64 <= size {
        let mut head = [0u8; HEADER];
        file.read_exact_at(&mut head, pos)?;
        let Some((g, s, body_len)) = parse_header(&head) else {
            break;
        };
        if generation.is_some_and(|want| want != g) || s != seq {
            break;
        }
        if pos + (HEADER + body_len) as u64 > size {
            break;
        }
        let mut body = vec![0u8; body_len];
        file.read_exact_at(&mut body, pos + HEADER as u64)?;
        let mut h = blake3::Hasher::new();
        h.update(&head[..32]);
        h.update(&body);
        if h.finalize().as_bytes() != &head[32..64] {
            break;
        }
        let Some(records) = decode_records(
            &body,
            u32::from_le_bytes(head[28..32].try_into().expect("4 bytes")),
        ) else {
            break;
        };
        out.extend(records);
        generation = Some(g);
        seq += 1;
        pos += ((HEADER + body_len) as u64).next_multiple_of(BLOCK);
    }
    Ok(out)
}

/// Generation, sequence and record bytes of a header with the magic.
fn parse_header(head: &[u8; HEADER]) -> Option<(u64, u64, usize)> {
    if head[..8] != MAGIC {
        return None;
    }
    let g = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let s = u64::from_le_bytes(head[16..24].try_into().ok()?);
    let n = u32::from_le_bytes(head[24..28].try_into().ok()?) as usize;
    (n as u64 <= CAPACITY).then_some((g, s, n))
}

/// A batch's records; `None` if they do not parse to exactly `count`.
fn decode_records(mut body: &[u8], count: u32) -> Option<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < RECORD_HEADER {
            return None;
        }
        let offset = u64::from_le_bytes(body[..8].try_into().ok()?);
        let len = u32::from_le_bytes(body[8..12].try_into().ok()?) as usize;
        let data = body.get(RECORD_HEADER..RECORD_HEADER + len)?;
        out.push((offset, data.to_vec()));
        body = &body[RECORD_HEADER + len..];
    }
    (out.len() == count as usize).then_some(out)
}

#[cfg(test)]
#[path = "intent_log_tests.rs"]
mod tests;
