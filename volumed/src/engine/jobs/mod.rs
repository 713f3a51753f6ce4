//! Background work on volumes, each kind a struct that owns its running
//! jobs, their cancellation tokens and their task tracker:
//! - [`snapshot::SnapshotJobs`]: uploads of frozen volumes to the store,
//!   and (through [`block_upload::BlockUploads`]) snapshots clients send
//!   block by block, and (through [`copy::CopyJobs`]) copies of
//!   snapshots, under the same commit protocol;
//! - [`hydrate::Hydrator`]: restored volumes filling themselves in;
//! - [`import::ImportJobs`]: VM images copied into new volumes, tracked in
//!   [`registry::JobRegistry`] with the exports;
//! - [`export::ExportJobs`]: snapshots written out as images;
//! - [`work::WorkDirs`]: the imports' private directories, emptied at start.
//!
//! Shutdown cancels them first (their tokens are children of nothing the
//! data path uses), waits for their tasks, then the engine flushes.

pub mod block_upload;
pub mod copy;
pub mod export;
pub mod hydrate;
pub mod import;
pub mod registry;
pub mod snapshot;
pub mod work;
