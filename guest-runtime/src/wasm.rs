//! The allocator, `cabi_realloc` and panic report, on wasi-libc's `malloc`.

use core::alloc::{GlobalAlloc, Layout};

use crate::PanicReport;

/// wasi-libc's `malloc`, the allocator `std` uses on this target, which
/// starts in the free space of the module's initial memory. An allocator
/// that takes a new wasm page at its first allocation (the `dlmalloc` crate
/// does) costs the next instance in its pool slot an `mprotect`, and with
/// other threads a TLB shootdown: twice the time of a fresh call
/// (docs/BENCHMARKS.md).
struct LibcMalloc;

/// Every block wasi-libc's `malloc` returns is aligned to 16 bytes.
const MALLOC_ALIGN: usize = 16;

#[link(name = "c")]
unsafe extern "C" {
    fn malloc(size: usize) -> *mut u8;
    fn calloc(count: usize, size: usize) -> *mut u8;
    fn aligned_alloc(align: usize, size: usize) -> *mut u8;
    fn realloc(ptr: *mut u8, size: usize) -> *mut u8;
    fn free(ptr: *mut u8);
}

// SAFETY: each method returns a block aligned as asked (malloc's own
// alignment covers small ones; `aligned_alloc` the rest) or null, and
// `free` takes only blocks these returned.
unsafe impl GlobalAlloc for LibcMalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: any size is valid.
            unsafe { malloc(layout.size()) }
        } else {
            // SAFETY: a layout's alignment is a power of two.
            unsafe { aligned_alloc(layout.align(), layout.size()) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: any size is valid.
            unsafe { calloc(1, layout.size()) }
        } else {
            // SAFETY: `alloc` returns `layout.size()` writable bytes or null.
            unsafe {
                let ptr = self.alloc(layout);
                if !ptr.is_null() {
                    core::ptr::write_bytes(ptr, 0, layout.size());
                }
                ptr
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _: Layout) {
        // SAFETY: `ptr` came from this allocator.
        unsafe { free(ptr) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: `ptr` came from this allocator, and `realloc` keeps
            // malloc's alignment, which covers the layout's.
            unsafe { realloc(ptr, new_size) }
        } else {
            // SAFETY: as `GlobalAlloc::realloc` requires of its caller.
            unsafe { grow_overaligned(ptr, layout.size(), layout.align(), new_size) }
        }
    }
}

#[global_allocator]
static ALLOCATOR: LibcMalloc = LibcMalloc;

/// The canonical ABI's allocator: the host calls it to place a message's
/// strings and bytes in the instance's memory. The same heap as Rust's own
/// allocations, through the same choices.
///
/// # Safety
/// Called as the canonical ABI says: `old_ptr`/`old_len`/`align` describe a
/// block this function returned, or `old_len` is 0.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(old_ptr: *mut u8, old_len: usize, align: usize, new_len: usize) -> *mut u8 {
    // The canonical ABI only asks for power-of-two alignments.
    let Ok(old) = Layout::from_size_align(old_len, align) else { core::arch::wasm32::unreachable() };
    let new_len = new_len.max(1);
    let ptr = if old_len == 0 {
        // SAFETY: `align` is valid (checked above) and the size is not zero.
        unsafe { ALLOCATOR.alloc(Layout::from_size_align_unchecked(new_len, align)) }
    } else {
        // SAFETY: the block came from this allocator with the layout `old`,
        // and the new size is not zero.
        unsafe { ALLOCATOR.realloc(old_ptr, old, new_len) }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable()
    }
    ptr
}

/// `realloc` for an alignment above malloc's own: a new block, the old bytes
/// copied over, the old block freed.
///
/// # Safety
/// `old_ptr` is a block of at least `old_len` bytes from this allocator.
unsafe fn grow_overaligned(old_ptr: *mut u8, old_len: usize, align: usize, new_len: usize) -> *mut u8 {
    // SAFETY: any size and power-of-two alignment is valid here.
    let new = unsafe { aligned_alloc(align, new_len.max(1)) };
    if !new.is_null() {
        // SAFETY: both blocks hold at least `min(old_len, new_len)` bytes and
        // do not overlap; the old one is freed once.
        unsafe {
            core::ptr::copy_nonoverlapping(old_ptr, new, old_len.min(new_len));
            free(old_ptr);
        }
    }
    new
}

/// Hands `report` the panic's text ("panicked at file:line:column:" and the
/// message, cut to 1 KiB, formatted without the heap), then traps: the host
/// retries a message whose consumer trapped, and never reuses the instance.
/// A panic while reporting traps at once.
pub fn report_panic(info: &core::panic::PanicInfo<'_>, report: impl FnOnce(&str)) -> ! {
    static REPORT: PanicReport = PanicReport::new();
    REPORT.report(info, report);
    core::arch::wasm32::unreachable()
}
