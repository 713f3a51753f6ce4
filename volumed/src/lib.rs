//! volumed: the block-storage daemon of one host.
//!
//! See docs/architecture.md for the map. In short: `engine` owns the volumes
//! (catalog records and data files), `nbd` serves attached volumes to
//! hypervisors, `api` is the control API the `vol` CLI speaks, and `daemon`
//! wires them together and shuts them down in order.

// Public only what another crate uses: the binary (config, daemon) and the
// benches (the chunk map, the NBD wire format).
pub(crate) mod api;
pub mod aws;
pub(crate) mod catalog;
pub(crate) mod child;
pub mod config;
pub mod daemon;
pub(crate) mod disk;
pub mod engine;
pub(crate) mod error;
pub(crate) mod failpoint;
pub mod image;
pub(crate) mod metrics;
pub mod nbd;
pub(crate) mod present;
pub(crate) mod socket_path;
pub(crate) mod telemetry;
