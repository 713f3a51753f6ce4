//! Exports: a snapshot's bytes written out as an image. A volume given as
//! the source is snapshotted first, so the export is point-in-time even
//! while the volume is attached and written.
//!
//! Raw is written by us: the manifest's chunks fetched (through the host
//! cache, each verified against its hash), 16 at a time, into a sparse file
//! (zero chunks are never written) or, for `-`, in order into the answer's
//! body. Other formats are made by `qemu-img convert -f raw` reading the
//! snapshot's read-only NBD export (a lease on it, dropped at the end).
//!
//! To a bucket (EC2's ExportImage and CreateInstanceExportTask), the bytes
//! go up as a multipart upload: raw straight from the chunks, other formats
//! through a file `qemu-img` writes in the job's work directory, an
//! instance's disks wrapped in an OVA (`export_object`).
//!
//! A job cut short (error, cancel) removes its partial destination (the
//! file, or the upload with its parts); one interrupted by a restart ends
//! `error` at the next start, its upload aborted (it is not resumed). The
//! snapshot taken of a volume is deleted at the end unless kept on request;
//! a file is given to the user who asked (`give_to`).

use std::path::{Path, PathBuf};

use std::process::Stdio;
use std::sync::Arc;

use futures_util::StreamExt;
use snapshot::SnapshotId;
use tokio::sync::mpsc;
use tracing::{info, warn};
use volumed_api::JobState;

use super::ImageFormat;
use super::buckets::Buckets;
use super::export_end::give_to;
pub use super::export_object::{ObjectSink, OvaSpec};
use super::registry::{JobHandle, JobRegistry};
use super::upload::ObjectUpload;
use super::work::WorkDirs;
use crate::catalog::{JobRecord, Requester};
use crate::engine::{Engine, SnapshotDone, SnapshotOutcome, Volume};

const FETCHES_IN_FLIGHT: usize = 16;
/// Chunk writes into a raw file in flight.
const WRITES_IN_FLIGHT: usize = 4;

/// What an export reads.
pub enum ExportSource {
    Snapshot(SnapshotId),
    /// Snapshotted first.
    Volume(Arc<Volume>),
}

/// Where an export writes.
pub enum Sink {
    File(PathBuf),
    /// The answer's body, in order; a closed receiver ends the job.
    Stream(mpsc::Sender<std::io::Result<Vec<u8>>>),
    /// An object in a bucket, written as a multipart upload.
    Object(ObjectSink),
}

/// What an export does: its sources (one, or an instance's disks for an
/// OVA), the format, and where it goes.
pub struct ExportPlan {
    pub sources: Vec<ExportSource>,
    pub format: ImageFormat,
    pub compress: bool,
    /// Keep the snapshots taken of volume sources.
    pub keep_snapshot: bool,
    /// Who a file is given to.
    pub requester: Option<Requester>,
    pub sink: Sink,
}

/// What a job leaves behind that its end must undo or keep.
#[derive(Default)]
struct Leftovers {
    /// Snapshots taken of volume sources, with how each ends.
    taken: Vec<(SnapshotId, SnapshotDone)>,
    upload: Option<ObjectUpload>,
}

pub struct ExportJobs {
    pub(super) engine: Arc<Engine>,
    pub(super) jobs: Arc<JobRegistry>,
    /// The NBD server's Unix socket, where `qemu-img` reads a lease.
    nbd_socket: PathBuf,
    /// Where a conversion bound for a bucket writes its file first.
    pub(super) work: WorkDirs,
    /// The buckets exports to S3 write to.
    pub(super) buckets: Arc<Buckets>,
}

impl ExportJobs {
    pub fn new(
        engine: Arc<Engine>,
        jobs: Arc<JobRegistry>,
        nbd_socket: PathBuf,
        work: WorkDirs,
        buckets: Arc<Buckets>,
    ) -> Self {
        ExportJobs {
            engine,
            jobs,
            nbd_socket,
            work,
            buckets,
        }
    }

