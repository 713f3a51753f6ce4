//! Imports: a VM image's logical bytes copied into new volumes. The image
//! is read through `image::source` (a raw file directly, any other format
//! through qemu-nbd), chunk by chunk: holes and all-zero chunks stay `Zero`,
//! data chunks are written into the volume, reads run ahead of the writes.
//!
//! Steps, and what a crash at each leaves:
//! 1. The job record (`running`, its volumes named) is written, then the
//!    volumes are created `importing`. A volume `importing` for a job that
//!    is not running is removed at start.
//! 2. Every [`CHECKPOINT_EVERY`] bytes the volume is flushed, then the
//!    record's checkpoint moves. A restarted file import goes on from the
//!    checkpoint (rereading what it hashes); a stream import cannot be
//!    resumed, so it is rolled back: its volume removed, the job `error`.
//! 3. At the end the volumes are flushed and recorded without `importing`
//!    (now `available`), a snapshot is taken if asked, and the job ends
//!    `completed`. A failure or cancel removes the volumes instead.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use snapshot::hash::hex;
use tracing::{info, warn};
use volumed_api::{JobKind, JobState, VolumeName};

use super::registry::{JobHandle, JobRegistry};
use super::snapshot::SnapshotJobs;
use super::work::WorkDirs;
use crate::catalog::{Catalog, Checkpoint, JobRecord};
use crate::engine::registry::Registry;
use crate::engine::{Volume, VolumeDirs, remove_files_and_record};
use crate::image::inspect::Disk;
use crate::image::qemu::NbdServer;
use crate::image::source::{NbdPool, Source};
use crate::image::{ImageError, ImageFormat};

/// Bytes of the image asked about (BLOCK_STATUS or SEEK_DATA) at once.
const WINDOW: u64 = 32 << 20;
/// Reads in flight, and qemu-nbd connections (one request each).
const READS_IN_FLIGHT: usize = 16;
const NBD_CONNECTIONS: usize = 8;
/// A stream import's files are extended this far ahead of its data.
const STREAM_RESERVE: u64 = 1 << 30;
/// Writes into the volume in flight while the next reads arrive.
const WRITES_IN_FLIGHT: usize = 8;
/// The volume is flushed and the checkpoint recorded this often: a crash
/// rereads at most this much.
const CHECKPOINT_EVERY: u64 = 64 << 20;
/// How long an import waits for the snapshot it asked for.
const SNAPSHOT_POLL: Duration = Duration::from_millis(200);

/// Zeros to compare a chunk against (memcmp, even in a debug build).
static ZEROS: [u8; volumed_api::MAX_CHUNK_SIZE as usize] =
    [0; volumed_api::MAX_CHUNK_SIZE as usize];

fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// A flush of the volume, running beside the copy.
type Flushing<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send + 'a>>;

/// Why an import stopped.
enum Stop {
    /// The daemon is stopping: a file import resumes at the next start.
    Shutdown,
    Cancelled,
    Failed(String),
}

impl From<ImageError> for Stop {
    fn from(e: ImageError) -> Self {
        Stop::Failed(e.to_string())
    }
}

pub struct ImportJobs {
    catalog: Arc<Catalog>,
    volumes: Arc<Registry>,
    dirs: VolumeDirs,
    pub jobs: Arc<JobRegistry>,
    snapshot_jobs: Arc<SnapshotJobs>,
    /// Each job's private directory for qemu-nbd's socket.
    work: WorkDirs,
}

impl ImportJobs {
    pub fn new(
        catalog: Arc<Catalog>,
        volumes: Arc<Registry>,
        dirs: VolumeDirs,
        jobs: Arc<JobRegistry>,
        snapshot_jobs: Arc<SnapshotJobs>,
        work: WorkDirs,
    ) -> Self {
        ImportJobs {
            catalog,
            volumes,
            dirs,
            jobs,
            snapshot_jobs,
            work,
        }
    }

    /// Runs a file import in the background, from its checkpoint.
    pub fn spawn_file(
        self: &Arc<Self>,
        h: Arc<JobHandle>,
        disks: Vec<Disk>,
        vols: Vec<Arc<Volume>>,
    ) {
        let this = Arc::clone(self);
        self.jobs.tasks.spawn(async move {
            let r = this.fill_disks(&h, &disks, &vols).await;
            this.end(&h, &vols, r).await;
        });
    }

