//! `vol create | list | inspect | attach | detach | modify | delete`.

use hyper::Method;
use serde_json::json;
use volumed_api::{
    AttachVolume, CreateVolume, Detached, ModifyVolume, Volume, VolumeList, VolumeName, format_size,
};

use crate::client::Client;
use crate::output::Out;

fn path(name: &VolumeName) -> String {
    format!("/v1/volumes/{name}")
}

pub async fn create(
    client: &Client,
    out: &Out,
    req: CreateVolume,
    tags: std::collections::BTreeMap<String, String>,
    wait: bool,
) -> anyhow::Result<()> {
    let mut body = serde_json::to_value(&req)?;
    if !tags.is_empty() {
        body["tags"] = serde_json::to_value(&tags)?;
    }
    let mut v: Volume = client.send(Method::POST, "/v1/volumes", &body).await?;
    if wait {
        v = wait_hydrated(client, out, v).await?;
    }
    if out.json {
        return Ok(out.json(&v)?);
    }
    let kind = if v.ephemeral {
        "ephemeral volume"
    } else {
        "volume"
    };
    let from = match &v.source_snapshot {
        Some(s) => format!(" from snapshot {s}"),
        None => String::new(),
    };
    out.line(format!(
        "created {kind} '{}'{from}: {}, chunk size {}",
        v.name,
        format_size(v.size),
        format_size(v.chunk_size)
    ))?;
    Ok(())
}

/// Polls until the restored volume holds every chunk of its snapshot, with
/// a progress bar on stderr for people.
async fn wait_hydrated(client: &Client, out: &Out, mut v: Volume) -> anyhow::Result<Volume> {
    let total = v.hydration.as_ref().map_or(0, |h| h.total_bytes);
    let bar = if out.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("hydrating '{}'", v.name));
    let mut poll = super::Poll::new();
    while let Some(h) = &v.hydration {
        bar.set_length(h.total_bytes);
        bar.set_position(h.hydrated_bytes);
        if h.state == "complete" {
            break;
        }
        if h.state == "retrying" {
            bar.set_message(format!(
                "hydrating '{}' (retrying: {})",
                v.name,
                h.error.clone().unwrap_or_default()
            ));
        }
        poll.sleep().await;
        v = client.get(&path(&v.name)).await?;
    }
    bar.finish_and_clear();
    Ok(v)
}

pub async fn list(
    client: &Client,
    out: &Out,
    filters: &[volumed_api::VolumeFilter],
) -> anyhow::Result<()> {
    let mut list: VolumeList = client.get("/v1/volumes").await?;
    list.volumes
        .retain(|v| volumed_api::filter::matches_all(filters, v));
    if out.json {
        return Ok(out.json(&list.volumes)?);
    }
    let rows: Vec<Vec<String>> = list
        .volumes
        .iter()
        .map(|v| {
            vec![
                v.name.to_string(),
                format_size(v.size),
                v.state.as_str().to_owned(),
                if v.ephemeral { "yes" } else { "no" }.to_owned(),
                v.instance.clone().unwrap_or_else(|| "-".into()),
                v.uri.clone().unwrap_or_else(|| "-".into()),
                v.health.as_str().to_owned(),
            ]
        })
        .collect();
    out.table(
        &[
            "NAME",
            "SIZE",
            "STATE",
            "EPHEMERAL",
            "INSTANCE",
            "URI",
            "HEALTH",
        ],
        &rows,
    )?;
    Ok(())
}

