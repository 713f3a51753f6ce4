//! One file per noun.

pub mod snapshot;
pub mod status;
pub mod volume;
