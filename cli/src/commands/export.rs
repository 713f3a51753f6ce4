//! `vol export`: a snapshot (or a volume, snapshotted first) to an image
//! file the daemon writes, or raw to stdout with `-`.

use std::io::Write;

use hyper::Method;
use volumed_api::{ExportRequest, Job, format_size};

use crate::client::Client;
use crate::output::Out;

pub async fn export(
    client: &Client,
    out: &Out,
    mut req: ExportRequest,
    no_wait: bool,
) -> anyhow::Result<()> {
    if req.destination == "-" {
        let stdout = std::io::stdout();
        let mut w = stdout.lock();
        let r = client
            .download("/v1/exports", &req, |data| match w.write_all(data) {
                // A closed pipe (`| head`) ends the download quietly.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => r,
            })
            .await;
        w.flush().ok();
        return Ok(r?);
    }
    let path = std::path::Path::new(&req.destination);
    if !path.is_absolute() {
        req.destination = std::env::current_dir()?.join(path).display().to_string();
    }
    let job: Job = client.send(Method::POST, "/v1/exports", &req).await?;
    if no_wait {
        return if out.json {
            Ok(out.json(&job)?)
        } else {
            Ok(out.line(&job.id)?)
        };
    }
    let job = super::import::wait(client, out, job).await?;
    if out.json {
        return Ok(out.json(&job)?);
    }
    out.line(format!(
        "exported {} to {} ({}, {})",
        job.snapshot.as_deref().unwrap_or(&job.source),
        job.destination.as_deref().unwrap_or(""),
        job.format,
        format_size(job.bytes_total)
    ))?;
    if let Some(owner) = &job.owner {
        out.line(format!("the file is owned by {owner}"))?;
    }
    match (job.snapshot_kept, job.snapshot.as_deref()) {
        (Some(true), Some(s)) => out.line(format!("kept snapshot {s}"))?,
        (Some(false), Some(s)) => out.line(format!(
            "deleted snapshot {s}, taken for the export (--keep-snapshot keeps it)"
        ))?,
        _ => {}
    }
    Ok(())
}
