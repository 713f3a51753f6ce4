//! A volume's bytes on the host's disk.
//!
//! A volume is a directory of sparse segment files, `seg-00000`,
//! `seg-00001`, ... each covering [`SEGMENT_SIZE`] bytes of the volume (the
//! last one shorter). One file would be simpler, but ext4 caps a file at
//! 16 TiB and volumes go to 64 TiB.
//!
//! I/O is positional on file descriptors shared by every connection, so all
//! connections' completed writes sit in the same page cache and one sync per
//! segment makes all of them durable. That is what lets the NBD server
//! advertise CAN_MULTI_CONN. The I/O itself goes through an [`IoEngine`]:
//! io_uring, or a thread pool where io_uring is unavailable.
//!
//! A FLUSH after small writes syncs the volume's intent log instead of the
//! segments (`intent_log`): one sequential write, replayed at open.

mod cipher_io;
pub mod data_file;
pub mod engine;
mod intent_log;
mod op;
mod powerloss;
pub mod sector_cipher;
mod uring;
mod write_behind;

pub use data_file::{DataFile, sync_dir};
pub use engine::{EngineChoice, IoEngine, SyncOn};
#[cfg(test)]
pub(crate) use op::OpKind;
pub use sector_cipher::SectorCipher;
