//! Changed blocks between snapshots: `GET /v1/snapshots/{to}/diff` for the
//! whole answer, and `GET /v1/snapshots/{to}/changed-blocks`, paged, with
//! the field names of Kubernetes CSI SnapshotMetadata.

use serde::{Deserialize, Serialize};

/// A byte range that differs between two snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffExtent {
    pub offset: u64,
    pub length: u64,
    /// The range is zeros in the newer snapshot (trimmed or zeroed).
    pub zero: bool,
}

/// `vol snapshot diff --json`: what changed from `from` to `to`; without
/// `from`, the ranges of `to` that hold data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDiff {
    pub from: Option<String>,
    pub to: String,
    pub volume_size: u64,
    pub chunk_size: u64,
    /// The sum of the extents' lengths.
    pub changed_bytes: u64,
    /// Ascending; adjacent chunks of the same kind merged into one.
    pub extents: Vec<DiffExtent>,
}

/// One changed range, as CSI's `BlockMetadata`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMetadata {
    pub byte_offset: u64,
    pub size_bytes: u64,
}

/// A page of changed blocks, as CSI's `GetMetadataDeltaResponse` (with
/// `from`) or `GetMetadataAllocatedResponse` (without).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedBlocks {
    /// Always `VARIABLE_LENGTH`: ranges are merged runs of chunks.
    pub block_metadata_type: String,
    pub volume_capacity_bytes: u64,
    pub block_metadata: Vec<BlockMetadata>,
    /// Pass back as `next_token` for the next page; null on the last one.
    pub next_token: Option<String>,
}
