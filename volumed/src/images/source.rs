//! One reader over an image's logical bytes: a raw file read directly
//! (allocation from SEEK_DATA/SEEK_HOLE), or qemu-nbd's export through a
//! pool of our NBD connections (allocation from BLOCK_STATUS). Either way a
//! reader asks for runs (data or zero) and for chunks of bytes.

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use super::ImageError;
use super::nbd_client::{MAX_READ, NbdConn, Run};

pub enum Source {
    File(Arc<std::fs::File>, u64),
    Nbd(NbdPool),
}

/// Connections to one export; each carries one request at a time, so the
/// pool's size is the number of reads in flight.
pub struct NbdPool {
    conns: Mutex<Vec<NbdConn>>,
    permits: Semaphore,
    size: u64,
}

impl NbdPool {
    pub async fn connect(socket: &Path, name: &str, n: usize) -> Result<Self, ImageError> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(connect_retrying(socket, name).await?);
        }
        let size = conns[0].size;
        Ok(NbdPool {
            conns: Mutex::new(conns),
            permits: Semaphore::new(n),
            size,
        })
    }

    async fn with<T>(
        &self,
        f: impl AsyncFnOnce(&mut NbdConn) -> Result<T, super::nbd_client::NbdError>,
    ) -> Result<T, ImageError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let mut conn = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .expect("a permit guarantees a connection");
        let r = f(&mut conn).await;
        // A connection that failed mid-reply is out of step: it is dropped,
        // and so is the job, which fails with this error.
        if r.is_ok() {
            self.conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        }
        Ok(r?)
    }

    pub async fn close(self) {
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for c in conns {
            c.disconnect().await;
        }
    }
}

/// qemu-nbd's socket file exists a moment before it listens: a refused
/// connection is tried again for up to a second.
async fn connect_retrying(socket: &Path, name: &str) -> Result<NbdConn, ImageError> {
    let mut tries = 0;
    loop {
        match NbdConn::connect(socket, name).await {
            Err(super::nbd_client::NbdError::Io(e))
                if tries < 50
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) =>
            {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            r => return Ok(r?),
        }
    }
}

impl Source {
    pub fn open_file(path: &Path) -> Result<Self, ImageError> {
        let f = std::fs::File::open(path).map_err(|source| ImageError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let len = f
            .metadata()
            .map_err(|source| ImageError::Open {
                path: path.display().to_string(),
                source,
            })?
            .len();
        Ok(Source::File(Arc::new(f), len))
    }

    /// The image's bytes; a raw file's last partial sector reads as zeros.
    pub fn size(&self) -> u64 {
        match self {
            Source::File(_, len) => len.next_multiple_of(512),
            Source::Nbd(p) => p.size,
        }
    }

    /// The image's logical length: a raw file's own length, unrounded (what
    /// `--sha256` hashes).
    pub fn logical_len(&self) -> u64 {
        match self {
            Source::File(_, len) => *len,
            Source::Nbd(p) => p.size,
        }
    }

    /// Runs covering `[offset, offset + len)` (`len` ≤ 4 GiB - 1), in order;
    /// the last may end past it.
    pub async fn runs(&self, offset: u64, len: u32) -> Result<Vec<Run>, ImageError> {
        match self {
            Source::Nbd(p) => {
                let mut out = Vec::new();
                let mut at = offset;
                let end = offset + u64::from(len);
                while at < end {
                    let n = (end - at) as u32;
                    let runs = p.with(async |c| c.block_status(at, n).await).await?;
                    for r in runs {
                        at += r.len;
                        out.push(r);
                    }
                }
                Ok(out)
            }
            Source::File(f, file_len) => {
                let f = Arc::clone(f);
                let file_len = *file_len;
                tokio::task::spawn_blocking(move || file_runs(&f, file_len, offset, len))
                    .await
                    .expect("file_runs does not panic")
                    .map_err(|source| ImageError::Read { offset, source })
            }
        }
    }

    /// The bytes of `[offset, offset + len)`, `len` ≤ 4 MiB.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ImageError> {
        debug_assert!(len <= MAX_READ);
        match self {
            Source::Nbd(p) => p.with(async |c| c.read(offset, len).await).await,
            Source::File(f, _) => {
                let f = Arc::clone(f);
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    let mut done = 0usize;
                    while done < buf.len() {
                        match f.read_at(&mut buf[done..], offset + done as u64) {
                            // Past the end: the partial sector's zeros.
                            Ok(0) => break,
                            Ok(n) => done += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(buf)
                })
                .await
                .expect("a read does not panic")
                .map_err(|source| ImageError::Read { offset, source })
            }
        }
    }

    pub async fn close(self) {
        if let Source::Nbd(p) = self {
            p.close().await;
        }
    }
}

/// Data and hole runs of a file from SEEK_DATA/SEEK_HOLE; past the file's
/// end everything is zero.
fn file_runs(f: &std::fs::File, file_len: u64, offset: u64, len: u32) -> std::io::Result<Vec<Run>> {
    let end = offset + u64::from(len);
    let mut out = Vec::new();
    let mut at = offset;
    let fd = f.as_raw_fd();
    let seek = |pos: u64, whence| -> std::io::Result<Option<u64>> {
        let Ok(p) = i64::try_from(pos) else {
            return Ok(None);
        };
        // SAFETY: lseek on a descriptor this function's caller keeps open;
        // it reads no memory of ours.
        let r = unsafe { libc::lseek(fd, p, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `pos`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    };
    while at < end {
        if at >= file_len {
            out.push(Run {
                len: end - at,
                zero: true,
            });
            break;
        }
        let data = seek(at, libc::SEEK_DATA)?.unwrap_or(file_len).min(end);
        if data > at {
            out.push(Run {
                len: data - at,
                zero: true,
            });
            at = data;
            continue;
        }
        let hole = seek(at, libc::SEEK_HOLE)?.unwrap_or(file_len).min(end);
        let hole = hole.max(at + 1);
        out.push(Run {
            len: hole - at,
            zero: false,
        });
        at = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_runs_follow_holes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_at(&[1u8; 4096], 1 << 20).unwrap();
        f.sync_all().unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let runs = file_runs(&f, 4 << 20, 0, 4 << 20).unwrap();
        let total: u64 = runs.iter().map(|r| r.len).sum();
        assert_eq!(total, 4 << 20);
        let data: u64 = runs.iter().filter(|r| !r.zero).map(|r| r.len).sum();
        assert!((4096..(4 << 20)).contains(&data), "{runs:?}");
        // The first run is the hole before the data.
        assert!(runs[0].zero && runs[0].len <= 1 << 20);
        // Past the end of the file is zero.
        let past = file_runs(&f, 4 << 20, 4 << 20, 4096).unwrap();
        assert_eq!(
            past,
            vec![Run {
                len: 4096,
                zero: true
            }]
        );
    }
}
