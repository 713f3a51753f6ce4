//! The EC2 Query API: `Action=...&Version=2016-11-15` as a form body or a
//! query string, answered in EC2's XML. One routing table from action name
//! to handler; unknown actions get `InvalidAction`.
//!
//! - `params`: the flattened parameters (`X.N`, `Filter.N.Name`);
//! - `xml`: the answer and error documents;
//! - `volumes`, `snapshots`, `tags`, `instances`: the actions;
//! - `images`, `reservations`, `snapshot_sets`: images, launched
//!   instances and CreateSnapshots, over the machines layer; `mappings`:
//!   block-device mappings in EC2's words;
//! - `exports`: ExportImage, CreateInstanceExportTask and their tasks,
//!   over the images layer's export jobs;
//! - `volume_types`: sizes, IOPS and throughput per volume type;
//!   `modifications`: ModifyVolume's record, DescribeVolumesModifications;
//! - `import_tasks`: ImportSnapshot, ImportImage and their tasks.

pub mod encryption;
pub mod exports;
pub mod images;
pub mod import_tasks;
pub mod instances;
pub mod mappings;
pub mod modifications;
pub mod params;
pub mod recycle;
pub mod reservations;
pub mod snapshot_sets;
pub mod snapshots;
pub mod tags;
pub mod volume_types;
pub mod volumes;
pub mod xml;

use bytes::Bytes;
use http_body_util::Full;

use super::sigv4::AuthError;
use super::{AwsState, Refusal, Request, Response};
use crate::catalog::CatalogError;
use crate::engine::Error;
use params::Params;
use xml::Xml;

/// The API version we answer as; requests may name it or omit it.
pub const VERSION: &str = "2016-11-15";

/// An EC2 error: its code, message and HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ec2Error {
    pub code: &'static str,
    pub message: String,
    pub status: u16,
}

impl Ec2Error {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        let status = match code {
            "AuthFailure" | "SignatureDoesNotMatch" | "IncompleteSignature" => 401,
            // EC2 answers a dry run that would have succeeded with 412.
            "DryRunOperation" => 412,
            "InternalError" => 500,
            "Unavailable" => 503,
            _ => 400,
        };
        Ec2Error {
            code,
            message: message.into(),
            status,
        }
    }

    pub fn missing(name: &str) -> Self {
        Ec2Error::new(
            "MissingParameter",
            format!("The request must contain the parameter {name}"),
        )
    }

    pub fn invalid_parameter(message: impl Into<String>) -> Self {
        Ec2Error::new("InvalidParameterValue", message)
    }

    pub fn invalid_value(name: &str, value: &str, why: &str) -> Self {
        Ec2Error::new(
            "InvalidParameterValue",
            format!("Value ({value}) for parameter {name} is invalid. {why}"),
        )
    }

    pub fn volume_not_found(id: &str) -> Self {
        Ec2Error::new(
            "InvalidVolume.NotFound",
            format!("The volume '{id}' does not exist."),
        )
    }

    pub fn snapshot_not_found(id: &str) -> Self {
        Ec2Error::new(
            "InvalidSnapshot.NotFound",
            format!("The snapshot '{id}' does not exist."),
        )
    }
}