    /// Runs a stream import to its end; the caller awaits the answer.
    pub fn spawn_stream<S, B, E>(
        self: &Arc<Self>,
        h: Arc<JobHandle>,
        vol: Arc<Volume>,
        body: S,
    ) -> tokio::task::JoinHandle<()>
    where
        S: futures_util::Stream<Item = Result<B, E>> + Send + Unpin + 'static,
        B: AsRef<[u8]> + Send,
        E: std::fmt::Display + Send,
    {
        let this = Arc::clone(self);
        self.jobs.tasks.spawn(async move {
            let vols = [vol];
            let r = this.fill_stream(&h, &vols[0], body).await;
            this.end(&h, &vols, r).await;
        })
    }

    async fn end(&self, h: &JobHandle, vols: &[Arc<Volume>], r: Result<(), Stop>) {
        let r = match r {
            Ok(()) => self.complete(h, vols).await,
            Err(e) => Err(e),
        };
        let id = h.id();
        match r {
            Ok(()) => {
                info!(job = %id, volumes = ?vols.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
                      "import completed");
                self.jobs.finish(h, JobState::Completed, None);
            }
            Err(Stop::Shutdown) => {
                info!(job = %id, "import stopped by shutdown; it resumes at the next start");
            }
            Err(Stop::Cancelled) => {
                self.remove_volumes(&h.record()).await;
                info!(job = %id, "import cancelled; its volumes are removed");
                self.jobs.finish(h, JobState::Cancelled, None);
            }
            Err(Stop::Failed(msg)) => {
                self.remove_volumes(&h.record()).await;
                info!(job = %id, error = %msg, "import failed; its volumes are removed");
                self.jobs.finish(h, JobState::Error, Some(msg));
            }
        }
        self.work.remove(&id);
    }

    /// Flushes, makes the volumes available, and takes the snapshot asked for.
    async fn complete(&self, h: &JobHandle, vols: &[Arc<Volume>]) -> Result<(), Stop> {
        for v in vols {
            v.flush()
                .await
                .map_err(|e| Stop::Failed(format!("flush volume '{}': {e}", v.name)))?;
        }
        {
            let _guard = self.volumes.lock().await;
            for v in vols {
                v.update_record(&self.catalog, |rec| {
                    rec.importing = None;
                    rec.size = v.size();
                    Ok(())
                })
                .await
                .map_err(|e| Stop::Failed(e.to_string()))?;
            }
        }
        let req = h.record().import.unwrap_or_else(unreachable_request);
        if req.snapshot {
            for v in vols {
                let snap = self
                    .snapshot_jobs
                    .start(Arc::clone(v), req.labels.clone())
                    .await
                    .map_err(|e| Stop::Failed(format!("snapshot of '{}': {e}", v.name)))?;
                let _ = self.jobs.update(h, |r| {
                    r.snapshot.get_or_insert(snap.id.clone());
                });
                // At shutdown the snapshot job ends on its own (`error`); the
                // import is complete either way.
                while self.snapshot_jobs.is_running(&snap.id) && !self.jobs.shutdown.is_cancelled()
                {
                    tokio::time::sleep(SNAPSHOT_POLL).await;
                }
                // The volume stays: the import itself succeeded. The
                // snapshot's own record says why it failed.
                let failed = self
                    .catalog
                    .snapshots()
                    .ok()
                    .and_then(|s| s.into_iter().find(|s| s.id == snap.id))
                    .and_then(|s| s.error);
                if let Some(e) = failed {
                    warn!(snapshot = %snap.id, error = %e, "the snapshot after an import failed");
                }
            }
        }
        Ok(())
    }

