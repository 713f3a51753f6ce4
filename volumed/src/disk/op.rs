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
    /// Write an aligned buffer at the offset, on a file opened O_DIRECT.
    WriteDirect(AlignedBuf),
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
            OpKind::WriteDirect(buf) => Some(buf.len()),
            _ => None,
        }
    }
}

/// What an engine hands back: the op's result and the op itself, so the
/// caller gets its buffer back whether the I/O succeeded or not.
pub type OpResult = (std::io::Result<()>, OpKind);

/// A buffer at a [`AlignedBuf::ALIGN`]-byte boundary, for O_DIRECT writes,
/// whose memory the kernel reads straight from. Taken from and given back
/// to a small pool, so its pages stay mapped between uses: on a VM a fresh
/// page costs more to touch the first time than the copy into it.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: the buffer owns its allocation outright, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads, like `&[u8]`.
unsafe impl Sync for AlignedBuf {}

/// Buffers kept for reuse; enough for hydration's fetches in flight.
static POOL: std::sync::Mutex<Vec<AlignedBuf>> = std::sync::Mutex::new(Vec::new());
const POOL_MAX: usize = 32;

impl AlignedBuf {
    /// What O_DIRECT needs of memory, offsets and lengths on the devices we
    /// serve from (4 KiB logical blocks or smaller).
    pub const ALIGN: usize = 4096;

    fn layout(cap: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(cap, Self::ALIGN).expect("aligned layout")
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_of(data: &[u8]) -> Self {
        let pooled = {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            pool.iter()
                .position(|b| b.cap >= data.len())
                .map(|i| pool.swap_remove(i))
        };
        let mut buf = pooled.unwrap_or_else(|| {
            let cap = data.len().max(1).next_multiple_of(Self::ALIGN);
            // SAFETY: the layout has a non-zero size.
            let raw = unsafe { std::alloc::alloc(Self::layout(cap)) };
            let ptr = std::ptr::NonNull::new(raw)
                .unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout(cap)));
            AlignedBuf { ptr, len: 0, cap }
        });
        // SAFETY: `cap >= data.len()` bytes are allocated at `ptr`, and
        // `data` cannot overlap memory this buffer owns.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), buf.ptr.as_ptr(), data.len());
        }
        buf.len = data.len();
        buf
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were written by `copy_of`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Back to the pool, or freed if the pool is full.
    pub fn recycle(self) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `copy_of` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::AlignedBuf;

    #[test]
    fn aligned_copies_hold_their_bytes_and_are_reused() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let a = AlignedBuf::copy_of(&data);
        assert_eq!(a.as_ptr_addr() % AlignedBuf::ALIGN, 0);
        assert_eq!(a.as_slice(), &data[..]);
        a.recycle();
        // A shorter copy fits a pooled buffer and sees only its own bytes.
        let b = AlignedBuf::copy_of(&data[..4096]);
        assert_eq!(b.as_ptr_addr() % AlignedBuf::ALIGN, 0);
        assert_eq!(b.as_slice(), &data[..4096]);
        assert_eq!(b.len(), 4096);
    }

    impl AlignedBuf {
        fn as_ptr_addr(&self) -> usize {
            self.ptr.as_ptr() as usize
        }
    }
}