/// The engine's errors in EC2's words.
impl From<Error> for Ec2Error {
    fn from(e: Error) -> Self {
        let msg = volumed_api::error_chain(&e);
        let code = match &e {
            Error::VolumeNotFound(_) => "InvalidVolume.NotFound",
            Error::SnapshotNotFound(_) | Error::NoSuchSnapshotId(_) => "InvalidSnapshot.NotFound",
            Error::VolumeAttached(_) | Error::AttachedElsewhere(..) => "VolumeInUse",
            Error::VolumeNotAttached(_)
            | Error::SnapshotInProgress(..)
            | Error::VolumeFailed(..)
            | Error::SnapshotBusy(_)
            | Error::SnapshotNotUploading(_) => "IncorrectState",
            Error::VolumeExists(_) => "InvalidParameterValue",
            // A snapshot attached read-only, or a volume an import is
            // still filling: not in a state for the call.
            Error::SnapshotAttached(_)
            | Error::SnapshotNotAttached(_)
            | Error::VolumeImporting(..) => "IncorrectState",
            // EC2 has no protected snapshots; its nearest refusal for a
            // snapshot that may not be deleted now.
            Error::SnapshotProtected(_) | Error::BinExpired(_) => "IncorrectState",
            Error::NotInBin(_) => "InvalidSnapshot.NotFound",
            Error::SnapshotSetFailed(_) => "IncorrectState",
            Error::SnapshotSetNotFound(_) => "InvalidParameterValue",
            Error::InvalidRequest(_)
            | Error::InvalidName { .. }
            | Error::InvalidSize(_)
            | Error::InvalidLabel(..) => "InvalidParameterValue",
            // A KmsKeyId naming no key, or a key that cannot be made.
            Error::Key(_) => "InvalidParameterValue",
            Error::ShuttingDown | Error::Store { .. } | Error::SnapshotCommit { .. } => {
                "Unavailable"
            }
            Error::Catalog(_) | Error::Io { .. } => {
                tracing::error!(error = %msg, "EC2 request failed");
                "InternalError"
            }
        };
        Ec2Error::new(code, msg)
    }
}

/// The endpoint's own records (EC2 attributes) failing: internal.
impl From<CatalogError> for Ec2Error {
    fn from(e: CatalogError) -> Self {
        Ec2Error::from(Error::from(e))
    }
}

pub type Ec2Result<T> = Result<T, Ec2Error>;

/// Routes one authenticated request to its action.
pub async fn handle(state: &AwsState, req: Request) -> Response {
    let rid = req.request_id.clone();
    let result = dispatch(state, &req).await;
    match result {
        Ok(body) => xml_response(200, body),
        Err(e) => {
            tracing::info!(request_id = rid, code = e.code, message = %e.message, "EC2 request failed");
            xml_response(e.status, xml::error(e.code, &e.message, &rid))
        }
    }
}

