//! volumed: the block-storage daemon of one host.
//!
//! See docs/architecture.md for the map. In short: `engine` owns the volumes
//! (catalog records and data files), `nbd` serves attached volumes to
//! hypervisors, `api` is the control API the `vol` CLI speaks, and `daemon`
//! wires them together and shuts them down in order.

pub mod api;
pub mod catalog;
pub mod config;
pub mod daemon;
pub mod disk;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod nbd;
pub(crate) mod socket_path;
