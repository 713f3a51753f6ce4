//! Keys and encryption: the key service's keys (`vol key`), how a volume or
//! snapshot is encrypted, and snapshot copies.

use serde::{Deserialize, Serialize};

/// A master key of the host's key service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    /// A UUID: what manifests and wrapped data keys name.
    pub id: String,
    pub name: String,
    /// `arn:aws:kms:REGION:ACCOUNT:key/ID`, as KmsKeyId shows it.
    pub arn: String,
    /// `alias/NAME`, and `alias/aws/ebs` for the managed key.
    pub aliases: Vec<String>,
    /// `enabled`, `disabled`, or `unavailable` (its command failed).
    pub state: String,
    /// Why it is unavailable.
    #[serde(default)]
    pub reason: Option<String>,
    /// The newest version: rotation adds one.
    pub version: u32,
    /// RFC 3339, UTC.
    pub created_at: String,
    #[serde(default)]
    pub description: String,
    /// `local` (material in its key file) or `command` (an external KMS).
    pub source: String,
    /// Used when a volume names no key.
    pub default: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyList {
    pub keys: Vec<Key>,
    /// Whether the store is encrypted (keys matter only then).
    pub store_encrypted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// A shell command printing the key's material (64 hex digits) for the
    /// version in `VOLUMED_KEY_VERSION`; without it the material is random
    /// and kept in the key file.
    #[serde(default)]
    pub command: Option<String>,
}

/// `POST /v1/keys/default`: the key used when none is named; null makes
/// it the managed `aws-ebs` key again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetDefaultKey {
    #[serde(default)]
    pub key: Option<String>,
}

/// What `vol key rotate` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotation {
    pub key: Key,
    /// Encryption domains the key wraps, in the store.
    pub domains: u64,
    /// Data keys wrapped anew under the new version (no data re-encrypted).
    pub rewrapped: u64,
    /// New data keys, one per domain, that new data is sealed with.
    pub generations: u64,
}

/// How a volume or snapshot is encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionInfo {
    /// The master key's id.
    pub key_id: String,
    /// Its name on this host, if known here.
    #[serde(default)]
    pub key: Option<String>,
    /// The key's ARN (EC2's KmsKeyId).
    pub kms_key_id: String,
    /// The encryption domain (EC2's DataEncryptionKeyId): snapshots that
    /// share it share chunks.
    pub data_key_id: String,
    /// Why the key cannot be used on this host (disabled, unknown here):
    /// reads of data not yet local fail until it can.
    #[serde(default)]
    pub problem: Option<String>,
}

/// `POST /v1/snapshots/{id}/copy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopySnapshot {
    /// Copy under this key: a full copy, every chunk sealed anew, when it
    /// is not the source's; without it the copy shares the source's chunks.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}
