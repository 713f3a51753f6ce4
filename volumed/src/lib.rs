//! volumed: the block-storage daemon of one host.
//!
//! See docs/architecture.md for the map. The layers, each importing only
//! the ones below it (`tests/tests/tidy.rs` keeps that true):
//!
//! - ground: `failpoint`, `child`, `socket_path`, `metrics` (counters),
//!   `disk` (data files, io_uring), `catalog` (sled);
//! - `engine`: the one owner of volume state;
//! - `images`: VM images in and out, through the engine's public functions;
//!   `lifecycle`: snapshot policies, prune and the recycle bin, likewise;
//! - shared by the front-ends: `present` (views, URIs, error codes), `tls`;
//! - front-ends, none importing another: `nbd`, `api`, `aws`, `telemetry`;
//! - wiring: `config`, `daemon` (and `main.rs`).

// Public only what another crate uses: the binary (config, daemon) and the
// benches (the chunk map, the NBD wire format).
pub(crate) mod api;
pub(crate) mod aws;
pub(crate) mod catalog;
pub(crate) mod child;
pub mod config;
pub mod daemon;
pub(crate) mod disk;
pub mod engine;
pub(crate) mod failpoint;
pub(crate) mod images;
pub mod keys;
pub mod lifecycle;
pub mod machines;
pub(crate) mod metrics;
pub mod nbd;
pub(crate) mod present;
pub(crate) mod socket_path;
pub(crate) mod telemetry;
pub(crate) mod tls;
