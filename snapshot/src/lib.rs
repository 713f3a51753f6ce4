//! Snapshot formats and object stores for volumed.
//!
//! Architecture invariant: this crate knows nothing about NBD, sled or the
//! daemon's state, so a snapshot in a store can be read, verified or restored
//! by any program that links it.

pub mod store_url;

pub use store_url::{StoreUrl, StoreUrlError};
