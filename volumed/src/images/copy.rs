//! The copy of one disk of an image into its volume: one pipeline from the
//! first window of the image to the last, the image's allocation asked
//! ahead, reads in flight in order, zero chunks skipped, writes landing
//! while the next reads arrive, a checkpoint's flush beside the copy.

use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use snapshot::hash::hex;

use super::import::{ImportJobs, Stop};
use super::nbd_client::Run;
use super::registry::JobHandle;
use super::source::Source;
use crate::catalog::Checkpoint;
use crate::engine::Volume;

/// Bytes of the image asked about (BLOCK_STATUS or SEEK_DATA) at once.
const WINDOW: u64 = 32 << 20;
/// Reads in flight.
const READS_IN_FLIGHT: usize = 16;
/// Writes into the volume in flight while the next reads arrive.
pub(super) const WRITES_IN_FLIGHT: usize = 8;
/// The volume is flushed and the checkpoint recorded this often: a crash
/// rereads at most this much.
const CHECKPOINT_EVERY: u64 = 64 << 20;

/// Zeros to compare a chunk against (memcmp, even in a debug build).
static ZEROS: [u8; volumed_api::MAX_CHUNK_SIZE as usize] =
    [0; volumed_api::MAX_CHUNK_SIZE as usize];

pub(super) fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// A flush of the volume, running beside the copy.
type Flushing<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send + 'a>>;

impl ImportJobs {
    /// Copies disk `disk` of the image into `vol`: reads from `from` (to
    /// hash), writes from `write_from`. Returns the SHA-256 when it read
    /// from the start.
    ///
    /// One pipeline from start to end: the runs of the next window are
    /// asked for while the reads of this one are in flight, reads run
    /// [`READS_IN_FLIGHT`] ahead in order (the hash needs the order), and up
    /// to [`WRITES_IN_FLIGHT`] writes land while the next reads arrive. A
    /// checkpoint waits for the writes before it, then flushes.
    pub(super) async fn copy(
        &self,
        h: &JobHandle,
        src: &Arc<Source>,
        vol: &Volume,
        disk: usize,
        from: u64,
        write_from: u64,
    ) -> Result<Option<String>, Stop> {
        let size = src.size();
        let logical = src.logical_len();
        let cs = vol.chunk_size;
        let mut hasher = (from == 0
            && h.record()
                .import()
                .is_some_and(|i| i.request.sha256.is_some()))
        .then(Sha256::new);
        let start = from - from % cs;
        h.add_done(start.min(size));
        let runs_src = Arc::clone(src);
        let windows = futures_util::stream::try_unfold(start, move |off| {
            let src = Arc::clone(&runs_src);
            async move {
                if off >= size {
                    return Ok(None);
                }
                crate::failpoint::delay("import-window").await;
                let end = off.saturating_add(WINDOW).min(size);
                let runs = src.runs(off, (end - off) as u32).await?;
                let pieces = chunk_pieces(off, end, cs, &runs)
                    .into_iter()
                    .map(Ok::<_, Stop>);
                Ok::<_, Stop>(Some((futures_util::stream::iter(pieces), end)))
            }
        })
        .try_flatten();
        let mut reads = std::pin::pin!(
            windows
                .map(|piece| {
                    let src = Arc::clone(src);
                    async move {
                        let (o, n, data) = piece?;
                        if !data {
                            return Ok((o, n, None));
                        }
                        let r = tokio::spawn(async move { src.read(o, n as u32).await }).await;
                        match r {
                            Ok(Ok(buf)) => Ok((o, n, Some(buf))),
                            Ok(Err(e)) => Err(Stop::from(e)),
                            Err(e) => Err(Stop::Failed(format!("read task: {e}"))),
                        }
                    }
                })
                .buffered(READS_IN_FLIGHT)
        );
        let mut writes = futures_util::stream::FuturesUnordered::new();
        let write_failed =
            |e: std::io::Error| Stop::Failed(format!("write volume '{}': {e}", vol.name));
        let flush_failed =
            |e: std::io::Error| Stop::Failed(format!("flush volume '{}': {e}", vol.name));
        let mut last_ck = write_from;
        // The checkpoint being made: its offset and the flush that makes
        // every write before it durable, while the copy goes on.
        let mut flushing: Option<(u64, Flushing<'_>)> = None;
        loop {
            if h.cancel.is_cancelled() {
                return Err(Stop::Cancelled);
            }
            if self.jobs.shutdown.is_cancelled() {
                return Err(Stop::Shutdown);
            }
            let piece = tokio::select! {
                biased;
                r = async { flushing.as_mut().map(|f| f.1.as_mut()).expect("guarded").await },
                    if flushing.is_some() =>
                {
                    r.map_err(flush_failed)?;
                    let at = flushing.take().map_or(0, |f| f.0);
                    self.jobs
                        .update(h, |r| {
                            if let Some(i) = r.import_mut() {
                                i.checkpoint = Checkpoint { disk, offset: at };
                            }
                        })
                        .await
                        .map_err(Stop::failed)?;
                    crate::failpoint::hit("import-after-checkpoint");
                    continue;
                }
                // Writes next: a finished write frees its buffer and a slot.
                Some(w) = writes.next(), if !writes.is_empty() => {
                    let w: std::io::Result<()> = w;
                    w.map_err(write_failed)?;
                    continue;
                }
                p = reads.next(), if writes.len() < WRITES_IN_FLIGHT => match p {
                    Some(p) => p?,
                    None => break,
                },
            };
            let (o, n, buf) = piece;
            if let Some(hs) = hasher.as_mut() {
                // The padding of a raw file's last sector is not the image's.
                let k = n.min(logical.saturating_sub(o));
                match &buf {
                    Some(b) => hs.update(&b[..k as usize]),
                    None => hash_zeros(hs, k),
                }
            }
            if let Some(b) = buf
                && o >= write_from
                && !is_zero(&b)
            {
                writes.push(vol.write(o, b, None));
            }
            h.add_done(n);
            let off = o + n;
            if off >= last_ck.saturating_add(CHECKPOINT_EVERY) && off < size && flushing.is_none() {
                // Only the writes before `off` must be durable: wait for
                // those in flight, then flush in the background.
                while let Some(w) = writes.next().await {
                    w.map_err(write_failed)?;
                }
                flushing = Some((off, Box::pin(vol.flush())));
                last_ck = off;
            }
        }
        while let Some(w) = writes.next().await {
            w.map_err(write_failed)?;
        }
        // The caller flushes the whole volume next; a checkpoint under way
        // is only waited for, so nothing is left running on the volume.
        if let Some((_, f)) = flushing {
            f.await.map_err(flush_failed)?;
        }
        Ok(hasher.map(|hs| hex(&hs.finalize())))
    }
}

/// The chunks of `[off, end)` with whether any run says they hold data.
/// `runs` start at `off` and cover at least to `end`.
pub fn chunk_pieces(off: u64, end: u64, cs: u64, runs: &[Run]) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut c = off;
    let mut ri = 0usize;
    let mut run_start = off;
    while c < end {
        let c_end = c.saturating_add(cs).min(end);
        let mut data = false;
        // Runs overlapping [c, c_end).
        while ri < runs.len() {
            let r_end = run_start.saturating_add(runs[ri].len);
            if r_end <= c {
                run_start = r_end;
                ri += 1;
                continue;
            }
            if run_start >= c_end {
                break;
            }
            if !runs[ri].zero {
                data = true;
            }
            if r_end > c_end {
                break;
            }
            run_start = r_end;
            ri += 1;
        }
        // Bytes no run covers are read, to be safe.
        if ri >= runs.len() && run_start < c_end {
            data = true;
        }
        out.push((c, c_end - c, data));
        c = c_end;
    }
    out
}

