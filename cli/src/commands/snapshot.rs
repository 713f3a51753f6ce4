//! `vol snapshot create | list | inspect | delete | protect | unprotect |
//! verify | copy | attach | detach`, and `vol gc`.

use hyper::Method;
use volumed_api::{
    CreateSnapshot, CreateSnapshotSet, GcReport, GcRequest, Snapshot, SnapshotList,
    SnapshotSetCreated, SnapshotSetState, SnapshotState, VerifyReport, format_size,
};

use crate::args::SnapshotCommand;
use crate::client::Client;
use crate::output::Out;

async fn protect(client: &Client, out: &Out, id: &str, on: bool) -> anyhow::Result<()> {
    let verb = if on { "protect" } else { "unprotect" };
    let s: Snapshot = client
        .send(Method::POST, &format!("/v1/snapshots/{id}/{verb}"), &())
        .await?;
    if out.json {
        return Ok(out.json(&s)?);
    }
    out.line(format!("snapshot {} {verb}ed", s.id))?;
    Ok(())
}

pub async fn run(client: &Client, out: &Out, cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create {
            volumes,
            set: Some(set),
            quiesce_hook,
            ignore_quiesce_error,
            labels,
            wait,
        } => {
            let quiesce_hook = quiesce_hook
                .map(|p| {
                    std::path::absolute(&p)
                        .map(|p| p.display().to_string())
                        .map_err(|e| anyhow::anyhow!("quiesce hook {}: {e}", p.display()))
                })
                .transpose()?;
            let req = CreateSnapshotSet {
                name: set,
                volumes,
                labels: labels.into_iter().collect(),
                quiesce_hook,
                ignore_quiesce_error,
            };
            let mut created: SnapshotSetCreated =
                client.send(Method::POST, "/v1/snapshot-sets", &req).await?;
            if wait {
                let mut done = Vec::new();
                for snap in created.snapshots {
                    done.push(wait_for(client, out, snap).await?);
                }
                created.snapshots = done;
                // The set settles once every member has.
                let mut poll = super::Poll::new();
                while created.set.state == SnapshotSetState::Pending {
                    poll.sleep().await;
                    created.set = client
                        .get(&format!("/v1/snapshot-sets/{}", created.set.id))
                        .await?;
                }
            }
            if out.json {
                out.json(&created)?;
            } else {
                out.line(format!(
                    "snapshot set {} ({}) {}",
                    created.set.id,
                    created.set.name,
                    set_state(created.set.state)
                ))?;
                let rows: Vec<Vec<String>> = created
                    .snapshots
                    .iter()
                    .map(|s| vec![s.id.clone(), s.volume.clone(), s.state.as_str().to_owned()])
                    .collect();
                out.table(&["ID", "VOLUME", "STATE"], &rows)?;
            }
            if created.set.state == SnapshotSetState::Failed {
                anyhow::bail!(
                    "snapshot set {} failed: {}; none of its snapshots remains",
                    created.set.id,
                    created.set.error.unwrap_or_default()
                );
            }
            Ok(())
        }
        SnapshotCommand::Create {
            volumes,
            set: None,
            labels,
            wait,
            ..
        } => {
            let [volume] = <[_; 1]>::try_from(volumes).map_err(|v| {
                anyhow::anyhow!(
                    "{} volumes given without --set: snapshot one volume, or name a set with --set NAME",
                    v.len()
                )
            })?;
            let req = CreateSnapshot {
                labels: labels.into_iter().collect(),
            };
            let snap: Snapshot = client
                .send(
                    Method::POST,
                    &format!("/v1/volumes/{volume}/snapshots"),
                    &req,
                )
                .await?;
            let snap = if wait {
                wait_for(client, out, snap).await?
            } else {
                snap
            };
            if out.json {
                out.json(&snap)?;
            } else if wait {
                out.line(format!(
                    "snapshot {} of '{}' {}: {} changed chunks, {} uploaded",
                    snap.id,
                    snap.volume,
                    snap.state.as_str(),
                    snap.changed_chunks,
                    format_size(snap.uploaded_bytes)
                ))?;
            } else {
                out.line(&snap.id)?;
            }
            if snap.state == SnapshotState::Error {
                anyhow::bail!(
                    "snapshot {} of '{}' failed: {}",
                    snap.id,
                    snap.volume,
                    snap.error.unwrap_or_default()
                );
            }
            Ok(())
        }
        SnapshotCommand::List { volume } => {
            let path = match &volume {
                Some(v) => format!("/v1/snapshots?volume={v}"),
                None => "/v1/snapshots".to_owned(),
            };
            let list: SnapshotList = client.get(&path).await?;
            if let Some(w) = &list.warning {
                eprintln!("warning: {w}");
            }
            if out.json {
                return Ok(out.json(&list.snapshots)?);
            }
            let rows: Vec<Vec<String>> = list
                .snapshots
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.volume.clone(),
                        s.state.as_str().to_owned(),
                        format_size(s.size),
                        s.changed_chunks.to_string(),
                        format_size(s.uploaded_bytes),
                        s.created_at.clone(),
                    ]
                })
                .collect();
            out.table(
                &[
                    "ID", "VOLUME", "STATE", "SIZE", "CHANGED", "UPLOADED", "CREATED",
                ],
                &rows,
            )?;
            Ok(())
        }
        SnapshotCommand::Inspect { id } => {
            let s: Snapshot = client.get(&format!("/v1/snapshots/{id}")).await?;
            if out.json {
                return Ok(out.json(&s)?);
            }
            let labels = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ");
            out.fields(&[
                ("id", s.id.clone()),
                ("volume", s.volume.clone()),
                ("state", s.state.as_str().to_owned()),
                (
                    "size",
                    format!("{} ({} bytes)", format_size(s.size), s.size),
                ),
                ("chunk size", format_size(s.chunk_size)),
                ("parent", s.parent.clone().unwrap_or_else(|| "-".into())),
                ("created", s.created_at.clone()),
                ("protected", s.protected.to_string()),
                (
                    "completed",
                    s.completed_at.clone().unwrap_or_else(|| "-".into()),
                ),
                ("changed chunks", s.changed_chunks.to_string()),
                ("logical", format_size(s.logical_bytes)),
                ("uploaded", format_size(s.uploaded_bytes)),
                (
                    "progress",
                    format!(
                        "{:.0}% ({}/{} chunks)",
                        s.progress * 100.0,
                        s.chunks_done,
                        s.chunks_total
                    ),
                ),
                (
                    "labels",
                    if labels.is_empty() {
                        "-".into()
                    } else {
                        labels
                    },
                ),
                (
                    "encryption",
                    super::key::encryption_text(s.encryption.as_ref()),
                ),
                ("error", s.error.clone().unwrap_or_else(|| "-".into())),
                (
                    "export",
                    s.export
                        .as_ref()
                        .map_or_else(|| "-".into(), |e| e.uri.clone()),
                ),
            ])?;
            Ok(())
        }
        SnapshotCommand::Delete { id } => {
            client.delete(&format!("/v1/snapshots/{id}")).await?;
            if out.json {
                return Ok(out.json(&serde_json::json!({ "id": id, "deleted": true }))?);
            }
            out.line(format!("deleted snapshot {id}"))?;
            Ok(())
        }
        SnapshotCommand::Protect { id } => protect(client, out, &id, true).await,
        SnapshotCommand::Unprotect { id } => protect(client, out, &id, false).await,
        SnapshotCommand::Attach { id } => {
            let s: Snapshot = client
                .send(
                    Method::POST,
                    &format!("/v1/snapshots/{id}/attach"),
                    &serde_json::json!({}),
                )
                .await?;
            if out.json {
                return Ok(out.json(&s)?);
            }
            let Some(export) = &s.export else {
                anyhow::bail!("snapshot {id} was attached but the daemon reports no export");
            };
            out.line(&export.uri)?;
            Ok(())
        }
        SnapshotCommand::Detach { id } => {
            let s: Snapshot = client
                .send(
                    Method::POST,
                    &format!("/v1/snapshots/{id}/detach"),
                    &serde_json::json!({}),
                )
                .await?;
            if out.json {
                return Ok(out.json(&s)?);
            }
            out.line(format!("detached snapshot {id}"))?;
            Ok(())
        }
        SnapshotCommand::Copy {
            id,
            key,
            labels,
            wait,
        } => {
            let req = volumed_api::CopySnapshot {
                key,
                labels: labels.into_iter().collect(),
            };
            let snap: Snapshot = client
                .send(Method::POST, &format!("/v1/snapshots/{id}/copy"), &req)
                .await?;
            let snap = if wait {
                wait_for(client, out, snap).await?
            } else {
                snap
            };
            if out.json {
                out.json(&snap)?;
            } else if wait {
                out.line(format!(
                    "snapshot {} (a copy of {id}) {}: {} uploaded",
                    snap.id,
                    snap.state.as_str(),
                    format_size(snap.uploaded_bytes)
                ))?;
            } else {
                out.line(&snap.id)?;
            }
            if snap.state == SnapshotState::Error {
                anyhow::bail!(
                    "copy {} of snapshot {id} failed: {}",
                    snap.id,
                    snap.error.unwrap_or_default()
                );
            }
            Ok(())
        }
        SnapshotCommand::Diff { from, to, format } => {
            super::diff::run(client, out, from, to, format).await
        }
        SnapshotCommand::Verify { id } => {
            let r: VerifyReport = client
                .send(
                    Method::POST,
                    &format!("/v1/snapshots/{id}/verify"),
                    &serde_json::json!({}),
                )
                .await?;
            if out.json {
                out.json(&r)?;
            } else {
                out.line(format!(
                    "snapshot {}: {} chunks, {} objects, {} ok, {} missing, {} damaged",
                    r.snapshot,
                    r.chunks,
                    r.objects,
                    r.ok_objects,
                    r.missing.len(),
                    r.damaged.len()
                ))?;
                if let Some(why) = &r.framing_only {
                    out.line(format!("  only the manifest's framing was checked: {why}"))?;
                }
                for (what, list) in [("missing", &r.missing), ("damaged", &r.damaged)] {
                    for b in list {
                        out.line(format!(
                            "  {what} object {} (chunks {:?}): {}",
                            b.hash, b.indices, b.error
                        ))?;
                    }
                }
            }
            if let Some(why) = &r.framing_only {
                anyhow::bail!(
                    "snapshot {} was checked only for its sealed framing: {why}",
                    r.snapshot
                );
            }
            if !r.ok {
                anyhow::bail!(
                    "snapshot {} has {} missing and {} damaged chunk objects",
                    r.snapshot,
                    r.missing.len(),
                    r.damaged.len()
                );
            }
            Ok(())
        }
    }
}

