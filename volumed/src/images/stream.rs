//! A stream import: the raw bytes of a request body into a volume that
//! grows as they arrive (its files reserved ahead), zero chunks skipped.
//! It cannot resume after a restart; its volume is rolled back instead.

use std::sync::Arc;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use snapshot::hash::hex;

use super::copy::{WRITES_IN_FLIGHT, is_zero};
use super::import::{ImportJobs, Stop};
use super::registry::JobHandle;
use crate::engine::Volume;

/// A stream import's files are extended this far ahead of its data.
const STREAM_RESERVE: u64 = 1 << 30;

impl ImportJobs {
    pub(super) async fn fill_stream<S, B, E>(
        &self,
        h: &JobHandle,
        vol: &Arc<Volume>,
        mut body: S,
    ) -> Result<(), Stop>
    where
        S: futures_util::Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display + Send,
    {
        let rec = h.record();
        let Some(spec) = rec.import() else {
            return Err(Stop::Failed("the job is not an import".into()));
        };
        let req = spec.request.clone();
        let cs = vol.chunk_size as usize;
        let mut hasher = req.sha256.is_some().then(Sha256::new);
        let mut buf: Vec<u8> = Vec::with_capacity(cs);
        let mut off = 0u64;
        let mut reserved = 0u64;
        // Chunks land while the next ones arrive from the socket.
        let mut writes = futures_util::stream::FuturesUnordered::new();
        let write_failed =
            |e: std::io::Error| Stop::Failed(format!("write volume '{}': {e}", vol.name));
        loop {
            let next = tokio::select! {
                biased;
                () = h.cancel.cancelled() => return Err(Stop::Cancelled),
                () = self.jobs.shutdown.cancelled() => return Err(Stop::Shutdown),
                Some(w) = writes.next(), if !writes.is_empty() => {
                    let w: std::io::Result<()> = w;
                    w.map_err(write_failed)?;
                    continue;
                }
                n = body.next(), if writes.len() < WRITES_IN_FLIGHT => n,
            };
            let bytes = match next {
                Some(Ok(b)) => Some(b),
                Some(Err(e)) => return Err(Stop::Failed(format!("the stream broke off: {e}"))),
                None => None,
            };
            let mut data = bytes.as_ref().map_or(&[][..], |b| b.as_ref());
            let eof = bytes.is_none();
            while !data.is_empty() || (eof && !buf.is_empty()) {
                let take = (cs - buf.len()).min(data.len());
                buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                if buf.len() < cs && !eof {
                    break;
                }
                let n = buf.len() as u64;
                if let Some(hs) = hasher.as_mut() {
                    hs.update(&buf);
                }
                let end = off
                    .checked_add(n)
                    .filter(|&e| e <= volumed_api::MAX_VOLUME_SIZE)
                    .ok_or_else(|| {
                        Stop::Failed("the stream is larger than the largest volume".into())
                    })?;
                let new_size = end.next_multiple_of(512);
                let reserve = (new_size > reserved).then(|| {
                    reserved = new_size
                        .saturating_add(STREAM_RESERVE)
                        .min(volumed_api::MAX_VOLUME_SIZE);
                    reserved
                });
                if reserve.is_some() || new_size > vol.size() {
                    self.engine
                        .grow_importing(vol, &rec.id, new_size, reserve)
                        .await
                        .map_err(Stop::failed)?;
                }
                let chunk = std::mem::replace(&mut buf, Vec::with_capacity(cs));
                if !is_zero(&chunk) {
                    writes.push(vol.write(off, chunk, None));
                }
                off = end;
                h.add_done(n);
            }
            if eof {
                break;
            }
        }
        while let Some(w) = writes.next().await {
            w.map_err(write_failed)?;
        }
        if off == 0 {
            return Err(Stop::Failed("the stream was empty".into()));
        }
        let _ = self.jobs.update(h, |r| r.bytes_total = off).await;
        if let Some(hs) = hasher {
            let got = hex(&hs.finalize());
            let want = req.sha256.unwrap_or_default();
            if !want.eq_ignore_ascii_case(&got) {
                return Err(Stop::Failed(format!(
                    "sha256 mismatch: the image is {got}, expected {want}"
                )));
            }
            let _ = self
                .jobs
                .update(h, |r| {
                    if let Some(i) = r.import_mut() {
                        i.sha256 = Some(got);
                    }
                })
                .await;
        }
        Ok(())
    }
}
