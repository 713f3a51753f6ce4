//! EC2's VM export: ExportImage, DescribeExportImageTasks,
//! CreateInstanceExportTask, DescribeExportTasks, CancelExportTask. Each
//! task is an export job of the images layer writing one object to a
//! bucket as a multipart upload; this file resolves images and instances
//! to what is exported and speaks EC2's shapes and states.

use std::collections::BTreeMap;
use std::sync::Arc;

use volumed_api::{JobState, VolumeName};

use super::images::tag_specs;
use super::xml::Xml;
use super::{Cx, Describe, Ec2Error, Ec2Result, max_results};
use crate::catalog::{ExportTask, JobRecord};
use crate::images::buckets::valid_current_bucket;
use crate::images::registry::JobHandle;
use crate::images::{BucketExport, ExportDisk, ImageFormat, extension};
use crate::machines::fresh_id;

/// What an OVA's descriptor says of the machine: instance types here
/// carry no CPU or memory count, so the appliance asks for a small VM the
/// importer may resize.
const OVA_CPUS: u32 = 1;
const OVA_MEMORY_MIB: u64 = 1024;

/// `VMDK`, `RAW`, `VHD` as EC2 names them, and `QCOW2` (ours).
fn disk_format(name: &str, v: &str) -> Ec2Result<ImageFormat> {
    match v {
        "VMDK" => Ok(ImageFormat::Vmdk),
        "RAW" => Ok(ImageFormat::Raw),
        "VHD" => Ok(ImageFormat::Vpc),
        "QCOW2" => Ok(ImageFormat::Qcow2),
        _ => Err(Ec2Error::invalid_value(
            name,
            v,
            "Expecting VMDK, RAW or VHD (or QCOW2).",
        )),
    }
}

/// A bucket name as S3 takes it today (the bucket must exist already; see
/// [`valid_current_bucket`]).
fn bucket(name: &str, v: &str) -> Ec2Result<String> {
    let ok = valid_current_bucket(v);
    if ok {
        Ok(v.to_owned())
    } else {
        Err(Ec2Error::invalid_value(
            name,
            v,
            "Expecting an S3 bucket name: 3 to 63 lowercase letters, digits, dots and dashes.",
        ))
    }
}

/// A prefix of object keys: at most 900 bytes, so the key stays within
/// S3's 1024, and no control characters.
fn prefix(name: &str, v: Option<&str>) -> Ec2Result<String> {
    let v = v.unwrap_or("");
    if v.len() > 900 || v.chars().any(char::is_control) {
        return Err(Ec2Error::invalid_value(
            name,
            v,
            "Expecting at most 900 bytes without control characters.",
        ));
    }
    Ok(v.to_owned())
}

fn description(v: Option<&str>) -> Ec2Result<Option<String>> {
    match v {
        Some(d) if d.chars().count() > 255 || d.chars().any(char::is_control) => {
            Err(Ec2Error::invalid_value(
                "Description",
                d,
                "Expecting at most 255 printable characters.",
            ))
        }
        d => Ok(d.map(str::to_owned)),
    }
}

fn client_token(v: Option<&str>) -> Ec2Result<Option<String>> {
    match v {
        Some(t) if t.is_empty() || t.len() > 64 => Err(Ec2Error::invalid_value(
            "ClientToken",
            t,
            "Expecting 1 to 64 characters.",
        )),
        t => Ok(t.map(str::to_owned)),
    }
}

fn started(cx: &Cx<'_>, req: BucketExport) -> impl Future<Output = Ec2Result<Arc<JobHandle>>> {
    let images = Arc::clone(&cx.state.images);
    async move {
        images.export_to_bucket(req).await.map_err(|e| match e {
            crate::images::Error::Engine(e) => Ec2Error::from(e),
            crate::images::Error::Catalog(e) => Ec2Error::from(e),
            e => Ec2Error::invalid_parameter(volumed_api::error_chain(&e)),
        })
    }
}

