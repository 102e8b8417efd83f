//! Shared by the fuzz targets (included with `#[path]`, not a crate).
//!
//! libFuzzer's `-malloc_limit_mb` only works with a sanitizer's allocator, and
//! these targets run without one (stable toolchain, `--sanitizer none`), and an
//! untouched `Vec::with_capacity` never shows in RSS. So this allocator aborts on
//! any single allocation above [`MAX_ALLOC`]: a length read from store bytes
//! that turns into a huge allocation is a bug libFuzzer then reports as a crash.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};

/// Larger than any bound the parsers are meant to allocate up to for a small
/// input (64 MiB for a whole entry in memory), far below what a lying u32/u64
/// length asks for.
pub const MAX_ALLOC: usize = 128 << 20;

pub struct Guard;

unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

fn check(size: usize) {
    if size > MAX_ALLOC {
        // No formatting (it would allocate): write a fixed message and abort,
        // which libFuzzer records as a crash with the input.
        let msg =
            b"fuzz: single allocation above MAX_ALLOC (a length from the input was trusted)\n";
        unsafe {
            libc_write(2, msg.as_ptr(), msg.len());
        }
        std::process::abort();
    }
}

extern "C" {
    #[link_name = "write"]
    fn libc_write(fd: i32, buf: *const u8, count: usize) -> isize;
}

#[global_allocator]
static GLOBAL: Guard = Guard;

/// Reads a little-endian u64 from the front of `data` (zero-padded), returning the rest.
pub fn take_u64(data: &[u8]) -> (u64, &[u8]) {
    let n = data.len().min(8);
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&data[..n]);
    (u64::from_le_bytes(b), &data[n..])
}
