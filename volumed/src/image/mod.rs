//! VM images in and out. qemu decodes, volumed copies: the formats are read
//! by `qemu-nbd` (and inspected by `qemu-img info`), and the daemon does the
//! copying, zero detection, hashing, progress and resumption itself.
//!
//! - `format`: pure detection from the header, and the header refusals;
//! - `inspect`: the full safety check of a file (ours, then qemu's), OVA
//!   members;
//! - `qemu`: the bounded `qemu-img info` and the read-only `qemu-nbd`;
//! - `nbd_client`: our NBD client (handshake, READ, BLOCK_STATUS);
//! - `source`: one reader over a raw file or a pool of NBD connections.

pub mod format;
pub mod inspect;
pub mod nbd_client;
pub mod qemu;
pub mod source;

pub use format::{ImageFormat, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("image {0} is not a regular file")]
    NotAFile(String),
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("not a valid {format} image: {message}")]
    NotAnImage {
        format: ImageFormat,
        message: String,
    },
    #[error("{0}")]
    Qemu(#[from] qemu::QemuError),
    #[error("reading the image: {0}")]
    Nbd(#[from] nbd_client::NbdError),
    #[error("reading the image at offset={offset}: {source}")]
    Read { offset: u64, source: std::io::Error },
}

impl ImageError {
    /// Refusals and bad images are the caller's input; a missing qemu is
    /// the host's (unsupported); a failed read of a good image is internal.
    pub fn code(&self) -> volumed_api::ErrorCode {
        use volumed_api::ErrorCode;
        match self {
            ImageError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorCode::NotFound
            }
            ImageError::Open { .. } | ImageError::NotAFile(_) => ErrorCode::InvalidRequest,
            ImageError::Refused(_) | ImageError::NotAnImage { .. } => ErrorCode::InvalidRequest,
            ImageError::Qemu(qemu::QemuError::Missing { .. }) => ErrorCode::Unsupported,
            ImageError::Qemu(_) | ImageError::Nbd(_) | ImageError::Read { .. } => {
                ErrorCode::Internal
            }
        }
    }
}