async fn dispatch(state: &AwsState, req: &Request) -> Ec2Result<String> {
    if req.path != "/" {
        return Err(Ec2Error::new(
            "InvalidAction",
            format!("no EC2 API at path {}", req.path),
        ));
    }
    let form: &[u8] = if req.method == hyper::Method::POST {
        &req.body
    } else {
        &[]
    };
    let p = Params::parse(&req.query, form)?;
    let action = p.required("Action")?.to_owned();
    if let Some(v) = p.get("Version")
        && v != VERSION
    {
        return Err(Ec2Error::invalid_value(
            "Version",
            v,
            "this endpoint speaks 2016-11-15",
        ));
    }
    if p.bool("DryRun")? == Some(true) {
        return Err(Ec2Error::new(
            "DryRunOperation",
            "Request would have succeeded, but DryRun flag is set.",
        ));
    }
    let rid = req.request_id.as_str();
    let cx = Cx { state, p: &p, rid };
    match action.as_str() {
        "CreateVolume" => volumes::create(cx).await,
        "DescribeVolumes" => volumes::describe(cx).await,
        "ModifyVolume" => volumes::modify(cx).await,
        "DescribeVolumesModifications" => modifications::describe(cx).await,
        "DeleteVolume" => volumes::delete(cx).await,
        "AttachVolume" => volumes::attach(cx).await,
        "DetachVolume" => volumes::detach(cx).await,
        "CreateSnapshot" => snapshots::create(cx).await,
        "DescribeSnapshots" => snapshots::describe(cx).await,
        "DeleteSnapshot" => snapshots::delete(cx).await,
        "ListSnapshotsInRecycleBin" => recycle::list_snapshots(cx).await,
        "RestoreSnapshotFromRecycleBin" => recycle::restore_snapshot(cx).await,
        "ListImagesInRecycleBin" => recycle::list_images(cx).await,
        "RestoreImageFromRecycleBin" => recycle::restore_image(cx).await,
        "CopySnapshot" => encryption::copy_snapshot(cx).await,
        "EnableEbsEncryptionByDefault" => encryption::by_default(cx, Some(true)).await,
        "DisableEbsEncryptionByDefault" => encryption::by_default(cx, Some(false)).await,
        "GetEbsEncryptionByDefault" => encryption::by_default(cx, None).await,
        "GetEbsDefaultKmsKeyId" => encryption::default_key(cx, None).await,
        "ModifyEbsDefaultKmsKeyId" => encryption::default_key(cx, Some(true)).await,
        "ResetEbsDefaultKmsKeyId" => encryption::default_key(cx, Some(false)).await,
        "CreateTags" => tags::create(cx).await,
        "DeleteTags" => tags::delete(cx).await,
        "DescribeTags" => tags::describe(cx).await,
        "ModifyInstanceAttribute" => instances::modify_attribute(cx).await,
        "TerminateInstances" => instances::terminate(cx).await,
        "RegisterImage" => images::register(cx).await,
        "DescribeImages" => images::describe(cx).await,
        "DeregisterImage" => images::deregister(cx).await,
        "CreateImage" => images::create(cx).await,
        "RunInstances" => reservations::run(cx).await,
        "DescribeInstances" => reservations::describe(cx).await,
        "StopInstances" => reservations::stop(cx).await,
        "StartInstances" => reservations::start(cx).await,
        "RebootInstances" => reservations::reboot(cx).await,
        "CreateSnapshots" => snapshot_sets::create(cx).await,
        "ImportSnapshot" => import_tasks::import_snapshot(cx).await,
        "ImportImage" => import_tasks::import_image(cx).await,
        "DescribeImportSnapshotTasks" => {
            import_tasks::describe(cx, crate::catalog::TaskKind::Snapshot).await
        }
        "DescribeImportImageTasks" => {
            import_tasks::describe(cx, crate::catalog::TaskKind::Image).await
        }
        "CancelImportTask" => import_tasks::cancel(cx).await,
        "ImportVolume" | "ImportInstance" => import_tasks::legacy(&action),
        "ExportImage" => exports::export_image(cx).await,
        "DescribeExportImageTasks" => exports::describe_image_tasks(cx).await,
        "CreateInstanceExportTask" => exports::create_instance_task(cx).await,
        "DescribeExportTasks" => exports::describe_instance_tasks(cx).await,
        "CancelExportTask" => exports::cancel(cx).await,
        other => Err(Ec2Error::new(
            "InvalidAction",
            format!("The action {other} is not valid for this web service."),
        )),
    }
}

/// What every action gets.
#[derive(Clone, Copy)]
pub struct Cx<'a> {
    pub state: &'a AwsState,
    pub p: &'a Params,
    pub rid: &'a str,
}

impl Cx<'_> {
    /// Refuses parameters the action does not know, besides the common ones.
    pub fn only(&self, known: &[&str]) -> Ec2Result<()> {
        let mut all = vec!["Action", "Version", "DryRun"];
        all.extend_from_slice(known);
        match self.p.unknown(&all) {
            Some(k) => Err(Ec2Error::new(
                "UnknownParameter",
                format!("The parameter {k} is not recognized"),
            )),
            None => Ok(()),
        }
    }
}

/// MaxResults within `min..=max`, if given.
pub fn max_results(p: &Params, min: u64, max: u64) -> Ec2Result<Option<usize>> {
    match p.u64("MaxResults")? {
        None => Ok(None),
        Some(n) if (min..=max).contains(&n) => Ok(usize::try_from(n).ok()),
        Some(n) => Err(Ec2Error::invalid_value(
            "MaxResults",
            &n.to_string(),
            &format!("Expecting a value from {min} to {max}."),
        )),
    }
}

/// One page of a Describe call's answer: the items of `all` that are
/// `ours`, named in `ids` (all when none is named) and kept by every
/// filter, each written by `write` as an `item` of `set`.
pub struct Describe<'a> {
    pub action: &'a str,
    pub set: &'a str,
    pub rid: &'a str,
    pub ours: bool,
    pub ids: &'a [String],
    pub filters: &'a [(String, Vec<String>)],
    pub token: Option<&'a str>,
    pub max: Option<usize>,
}

