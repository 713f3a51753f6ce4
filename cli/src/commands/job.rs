//! `vol job list`, `inspect`, `cancel`.

use hyper::Method;
use volumed_api::{Job, JobList, format_size};

use crate::args::JobCommand;
use crate::client::Client;
use crate::output::Out;

pub async fn run(client: &Client, out: &Out, cmd: JobCommand) -> anyhow::Result<()> {
    match cmd {
        JobCommand::List => {
            let list: JobList = client.get("/v1/jobs").await?;
            if out.json {
                return Ok(out.json(&list)?);
            }
            let rows: Vec<Vec<String>> = list
                .jobs
                .iter()
                .map(|j| {
                    vec![
                        j.id.clone(),
                        j.kind.as_str().into(),
                        j.state.as_str().into(),
                        progress(j),
                        j.volume.clone().unwrap_or_default(),
                        source(j),
                    ]
                })
                .collect();
            Ok(out.table(
                &["ID", "KIND", "STATE", "PROGRESS", "VOLUME", "SOURCE"],
                &rows,
            )?)
        }
        JobCommand::Inspect { id } => {
            let j: Job = client.get(&format!("/v1/jobs/{}", checked(&id)?)).await?;
            if out.json {
                return Ok(out.json(&j)?);
            }
            let mut fields = vec![
                ("id", j.id.clone()),
                ("kind", j.kind.as_str().into()),
                ("state", j.state.as_str().into()),
                ("progress", progress(&j)),
                ("volumes", j.volumes.join(", ")),
                ("source", j.source.clone()),
                ("format", j.format.clone()),
                ("created", j.created_at.clone()),
            ];
            if let Some(d) = &j.destination {
                fields.push(("destination", d.clone()));
            }
            if let Some(o) = &j.owner {
                fields.push(("owner", o.clone()));
            }
            if let Some(s) = &j.snapshot {
                let s = match j.snapshot_kept {
                    Some(false) => format!("{s} (deleted when the export ended)"),
                    _ => s.clone(),
                };
                fields.push(("snapshot", s));
            }
            if let Some(h) = &j.sha256 {
                fields.push(("sha256", h.clone()));
            }
            if let Some(f) = &j.finished_at {
                fields.push(("finished", f.clone()));
            }
            if let Some(e) = &j.error {
                fields.push(("error", e.clone()));
            }
            Ok(out.fields(&fields)?)
        }
        JobCommand::Cancel { id } => {
            let j: Job = client
                .send(
                    Method::POST,
                    &format!("/v1/jobs/{}/cancel", checked(&id)?),
                    &serde_json::json!({}),
                )
                .await?;
            if out.json {
                return Ok(out.json(&j)?);
            }
            Ok(out.line(format!("cancelling {}", j.id))?)
        }
    }
}

fn progress(j: &Job) -> String {
    format!(
        "{} / {}",
        format_size(j.bytes_done),
        format_size(j.bytes_total)
    )
}

/// Job ids are `job-` and hex digits: nothing else goes into a path.
fn checked(id: &str) -> anyhow::Result<&str> {
    let ok = id.strip_prefix("job-").is_some_and(|h| {
        !h.is_empty() && h.len() <= 32 && h.bytes().all(|b| b.is_ascii_hexdigit())
    });
    if !ok {
        anyhow::bail!("invalid job id {id:?}: expected job- followed by hex digits");
    }
    Ok(id)
}

/// What a job read: an export of a volume read the snapshot it took, so
/// that is shown, with the volume it came from.
fn source(j: &Job) -> String {
    match (&j.kind, &j.snapshot, &j.volume) {
        (volumed_api::JobKind::Export, Some(snap), Some(vol)) => format!("{snap} (of {vol})"),
        (volumed_api::JobKind::Export, Some(snap), None) => snap.clone(),
        _ => j.source.clone(),
    }
}
