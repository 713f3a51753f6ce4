//! The one place an error becomes a control-API answer: [`api_code`] maps
//! every kind of error the engine, the images layer and the lifecycle
//! layer return to its API code (whose HTTP status
//! `volumed_api::ErrorCode::http_status` gives), and the message is the error's chain, rendered once
//! (`volumed_api::error_chain`). The AWS endpoint keeps its own mapping to
//! EC2 and EBS codes.

use std::error::Error as StdError;

use volumed_api::ErrorCode;

use crate::engine::Error as EngineError;
use crate::images::{Error as ImagesError, ImageError, qemu::QemuError};
use crate::lifecycle::LifecycleError;

/// The API code of `e`: an engine error, an images error, or anything
/// else (internal).
pub fn api_code(e: &(dyn StdError + 'static)) -> ErrorCode {
    if let Some(e) = e.downcast_ref::<EngineError>() {
        return match e {
            EngineError::InvalidRequest(_) | EngineError::InvalidLabel(..) => {
                ErrorCode::InvalidRequest
            }
            EngineError::InvalidName { .. } => ErrorCode::InvalidName,
            EngineError::InvalidSize(_) => ErrorCode::InvalidSize,
            EngineError::VolumeNotFound(_)
            | EngineError::SnapshotNotFound(_)
            | EngineError::NoSuchSnapshotId(_)
            | EngineError::SnapshotNotUploading(_) => ErrorCode::NotFound,
            EngineError::VolumeExists(_) => ErrorCode::AlreadyExists,
            EngineError::VolumeAttached(_) | EngineError::AttachedElsewhere(..) => {
                ErrorCode::VolumeAttached
            }
            EngineError::VolumeNotAttached(_) => ErrorCode::VolumeNotAttached,
            EngineError::SnapshotInProgress(..)
            | EngineError::VolumeFailed(..)
            | EngineError::SnapshotBusy(_)
            | EngineError::VolumeImporting(..) => ErrorCode::Conflict,
            EngineError::ShuttingDown => ErrorCode::ShuttingDown,
            EngineError::Store { .. } | EngineError::SnapshotCommit { .. } => {
                ErrorCode::StoreUnavailable
            }
            EngineError::SnapshotAttached(_) => ErrorCode::SnapshotAttached,
            EngineError::SnapshotNotAttached(_) => ErrorCode::SnapshotNotAttached,
            EngineError::SnapshotProtected(_) => ErrorCode::SnapshotProtected,
            EngineError::NotInBin(_) => ErrorCode::NotFound,
            EngineError::BinExpired(_) => ErrorCode::Conflict,
            EngineError::Key(e) => e.code(),
            EngineError::SnapshotSetFailed(_) => ErrorCode::Conflict,
            EngineError::SnapshotSetNotFound(_) => ErrorCode::NotFound,
            EngineError::Catalog(_) | EngineError::Io { .. } => ErrorCode::Internal,
        };
    }
    if let Some(e) = e.downcast_ref::<LifecycleError>() {
        return match e {
            LifecycleError::Engine(e) => api_code(e),
            LifecycleError::Machine(e) => api_code(e),
            LifecycleError::Invalid(_) => ErrorCode::InvalidRequest,
            LifecycleError::PolicyNotFound(_) | LifecycleError::RuleNotFound(_) => {
                ErrorCode::NotFound
            }
            LifecycleError::PolicyExists(_) => ErrorCode::AlreadyExists,
            LifecycleError::RuleLocked(_) => ErrorCode::Conflict,
            LifecycleError::Catalog(_) => ErrorCode::Internal,
        };
    }
    if let Some(e) = e.downcast_ref::<crate::machines::MachineError>() {
        return match e {
            crate::machines::MachineError::Engine(e) => api_code(e),
            e => e.code().unwrap_or(ErrorCode::Internal),
        };
    }
    if let Some(e) = e.downcast_ref::<ImagesError>() {
        return match e {
            ImagesError::Engine(e) => api_code(e),
            ImagesError::Image(e) => api_code(e),
            ImagesError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            ImagesError::JobNotFound(_) | ImagesError::NoSuchJobId(_) => ErrorCode::NotFound,
            ImagesError::Catalog(_) => ErrorCode::Internal,
        };
    }
    if let Some(e) = e.downcast_ref::<ImageError>() {
        // Refusals and bad images are the caller's input; a missing qemu is
        // the host's (unsupported); a failed read of a good image is
        // internal.
        return match e {
            ImageError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorCode::NotFound
            }
            ImageError::Open { .. } | ImageError::NotAFile(_) => ErrorCode::InvalidRequest,
            ImageError::Refused(_) | ImageError::NotAnImage { .. } => ErrorCode::InvalidRequest,
            ImageError::Qemu(QemuError::Missing { .. }) => ErrorCode::Unsupported,
            ImageError::Bucket(b) => {
                use crate::images::buckets::BucketError as B;
                match b {
                    B::InvalidName(_) | B::TooLarge { .. } | B::Changed { .. } => {
                        ErrorCode::InvalidRequest
                    }
                    B::NoSuchBucket(_) | B::NoSuchKey { .. } => ErrorCode::NotFound,
                    B::NotConfigured(_) => ErrorCode::Unsupported,
                    B::Cancelled => ErrorCode::ShuttingDown,
                    B::AccessDenied { .. } | B::Store { .. } => ErrorCode::StoreUnavailable,
                    B::Local { .. } => ErrorCode::Internal,
                }
            }
            ImageError::Url(u) => {
                use crate::images::url::UrlError as U;
                match u {
                    U::Invalid(_) | U::TooLarge { .. } | U::Short { .. } => {
                        ErrorCode::InvalidRequest
                    }
                    U::Status { .. } => ErrorCode::NotFound,
                    U::Connect { .. } | U::TimedOut { .. } => ErrorCode::StoreUnavailable,
                    U::Cancelled => ErrorCode::ShuttingDown,
                    U::Local { .. } => ErrorCode::Internal,
                }
            }
            ImageError::Qemu(_) | ImageError::Nbd(_) | ImageError::Read { .. } => {
                ErrorCode::Internal
            }
        };
    }
    ErrorCode::Internal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_error_through_the_layers() {
        let name = volumed_api::VolumeName::parse("a").unwrap();
        let e = EngineError::VolumeNotFound(name.clone());
        assert_eq!(api_code(&e), ErrorCode::NotFound);
        let wrapped = ImagesError::from(EngineError::VolumeAttached(name));
        assert_eq!(api_code(&wrapped), ErrorCode::VolumeAttached);
        let io = EngineError::io("flush volume 'a'", std::io::Error::from_raw_os_error(5));
        assert_eq!(api_code(&io), ErrorCode::Internal);
        assert_eq!(
            volumed_api::error_chain(&io),
            "flush volume 'a': Input/output error (os error 5)"
        );
        let missing = ImagesError::Image(ImageError::NotAFile("/x".into()));
        assert_eq!(api_code(&missing), ErrorCode::InvalidRequest);
        assert_eq!(api_code(&std::io::Error::other("x")), ErrorCode::Internal);
        let id = snapshot::SnapshotId::parse("snap-0123456789abcdef0").unwrap();
        let protected = LifecycleError::from(EngineError::SnapshotProtected(id));
        assert_eq!(api_code(&protected), ErrorCode::SnapshotProtected);
        let missing = LifecycleError::PolicyNotFound("daily".into());
        assert_eq!(api_code(&missing), ErrorCode::NotFound);
    }
}
