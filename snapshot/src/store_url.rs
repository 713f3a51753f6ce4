//! Where snapshots live: `file:///abs/dir` or `s3://bucket[/prefix]`.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A local directory (the embedded default).
    File(PathBuf),
    /// An S3 bucket; endpoint, region and credentials come from the standard
    /// AWS environment.
    S3 { bucket: String, prefix: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreUrlError {
    #[error("store url {0:?} has no scheme; use file:///DIR or s3://BUCKET[/PREFIX]")]
    NoScheme(String),
    #[error("store url {url:?} has unsupported scheme {scheme:?}; use file:// or s3://")]
    Scheme { url: String, scheme: String },
    #[error("store url {0:?} must name an absolute directory (file:///DIR)")]
    RelativePath(String),
    #[error("store url {url:?} has an invalid bucket name {bucket:?}")]
    Bucket { url: String, bucket: String },
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<Self, StoreUrlError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| StoreUrlError::NoScheme(url.to_owned()))?;
        match scheme {
            "file" => {
                if !rest.starts_with('/') {
                    return Err(StoreUrlError::RelativePath(url.to_owned()));
                }
                Ok(StoreUrl::File(PathBuf::from(rest)))
            }
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if !valid_bucket(bucket) {
                    return Err(StoreUrlError::Bucket {
                        url: url.to_owned(),
                        bucket: bucket.to_owned(),
                    });
                }
                Ok(StoreUrl::S3 {
                    bucket: bucket.to_owned(),
                    prefix: prefix.trim_matches('/').to_owned(),
                })
            }
            other => Err(StoreUrlError::Scheme {
                url: url.to_owned(),
                scheme: other.to_owned(),
            }),
        }
    }
}

/// S3's bucket naming rules: 3 to 63 of lowercase letters, digits, `.` and
/// `-`, starting and ending with a letter or digit.
fn valid_bucket(b: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (3..=63).contains(&b.len())
        && b.chars().all(ok_char)
        && edge(b.chars().next())
        && edge(b.chars().last())
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::File(p) => write!(f, "file://{}", p.display()),
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds() {
        assert_eq!(
            StoreUrl::parse("file:///var/lib/x").unwrap(),
            StoreUrl::File("/var/lib/x".into())
        );
        assert_eq!(
            StoreUrl::parse("s3://snaps/host-a/").unwrap(),
            StoreUrl::S3 {
                bucket: "snaps".into(),
                prefix: "host-a".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("s3://snaps").unwrap().to_string(),
            "s3://snaps"
        );
    }

    #[test]
    fn rejects_bad_urls() {
        assert!(matches!(
            StoreUrl::parse("/tmp/x"),
            Err(StoreUrlError::NoScheme(_))
        ));
        assert!(matches!(
            StoreUrl::parse("file://rel/x"),
            Err(StoreUrlError::RelativePath(_))
        ));
        assert!(matches!(
            StoreUrl::parse("gs://b"),
            Err(StoreUrlError::Scheme { .. })
        ));
        assert!(matches!(
            StoreUrl::parse("s3://UP"),
            Err(StoreUrlError::Bucket { .. })
        ));
        assert!(matches!(
            StoreUrl::parse("s3://"),
            Err(StoreUrlError::Bucket { .. })
        ));
    }
}
