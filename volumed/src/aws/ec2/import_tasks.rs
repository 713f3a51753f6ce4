//! EC2's VM import actions: ImportSnapshot, ImportImage,
//! DescribeImportSnapshotTasks, DescribeImportImageTasks, CancelImportTask;
//! ImportVolume and ImportInstance refused by name. The tasks are the
//! images layer's (`images::task`); this file speaks EC2.

use volumed_api::filter::wildcard;

use super::params::Params;
use super::xml::Xml;
use super::{Cx, Describe, Ec2Error, Ec2Result, max_results};
use crate::catalog::{TaskDisk, TaskKind, TaskSource, TaskSpec};
use crate::images::Error as ImagesError;
use crate::images::task::TaskView;

/// The images layer's errors in EC2's words.
impl From<ImagesError> for Ec2Error {
    fn from(e: ImagesError) -> Self {
        let msg = volumed_api::error_chain(&e);
        match e {
            ImagesError::Engine(e) => Ec2Error::from(e),
            ImagesError::Catalog(e) => Ec2Error::from(e),
            ImagesError::NoSuchJobId(_) | ImagesError::JobNotFound(_) => {
                Ec2Error::new("InvalidConversionTaskId.Malformed", msg)
            }
            // An image or source refused before a task exists: the
            // request's fault.
            ImagesError::InvalidRequest(_) | ImagesError::Image(_) => {
                Ec2Error::invalid_parameter(msg)
            }
        }
    }
}

/// `PREFIX.Url` or `PREFIX.UserBucket.S3Bucket`/`S3Key`, `Format`,
/// `Description`, `DeviceName`, `SnapshotId`.
fn disk(p: &Params, prefix: &str, image: bool) -> Ec2Result<TaskDisk> {
    let get = |k: &str| p.get(&format!("{prefix}.{k}")).map(str::to_owned);
    let bucket = get("UserBucket.S3Bucket");
    let key = get("UserBucket.S3Key");
    let url = get("Url");
    let snapshot = if image { get("SnapshotId") } else { None };
    let given = [
        bucket.is_some() || key.is_some(),
        url.is_some(),
        snapshot.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(Ec2Error::invalid_parameter(format!(
            "{prefix} needs exactly one of UserBucket, Url{}",
            if image { " or SnapshotId" } else { "" }
        )));
    }
    let source = if let Some(s) = snapshot {
        let id = snapshot::SnapshotId::parse(&s).ok_or_else(|| Ec2Error::snapshot_not_found(&s))?;
        TaskSource::Snapshot { id }
    } else if let Some(url) = url {
        source_of_url(&url)?
    } else {
        match (bucket, key) {
            (Some(bucket), Some(key)) if !key.is_empty() => TaskSource::S3 { bucket, key },
            _ => {
                return Err(Ec2Error::missing(&format!(
                    "{prefix}.UserBucket.S3Bucket and S3Key"
                )));
            }
        }
    };
    let format = get("Format");
    if format.is_none() && !matches!(source, TaskSource::Snapshot { .. }) {
        return Err(Ec2Error::missing(&format!("{prefix}.Format")));
    }
    Ok(TaskDisk {
        source,
        format,
        description: get("Description"),
        device_name: get("DeviceName"),
        size: None,
        volumes: None,
    })
}

/// `s3://BUCKET/KEY` or `file:///PATH` (an `--import-dir` extension).
fn source_of_url(url: &str) -> Ec2Result<TaskSource> {
    if let Some(rest) = url.strip_prefix("s3://") {
        if let Some((bucket, key)) = rest.split_once('/')
            && !key.is_empty()
        {
            return Ok(TaskSource::S3 {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            });
        }
    } else if let Some(path) = url.strip_prefix("file://") {
        if path.starts_with('/') {
            return Ok(TaskSource::File {
                path: path.to_owned(),
            });
        }
    } else if crate::images::url::is_https(url) {
        return Ok(TaskSource::Url {
            url: url.to_owned(),
        });
    }
    Err(Ec2Error::invalid_value(
        "Url",
        url,
        "Expecting https://HOST/PATH, s3://BUCKET/KEY or file:///PATH.",
    ))
}

/// The fields both actions share.
fn task(p: &Params, kind: TaskKind, disks: Vec<TaskDisk>, resource: &str) -> Ec2Result<TaskSpec> {
    let (encrypted, kms_key_id) = super::encryption::params(p)?;
    let tags = super::images::tag_specs(p, &[resource])?
        .remove(resource)
        .unwrap_or_default();
    let field = |k: &str| p.get(k).map(str::to_owned);
    Ok(TaskSpec {
        kind,
        client_token: field("ClientToken"),
        description: field("Description"),
        disks,
        tags,
        architecture: field("Architecture"),
        platform: field("Platform"),
        boot_mode: field("BootMode"),
        license_type: field("LicenseType"),
        encrypted,
        kms_key_id,
        snapshots: Vec::new(),
        image_id: None,
        cancel_reason: None,
    })
}