pub async fn export_image(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&[
        "ImageId",
        "DiskImageFormat",
        "S3ExportLocation",
        "Description",
        "ClientToken",
        "RoleName",
        "TagSpecification",
    ])?;
    let p = cx.p;
    for k in p.keys_under("S3ExportLocation.") {
        if !matches!(k, "S3Bucket" | "S3Prefix") {
            return Err(Ec2Error::new(
                "UnknownParameter",
                format!("The parameter S3ExportLocation.{k} is not recognized"),
            ));
        }
    }
    let image_id = p.required("ImageId")?.to_owned();
    let format = disk_format("DiskImageFormat", p.required("DiskImageFormat")?)?;
    let bucket = bucket(
        "S3ExportLocation.S3Bucket",
        p.required("S3ExportLocation.S3Bucket")?,
    )?;
    let prefix = prefix(
        "S3ExportLocation.S3Prefix",
        p.get("S3ExportLocation.S3Prefix"),
    )?;
    let tags = tag_specs(p, &["export-image-task"])?
        .remove("export-image-task")
        .unwrap_or_default();
    let img = cx.state.machines.image(&image_id).await?;
    let root = img
        .mappings
        .iter()
        .find(|m| m.device_name == img.root_device_name)
        .and_then(|m| m.ebs.as_ref()?.snapshot_id.clone())
        .ok_or_else(|| {
            Ec2Error::new(
                "InvalidAMIID.Unavailable",
                format!("The image {image_id} has no root snapshot to export"),
            )
        })?;
    let root =
        snapshot::SnapshotId::parse(&root).ok_or_else(|| Ec2Error::snapshot_not_found(&root))?;
    let id = fresh_id("export-ami");
    let task = ExportTask {
        key: format!("{prefix}{id}.{}", extension(format)),
        id,
        image_id: Some(image_id),
        instance_id: None,
        description: description(p.get("Description"))?,
        client_token: client_token(p.get("ClientToken"))?,
        disk_image_format: format_name(format).to_owned(),
        container_format: None,
        target_environment: None,
        role_name: p.get("RoleName").map(str::to_owned),
        bucket,
        prefix,
        tags: tags.into_iter().collect(),
    };
    let req = BucketExport {
        task,
        disks: vec![ExportDisk::Snapshot(root)],
        format,
        ova: None,
    };
    let h = started(&cx, req).await?;
    let mut x = Xml::response("ExportImage", cx.rid);
    write_image_task(&mut x, &h);
    Ok(x.finish("ExportImage"))
}

pub async fn describe_image_tasks(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["ExportImageTaskId", "Filter", "MaxResults", "NextToken"])?;
    let p = cx.p;
    let ids = p.list("ExportImageTaskId")?;
    let filters = p.filters()?;
    let all = tasks(&cx, "export-ami-");
    for id in &ids {
        if !all.iter().any(|(t, _)| t == id) {
            return Err(not_found(id));
        }
    }
    Describe {
        action: "DescribeExportImageTasks",
        set: "exportImageTaskSet",
        rid: cx.rid,
        ours: true,
        ids: &ids,
        filters: &filters,
        token: p.get("NextToken"),
        max: max_results(p, 1, 500)?,
    }
    .answer(
        all,
        |(id, _)| id.as_str(),
        |name, values, (_, h)| filter(name, values, image_status(&h.record(), h).0),
        |x, (_, h)| write_image_task(x, h),
    )
}