impl Describe<'_> {
    pub fn answer<T>(
        &self,
        all: Vec<T>,
        id: impl Fn(&T) -> &str,
        matches: impl Fn(&str, &[String], &T) -> Ec2Result<bool>,
        write: impl Fn(&mut Xml, &T),
    ) -> Ec2Result<String> {
        let mut selected = Vec::new();
        for item in all {
            if !self.ours || (!self.ids.is_empty() && !self.ids.iter().any(|i| i == id(&item))) {
                continue;
            }
            let mut keep = true;
            for (name, values) in self.filters {
                keep &= matches(name, values, &item)?;
            }
            if keep {
                selected.push(item);
            }
        }
        let (selected, next) = page(selected, &id, self.token, self.max)?;
        let mut x = Xml::response(self.action, self.rid);
        x.open(self.set);
        for item in &selected {
            x.open("item");
            write(&mut x, item);
            x.close("item");
        }
        x.close(self.set);
        x.opt("nextToken", next);
        Ok(x.finish(self.action))
    }
}

/// One page of `items` (sorted by `key`) after `token` (the key of the last
/// item of the page before); returns the page and the next token.
pub fn page<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> &str,
    token: Option<&str>,
    max: Option<usize>,
) -> Ec2Result<(Vec<T>, Option<String>)> {
    let start = match token {
        None => 0,
        Some(t) => {
            if t.is_empty() || t.len() > 512 {
                return Err(Ec2Error::invalid_value(
                    "NextToken",
                    t,
                    "Invalid NextToken.",
                ));
            }
            items.partition_point(|i| key(i) <= t)
        }
    };
    let mut rest: Vec<T> = items.into_iter().skip(start).collect();
    let next = match max {
        Some(m) if rest.len() > m => {
            rest.truncate(m);
            rest.last().map(|i| key(i).to_owned())
        }
        _ => None,
    };
    Ok((rest, next))
}

fn xml_response(status: u16, body: String) -> Response {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(body)))
        .expect("a static status and header always build")
}

/// An unauthenticated or oversized request, in EC2's words.
pub fn refusal(request_id: &str, why: Refusal) -> Response {
    let e = match why {
        Refusal::TooLarge => Ec2Error::invalid_parameter("request body is too large or too slow"),
        Refusal::Auth(a) => match a {
            AuthError::Missing => Ec2Error::new(
                "AuthFailure",
                "AWS was not able to validate the provided access credentials: the request is not signed",
            ),
            AuthError::UnknownKey(_) => Ec2Error::new(
                "AuthFailure",
                "AWS was not able to validate the provided access credentials",
            ),
            AuthError::Malformed(m) => Ec2Error::new("IncompleteSignature", m),
            AuthError::Expired(m) => Ec2Error::new("RequestExpired", m),
            e @ (AuthError::Scope(_) | AuthError::Mismatch | AuthError::PayloadHash) => {
                Ec2Error::new("SignatureDoesNotMatch", e.to_string())
            }
        },
    };
    xml_response(e.status, xml::error(e.code, &e.message, request_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_everything_once() {
        let items: Vec<String> = (0..23).map(|i| format!("vol-{i:02}")).collect();
        let mut token: Option<String> = None;
        let mut seen = Vec::new();
        loop {
            let (p, next) = page(items.clone(), |s| s.as_str(), token.as_deref(), Some(5)).unwrap();
            assert!(p.len() <= 5);
            seen.extend(p);
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!(seen, items);
        let (all, next) = page(items.clone(), |s| s.as_str(), None, None).unwrap();
        assert_eq!((all.len(), next), (23, None));
        assert!(page(items, |s| s.as_str(), Some(""), None).is_err());
    }

    #[test]
    fn engine_errors_map_to_ec2_codes() {
        let n = volumed_api::VolumeName::parse("v").unwrap();
        assert_eq!(
            Ec2Error::from(Error::VolumeNotFound(n.clone())).code,
            "InvalidVolume.NotFound"
        );
        assert_eq!(
            Ec2Error::from(Error::VolumeAttached(n.clone())).code,
            "VolumeInUse"
        );
        assert_eq!(
            Ec2Error::from(Error::VolumeNotAttached(n)).code,
            "IncorrectState"
        );
        assert_eq!(
            Ec2Error::from(Error::InvalidSize("x".into())).code,
            "InvalidParameterValue"
        );
    }
}
