//! `vol image register | list | inspect | deregister`.

use hyper::Method;
use volumed_api::{
    BlockDeviceMapping, DeregisterImage, Deregistered, Image, ImageList, RegisterImage,
};

use crate::args::ImageCommand;
use crate::client::Client;
use crate::output::Out;

pub async fn run(client: &Client, out: &Out, cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Register {
            name,
            root,
            mappings,
            description,
            architecture,
            tags,
        } => {
            if root
                .ebs
                .as_ref()
                .and_then(|e| e.snapshot_id.as_ref())
                .is_none()
            {
                anyhow::bail!(
                    "--root {} must name a snapshot: DEVICE=snap-ID",
                    root.device_name
                );
            }
            let root = *root;
            let mut all = vec![root.clone()];
            all.extend(mappings);
            let req = RegisterImage {
                name,
                description,
                architecture,
                root_device_name: root.device_name,
                mappings: all,
                tags: tags.into_iter().collect(),
            };
            let img: Image = client.send(Method::POST, "/v1/images", &req).await?;
            if out.json {
                return Ok(out.json(&img)?);
            }
            Ok(out.line(&img.id)?)
        }
        ImageCommand::List => {
            let list: ImageList = client.get("/v1/images").await?;
            if out.json {
                return Ok(out.json(&list.images)?);
            }
            let rows: Vec<Vec<String>> = list
                .images
                .iter()
                .map(|i| {
                    vec![
                        i.id.clone(),
                        i.name.clone(),
                        i.state.as_str().to_owned(),
                        i.root_device_name.clone(),
                        i.mappings.len().to_string(),
                        i.created_at.clone(),
                    ]
                })
                .collect();
            out.table(
                &["ID", "NAME", "STATE", "ROOT", "DEVICES", "CREATED"],
                &rows,
            )?;
            Ok(())
        }
        ImageCommand::Inspect { id } => {
            let i: Image = client.get(&format!("/v1/images/{}", path_id(&id)?)).await?;
            if out.json {
                return Ok(out.json(&i)?);
            }
            out.fields(&[
                ("id", i.id.clone()),
                ("name", i.name.clone()),
                ("state", i.state.as_str().to_owned()),
                ("architecture", i.architecture.clone()),
                ("root device", i.root_device_name.clone()),
                ("created", i.created_at.clone()),
                (
                    "from instance",
                    i.source_instance.clone().unwrap_or_else(|| "-".into()),
                ),
                ("error", i.error.clone().unwrap_or_else(|| "-".into())),
            ])?;
            let rows: Vec<Vec<String>> = i.mappings.iter().map(mapping_row).collect();
            out.table(&["DEVICE", "MAPS"], &rows)?;
            Ok(())
        }
        ImageCommand::Deregister {
            id,
            delete_snapshots,
        } => {
            let d: Deregistered = client
                .send(
                    Method::DELETE,
                    &format!("/v1/images/{}", path_id(&id)?),
                    &DeregisterImage { delete_snapshots },
                )
                .await?;
            if out.json {
                return Ok(out.json(&d)?);
            }
            out.line(format!("deregistered image {}", d.image))?;
            for s in &d.snapshots {
                out.line(format!("snapshot {}: {}", s.snapshot, s.result))?;
            }
            Ok(())
        }
    }
}

/// A mapping as the legacy `-b` grammar writes it.
pub fn mapping_row(m: &BlockDeviceMapping) -> Vec<String> {
    let spec = if m.no_device {
        "none".to_owned()
    } else if let Some(v) = &m.virtual_name {
        v.clone()
    } else if let Some(e) = &m.ebs {
        let mut parts = vec![
            e.snapshot_id.clone().unwrap_or_default(),
            e.volume_size.map(|s| s.to_string()).unwrap_or_default(),
            e.delete_on_termination
                .map(|d| d.to_string())
                .unwrap_or_default(),
            e.volume_type.clone().unwrap_or_default(),
            e.iops.map(|i| i.to_string()).unwrap_or_default(),
        ];
        while parts.len() > 1 && parts.last().is_some_and(String::is_empty) {
            parts.pop();
        }
        parts.join(":")
    } else {
        "-".into()
    };
    vec![m.device_name.clone(), spec]
}

/// An id as it may go into a request path: letters, digits and dashes.
pub fn path_id(id: &str) -> anyhow::Result<&str> {
    if !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        Ok(id)
    } else {
        anyhow::bail!("invalid id {id:?}: expected letters, digits and dashes")
    }
}
