//! The images layer's errors: an image refused or unreadable
//! ([`ImageError`]), and everything a job or a request of this layer can
//! end with ([`Error`]), the engine's errors passed through unchanged.
//! Messages carry their own context only; the chain is rendered once by
//! whoever shows it.

use super::format::{ImageFormat, Refusal};
use super::{nbd_client, qemu};
use crate::catalog::JobId;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("image {0} is not a regular file")]
    NotAFile(String),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("not a valid {format} image: {message}")]
    NotAnImage {
        format: ImageFormat,
        message: String,
    },
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
    #[error("reading the image")]
    Nbd(#[from] nbd_client::NbdError),
    #[error("reading the image at offset={offset}")]
    Read { offset: u64, source: std::io::Error },
    /// An S3 bucket or object a task names.
    #[error(transparent)]
    Bucket(#[from] super::buckets::BucketError),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] crate::engine::Error),
    /// An image refused, unreadable, or failing while it was read.
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("job '{0}' not found")]
    JobNotFound(JobId),
    /// An id no job can have: named as given.
    #[error("job '{0}' not found")]
    NoSuchJobId(String),
    #[error("catalog")]
    Catalog(#[from] crate::catalog::CatalogError),
}

impl Error {
    /// The job `raw` names, or not found.
    pub fn job_id(raw: &str) -> Result<JobId> {
        JobId::parse(raw).ok_or_else(|| Error::NoSuchJobId(raw.to_owned()))
    }
}
