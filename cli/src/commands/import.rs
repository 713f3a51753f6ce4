//! `vol import`: a file the daemon reads, or `-` streamed from stdin; a
//! progress bar until the volume is ready, or the job id with `--no-wait`.

use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::Method;
use hyper::body::{Bytes, Frame};
use volumed_api::{ImportRequest, Job, JobState, Volume, VolumeList, format_size};

use crate::client::Client;
use crate::output::Out;

/// Bytes of stdin per body frame.
const FRAME: usize = 1 << 20;

pub async fn import(
    client: &Client,
    out: &Out,
    mut req: ImportRequest,
    no_wait: bool,
) -> anyhow::Result<()> {
    if req.source == "-" {
        return import_stdin(client, out, req).await;
    }
    // The daemon reads the file, from its own working directory: send an
    // absolute path.
    let path = std::path::Path::new(&req.source);
    if !path.is_absolute() {
        req.source = std::env::current_dir()?.join(path).display().to_string();
    }
    let job: Job = client.send(Method::POST, "/v1/imports", &req).await?;
    if no_wait {
        return if out.json {
            Ok(out.json(&job)?)
        } else {
            Ok(out.line(&job.id)?)
        };
    }
    let job = wait(client, out, job).await?;
    finish(client, out, &job).await
}

/// Follows the job's event stream with a progress bar until it ends (the
/// daemon sends its final state at once); an error if it did not complete.
/// If the stream breaks off (the daemon is stopping), polls instead.
pub async fn wait(client: &Client, out: &Out, mut job: Job) -> anyhow::Result<Job> {
    let bar = if out.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(job.bytes_total)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("{} {}", job.kind.as_str(), job.id));
    let show = |job: &Job| {
        bar.set_length(job.bytes_total);
        bar.set_position(job.bytes_done);
    };
    let mut line: Vec<u8> = Vec::new();
    // A broken stream is not an error of the job: the polling below asks.
    let _ = client
        .get_stream(&format!("/v1/jobs/{}/events", job.id), |data| {
            line.extend_from_slice(data);
            while let Some(nl) = line.iter().position(|&b| b == b'\n') {
                if let Ok(j) = serde_json::from_slice::<Job>(&line[..nl]) {
                    show(&j);
                    job = j;
                }
                line.drain(..=nl);
            }
            Ok(())
        })
        .await;
    // The event stream broke off: ask.
    let mut poll = super::Poll::new();
    while job.state == JobState::Running {
        poll.sleep().await;
        job = client.get(&format!("/v1/jobs/{}", job.id)).await?;
        show(&job);
    }
    bar.finish_and_clear();
    if job.state != JobState::Completed {
        anyhow::bail!(
            "{} {} {}: {}",
            job.kind.as_str(),
            job.id,
            job.state.as_str(),
            job.error.as_deref().unwrap_or("stopped")
        );
    }
    Ok(job)
}

/// Prints the imported volume (or volumes, for an OVA).
async fn finish(client: &Client, out: &Out, job: &Job) -> anyhow::Result<()> {
    let mut vols: Vec<Volume> = Vec::new();
    for name in &job.volumes {
        vols.push(client.get(&format!("/v1/volumes/{name}")).await?);
    }
    if out.json {
        match vols.len() {
            1 => out.json(&vols[0])?,
            _ => out.json(&VolumeList { volumes: vols })?,
        }
        return Ok(());
    }
    for v in &vols {
        out.line(format!(
            "imported '{}': {}, {} allocated",
            v.name,
            format_size(v.size),
            format_size(v.allocated_bytes)
        ))?;
    }
    if let Some(s) = &job.snapshot {
        out.line(format!("snapshot {s}"))?;
    }
    Ok(())
}

/// Stdin as a request body: a thread reads it and hands frames over.
struct StdinBody {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
}

impl hyper::body::Body for StdinBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// Up to [`FRAME`] bytes, fewer only at the end of the input. A pipe hands
/// over at most its buffer per read; whole frames mean fewer, larger
/// writes to the daemon.
fn read_frame(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(FRAME);
    // `take` + `read_to_end` fills the capacity without zeroing it first.
    r.take(FRAME as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// A pipe on stdin gets a buffer as large as a frame (best effort: an
/// unprivileged user may be capped by /proc/sys/fs/pipe-max-size), so the
/// writer on the other side is switched out 16 times less often than with
/// the default 64 KiB.
fn widen_pipe(stdin: &impl std::os::fd::AsRawFd) {
    // SAFETY: F_SETPIPE_SZ takes an int and only changes the pipe's buffer;
    // on anything that is not a pipe it fails with EBADF/EINVAL, ignored.
    unsafe {
        libc::fcntl(stdin.as_raw_fd(), libc::F_SETPIPE_SZ, FRAME as libc::c_int);
    }
}

/// Frames come from malloc's arenas and freed ones are reused: with glibc's
/// defaults each 1 MiB frame was a fresh mmap, paying a page fault and the
/// kernel's zeroing per 4 KiB, the larger part of this process's CPU.
fn keep_frames() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; a refused value
    // (returns 0) leaves the default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 * FRAME as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 * FRAME as libc::c_int);
    }
}

async fn import_stdin(client: &Client, out: &Out, req: ImportRequest) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let bar = if out.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {spinner} {bytes} ({bytes_per_sec})")
            .expect("a valid template"),
    );
    bar.set_message(format!("import - '{}'", req.name));
    let counter = bar.clone();
    keep_frames();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        widen_pipe(&stdin);
        loop {
            match read_frame(&mut stdin) {
                Ok(buf) if buf.is_empty() => break,
                Ok(buf) => {
                    counter.inc(buf.len() as u64);
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    let header = serde_json::to_string(&req)?;
    let job: Result<Job, _> = client
        .post_stream(
            "/v1/imports/stream",
            ("x-volumed-import", header),
            StdinBody { rx },
        )
        .await;
    bar.finish_and_clear();
    let job = job?;
    finish(client, out, &job).await
}
