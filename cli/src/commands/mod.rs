//! One file per noun.

pub mod status;
pub mod volume;
