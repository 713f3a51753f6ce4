//! One positional I/O operation, as both engines take it: the op owns its
//! buffer for as long as the I/O runs and hands it back when it is done.
//! Its own module because the engine front (`engine.rs`) and the io_uring
//! backend (`uring.rs`) both speak it and neither should import the other
//! for it.

/// One positional operation on one file, at an offset the caller gives.
#[derive(Debug)]
pub enum OpKind {
    /// Fill the buffer from the offset.
    Read(ReadBuf),
    /// Write the buffer at the offset.
    Write(Vec<u8>),
    /// fdatasync (`data_only`) or fsync.
    Sync { data_only: bool },
    /// fallocate(2) with `mode` over `[offset, offset + len)`.
    Fallocate { mode: i32, len: u64 },
    /// posix_fadvise WILLNEED: start reading into the page cache.
    WillNeed { len: u64 },
    /// sync_file_range(SYNC_FILE_RANGE_WRITE): start writing the range's
    /// dirty pages to disk. Waits for nothing and makes nothing durable
    /// (no metadata, no cache flush): only a FLUSH's fdatasync does.
    WriteBack { len: u64 },
}

impl OpKind {
    /// Bytes a read or write moves; `None` for the other ops.
    pub fn transfer_len(&self) -> Option<usize> {
        match self {
            OpKind::Read(buf) => Some(buf.want),
            OpKind::Write(buf) => Some(buf.len()),
            _ => None,
        }
    }
}

/// A read's destination. A large read from the page cache spent a tenth of
/// its CPU zeroing a buffer the kernel then overwrote, so the buffer may
/// start uninitialised: `vec` holds only the bytes known to be written (the
/// ring writes into its spare capacity and grows it), and `want` is the
/// size asked for. A read either fills all of `want` or fails.
#[derive(Debug)]
pub struct ReadBuf {
    vec: Vec<u8>,
    want: usize,
}

impl ReadBuf {
    /// A buffer for `want` bytes, none of them written yet.
    pub fn uninit(want: usize) -> Self {
        ReadBuf {
            vec: Vec::with_capacity(want),
            want,
        }
    }

    /// Where the bytes after the first `done` go, and how many they are.
    pub fn rest_ptr(&mut self, done: usize) -> (*mut u8, usize) {
        let done = done.min(self.want);
        // SAFETY: `done <= want <= capacity`, so the pointer stays inside
        // the allocation; writing through it is up to the caller.
        let ptr = unsafe { self.vec.as_mut_ptr().add(done) };
        (ptr, self.want - done)
    }

    /// Records that the first `done` bytes are written.
    ///
    /// # Safety
    /// Every byte below `done` must have been written (through `rest_ptr`,
    /// or because the buffer started initialised).
    pub unsafe fn written_to(&mut self, done: usize) {
        let len = done.min(self.want);
        if len > self.vec.len() {
            // SAFETY: the caller vouches the bytes below `len` are
            // initialised, and `len <= want <= capacity`.
            unsafe { self.vec.set_len(len) }
        }
    }

    /// The whole buffer as a slice, zero-filled past what was written: for
    /// blocking reads, which want initialised memory and redo the whole op.
    pub fn whole_mut(&mut self) -> &mut [u8] {
        self.vec.resize(self.want, 0);
        &mut self.vec
    }

    /// The bytes read. Only a read that succeeded wrote all of them; the
    /// rest are zeros, so uninitialised memory is never exposed.
    pub fn into_vec(mut self) -> Vec<u8> {
        self.vec.resize(self.want, 0);
        self.vec
    }
}

impl From<Vec<u8>> for ReadBuf {
    /// A buffer that starts with these bytes; the read overwrites them.
    fn from(vec: Vec<u8>) -> Self {
        let want = vec.len();
        ReadBuf { vec, want }
    }
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    /// The bytes written so far.
    fn deref(&self) -> &[u8] {
        &self.vec
    }
}

impl PartialEq<Vec<u8>> for ReadBuf {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.vec.len() == self.want && self.vec == *other
    }
}

/// What an engine hands back: the op's result and the op itself, so the
/// caller gets its buffer back whether the I/O succeeded or not.
pub type OpResult = (std::io::Result<()>, OpKind);