pub async fn create_instance_task(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&[
        "InstanceId",
        "TargetEnvironment",
        "ExportToS3",
        "Description",
        "TagSpecification",
    ])?;
    let p = cx.p;
    for k in p.keys_under("ExportToS3.") {
        if !matches!(
            k,
            "DiskImageFormat" | "ContainerFormat" | "S3Bucket" | "S3Prefix"
        ) {
            return Err(Ec2Error::new(
                "UnknownParameter",
                format!("The parameter ExportToS3.{k} is not recognized"),
            ));
        }
    }
    let instance = super::volumes::instance_id(p.required("InstanceId")?)?.to_owned();
    let target = p.required("TargetEnvironment")?;
    if !matches!(target, "citrix" | "vmware" | "microsoft") {
        return Err(Ec2Error::invalid_value(
            "TargetEnvironment",
            target,
            "Expecting citrix, vmware or microsoft.",
        ));
    }
    let format = disk_format(
        "ExportToS3.DiskImageFormat",
        p.get("ExportToS3.DiskImageFormat").unwrap_or("VMDK"),
    )?;
    let ova = match p.get("ExportToS3.ContainerFormat") {
        None => false,
        Some("ova") if format == ImageFormat::Vmdk => true,
        Some("ova") => {
            return Err(Ec2Error::invalid_parameter(
                "An OVA holds VMDK disks: ExportToS3.ContainerFormat=ova needs DiskImageFormat VMDK",
            ));
        }
        Some(v) => {
            return Err(Ec2Error::invalid_value(
                "ExportToS3.ContainerFormat",
                v,
                "Expecting ova.",
            ));
        }
    };
    let bucket = bucket("ExportToS3.S3Bucket", p.required("ExportToS3.S3Bucket")?)?;
    let prefix = prefix("ExportToS3.S3Prefix", p.get("ExportToS3.S3Prefix"))?;
    let tags = tag_specs(p, &["export-instance-task"])?
        .remove("export-instance-task")
        .unwrap_or_default();
    // The root first, then the data volumes in device order.
    let mut vols: Vec<(VolumeName, bool)> = cx
        .state
        .machines
        .instance_volumes(&instance, false, &[])
        .await?;
    vols.sort_by_key(|(_, root)| !*root);
    if !ova {
        vols.retain(|(_, root)| *root);
    }
    if vols.is_empty() {
        return Err(Ec2Error::new(
            "IncorrectState",
            format!("The instance {instance} has no EBS root volume to export"),
        ));
    }
    let id = fresh_id("export-i");
    let ext = if ova { "ova" } else { extension(format) };
    let task = ExportTask {
        key: format!("{prefix}{id}.{ext}"),
        id,
        image_id: None,
        instance_id: Some(instance),
        description: description(p.get("Description"))?,
        client_token: None,
        disk_image_format: format_name(format).to_owned(),
        container_format: ova.then(|| "ova".to_owned()),
        target_environment: Some(target.to_owned()),
        role_name: None,
        bucket,
        prefix,
        tags: tags.into_iter().collect(),
    };
    let req = BucketExport {
        task,
        disks: vols
            .into_iter()
            .map(|(n, _)| ExportDisk::Volume(n))
            .collect(),
        format,
        ova: ova.then_some((OVA_CPUS, OVA_MEMORY_MIB)),
    };
    let h = started(&cx, req).await?;
    let mut x = Xml::response("CreateInstanceExportTask", cx.rid);
    x.open("exportTask");
    write_instance_task(&mut x, &h);
    x.close("exportTask");
    Ok(x.finish("CreateInstanceExportTask"))
}

pub async fn describe_instance_tasks(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["ExportTaskId", "Filter"])?;
    let p = cx.p;
    let ids = p.list("ExportTaskId")?;
    let filters = p.filters()?;
    let all = tasks(&cx, "export-i-");
    for id in &ids {
        if !all.iter().any(|(t, _)| t == id) {
            return Err(not_found(id));
        }
    }
    Describe {
        action: "DescribeExportTasks",
        set: "exportTaskSet",
        rid: cx.rid,
        ours: true,
        ids: &ids,
        filters: &filters,
        token: None,
        max: None,
    }
    .answer(
        all,
        |(id, _)| id.as_str(),
        |name, values, (_, h)| filter(name, values, instance_state(&h.record(), h)),
        |x, (_, h)| write_instance_task(x, h),
    )
}

