//! Exports to a bucket: the object goes up as one multipart upload, started
//! before any conversion (so a missing bucket or a refusal ends the job at
//! once) and recorded in the job before its first part. Raw is streamed
//! from the snapshot's chunks in order; other formats are converted by
//! `qemu-img` into the job's work directory first (a stream-optimized VMDK
//! needs a seekable file) and uploaded from there; an instance's disks go
//! into an OVA, the descriptor first.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use snapshot::{SnapshotId, StoreError};

use super::ImageFormat;
use super::buckets::Bucket;
use super::export::{ExportJobs, chunks_in_order, set_upload};
use super::ova::{self, OvaDisk};
use super::registry::JobHandle;
use super::upload::ObjectUpload;

/// A store error of the upload as the job's message, naming bucket and key.
type Failed<'a> = dyn Fn(StoreError) -> String + Sync + 'a;

/// Bytes read from a converted file per write to the upload.
const FILE_READ: usize = 4 << 20;

/// The object an export writes.
pub struct ObjectSink {
    pub bucket: Bucket,
    pub key: String,
    /// Wraps the disks in an OVA.
    pub ova: Option<OvaSpec>,
}

/// What an OVA's descriptor says about the machine.
pub struct OvaSpec {
    /// The appliance's name and its members' stem (the task id).
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
}

impl ExportJobs {
    /// Writes the snapshots `ids` as one object: a disk image, or an OVA.
    pub(super) async fn to_object(
        &self,
        h: &JobHandle,
        ids: &[SnapshotId],
        format: ImageFormat,
        obj: ObjectSink,
        upload_slot: &mut Option<ObjectUpload>,
    ) -> Result<(), String> {
        // A refusal names the bucket and the key: "S3 bucket \"b\" does
        // not exist", "access to S3 object s3://b/k was denied (...)".
        let failed = |e: StoreError| obj.bucket.error(&obj.key, e).to_string();
        let mut sizes = Vec::new();
        for id in ids {
            let hdr = self
                .engine
                .snapshot_header(id)
                .await
                .map_err(|e| format!("read snapshot {id}: {}", volumed_api::error_chain(&e)))?;
            sizes.push(hdr.size);
        }
        let total: u64 = sizes.iter().sum();
        let _ = self.jobs.update(h, |r| r.bytes_total = total).await;
        // The bucket must exist (some S3 servers would make it on the first
        // write): a listing of the key finds out, through the same retries.
        obj.bucket.store().list(&obj.key).await.map_err(&failed)?;
        let up = ObjectUpload::start(Arc::clone(obj.bucket.store()), &obj.key, total)
            .await
            .map_err(failed)?;
        let upload_id = up.id().to_owned();
        let _ = self
            .jobs
            .update(h, |r| set_upload(r, Some(upload_id)))
            .await;
        let up = upload_slot.insert(up);
        match (&obj.ova, ids) {
            (None, [id]) if format == ImageFormat::Raw => self.raw_to(h, id, up, &failed).await?,
            (None, [id]) => {
                let dir = self.work_dir(h).await?;
                let file = dir.join(format!("disk.{}", extension(format)));
                // Converting counts for half the progress, uploading for
                // the other half.
                let half = sizes[0] / 2;
                self.convert_snapshot(h, id, format, false, &file, half)
                    .await?;
                file_to(h, &file, up, false, sizes[0] - half, &failed).await?;
            }
            (None, _) => return Err("several disks go into an OVA only".into()),
            (Some(spec), ids) => self.ova_to(h, ids, &sizes, spec, up, &failed).await?,
        }
        if h.cancel.is_cancelled() || self.jobs.shutdown.is_cancelled() {
            return Err("stopped".into());
        }
        let up = upload_slot.take().expect("inserted above");
        up.finish().await.map_err(failed)?;
        let _ = self.jobs.update(h, |r| set_upload(r, None)).await;
        Ok(())
    }

    async fn work_dir(&self, h: &JobHandle) -> Result<PathBuf, String> {
        let (work, id) = (self.work.clone(), h.id());
        blocking(move || work.create(id.as_str()))
            .await
            .map_err(|e| format!("create the job's work directory: {e}"))
    }

    /// The snapshot's bytes in order, holes as zeros.
    async fn raw_to(
        &self,
        h: &JobHandle,
        id: &SnapshotId,
        up: &mut ObjectUpload,
        failed: &Failed<'_>,
    ) -> Result<(), String> {
        let m = self
            .engine
            .repo()
            .open_manifest(id)
            .await
            .map_err(|e| format!("read snapshot {id}: {e}"))?
            .materialize()
            .await
            .map_err(|e| format!("read snapshot {id}: {e}"))?;
        let mut fetches = chunks_in_order(Arc::clone(self.engine.fetcher()), &m);
        while let Some(next) = fetches.next().await {
            if h.cancel.is_cancelled() || self.jobs.shutdown.is_cancelled() {
                return Err("stopped".into());
            }
            let (n, data) = next?;
            let sent = match data {
                None => up.write_zeros(n).await,
                Some(d) => up.write(&d).await,
            };
            sent.map_err(failed)?;
            h.add_done(n);
        }
        Ok(())
    }