const COMMON: [&str; 8] = [
    "ClientToken",
    "ClientData",
    "Description",
    "DiskContainer",
    "Encrypted",
    "KmsKeyId",
    "RoleName",
    "TagSpecification",
];

pub async fn import_snapshot(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&COMMON)?;
    let d = disk(cx.p, "DiskContainer", false)?;
    let spec = task(cx.p, TaskKind::Snapshot, vec![d], "import-snapshot-task")?;
    let v = start(&cx, spec).await?;
    let mut x = Xml::response("ImportSnapshot", cx.rid);
    write_snapshot_task(&mut x, &v);
    Ok(x.finish("ImportSnapshot"))
}

pub async fn import_image(cx: Cx<'_>) -> Ec2Result<String> {
    let mut known = COMMON.to_vec();
    known.extend([
        "Architecture",
        "Platform",
        "BootMode",
        "LicenseType",
        "Hypervisor",
        "UsageOperation",
        "LicenseSpecifications",
    ]);
    cx.only(&known)?;
    if let Some(a) = cx.p.get("Architecture")
        && !["i386", "x86_64", "arm64"].contains(&a)
    {
        return Err(Ec2Error::invalid_value(
            "Architecture",
            a,
            "Expecting i386, x86_64 or arm64.",
        ));
    }
    let disks =
        cx.p.indices("DiskContainer")?
            .into_iter()
            .map(|n| disk(cx.p, &format!("DiskContainer.{n}"), true))
            .collect::<Ec2Result<Vec<_>>>()?;
    if disks.is_empty() {
        return Err(Ec2Error::missing("DiskContainer"));
    }
    let spec = task(cx.p, TaskKind::Image, disks, "import-image-task")?;
    let v = start(&cx, spec).await?;
    let mut x = Xml::response("ImportImage", cx.rid);
    write_image_task(&mut x, &v);
    Ok(x.finish("ImportImage"))
}

/// Starts the task and returns its first view, for the response.
async fn start(cx: &Cx<'_>, spec: TaskSpec) -> Ec2Result<TaskView> {
    let tasks = cx.state.images.import_tasks();
    let h = tasks.start(spec).await?;
    tasks
        .view(&h)
        .ok_or_else(|| Ec2Error::new("InternalError", "the task has no view"))
}

pub async fn describe(cx: Cx<'_>, kind: TaskKind) -> Ec2Result<String> {
    cx.only(&[
        "ImportTaskId",
        "Filters",
        "Filter",
        "MaxResults",
        "NextToken",
    ])?;
    let p = cx.p;
    let ids = p.list("ImportTaskId")?;
    let mut filters = p.filters()?;
    for n in p.indices("Filters")? {
        let name = p.required(&format!("Filters.{n}.Name"))?.to_owned();
        filters.push((name, p.list(&format!("Filters.{n}.Value"))?));
    }
    let max = max_results(p, 1, 1000)?;
    let tasks = cx.state.images.import_tasks();
    for id in &ids {
        if tasks.get(kind, id).is_none() {
            return Err(Ec2Error::new(
                "InvalidConversionTaskId.Malformed",
                format!("The import task id '{id}' does not exist"),
            ));
        }
    }
    let mut all = tasks.list(kind);
    all.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    let (action, set) = match kind {
        TaskKind::Snapshot => ("DescribeImportSnapshotTasks", "importSnapshotTaskSet"),
        TaskKind::Image => ("DescribeImportImageTasks", "importImageTaskSet"),
    };
    let matches = |name: &str, values: &[String], v: &TaskView| -> Ec2Result<bool> {
        let have: Vec<String> = match name {
            "task-state" => vec![v.status.to_owned()],
            "import-task-id" => vec![v.task_id.clone()],
            n if n.starts_with("tag:") => v.task().tags.get(&n[4..]).cloned().into_iter().collect(),
            "tag-key" => v.task().tags.keys().cloned().collect(),
            other => {
                return Err(Ec2Error::invalid_parameter(format!(
                    "The filter '{other}' is invalid"
                )));
            }
        };
        Ok(values
            .iter()
            .any(|want| have.iter().any(|h| wildcard(want, h))))
    };
    Describe {
        action,
        set,
        rid: cx.rid,
        ours: true,
        ids: &ids,
        filters: &filters,
        token: p.get("NextToken"),
        max,
    }
    .answer(
        all,
        |v| v.task_id.as_str(),
        matches,
        |x, v| match kind {
            TaskKind::Snapshot => write_snapshot_task(x, v),
            TaskKind::Image => write_image_task(x, v),
        },
    )
}

