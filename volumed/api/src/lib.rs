//! Types of the volumed control API.
//!
//! Shared by the daemon and the `vol` CLI so that both agree on names, sizes
//! and JSON documents. Architecture invariant: this crate depends on serde and
//! thiserror only, so the CLI never links sled, tokio's runtime internals or
//! io_uring.

pub mod diff;
mod error_chain;
pub mod filter;
pub mod job;
pub mod key;
pub mod lifecycle;
pub mod machine;
pub mod name;
pub mod size;
pub mod types;

pub use diff::*;
pub use error_chain::error_chain;
pub use filter::{FilterError, VolumeFilter, validate_tags};
pub use job::*;
pub use key::*;
pub use lifecycle::*;
pub use machine::*;
pub use name::{NameError, VolumeName};
pub use size::{SizeError, format_size, parse_size};
pub use types::*;
