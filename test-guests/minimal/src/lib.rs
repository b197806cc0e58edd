//! The trivial consumer, built without the standard library: it acknowledges
//! every message but one whose body is `retry`.
//!
//! Its component imports the wasm-pc types and nothing else. A `std` guest
//! on `wasm32-wasip2` also imports WASI's environment, exit, stdio, streams
//! and clocks whether it uses them or not, and each import is wiring that
//! every instantiation pays for; the invoke bench puts the two side by side.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::string::String;

use exports::wasm_pc::app::consume::{ConsumeError, Guest, Message};

wit_bindgen::generate!({ world: "consumer", path: "../../wit" });

struct Minimal;

impl Guest for Minimal {
    fn handle(message: Message) -> Result<(), ConsumeError> {
        match message.body.as_slice() {
            b"retry" => Err(ConsumeError::Retry(String::from("asked to retry"))),
            _ => Ok(()),
        }
    }
}

export!(Minimal);

/// What `std` would otherwise give a guest: an allocator, the canonical
/// ABI's `cabi_realloc`, and a panic handler.
#[cfg(target_arch = "wasm32")]
mod without_std {
    use core::alloc::{GlobalAlloc, Layout};

    /// wasi-libc's `malloc`, the allocator `std` uses on this target. The
    /// `dlmalloc` crate would ask for a new wasm page at its first
    /// allocation; this one starts in the free space the module's initial
    /// memory already has. That matters: an instance that grows its memory
    /// costs the next instance in its pool slot an `mprotect`, and with
    /// threads on other cores a TLB shootdown (the invoke bench measured
    /// 17.6 µs against 9.5 µs a call).
    struct LibcMalloc;

    #[link(name = "c")]
    unsafe extern "C" {
        fn aligned_alloc(align: usize, size: usize) -> *mut u8;
        fn free(ptr: *mut u8);
        fn realloc(ptr: *mut u8, size: usize) -> *mut u8;
    }

    // SAFETY: `aligned_alloc` returns blocks aligned as asked (or null), and
    // `free` takes exactly what it returned.
    unsafe impl GlobalAlloc for LibcMalloc {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: a layout's alignment is a power of two.
            unsafe { aligned_alloc(layout.align(), layout.size()) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, _: Layout) {
            // SAFETY: `ptr` came from `alloc` above.
            unsafe { free(ptr) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: LibcMalloc = LibcMalloc;

    /// The canonical ABI's allocator: the host calls it to place a message's
    /// strings and bytes in this instance's memory.
    ///
    /// # Safety
    /// Called as the canonical ABI says: `old_ptr`/`old_len`/`align` describe
    /// a block this function returned, or `old_len` is 0.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn cabi_realloc(old_ptr: *mut u8, old_len: usize, align: usize, new_len: usize) -> *mut u8 {
        let ptr = if old_len == 0 {
            // SAFETY: any size and power-of-two alignment is valid here.
            unsafe { aligned_alloc(align, new_len.max(1)) }
        } else if align <= 16 {
            // SAFETY: `old_ptr` came from this allocator, and `realloc` keeps
            // malloc's own 16-byte alignment, which covers `align`.
            unsafe { realloc(old_ptr, new_len.max(1)) }
        } else {
            grow_overaligned(old_ptr, old_len, align, new_len)
        };
        if ptr.is_null() {
            core::arch::wasm32::unreachable()
        }
        ptr
    }

    /// `realloc` for an alignment above malloc's own: a new block, the old
    /// bytes copied over.
    fn grow_overaligned(old_ptr: *mut u8, old_len: usize, align: usize, new_len: usize) -> *mut u8 {
        // SAFETY: as in `cabi_realloc`.
        let new = unsafe { aligned_alloc(align, new_len.max(1)) };
        if !new.is_null() {
            // SAFETY: both blocks hold at least `min(old_len, new_len)` bytes
            // and do not overlap; the old one is then freed once.
            unsafe {
                core::ptr::copy_nonoverlapping(old_ptr, new, old_len.min(new_len));
                free(old_ptr);
            }
        }
        new
    }

    /// A panic ends the instance with a trap, which the host turns into a retry.
    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo) -> ! {
        core::arch::wasm32::unreachable()
    }
}