    pub fn spawn(self: &Arc<Self>, h: Arc<JobHandle>, plan: ExportPlan) {
        let this = Arc::clone(self);
        self.jobs.tasks.spawn(async move {
            let dest = match &plan.sink {
                Sink::File(p) => Some(p.clone()),
                _ => None,
            };
            let (keep, requester) = (plan.keep_snapshot, plan.requester);
            let mut left = Leftovers::default();
            let r = this.run(&h, plan, &mut left).await;
            let id = h.id();
            let stopping = this.jobs.shutdown.is_cancelled();
            // At shutdown the upload is left recorded: the next start
            // aborts it (the store's retries are being cancelled now).
            if let Some(up) = left.upload.take()
                && r.is_err()
                && !stopping
            {
                match up.abort().await {
                    Ok(()) => {
                        let _ = this.jobs.update(&h, |r| set_upload(r, None)).await;
                    }
                    Err(e) => {
                        warn!(job = %id, error = %e, "could not abort the export's upload")
                    }
                }
            }
            let (work, job) = (this.work.clone(), id.clone());
            let _ = tokio::task::spawn_blocking(move || work.remove(job.as_str())).await;
            // At shutdown the snapshots are left; the next start removes them.
            if !keep && !stopping {
                this.remove_taken(&h, std::mem::take(&mut left.taken)).await;
            }
            match r {
                Ok(()) => {
                    if let (Some(d), Some(who)) = (dest, requester) {
                        let owner = give_to(d, who).await;
                        let _ = this
                            .jobs
                            .update(&h, |r| {
                                if let Some(e) = r.export_mut() {
                                    e.owner = Some(owner)
                                }
                            })
                            .await;
                    }
                    info!(job = %id, "export completed");
                    this.jobs.finish(&h, JobState::Completed, None).await;
                }
                Err(e) => {
                    if let Some(d) = dest {
                        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(d)).await;
                    }
                    let cancelled = h.cancel.is_cancelled();
                    info!(job = %id, error = %e, "export ended early");
                    if cancelled {
                        this.jobs.finish(&h, JobState::Cancelled, None).await;
                    } else if stopping {
                        // Left running in the catalog: the next start ends it.
                    } else {
                        this.jobs.finish(&h, JobState::Error, Some(e)).await;
                    }
                }
            }
        });
    }

    /// The snapshot of each source: taken now for a volume.
    async fn snapshots(
        &self,
        h: &JobHandle,
        sources: Vec<ExportSource>,
        left: &mut Leftovers,
    ) -> Result<Vec<SnapshotId>, String> {
        let mut ids = Vec::new();
        for source in sources {
            let id = match source {
                ExportSource::Snapshot(id) => id,
                ExportSource::Volume(vol) => {
                    let labels = [("export".to_owned(), h.id().to_string())]
                        .into_iter()
                        .collect();
                    let (rec, done) = self
                        .engine
                        .snapshot_for_job(vol, labels)
                        .await
                        .map_err(|e| volumed_api::error_chain(&e))?;
                    left.taken.push((rec.id.clone(), done.clone()));
                    let outcome = tokio::select! {
                        o = done.wait() => o,
                        () = h.cancel.cancelled() => return Err("stopped".into()),
                        () = self.jobs.shutdown.cancelled() => return Err("stopped".into()),
                    };
                    if let SnapshotOutcome::Failed(e) = outcome {
                        return Err(format!("snapshot {} failed: {e}", rec.id));
                    }
                    rec.id
                }
            };
            ids.push(id);
        }
        let first = ids.first().cloned();
        let _ = self.jobs.update(h, |r| r.snapshot = first).await;
        Ok(ids)
    }

    async fn run(
        &self,
        h: &JobHandle,
        plan: ExportPlan,
        left: &mut Leftovers,
    ) -> Result<(), String> {
        let ExportPlan {
            sources,
            format,
            compress,
            sink,
            ..
        } = plan;
        let ids = self.snapshots(h, sources, left).await?;
        if let Sink::Object(obj) = sink {
            return self.to_object(h, &ids, format, obj, &mut left.upload).await;
        }
        let [id] = ids.as_slice() else {
            return Err("only an export to a bucket takes several disks".into());
        };
        let m = self
            .engine
            .repo()
            .open_manifest(id)
            .await
            .map_err(|e| format!("read snapshot {id}: {e}"))?;
        let _ = self
            .jobs
            .update(h, |r| r.bytes_total = m.header().size)
            .await;
        match (format, sink) {
            (ImageFormat::Raw, sink) => {
                let m = m
                    .materialize()
                    .await
                    .map_err(|e| format!("read snapshot {id}: {e}"))?;
                self.write_raw(h, &m, sink).await
            }
            (_, Sink::File(dest)) => {
                let size = m.header().size;
                drop(m);
                self.convert_snapshot(h, id, format, compress, &dest, size)
                    .await
            }
            (_, _) => Err("only raw goes to stdout".into()),
        }
    }

    /// `qemu-img convert` of snapshot `id`, read over a lease on its NBD
    /// export, into file `dest`.
    pub(super) async fn convert_snapshot(
        &self,
        h: &JobHandle,
        id: &SnapshotId,
        fmt: ImageFormat,
        compress: bool,
        dest: &Path,
        size: u64,
    ) -> Result<(), String> {
        let lease = self.engine.lease_snapshot_export(id).await.map_err(|e| {
            format!(
                "export snapshot {id} over NBD: {}",
                volumed_api::error_chain(&e)
            )
        })?;
        let uri =
            nbd_proto::Uri::unix(&self.nbd_socket, lease.snapshot().as_str(), false).to_string();
        // qemu-img is killed when this future is dropped; the lease ends
        // when `lease` goes.
        let r = tokio::select! {
            r = convert(h, &uri, fmt, compress, dest, size) => r,
            () = self.jobs.shutdown.cancelled() => Err("stopped".into()),
            () = h.cancel.cancelled() => Err("stopped".into()),
        };
        drop(lease);
        r
    }

    /// The snapshot's bytes into a sparse file or, in order, a stream.
    async fn write_raw(
        &self,
        h: &JobHandle,
        m: &snapshot::Manifest,
        sink: Sink,
    ) -> Result<(), String> {
        let size = m.header.size;
        let cs = m.header.chunk_size;
        let chunk_len = |i: u64| cs.min(size - i * cs);
        match sink {
            Sink::File(path) => {
                let p = path.clone();
                let f = tokio::task::spawn_blocking(move || {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&p)
                        .map_err(|e| format!("create {}: {e}", p.display()))?;
                    f.set_len(size)
                        .map_err(|e| format!("size {}: {e}", p.display()))?;
                    Ok::<_, String>(f)
                })
                .await
                .map_err(|e| e.to_string())??;
                let f = Arc::new(f);
                let mut fetches = futures_util::stream::iter(m.hashed().iter().copied())
                    .map(|(i, hash)| {
                        let fetcher = Arc::clone(self.engine.fetcher());
                        async move { (i, fetcher.get(&hash).await) }
                    })
                    .buffer_unordered(FETCHES_IN_FLIGHT);
                let zero_bytes = size - m.hashed().iter().map(|(i, _)| chunk_len(*i)).sum::<u64>();
                h.add_done(zero_bytes);
                // Chunks are written in any order, several at once, while
                // the next ones are fetched.
                let mut writes = futures_util::stream::FuturesUnordered::new();
                let written = |r: Result<std::io::Result<u64>, tokio::task::JoinError>| {
                    let n = r
                        .map_err(|e| e.to_string())?
                        .map_err(|e| format!("write {}: {e}", path.display()))?;
                    h.add_done(n);
                    Ok::<_, String>(())
                };
                loop {
                    if h.cancel.is_cancelled() || self.jobs.shutdown.is_cancelled() {
                        return Err("stopped".into());
                    }
                    let (i, data) = tokio::select! {
                        biased;
                        Some(r) = writes.next(), if !writes.is_empty() => {
                            written(r)?;
                            continue;
                        }
                        next = fetches.next(), if writes.len() < WRITES_IN_FLIGHT => match next {
                            Some(x) => x,
                            None => break,
                        },
                    };
                    let data = data
                        .map_err(|e| format!("read chunk {i} of snapshot {}: {e}", m.header.id))?;
                    let f = Arc::clone(&f);
                    writes.push(tokio::task::spawn_blocking(move || {
                        use std::os::unix::fs::FileExt;
                        f.write_all_at(&data, i * cs).map(|()| data.len() as u64)
                    }));
                }
                while let Some(r) = writes.next().await {
                    written(r)?;
                }
                let f2 = Arc::clone(&f);
                tokio::task::spawn_blocking(move || f2.sync_all())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("sync {}: {e}", path.display()))?;
                Ok(())
            }
            Sink::Object(_) => Err("an export to a bucket is written by to_object".into()),
            Sink::Stream(tx) => {
                let mut fetches = chunks_in_order(Arc::clone(self.engine.fetcher()), m)
                    .map(|r| r.map(|(n, d)| d.map_or_else(|| vec![0u8; n as usize], Vec::from)));
                while let Some(data) = fetches.next().await {
                    if h.cancel.is_cancelled() || self.jobs.shutdown.is_cancelled() {
                        return Err("stopped".into());
                    }
                    let data = match data {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = tx.send(Err(std::io::Error::other(e.clone()))).await;
                            return Err(e);
                        }
                    };
                    let n = data.len() as u64;
                    tokio::select! {
                        r = tx.send(Ok(data)) => r.map_err(|_| "the reader went away".to_owned())?,
                        () = self.jobs.shutdown.cancelled() => return Err("stopped".into()),
                        () = h.cancel.cancelled() => return Err("stopped".into()),
                    }
                    h.add_done(n);
                }
                Ok(())
            }
        }
    }
}

