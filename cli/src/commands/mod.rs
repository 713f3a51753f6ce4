//! One file per noun.

pub mod diff;
pub mod snapshot;
pub mod status;
pub mod volume;
