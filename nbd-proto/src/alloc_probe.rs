//! Test-only: the largest single allocation a closure makes on this thread,
//! so a parser's properties can say "never allocates more than its input"
//! rather than trust it. The crate's test binary runs on this allocator;
//! it only counts, and only on threads that asked.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Probe;

thread_local! {
    /// None while not measuring; the largest size seen while measuring.
    static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note(size: usize) {
    // `try_with`: a thread being torn down has no slot, and is not measured.
    let _ = LARGEST.try_with(|l| {
        if let Some(max) = l.get() {
            l.set(Some(max.max(size)));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// probe only records sizes in a const-initialized thread local, which
// never allocates.
unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `dealloc`, and the caller's contract for `realloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static PROBE: Probe = Probe;

/// Runs `f` and returns its value with the largest allocation (in bytes)
/// it made on this thread, 0 if none.
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(Some(0)));
    let v = f();
    let max = LARGEST.with(|l| l.replace(None)).unwrap_or(0);
    (v, max)
}

#[test]
fn measures_what_it_should() {
    let (v, n) = largest_allocation(|| vec![0u8; 1000]);
    assert!(n >= 1000, "{n}");
    drop(v);
    let ((), n) = largest_allocation(|| ());
    assert_eq!(n, 0);
}