/// A snapshot's chunks in order, fetched [`FETCHES_IN_FLIGHT`] ahead: each
/// as its length and its bytes (`None`: a hole, zeros). Shared by the raw
/// stream of a download and the raw upload to a bucket.
pub(super) fn chunks_in_order(
    fetcher: Arc<snapshot::cache::Fetcher>,
    m: &snapshot::Manifest,
) -> impl futures_util::Stream<Item = Result<(u64, Option<bytes::Bytes>), String>> + '_ {
    let (size, cs) = (m.header.size, m.header.chunk_size);
    futures_util::stream::iter(0..m.chunk_count())
        .map(move |i| {
            let fetcher = Arc::clone(&fetcher);
            let hash = m.get(i);
            let n = cs.min(size - i * cs);
            async move {
                match hash {
                    None => Ok((n, None)),
                    Some(hash) => fetcher
                        .get(&hash)
                        .await
                        .map(|d| (n, Some(d)))
                        .map_err(|e| format!("read chunk {i} of snapshot {}: {e}", m.header.id)),
                }
            }
        })
        .buffered(FETCHES_IN_FLIGHT)
}

/// `qemu-img convert` of the snapshot's NBD export into `fmt`: VMDK stream-optimized, VHD
/// fixed with `force_size` (what AWS and Azure accept), qcow2 optionally
/// zstd-compressed.
async fn convert(
    h: &JobHandle,
    uri: &str,
    fmt: ImageFormat,
    compress: bool,
    dest: &Path,
    total: u64,
) -> Result<(), String> {
    let mut args: Vec<String> = vec!["convert".into(), "-p".into(), "-f".into(), "raw".into()];
    args.extend(["-O".into(), fmt.to_string()]);
    match fmt {
        ImageFormat::Vmdk => args.extend(["-o".into(), "subformat=streamOptimized".into()]),
        ImageFormat::Vpc => args.extend(["-o".into(), "subformat=fixed,force_size=on".into()]),
        ImageFormat::Qcow2 if compress => {
            args.extend(["-c".into(), "-o".into(), "compression_type=zstd".into()])
        }
        _ => {}
    }
    args.push(uri.to_owned());
    args.push(dest.display().to_string());
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = crate::child::spawn(cmd, None)
        .await
        .map_err(|e| format!("qemu-img: {e} (install qemu-utils to export {fmt})"))?;
    // `-p` prints "(12.34/100%)" as it goes: the job's progress, of
    // `total` bytes for this disk.
    if let Some(mut stdout) = child.stdout.take() {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        let mut done = 0u64;
        while let Ok(n) = stdout.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&buf[..n]);
            if let Some(pct) = text
                .rsplit('(')
                .next()
                .and_then(|t| t.split('/').next())
                .and_then(|p| p.trim().parse::<f64>().ok())
            {
                let now = ((pct / 100.0) * total as f64) as u64;
                if now > done {
                    h.add_done(now - done);
                    done = now;
                }
            }
        }
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("qemu-img: {e}"))?;
    if !out.status.success() {
        let d = dest.to_owned();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(d)).await;
        return Err(format!(
            "qemu-img convert: {}",
            super::qemu::one_line("qemu-img", &out.stderr)
        ));
    }
    Ok(())
}

/// Records (or clears) the multipart upload in progress.
pub(super) fn set_upload(r: &mut JobRecord, upload: Option<String>) {
    if let Some(e) = r.export_mut() {
        e.upload = upload;
    }
}