/// CancelExportTask, for both kinds of task: the job is cancelled, its
/// upload aborted, so no partial object stays.
pub async fn cancel(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&["ExportTaskId"])?;
    let id = cx.p.required("ExportTaskId")?;
    match cx.state.images.cancel_export_task(id) {
        None => return Err(not_found(id)),
        Some(Err(_)) => {
            return Err(Ec2Error::new(
                "IncorrectState",
                format!("The export task {id} has already ended and cannot be cancelled"),
            ));
        }
        Some(Ok(_)) => {}
    }
    let mut x = Xml::response("CancelExportTask", cx.rid);
    x.elem("return", true);
    Ok(x.finish("CancelExportTask"))
}

fn not_found(id: &str) -> Ec2Error {
    Ec2Error::new(
        "InvalidExportTaskID.NotFound",
        format!("The export task ID '{id}' does not exist"),
    )
}

/// The export tasks whose id starts with `kind`, by id.
fn tasks(cx: &Cx<'_>, kind: &str) -> Vec<(String, Arc<JobHandle>)> {
    let mut out: Vec<(String, Arc<JobHandle>)> = cx
        .state
        .images
        .export_tasks()
        .into_iter()
        .filter_map(|h| {
            let id = task_of(&h.record())?.id.clone();
            id.starts_with(kind).then_some((id, h))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn task_of(rec: &JobRecord) -> Option<&ExportTask> {
    rec.export()?.task.as_deref()
}

/// `task-state` is the one filter.
fn filter(name: &str, values: &[String], state: &str) -> Ec2Result<bool> {
    match name {
        "task-state" => Ok(values.iter().any(|v| v == state)),
        _ => Err(Ec2Error::invalid_parameter(format!(
            "The filter '{name}' is invalid"
        ))),
    }
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Raw => "RAW",
        ImageFormat::Vpc => "VHD",
        ImageFormat::Qcow2 => "QCOW2",
        _ => "VMDK",
    }
}

/// The percentage done, as EC2 shows it: a whole number in a string,
/// below 100 until the task completes.
fn progress(rec: &JobRecord, h: &JobHandle) -> String {
    let done = h.bytes_done.load(std::sync::atomic::Ordering::Relaxed);
    let pct = (done.saturating_mul(100))
        .checked_div(rec.bytes_total)
        .unwrap_or(0)
        .min(99);
    pct.to_string()
}

/// The message of a task that failed: EC2's `ClientError:` and the job's
/// one-line reason (which names the bucket and key for a store refusal).
fn failure(rec: &JobRecord) -> String {
    let why = rec.error.as_deref().unwrap_or("the export failed");
    format!("ClientError: {}", why.lines().next().unwrap_or(why))
}

/// ExportImageTask's `Status` and `StatusMessage`.
fn image_status(rec: &JobRecord, h: &JobHandle) -> (&'static str, Option<String>) {
    match rec.state {
        JobState::Running if h.cancel.is_cancelled() => ("deleting", None),
        JobState::Running
            if rec.snapshot.is_none()
                || h.bytes_done.load(std::sync::atomic::Ordering::Relaxed) == 0 =>
        {
            ("active", Some("validating".into()))
        }
        JobState::Running => ("active", Some("converting".into())),
        JobState::Completed => ("completed", None),
        JobState::Cancelled => ("deleted", Some("Canceled by request".into())),
        JobState::Error => ("deleted", Some(failure(rec))),
    }
}

/// ExportTask's `State` (active, cancelling, cancelled, completed): a
/// failed task is `cancelled` with the reason, as EC2 has no failed state.
fn instance_state(rec: &JobRecord, h: &JobHandle) -> &'static str {
    match rec.state {
        JobState::Running if h.cancel.is_cancelled() => "cancelling",
        JobState::Running => "active",
        JobState::Completed => "completed",
        JobState::Cancelled | JobState::Error => "cancelled",
    }
}

fn tag_set(x: &mut Xml, t: &ExportTask) {
    let tags: BTreeMap<String, String> = t.tags.iter().cloned().collect();
    x.tag_set(&tags);
}

fn write_image_task(x: &mut Xml, h: &JobHandle) {
    let rec = h.record();
    let Some(t) = task_of(&rec) else { return };
    let (status, message) = image_status(&rec, h);
    x.elem("exportImageTaskId", &t.id)
        .opt("description", t.description.as_ref())
        .opt("imageId", t.image_id.as_ref())
        .elem("diskImageFormat", &t.disk_image_format)
        .opt("roleName", t.role_name.as_ref());
    if rec.state == JobState::Running {
        x.elem("progress", progress(&rec, h));
    }
    x.open("s3ExportLocation")
        .elem("s3Bucket", &t.bucket)
        .elem("s3Prefix", &t.prefix)
        .close("s3ExportLocation")
        .elem("status", status)
        .opt("statusMessage", message);
    tag_set(x, t);
}

fn write_instance_task(x: &mut Xml, h: &JobHandle) {
    let rec = h.record();
    let Some(t) = task_of(&rec) else { return };
    let message = match rec.state {
        JobState::Error => Some(failure(&rec)),
        JobState::Cancelled => Some("Canceled by request".to_owned()),
        JobState::Running if !h.cancel.is_cancelled() => {
            Some(format!("converting ({}%)", progress(&rec, h)))
        }
        _ => None,
    };
    x.elem("exportTaskId", &t.id)
        .opt("description", t.description.as_ref())
        .elem("state", instance_state(&rec, h))
        .opt("statusMessage", message)
        .open("instanceExport")
        .opt("instanceId", t.instance_id.as_ref())
        .opt("targetEnvironment", t.target_environment.as_ref())
        .close("instanceExport")
        .open("exportToS3")
        .elem("diskImageFormat", t.disk_image_format.to_lowercase())
        .opt("containerFormat", t.container_format.as_ref())
        .elem("s3Bucket", &t.bucket)
        .elem("s3Key", &t.key)
        .close("exportToS3");
    tag_set(x, t);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_as_ec2_names_them_and_back() {
        for (name, f, ext) in [
            ("VMDK", ImageFormat::Vmdk, "vmdk"),
            ("RAW", ImageFormat::Raw, "raw"),
            ("VHD", ImageFormat::Vpc, "vhd"),
            ("QCOW2", ImageFormat::Qcow2, "qcow2"),
        ] {
            assert_eq!(disk_format("F", name).unwrap(), f);
            assert_eq!(format_name(f), name);
            assert_eq!(extension(f), ext);
        }
        for bad in ["vmdk", "VHDX", "OVA", ""] {
            assert_eq!(
                disk_format("F", bad).unwrap_err().code,
                "InvalidParameterValue"
            );
        }
    }

    #[test]
    fn bucket_names_and_prefixes_are_checked() {
        for ok in ["abc", "my-exports.2026", &"a".repeat(63)] {
            assert_eq!(bucket("B", ok).unwrap(), ok);
        }
        for bad in ["ab", "-abc", "abc-", "ABC", "a_b", "a b", &"a".repeat(64)] {
            assert!(bucket("B", bad).is_err(), "{bad}");
        }
        assert_eq!(prefix("P", None).unwrap(), "");
        assert_eq!(prefix("P", Some("vms/2026/")).unwrap(), "vms/2026/");
        assert!(prefix("P", Some("a\nb")).is_err());
        assert!(prefix("P", Some(&"p".repeat(901))).is_err());
        assert!(client_token(Some("")).is_err());
        assert!(client_token(Some(&"t".repeat(65))).is_err());
        assert_eq!(client_token(Some("t")).unwrap().as_deref(), Some("t"));
    }

    #[test]
    fn a_filter_other_than_task_state_is_refused() {
        assert!(filter("task-state", &["active".into()], "active").unwrap());
        assert!(!filter("task-state", &["deleted".into()], "active").unwrap());
        assert!(filter("image-id", &[], "active").is_err());
    }
}