    /// Each disk as a stream-optimized VMDK, then the archive: descriptor,
    /// disks, end.
    async fn ova_to(
        &self,
        h: &JobHandle,
        ids: &[SnapshotId],
        sizes: &[u64],
        spec: &OvaSpec,
        up: &mut ObjectUpload,
        failed: &Failed<'_>,
    ) -> Result<(), String> {
        let dir = self.work_dir(h).await?;
        let mut disks = Vec::new();
        for (i, (id, size)) in ids.iter().zip(sizes).enumerate() {
            let name = format!("{}-disk{}.vmdk", spec.name, i + 1);
            let file = dir.join(&name);
            self.convert_snapshot(h, id, ImageFormat::Vmdk, false, &file, size / 2)
                .await?;
            let f = file.clone();
            let len = blocking(move || std::fs::metadata(f).map(|m| m.len()))
                .await
                .map_err(|e| format!("stat {}: {e}", file.display()))?;
            disks.push(OvaDisk {
                file: name,
                file_size: len,
                capacity: *size,
            });
        }
        let now = crate::catalog::unix_now();
        let ovf = ova::descriptor(&spec.name, &disks, spec.cpus, spec.memory_mib);
        let put = failed;
        let ovf_name = format!("{}.ovf", spec.name);
        up.write(&ova::header(&ovf_name, ovf.len() as u64, now))
            .await
            .map_err(put)?;
        up.write(ovf.as_bytes()).await.map_err(put)?;
        up.write_zeros(ova::padding(ovf.len() as u64))
            .await
            .map_err(put)?;
        for d in &disks {
            up.write(&ova::header(&d.file, d.file_size, now))
                .await
                .map_err(put)?;
            file_to(
                h,
                &dir.join(&d.file),
                up,
                true,
                d.capacity - d.capacity / 2,
                failed,
            )
            .await?;
            up.write_zeros(ova::padding(d.file_size))
                .await
                .map_err(put)?;
        }
        up.write(&ova::END).await.map_err(put)?;
        Ok(())
    }
}

/// Appends file `path` to the upload, a few MiB at a time, counting
/// `share` bytes of the job's progress over the file; `remove` drops the
/// file once sent (an OVA's disks, so the work directory holds at most the
/// ones not yet sent).
async fn file_to(
    h: &JobHandle,
    path: &Path,
    up: &mut ObjectUpload,
    remove: bool,
    share: u64,
    failed: &Failed<'_>,
) -> Result<(), String> {
    use std::io::Read;
    let p = path.to_owned();
    let (mut f, len) = blocking(move || {
        let f = std::fs::File::open(p)?;
        let len = f.metadata()?.len();
        Ok((f, len))
    })
    .await
    .map_err(|e| format!("open {}: {e}", path.display()))?;
    let (mut sent, mut counted) = (0u64, 0u64);
    loop {
        if h.cancel.is_cancelled() {
            return Err("stopped".into());
        }
        let (buf, file) = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; FILE_READ];
            let mut n = 0;
            while n < buf.len() {
                match f.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return (Err(e), f),
                }
            }
            buf.truncate(n);
            (Ok(buf), f)
        })
        .await
        .map_err(|e| e.to_string())?;
        f = file;
        let buf = buf.map_err(|e| format!("read {}: {e}", path.display()))?;
        if buf.is_empty() {
            break;
        }
        up.write(&buf).await.map_err(failed)?;
        sent += buf.len() as u64;
        let now = (u128::from(sent.min(len)) * u128::from(share))
            .checked_div(u128::from(len))
            .map_or(share, |n| n as u64);
        h.add_done(now - counted);
        counted = now;
    }
    if remove {
        let p = path.to_owned();
        let _ = blocking(move || std::fs::remove_file(p)).await;
    }
    Ok(())
}

/// The file extension of an image in `format`, as AWS names its exports.
pub fn extension(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Raw => "raw",
        ImageFormat::Vmdk => "vmdk",
        ImageFormat::Vpc => "vhd",
        ImageFormat::Qcow2 => "qcow2",
        ImageFormat::Vhdx => "vhdx",
        ImageFormat::Ova => "ova",
    }
}

/// File work on the blocking pool, its join error as an I/O error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}
