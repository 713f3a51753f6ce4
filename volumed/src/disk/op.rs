//! One positional I/O operation, as both engines take it: the op owns its
//! buffer for as long as the I/O runs and hands it back when it is done.
//! Its own module because the engine front (`engine.rs`) and the io_uring
//! backend (`uring.rs`) both speak it and neither should import the other
//! for it.

/// One positional operation on one file, at an offset the caller gives.
#[derive(Debug)]
pub enum OpKind {
    /// Fill the buffer from the offset.
    Read(Vec<u8>),
    /// Write the buffer at the offset.
    Write(Vec<u8>),
    /// fdatasync (`data_only`) or fsync.
    Sync { data_only: bool },
    /// fallocate(2) with `mode` over `[offset, offset + len)`.
    Fallocate { mode: i32, len: u64 },
    /// posix_fadvise WILLNEED: start reading into the page cache.
    WillNeed { len: u64 },
}

impl OpKind {
    /// Bytes a read or write moves; `None` for the other ops.
    pub fn transfer_len(&self) -> Option<usize> {
        match self {
            OpKind::Read(buf) | OpKind::Write(buf) => Some(buf.len()),
            _ => None,
        }
    }
}

/// What an engine hands back: the op's result and the op itself, so the
/// caller gets its buffer back whether the I/O succeeded or not.
pub type OpResult = (std::io::Result<()>, OpKind);