fn hash_zeros(h: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64);
        h.update(&ZEROS[..k as usize]);
        n -= k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pieces_mark_chunks_with_data() {
        let runs = [
            Run {
                len: 100,
                zero: true,
            },
            Run {
                len: 10,
                zero: false,
            },
            Run {
                len: 1000,
                zero: true,
            },
        ];
        let p = chunk_pieces(0, 300, 100, &runs);
        assert_eq!(
            p,
            vec![(0, 100, false), (100, 100, true), (200, 100, false)]
        );
        // Not covered: read.
        let p = chunk_pieces(
            0,
            200,
            100,
            &[Run {
                len: 100,
                zero: true,
            }],
        );
        assert_eq!(p, vec![(0, 100, false), (100, 100, true)]);
    }

    #[test]
    fn zeros_and_hex() {
        assert!(is_zero(&[0u8; 10]));
        assert!(is_zero(&vec![0u8; (9 << 20) + 3]));
        assert!(!is_zero(&[0, 0, 1]));
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }

    proptest! {
        #[test]
        fn pieces_agree_with_a_byte_model(
            runs in proptest::collection::vec((1u64..300, any::<bool>()), 1..20),
            cs in 1u64..200,
        ) {
            let runs: Vec<Run> = runs.into_iter().map(|(len, zero)| Run { len, zero }).collect();
            let total: u64 = runs.iter().map(|r| r.len).sum();
            let mut model = Vec::new();
            for r in &runs {
                model.extend(std::iter::repeat_n(!r.zero, r.len as usize));
            }
            let p = chunk_pieces(0, total, cs, &runs);
            let mut at = 0;
            for (o, n, data) in p {
                prop_assert_eq!(o, at);
                let want = model[o as usize..(o + n) as usize].iter().any(|&d| d);
                prop_assert_eq!(data, want);
                at += n;
            }
            prop_assert_eq!(at, total);
        }
    }
}