pub async fn inspect(client: &Client, out: &Out, name: VolumeName) -> anyhow::Result<()> {
    let v: Volume = client.get(&path(&name)).await?;
    if out.json {
        return Ok(out.json(&v)?);
    }
    let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    out.fields(&[
        ("name", v.name.to_string()),
        ("volume id", v.volume_id.clone()),
        ("tags", tags_text(&v)),
        (
            "size",
            format!("{} ({} bytes)", format_size(v.size), v.size),
        ),
        ("chunk size", format_size(v.chunk_size)),
        ("ephemeral", v.ephemeral.to_string()),
        ("state", v.state.as_str().to_owned()),
        (
            "health",
            match &v.health_reason {
                Some(r) => format!("{} ({r})", v.health.as_str()),
                None => v.health.as_str().to_owned(),
            },
        ),
        ("instance", dash(&v.instance)),
        ("uri", dash(&v.uri)),
        ("unix uri", dash(&v.unix_uri)),
        ("source snapshot", dash(&v.source_snapshot)),
        (
            "hydration",
            match &v.hydration {
                Some(h) => format!(
                    "{} ({} of {}){}",
                    h.state,
                    format_size(h.hydrated_bytes),
                    format_size(h.total_bytes),
                    h.error
                        .as_ref()
                        .map_or_else(String::new, |e| format!(": {e}"))
                ),
                None => "-".into(),
            },
        ),
        (
            "encryption",
            super::key::encryption_text(v.encryption.as_ref()),
        ),
        ("allocated", format_size(v.allocated_bytes)),
        ("created", v.created_at.clone()),
        ("attached", dash(&v.attached_at)),
        (
            "device",
            dash(&v.attachment.as_ref().and_then(|a| a.device.clone())),
        ),
        (
            "delete on termination",
            v.attachment
                .as_ref()
                .map_or("-".into(), |a| a.delete_on_termination.to_string()),
        ),
    ])?;
    Ok(())
}

pub async fn attach(
    client: &Client,
    out: &Out,
    name: VolumeName,
    instance: Option<String>,
) -> anyhow::Result<()> {
    let v: Volume = client
        .send(
            Method::POST,
            &format!("{}/attach", path(&name)),
            &AttachVolume { instance },
        )
        .await?;
    if out.json {
        return Ok(out.json(&v)?);
    }
    out.line(v.uri.unwrap_or_default())?;
    Ok(())
}

pub async fn detach(client: &Client, out: &Out, name: VolumeName) -> anyhow::Result<()> {
    let d: Detached = client
        .send(Method::POST, &format!("{}/detach", path(&name)), &json!({}))
        .await?;
    if out.json {
        return Ok(out.json(&d)?);
    }
    if d.deleted {
        out.line(format!(
            "detached volume '{name}'; it was ephemeral and is deleted"
        ))?;
    } else {
        out.line(format!("detached volume '{name}'"))?;
    }
    Ok(())
}

pub async fn modify(
    client: &Client,
    out: &Out,
    name: VolumeName,
    req: ModifyVolume,
) -> anyhow::Result<()> {
    if req == ModifyVolume::default() {
        anyhow::bail!("nothing to modify on volume '{name}'; give --size or --ephemeral");
    }
    let v: Volume = client.send(Method::PATCH, &path(&name), &req).await?;
    if out.json {
        return Ok(out.json(&v)?);
    }
    out.line(format!(
        "modified volume '{}': size {}, ephemeral {}",
        v.name,
        format_size(v.size),
        v.ephemeral
    ))?;
    Ok(())
}

pub async fn delete(client: &Client, out: &Out, name: VolumeName) -> anyhow::Result<()> {
    client.delete(&path(&name)).await?;
    if out.json {
        return Ok(out.json(&json!({ "name": name, "deleted": true }))?);
    }
    out.line(format!("deleted volume '{name}'"))?;
    Ok(())
}

pub async fn tag(
    client: &Client,
    out: &Out,
    name: VolumeName,
    tags: std::collections::BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let req = volumed_api::TagVolume { tags };
    let v: Volume = client
        .send(Method::POST, &format!("{}/tags", path(&name)), &req)
        .await?;
    if out.json {
        return Ok(out.json(&v)?);
    }
    out.line(format!("tagged volume '{}': {}", v.name, tags_text(&v)))?;
    Ok(())
}

pub async fn untag(
    client: &Client,
    out: &Out,
    name: VolumeName,
    keys: Vec<String>,
) -> anyhow::Result<()> {
    let req = volumed_api::UntagVolume { keys };
    let v: Volume = client
        .send(Method::DELETE, &format!("{}/tags", path(&name)), &req)
        .await?;
    if out.json {
        return Ok(out.json(&v)?);
    }
    out.line(format!("volume '{}' tags: {}", v.name, tags_text(&v)))?;
    Ok(())
}

fn tags_text(v: &Volume) -> String {
    if v.tags.is_empty() {
        return "(none)".into();
    }
    v.tags
        .iter()
        .map(|(k, val)| format!("{k}={val}"))
        .collect::<Vec<_>>()
        .join(" ")
}