pub async fn cancel(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["ImportTaskId", "CancelReason"])?;
    let id = cx.p.required("ImportTaskId")?;
    let reason = cx.p.get("CancelReason").map(str::to_owned);
    let previous = cx
        .state
        .images
        .import_tasks()
        .cancel(id, reason)
        .await
        .map_err(|e| match e {
            ImagesError::NoSuchJobId(_) => Ec2Error::new(
                "InvalidConversionTaskId.Malformed",
                format!("The import task id '{id}' does not exist"),
            ),
            ImagesError::InvalidRequest(m) => Ec2Error::new("IncorrectState", m),
            e => Ec2Error::from(e),
        })?;
    let mut x = Xml::response("CancelImportTask", cx.rid);
    x.elem("importTaskId", id)
        .elem("previousState", previous)
        .elem("state", "deleting");
    Ok(x.finish("CancelImportTask"))
}

/// ImportVolume and ImportInstance: the legacy manifest-based actions.
pub fn legacy(action: &str) -> Ec2Result<String> {
    Err(Ec2Error::new(
        "UnsupportedOperation",
        format!(
            "{action} is not supported; use ImportSnapshot (a disk) or ImportImage (a machine image)"
        ),
    ))
}

/// The `url` or `userBucket` of a disk, as given.
fn write_source(x: &mut Xml, d: &TaskDisk) {
    match &d.source {
        TaskSource::S3 { bucket, key } => {
            x.open("userBucket")
                .elem("s3Bucket", bucket)
                .elem("s3Key", key)
                .close("userBucket");
        }
        TaskSource::File { path } => {
            x.elem("url", format!("file://{path}"));
        }
        TaskSource::Url { url } => {
            x.elem("url", url);
        }
        TaskSource::Snapshot { .. } => {}
    }
}

/// A disk's detail: its snapshot appears only once the task completed.
fn write_detail(x: &mut Xml, v: &TaskView, d: &TaskDisk, snapshot: Option<String>) {
    x.opt("description", d.description.as_deref())
        .opt("diskImageSize", d.size.map(|s| format!("{s}.0")))
        .opt("format", d.format.as_deref().map(str::to_ascii_uppercase))
        .opt("progress", v.progress)
        .opt("snapshotId", snapshot.filter(|_| v.status == "completed"))
        .elem("status", v.status)
        .opt("statusMessage", v.status_message.as_deref());
    write_source(x, d);
}

fn write_snapshot_task(x: &mut Xml, v: &TaskView) {
    let t = v.task();
    x.opt("description", t.description.as_deref())
        .elem("importTaskId", &v.task_id);
    x.open("snapshotTaskDetail");
    if let Some(d) = t.disks.first() {
        let snap = t
            .snapshots
            .first()
            .cloned()
            .flatten()
            .map(|s| s.to_string());
        write_detail(x, v, d, snap);
        x.elem("encrypted", t.encrypted.unwrap_or(false))
            .opt("kmsKeyId", t.kms_key_id.as_deref());
    }
    x.close("snapshotTaskDetail");
    x.tag_set(&t.tags);
}

fn write_image_task(x: &mut Xml, v: &TaskView) {
    let t = v.task();
    x.opt("architecture", t.architecture.as_deref())
        .opt("description", t.description.as_deref())
        .elem("encrypted", t.encrypted.unwrap_or(false))
        .opt("kmsKeyId", t.kms_key_id.as_deref())
        .opt(
            "imageId",
            t.image_id.as_deref().filter(|_| v.status == "completed"),
        )
        .elem("importTaskId", &v.task_id)
        .opt("licenseType", t.license_type.as_deref())
        .opt("platform", t.platform.as_deref())
        .opt("bootMode", t.boot_mode.as_deref())
        .opt("progress", v.progress)
        .elem("status", v.status)
        .opt("statusMessage", v.status_message.as_deref());
    x.open("snapshotDetailSet");
    let mut snaps = t.snapshots.iter();
    let mut rows: Vec<(Option<String>, &TaskDisk, Option<String>)> = Vec::new();
    for d in &t.disks {
        match &d.source {
            TaskSource::Snapshot { id } => {
                rows.push((d.device_name.clone(), d, Some(id.to_string())))
            }
            _ => {
                for i in 0..d.volumes.unwrap_or(1) {
                    let snap = snaps.next().cloned().flatten().map(|s| s.to_string());
                    let given = if i == 0 { d.device_name.clone() } else { None };
                    rows.push((given, d, snap));
                }
            }
        }
    }
    let given: Vec<Option<String>> = rows.iter().map(|r| r.0.clone()).collect();
    for (name, (_, d, snap)) in crate::images::task::device_names(&given)
        .into_iter()
        .zip(rows)
    {
        x.open("item").elem("deviceName", name);
        write_detail(x, v, d, snap);
        x.close("item");
    }
    x.close("snapshotDetailSet");
    x.tag_set(&t.tags);
}
