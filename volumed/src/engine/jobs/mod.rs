//! Background work on volumes, each kind a struct that owns its running
//! jobs, their cancellation tokens and their task tracker:
//! - [`snapshot::SnapshotJobs`]: uploads of frozen volumes to the store,
//!   and (through [`block_upload::BlockUploads`]) snapshots clients send
//!   block by block, and (through [`copy::CopyJobs`]) copies of
//!   snapshots, under the same commit protocol;
//! - [`hydrate::Hydrator`]: restored volumes filling themselves in.
//!
//! Shutdown cancels them first (their tokens are children of nothing the
//! data path uses), waits for their tasks, then the engine flushes. Imports
//! and exports are jobs of the images layer, above the engine.

pub mod block_upload;
pub mod copy;
pub mod hydrate;
pub mod snapshot;
mod snapshot_outcome;
