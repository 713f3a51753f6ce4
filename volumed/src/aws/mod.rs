//! The AWS-compatible endpoint (`--aws-listen`): the EC2 Query API's volume,
//! snapshot, tag and instance-attachment actions, and the EBS direct APIs,
//! so `aws`, boto3, Terraform's EC2 resources and coldsnap work against
//! volumed unchanged. See docs/aws-api.md for what is served.
//!
//! - `server`: the HTTP listener (plain or TLS), one request at a time per
//!   connection, bodies bounded;
//! - `credentials` and `sigv4`: who may call, checked on every request
//!   before anything else reads it;
//! - `ec2`: `POST /` (or `GET /?Action=`) with form parameters, XML answers;
//! - `ebs`: REST/JSON under `/snapshots`.
//!
//! Architecture invariant: this module only translates. Every rule about
//! volumes and snapshots is the engine's, reached through the same methods
//! the control API calls.

pub mod attrs;
pub mod credentials;
pub mod dlm;
pub mod ebs;
pub mod ec2;
pub mod rbin;
pub mod server;
pub mod sigv4;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;

use crate::engine::Engine;
use crate::present::NbdEndpoints;
use crate::tls::TlsFiles;
use attrs::Ec2Attributes;
use credentials::Credentials;

/// The endpoint's settings from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsConfig {
    pub listen: SocketAddr,
    pub credentials: PathBuf,
    pub region: String,
    /// When set, the endpoint speaks HTTPS only.
    pub tls: Option<TlsFiles>,
}

/// The account id every resource reports as its owner, and `self` means.
pub const OWNER_ID: &str = crate::keys::ACCOUNT_ID;
/// The availability zone volumes report: one host is one zone.
pub fn availability_zone(region: &str) -> String {
    format!("{region}a")
}

#[derive(Debug, thiserror::Error)]
#[error("invalid --aws-region {0:?}: expected lowercase letters, digits and dashes")]
pub struct InvalidRegion(String);

/// A region name as AWS spells them: lowercase letters, digits and dashes.
pub fn region(s: &str) -> Result<String, InvalidRegion> {
    let ok = (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return Err(InvalidRegion(s.to_owned()));
    }
    Ok(s.to_owned())
}

/// What every request handler shares.
pub struct AwsState {
    pub engine: Arc<Engine>,
    /// Snapshot policies (DLM) and the recycle bin (rbin, EC2's recycle
    /// actions); every snapshot deletion goes through it.
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    /// Images and instances.
    pub machines: Arc<crate::machines::Machines>,
    /// VM import and export tasks (and the jobs they are).
    pub images: Arc<crate::images::Images>,
    /// The endpoint's own records: EC2 attributes of volumes and snapshots.
    pub attrs: Ec2Attributes,
    pub endpoints: Arc<NbdEndpoints>,
    pub credentials: Credentials,
    pub region: String,
    pub ebs_tokens: ebs::write::Tokens,
}

pub type Response = hyper::Response<Full<Bytes>>;

/// A request as the handlers see it, after its signature was verified.
pub struct Request {
    pub method: hyper::Method,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub request_id: String,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why the listener answered a request before routing it.
pub enum Refusal {
    Auth(sigv4::AuthError),
    TooLarge,
}

/// Which API a path belongs to, and so the service name it is signed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Ec2,
    Ebs,
    Rbin,
    Dlm,
}

impl Service {
    pub fn of(path: &str) -> Service {
        if path == "/snapshots" || path.starts_with("/snapshots/") {
            Service::Ebs
        } else if path == "/rules" || path.starts_with("/rules/") || path == "/list-rules" {
            Service::Rbin
        } else if let Some(arn) = path.strip_prefix("/tags/") {
            // Recycle Bin and DLM both tag at /tags/{ARN}: the ARN's
            // service (`arn:aws:rbin:…`, its colons maybe escaped) decides.
            let arn = sigv4::percent_decode(arn).unwrap_or_default();
            if arn.split(|b| *b == b':').nth(2) == Some(b"rbin".as_slice()) {
                Service::Rbin
            } else {
                Service::Dlm
            }
        } else if path == "/policies" || path.starts_with("/policies/") {
            Service::Dlm
        } else {
            Service::Ec2
        }
    }

    pub fn signing_name(self) -> &'static str {
        match self {
            Service::Ec2 => "ec2",
            Service::Ebs => "ebs",
            Service::Rbin => "rbin",
            Service::Dlm => "dlm",
        }
    }
}

/// A request id in AWS's shape (a UUID), unique enough to find a request
/// in the log.
pub fn request_id() -> String {
    let h = snapshot::ChunkHash::of(snapshot::SnapshotId::generate().as_str().as_bytes()).to_hex();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Seconds since the Unix epoch as EC2 writes times: ISO 8601 with
/// milliseconds, UTC.
pub fn iso8601(secs: u64) -> String {
    let t = i64::try_from(secs).unwrap_or(i64::MAX);
    let (days, rem) = (t.div_euclid(86400), t.rem_euclid(86400));
    let (y, m, d) = sigv4::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// RFC 3339 as the control API and manifests write it, to Unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    humantime::parse_rfc3339(s)
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_ids() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_440_938_160), "2015-08-30T12:36:00.000Z");
        assert_eq!(parse_rfc3339("2015-08-30T12:36:00Z"), Some(1_440_938_160));
        assert_eq!(request_id().len(), 36);
        assert!(region("us-east-1").is_ok());
        assert!(region("US").is_err() && region("").is_err());
        assert_eq!(Service::of("/snapshots/snap-1/blocks"), Service::Ebs);
        assert_eq!(Service::of("/snapshots"), Service::Ebs);
        assert_eq!(Service::of("/"), Service::Ec2);
        assert_eq!(Service::of("/snapshotsx"), Service::Ec2);
    }
}
