//! `vol import`: a file the daemon reads, or `-` streamed from stdin; a
//! progress bar until the volume is ready, or the job id with `--no-wait`.

use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Method;
use hyper::body::{Bytes, Frame};
use volumed_api::{ImportRequest, Job, JobState, Volume, VolumeList, format_size};

use crate::client::Client;
use crate::output::Out;

/// How often a waiting `vol` asks for the job's progress.
const POLL: Duration = Duration::from_millis(250);
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

/// Polls the job with a progress bar until it ends; an error if it did not
/// complete.
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
    while job.state == JobState::Running {
        tokio::time::sleep(POLL).await;
        job = client.get(&format!("/v1/jobs/{}", job.id)).await?;
        bar.set_length(job.bytes_total);
        bar.set_position(job.bytes_done);
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
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut buf = vec![0u8; FRAME];
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    counter.inc(n as u64);
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
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
