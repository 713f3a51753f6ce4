//! Step 4 of ImportImage: the image registered over the task's snapshots,
//! with EC2's device names; and the names EC2 gives formats and devices.

use std::collections::BTreeMap;

use snapshot::SnapshotId;
use volumed_api::{BlockDeviceMapping, EbsDevice};

use super::super::ImageFormat;
use super::super::import::Stop;
use super::ImportTasks;
use crate::catalog::{JobRecord, TaskSource};

impl ImportTasks {
    /// Step 4 of ImportImage: `/dev/sda1` for the first disk, `/dev/sdb`,
    /// `/dev/sdc`, ... for the others, unless a `DeviceName` says.
    pub(super) async fn register(&self, rec: &JobRecord) -> Result<String, Stop> {
        let task = rec
            .task()
            .ok_or_else(|| Stop::Failed("not a task".into()))?;
        let registrar = self
            .registrar
            .get()
            .ok_or_else(|| Stop::Failed("images cannot be registered on this host".into()))?;
        let mut imported = task.snapshots.iter();
        let mut devices: Vec<(Option<String>, SnapshotId)> = Vec::new();
        for d in &task.disks {
            match &d.source {
                TaskSource::Snapshot { id } => devices.push((d.device_name.clone(), id.clone())),
                _ => {
                    for n in 0..d.volumes.unwrap_or(0) {
                        let snap = imported
                            .next()
                            .cloned()
                            .flatten()
                            .ok_or_else(|| Stop::Failed("a disk has no snapshot".into()))?;
                        devices.push((if n == 0 { d.device_name.clone() } else { None }, snap));
                    }
                }
            }
        }
        let names = device_names(&devices.iter().map(|d| d.0.clone()).collect::<Vec<_>>());
        let mappings: Vec<BlockDeviceMapping> = names
            .iter()
            .zip(&devices)
            .map(|(name, (_, snap))| BlockDeviceMapping {
                device_name: name.clone(),
                ebs: Some(EbsDevice {
                    snapshot_id: Some(snap.to_string()),
                    delete_on_termination: Some(true),
                    ..EbsDevice::default()
                }),
                virtual_name: None,
                no_device: false,
            })
            .collect();
        let task_id = task.task_id(&rec.id);
        let req = volumed_api::RegisterImage {
            name: task_id.clone(),
            description: task
                .description
                .clone()
                .unwrap_or_else(|| format!("imported by {task_id}")),
            architecture: task.architecture.clone(),
            root_device_name: names.first().cloned().unwrap_or_else(|| "/dev/sda1".into()),
            mappings,
            tags: BTreeMap::new(),
        };
        registrar.register(req).await.map_err(Stop::Failed)
    }
}

/// The qemu format of an EC2 `Format` (case-insensitive).
pub fn aws_format(f: &str) -> Option<ImageFormat> {
    match f.to_ascii_lowercase().as_str() {
        "vhd" => Some(ImageFormat::Vpc),
        "vmdk" => Some(ImageFormat::Vmdk),
        "raw" | "img" => Some(ImageFormat::Raw),
        "vhdx" => Some(ImageFormat::Vhdx),
        "qcow2" => Some(ImageFormat::Qcow2),
        "ova" => Some(ImageFormat::Ova),
        _ => None,
    }
}

/// The devices of an image's disks: as given, else `/dev/sda1` for the
/// first and the next free of `/dev/sdb` ... `/dev/sdz` for the others.
pub fn device_names(given: &[Option<String>]) -> Vec<String> {
    let mut used: Vec<String> = given.iter().flatten().cloned().collect();
    let mut letters = (b'b'..=b'z').map(|c| format!("/dev/sd{}", c as char));
    given
        .iter()
        .enumerate()
        .map(|(i, g)| match g {
            Some(n) => n.clone(),
            None if i == 0 && !used.iter().any(|u| u == "/dev/sda1") => {
                used.push("/dev/sda1".into());
                "/dev/sda1".into()
            }
            None => {
                let n = letters
                    .by_ref()
                    .find(|n| !used.contains(n))
                    .unwrap_or_else(|| format!("/dev/xvd{i}"));
                used.push(n.clone());
                n
            }
        })
        .collect()
}

/// The first line of a message, for a one-line `StatusMessage`.
pub fn one_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_devices() {
        assert_eq!(aws_format("VHD"), Some(ImageFormat::Vpc));
        assert_eq!(aws_format("vmdk"), Some(ImageFormat::Vmdk));
        assert_eq!(aws_format("ISO"), None);
        let n = |g: &[Option<&str>]| {
            device_names(&g.iter().map(|x| x.map(str::to_owned)).collect::<Vec<_>>())
        };
        assert_eq!(
            n(&[None, None, None]),
            ["/dev/sda1", "/dev/sdb", "/dev/sdc"]
        );
        assert_eq!(
            n(&[None, Some("/dev/sdb"), None]),
            ["/dev/sda1", "/dev/sdb", "/dev/sdc"]
        );
        assert_eq!(n(&[Some("/dev/xvda"), None]), ["/dev/xvda", "/dev/sdb"]);
        assert_eq!(one_line("a\nb"), "a");
    }
}