pub async fn gc(
    client: &Client,
    out: &Out,
    grace: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let req = GcRequest {
        grace_secs: grace.map(|g| g.as_secs()),
    };
    let r: GcReport = client.send(Method::POST, "/v1/gc", &req).await?;
    if out.json {
        return Ok(out.json(&r)?);
    }
    out.line(format!(
        "gc: deleted {} chunk objects and {} manifest pages ({}); kept {} referenced and {} younger than {}s; {} manifests, {} holds",
        r.chunks_deleted,
        r.pages_deleted,
        format_size(r.bytes_deleted),
        r.chunks_referenced,
        r.chunks_young,
        r.grace_secs,
        r.manifests,
        r.holds
    ))?;
    Ok(())
}

/// Polls until the snapshot leaves `pending`, with a progress bar on
/// stderr for people (hidden when stderr is not a terminal or with --json).
fn set_state(s: SnapshotSetState) -> &'static str {
    match s {
        SnapshotSetState::Pending => "pending",
        SnapshotSetState::Completed => "completed",
        SnapshotSetState::Failed => "failed",
    }
}

async fn wait_for(client: &Client, out: &Out, mut snap: Snapshot) -> anyhow::Result<Snapshot> {
    let bar = if out.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(snap.chunks_total)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} chunks")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("snapshot {}", snap.id));
    let mut poll = super::Poll::new();
    while snap.state == SnapshotState::Pending {
        poll.sleep().await;
        snap = client.get(&format!("/v1/snapshots/{}", snap.id)).await?;
        bar.set_length(snap.chunks_total);
        bar.set_position(snap.chunks_done);
    }
    bar.finish_and_clear();
    Ok(snap)
}
