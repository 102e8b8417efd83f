//! Shared by the fuzz targets (included with `#[path]`, not a crate).
//!
//! libFuzzer's `-malloc_limit_mb` needs a sanitizer's allocator to see
//! allocations, and these targets run without one (stable toolchain,
//! `--sanitizer none`); `-rss_limit_mb` alone misses memory that is allocated
//! but never touched (an untouched `Vec::with_capacity`, many small ones
//! above all). So this allocator counts the bytes the target holds and hands
//! libFuzzer's malloc hook (installed through the sanitizer interface it looks
//! for, [`__sanitizer_install_malloc_and_free_hooks`]) the heap held after
//! each allocation: `-malloc_limit_mb=N` then stops any input whose
//! allocations together reach N MiB, one huge allocation being the extreme
//! case, and libFuzzer reports it as `out-of-memory (malloc(<bytes held>))`
//! with the input saved. Without the hook (a libFuzzer run with
//! `-detect_leaks=0`) a single allocation above [`MAX_ALLOC`] aborts instead.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Larger than any bound the parsers are meant to allocate up to for a small
/// input (64 MiB for a whole entry in memory), far below what a lying u32/u64
/// length asks for. Only used when libFuzzer installed no malloc hook.
pub const MAX_ALLOC: usize = 128 << 20;

/// Bytes currently allocated through [`Guard`] (requested sizes).
static HELD: AtomicUsize = AtomicUsize::new(0);
/// libFuzzer's malloc hook (`void (*)(const volatile void *, size_t)`), 0 until installed.
static MALLOC_HOOK: AtomicUsize = AtomicUsize::new(0);

type MallocHook = extern "C" fn(*const u8, usize);
type FreeHook = extern "C" fn(*const u8);

/// Called by libFuzzer at start-up (it looks the symbol up as a weak one):
/// from then on every allocation is reported to its malloc hook. The free
/// hook only counts frees for leak detection, which needs LeakSanitizer: unused.
#[no_mangle]
pub extern "C" fn __sanitizer_install_malloc_and_free_hooks(
    malloc_hook: Option<MallocHook>,
    _free_hook: Option<FreeHook>,
) -> i32 {
    MALLOC_HOOK.store(malloc_hook.map_or(0, |h| h as usize), Ordering::SeqCst);
    1
}

pub struct Guard;

unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        allocated(p, 0, layout.size());
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        allocated(p, 0, layout.size());
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if p.is_null() {
            return p;
        }
        allocated(p, layout.size(), new_size);
        p
    }
}

/// Accounts an allocation of `size` bytes that replaced one of `old` bytes.
fn allocated(p: *mut u8, old: usize, size: usize) {
    if p.is_null() {
        return;
    }
    let held = if size >= old {
        HELD.fetch_add(size - old, Ordering::Relaxed) + (size - old)
    } else {
        HELD.fetch_sub(old - size, Ordering::Relaxed) - (old - size)
    };
    match MALLOC_HOOK.load(Ordering::Relaxed) {
        0 if size > MAX_ALLOC => {
            // No formatting (it would allocate): write a fixed message and
            // abort, which libFuzzer records as a crash with the input.
            let msg =
                b"fuzz: single allocation above MAX_ALLOC (a length from the input was trusted)\n";
            unsafe {
                libc_write(2, msg.as_ptr(), msg.len());
            }
            std::process::abort();
        }
        0 => {}
        hook => {
            // SAFETY: the value was stored from a `MallocHook` by libFuzzer's call above.
            let hook: MallocHook = unsafe { std::mem::transmute(hook) };
            hook(p, held);
        }
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
