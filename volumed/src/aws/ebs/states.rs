//! A snapshot that exists but is in the wrong state for the call: blocks
//! written to one that is no longer pending, or listed or read from one
//! that is not yet completed. The engine answers "not found" for the
//! first (no upload) and "not completed" for the second (no manifest);
//! the client is told the state, with one shape for both.
//!
//! The EBS API reference does not document this answer. We give
//! `ValidationException` with reason `INVALID_SNAPSHOT_ID` (400), which
//! SDKs do not retry; AWS itself has been seen answering "does not exist"
//! for a snapshot in transition (coldsnap issues 43 and 141), so clients
//! handle both.

use snapshot::SnapshotId;

use super::EbsError;
use crate::aws::AwsState;
use crate::engine::snapshot_catalog::SnapshotInfo;

/// The snapshot's state in EC2's words, if this host knows the snapshot.
async fn state_of(state: &AwsState, id: &SnapshotId) -> Option<&'static str> {
    let info = state.engine.snapshot(id).await.ok()?;
    Some(match info {
        SnapshotInfo::Stored(_) => "completed",
        SnapshotInfo::Recorded { rec, .. } => match rec.state {
            crate::catalog::SnapshotState::Pending => "pending",
            crate::catalog::SnapshotState::Completed => "completed",
            crate::catalog::SnapshotState::Error => "error",
        },
    })
}

fn is_not_found(e: &EbsError) -> bool {
    e.reason == Some("SNAPSHOT_NOT_FOUND")
}

/// `e`, or, when it says a snapshot that exists does not, why blocks
/// cannot be written to it.
pub async fn refine_write(state: &AwsState, id: &SnapshotId, e: EbsError) -> EbsError {
    if !is_not_found(&e) {
        return e;
    }
    match state_of(state, id).await {
        Some(s) => EbsError::validation(
            "INVALID_SNAPSHOT_ID",
            format!(
                "The snapshot '{id}' is {s}: blocks are written only to a pending snapshot started with StartSnapshot"
            ),
        ),
        None => e,
    }
}

/// `e`, or, when the snapshot exists but is not completed, why its blocks
/// cannot be listed or read yet.
pub async fn refine_read(state: &AwsState, id: &SnapshotId, e: EbsError) -> EbsError {
    match state_of(state, id).await {
        Some(s) if s != "completed" => EbsError::validation(
            "INVALID_SNAPSHOT_ID",
            format!("The snapshot '{id}' is {s}: blocks are read only from a completed snapshot"),
        ),
        _ => e,
    }
}
