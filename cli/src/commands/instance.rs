//! `vol instance run | list | inspect | stop | start | reboot | terminate`;
//! `inspect --qemu` and `--libvirt` print what a hypervisor needs to boot
//! the instance from its NBD exports.

use hyper::Method;
use volumed_api::{Instance, InstanceDevice, InstanceList, RunInstances, format_size};

use super::image::path_id;
use crate::args::InstanceCommand;
use crate::client::Client;
use crate::output::Out;

/// Seconds qemu waits for the daemon to come back before failing I/O
/// (a restart of volumed takes well under this).
const RECONNECT_DELAY: u32 = 10;

pub async fn run(client: &Client, out: &Out, cmd: InstanceCommand) -> anyhow::Result<()> {
    match cmd {
        InstanceCommand::Run {
            image,
            instance_type,
            count,
            mappings,
            tags,
        } => {
            let req = RunInstances {
                image_id: image,
                instance_type,
                count: Some(count),
                mappings,
                tags: tags.into_iter().collect(),
                volume_tags: Default::default(),
            };
            let list: InstanceList = client.send(Method::POST, "/v1/instances", &req).await?;
            if out.json {
                return Ok(out.json(&list.instances)?);
            }
            for i in &list.instances {
                out.line(&i.id)?;
            }
            Ok(())
        }
        InstanceCommand::List => {
            let list: InstanceList = client.get("/v1/instances").await?;
            if out.json {
                return Ok(out.json(&list.instances)?);
            }
            let rows: Vec<Vec<String>> = list
                .instances
                .iter()
                .map(|i| {
                    vec![
                        i.id.clone(),
                        i.image_id.clone(),
                        i.instance_type.clone(),
                        i.state.as_str().to_owned(),
                        i.devices.len().to_string(),
                        i.launched_at.clone(),
                    ]
                })
                .collect();
            out.table(
                &["ID", "IMAGE", "TYPE", "STATE", "DEVICES", "LAUNCHED"],
                &rows,
            )?;
            Ok(())
        }
        InstanceCommand::Inspect { id, qemu, libvirt } => {
            let i: Instance = client
                .get(&format!("/v1/instances/{}", path_id(&id)?))
                .await?;
            if qemu {
                for line in qemu_options(&i)? {
                    out.line(line)?;
                }
                return Ok(());
            }
            if libvirt {
                return Ok(out.line(libvirt_disks(&i)?)?);
            }
            if out.json {
                return Ok(out.json(&i)?);
            }
            out.fields(&[
                ("id", i.id.clone()),
                ("image", i.image_id.clone()),
                ("type", i.instance_type.clone()),
                ("state", i.state.as_str().to_owned()),
                ("reservation", i.reservation_id.clone()),
                ("launched", i.launched_at.clone()),
                ("root device", i.root_device_name.clone()),
            ])?;
            let rows: Vec<Vec<String>> = i
                .devices
                .iter()
                .map(|d| {
                    vec![
                        d.device_name.clone(),
                        d.volume.clone().unwrap_or_else(|| "-".into()),
                        d.virtual_name.clone().unwrap_or_else(|| "ebs".into()),
                        format_size(d.size),
                        d.delete_on_termination.to_string(),
                        d.uri.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            out.table(
                &["DEVICE", "VOLUME", "KIND", "SIZE", "DELETE_ON_TERM", "URI"],
                &rows,
            )?;
            Ok(())
        }
        InstanceCommand::Stop { id } => action(client, out, &id, "stop").await,
        InstanceCommand::Start { id } => action(client, out, &id, "start").await,
        InstanceCommand::Reboot { id } => action(client, out, &id, "reboot").await,
        InstanceCommand::Terminate { id } => action(client, out, &id, "terminate").await,
    }
}

async fn action(client: &Client, out: &Out, id: &str, verb: &str) -> anyhow::Result<()> {
    let i: Instance = client
        .send(
            Method::POST,
            &format!("/v1/instances/{}/{verb}", path_id(id)?),
            &serde_json::json!({}),
        )
        .await?;
    if out.json {
        return Ok(out.json(&i)?);
    }
    Ok(out.line(format!("instance {} {}", i.id, i.state.as_str()))?)
}

/// The socket path and export name of a device's `nbd+unix:///EXPORT?socket=PATH`.
fn unix_export(d: &InstanceDevice) -> anyhow::Result<Option<(String, String)>> {
    let Some(uri) = &d.unix_uri else {
        return Ok(None);
    };
    let rest = uri
        .strip_prefix("nbd+unix:///")
        .or_else(|| uri.strip_prefix("nbds+unix:///"))
        .ok_or_else(|| anyhow::anyhow!("unexpected NBD URI {uri}"))?;
    let (export, socket) = rest
        .split_once("?socket=")
        .ok_or_else(|| anyhow::anyhow!("NBD URI {uri} names no socket"))?;
    Ok(Some((percent_decode(export), percent_decode(socket))))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(Ok(v)) = s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16))
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `sda1` for `/dev/sda1`: a node name qemu accepts.
fn short_name(device: &str) -> String {
    device.trim_start_matches("/dev/").to_owned()
}

/// qemu's `-blockdev` (NBD over the Unix socket, reconnecting) and
/// `-device` options for every attached device, the root first to boot.
fn qemu_options(i: &Instance) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    let mut devices: Vec<&InstanceDevice> = i.devices.iter().collect();
    devices.sort_by_key(|d| d.device_name != i.root_device_name);
    for d in devices {
        let Some((export, socket)) = unix_export(d)? else {
            continue;
        };
        let node = short_name(&d.device_name);
        // qemu's option syntax doubles a comma inside a value.
        lines.push(format!(
            "-blockdev driver=nbd,node-name={node},server.type=unix,server.path={},export={},reconnect-delay={RECONNECT_DELAY}",
            socket.replace(',', ",,"),
            export.replace(',', ",,"),
        ));
        let boot = if d.device_name == i.root_device_name {
            ",bootindex=0"
        } else {
            ""
        };
        lines.push(format!("-device virtio-blk-pci,drive={node}{boot}"));
    }
    Ok(lines)
}

fn xml_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// A libvirt `<disk>` per attached device: NBD over the Unix socket with
/// `<reconnect>`; `sdX` on SCSI, `hdX` on IDE, `xvdX` as `vdX` on virtio.
fn libvirt_disks(i: &Instance) -> anyhow::Result<String> {
    let mut s = String::new();
    for d in &i.devices {
        let Some((export, socket)) = unix_export(d)? else {
            continue;
        };
        let base: String = short_name(&d.device_name)
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .to_owned();
        let (dev, bus) = if let Some(x) = base.strip_prefix("xvd") {
            (format!("vd{x}"), "virtio")
        } else if base.starts_with("hd") {
            (base.clone(), "ide")
        } else {
            (base.clone(), "scsi")
        };
        s.push_str("<disk type='network' device='disk'>\n");
        s.push_str("  <driver name='qemu' type='raw' cache='none'/>\n");
        s.push_str(&format!(
            "  <source protocol='nbd' name='{}'>\n    <host transport='unix' socket='{}'/>\n    <reconnect delay='{RECONNECT_DELAY}'/>\n  </source>\n",
            xml_attr(&export),
            xml_attr(&socket)
        ));
        s.push_str(&format!(
            "  <target dev='{}' bus='{bus}'/>\n",
            xml_attr(&dev)
        ));
        if d.device_name == i.root_device_name {
            s.push_str("  <boot order='1'/>\n");
        }
        s.push_str("</disk>\n");
    }
    Ok(s.trim_end().to_owned())
}
