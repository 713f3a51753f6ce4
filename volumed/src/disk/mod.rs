//! A volume's bytes on the host's disk.
//!
//! A volume is a directory of sparse segment files, `seg-00000`,
//! `seg-00001`, ... each covering [`SEGMENT_SIZE`] bytes of the volume (the
//! last one shorter). One file would be simpler, but ext4 caps a file at
//! 16 TiB and volumes go to 64 TiB.
//!
//! I/O is positional (`pread`/`pwrite`) on shared file descriptors, so every
//! connection's completed writes are in the same page cache and one
//! `fdatasync` per segment makes all of them durable. That is what lets the
//! NBD server advertise CAN_MULTI_CONN.

pub mod data_file;

pub use data_file::{DataFile, SEGMENT_SIZE, sync_dir};