    /// Removes the volumes a failed, cancelled or rolled-back import made.
    async fn remove_volumes(&self, rec: &JobRecord) {
        let _guard = self.volumes.lock().await;
        for name in &rec.volumes {
            let Ok(vol) = self.volumes.get(name) else {
                continue;
            };
            // Only a volume this job still fills: marked `deleting` through
            // its owner, which refuses if it changed hands.
            let marked = vol
                .update_record(&self.catalog, |r| {
                    if r.importing.as_deref() != Some(rec.id.as_str()) {
                        return Ok(false);
                    }
                    r.deleting = true;
                    Ok(true)
                })
                .await;
            match marked {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    warn!(volume = %name, error = %e, "could not mark the imported volume deleted");
                    continue;
                }
            }
            self.volumes.remove(&vol);
            if let Err(e) = remove_files_and_record(&self.catalog, &self.dirs, &vol.record()) {
                warn!(volume = %name, error = %e, "could not remove the imported volume; start-up finishes it");
            }
        }
    }

    async fn fill_disks(
        &self,
        h: &JobHandle,
        disks: &[Disk],
        vols: &[Arc<Volume>],
    ) -> Result<(), Stop> {
        let rec = h.record();
        let req = rec.import.clone().unwrap_or_else(unreachable_request);
        let ck = rec.checkpoint;
        let done_before: u64 = disks.iter().take(ck.disk).map(|d| d.size).sum();
        h.bytes_done
            .store(done_before, std::sync::atomic::Ordering::Relaxed);
        let dir = self
            .work
            .create(&rec.id)
            .map_err(|e| Stop::Failed(format!("create the work directory of {}: {e}", rec.id)))?;
        for (i, (disk, vol)) in disks.iter().zip(vols).enumerate().skip(ck.disk) {
            let resume_at = if i == ck.disk { ck.offset } else { 0 };
            let (src, server) = if disk.spec.format == ImageFormat::Raw && disk.spec.range.is_none()
            {
                (Source::open_file(&disk.spec.path)?, None)
            } else {
                let server = NbdServer::start(&disk.spec, &dir, NBD_CONNECTIONS)
                    .await
                    .map_err(ImageError::from)?;
                let pool = NbdPool::connect(server.socket(), "", NBD_CONNECTIONS).await?;
                (Source::Nbd(pool), Some(server))
            };
            let src = Arc::new(src);
            let hash = req.sha256.is_some();
            let r = self
                .copy(h, &src, vol, i, if hash { 0 } else { resume_at }, resume_at)
                .await;
            if let Ok(s) = Arc::try_unwrap(src) {
                s.close().await;
            }
            let said = match server {
                Some(s) => s.stop().await,
                None => None,
            };
            let digest = match r {
                Ok(d) => d,
                Err(Stop::Failed(msg)) => {
                    // qemu's own words are the better reason when it said any.
                    return Err(Stop::Failed(match said {
                        Some(q) if !q.is_empty() => format!("{msg} (qemu-nbd: {q})"),
                        _ => msg,
                    }));
                }
                Err(e) => return Err(e),
            };
            if let (Some(want), Some(got)) = (&req.sha256, digest) {
                if !want.eq_ignore_ascii_case(&got) {
                    return Err(Stop::Failed(format!(
                        "sha256 mismatch: the image is {got}, expected {want}"
                    )));
                }
                let _ = self.jobs.update(h, |r| r.sha256 = Some(got));
            }
            vol.flush()
                .await
                .map_err(|e| Stop::Failed(format!("flush volume '{}': {e}", vol.name)))?;
            self.jobs
                .update(h, |r| {
                    r.checkpoint = Checkpoint {
                        disk: i + 1,
                        offset: 0,
                    }
                })
                .map_err(|e| Stop::Failed(e.to_string()))?;
        }
        Ok(())
    }

    /// Copies disk `disk` of the image into `vol`: reads from `from` (to
    /// hash), writes from `write_from`. Returns the SHA-256 when it read
    /// from the start.
    ///
    /// One pipeline from start to end: the runs of the next window are
    /// asked for while the reads of this one are in flight, reads run
    /// [`READS_IN_FLIGHT`] ahead in order (the hash needs the order), and up
    /// to [`WRITES_IN_FLIGHT`] writes land while the next reads arrive. A
    /// checkpoint waits for the writes before it, then flushes.
    async fn copy(
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
        let mut hasher =
            (from == 0 && h.record().import.is_some_and(|r| r.sha256.is_some())).then(Sha256::new);
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
                        .update(h, |r| r.checkpoint = Checkpoint { disk, offset: at })
                        .map_err(|e| Stop::Failed(e.to_string()))?;
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
                writes.push(vol.write(o, b, false));
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

    async fn fill_stream<S, B, E>(
        &self,
        h: &JobHandle,
        vol: &Volume,
        mut body: S,
    ) -> Result<(), Stop>
    where
        S: futures_util::Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display + Send,
    {
        let req = h.record().import.unwrap_or_else(unreachable_request);
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
                if new_size > reserved {
                    reserved = new_size
                        .saturating_add(STREAM_RESERVE)
                        .min(volumed_api::MAX_VOLUME_SIZE);
                    vol.reserve(reserved)
                        .map_err(|e| Stop::Failed(format!("grow volume '{}': {e}", vol.name)))?;
                }
                if new_size > vol.size() {
                    vol.grow(new_size)
                        .map_err(|e| Stop::Failed(format!("grow volume '{}': {e}", vol.name)))?;
                }
                let chunk = std::mem::replace(&mut buf, Vec::with_capacity(cs));
                if !is_zero(&chunk) {
                    writes.push(vol.write(off, chunk, false));
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
        let _ = self.jobs.update(h, |r| r.bytes_total = off);
        if let Some(hs) = hasher {
            let got = hex(&hs.finalize());
            let want = req.sha256.unwrap_or_default();
            if !want.eq_ignore_ascii_case(&got) {
                return Err(Stop::Failed(format!(
                    "sha256 mismatch: the image is {got}, expected {want}"
                )));
            }
            let _ = self.jobs.update(h, |r| r.sha256 = Some(got));
        }
        Ok(())
    }

    /// At start: imports a previous run left running. File imports go on
    /// from their checkpoint (`reopen` inspects the image again); stream
    /// imports are rolled back; volumes of jobs no longer running go.
    pub async fn settle_interrupted<F, Fut>(self: &Arc<Self>, reopen: F)
    where
        F: Fn(JobRecord) -> Fut,
        Fut: std::future::Future<Output = Result<(Vec<Disk>, Vec<Arc<Volume>>), String>>,
    {
        for h in self.jobs.list() {
            let rec = h.record();
            if rec.state != JobState::Running {
                continue;
            }
            let stream = rec.import.as_ref().is_some_and(|r| r.source == "-");
            if rec.kind != JobKind::Import || stream {
                self.remove_volumes(&rec).await;
                let why = if stream {
                    "interrupted by a restart; a stream import cannot resume, so its volume was removed"
                } else {
                    "interrupted by a restart"
                };
                info!(job = %rec.id, "{why}");
                self.jobs.finish(&h, JobState::Error, Some(why.into()));
                continue;
            }
            match reopen(rec.clone()).await {
                Ok((disks, vols)) => {
                    info!(job = %rec.id, checkpoint = ?rec.checkpoint, "resuming an import");
                    self.spawn_file(h, disks, vols);
                }
                Err(msg) => {
                    self.remove_volumes(&rec).await;
                    self.jobs.finish(
                        &h,
                        JobState::Error,
                        Some(format!("could not resume: {msg}")),
                    );
                }
            }
        }
        // Volumes whose import is not running: left by a crash between the
        // job's end and their removal, or before the job was recorded.
        let running: BTreeMap<String, ()> = self
            .jobs
            .list()
            .into_iter()
            .map(|h| h.record())
            .filter(|r| r.state == JobState::Running)
            .map(|r| (r.id, ()))
            .collect();
        for v in self.volumes.list() {
            let rec = v.record();
            if let Some(j) = &rec.importing
                && !running.contains_key(j)
            {
                let orphan = JobRecord {
                    id: j.clone(),
                    volumes: vec![rec.name.clone()],
                    ..empty_record()
                };
                info!(volume = %rec.name, job = %j, "removing a volume whose import ended");
                self.remove_volumes(&orphan).await;
            }
        }
    }
}

fn empty_record() -> JobRecord {
    JobRecord {
        id: String::new(),
        kind: JobKind::Import,
        state: JobState::Error,
        created_at: 0,
        finished_at: None,
        import: None,
        export: None,
        format: String::new(),
        volumes: Vec::<VolumeName>::new(),
        bytes_total: 0,
        checkpoint: Checkpoint::default(),
        error: None,
        snapshot: None,
        sha256: None,
    }
}

/// An import job always carries its request; a record without one is
/// treated as one without options.
fn unreachable_request() -> volumed_api::ImportRequest {
    volumed_api::ImportRequest {
        source: String::new(),
        name: VolumeName::parse("import").expect("a valid name"),
        format: None,
        chunk_size: None,
        ephemeral: false,
        snapshot: false,
        labels: BTreeMap::new(),
        sha256: None,
    }
}

/// The chunks of `[off, end)` with whether any run says they hold data.
/// `runs` start at `off` and cover at least to `end`.
pub fn chunk_pieces(
    off: u64,
    end: u64,
    cs: u64,
    runs: &[crate::image::nbd_client::Run],
) -> Vec<(u64, u64, bool)> {
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
    use crate::image::nbd_client::Run;
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
