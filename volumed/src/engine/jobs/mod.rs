//! Background work on volumes, each kind a struct that owns its running
//! jobs, their cancellation tokens and their task tracker:
//! - [`snapshot::SnapshotJobs`]: uploads of frozen volumes to the store;
//! - [`hydrate::Hydrator`]: restored volumes filling themselves in.
//!
//! Shutdown cancels them first (their tokens are children of nothing the
//! data path uses), waits for their tasks, then the engine flushes.

pub mod hydrate;
pub mod snapshot;
