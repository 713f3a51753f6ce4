//! One file per noun.

pub mod diff;
pub mod export;
pub mod import;
pub mod job;
pub mod snapshot;
pub mod status;
pub mod volume;
