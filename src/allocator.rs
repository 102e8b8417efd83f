//! The process's allocator: mimalloc, except that large zeroed blocks come
//! straight from fresh anonymous mappings, as glibc's `calloc` gives them.
//!
//! mimalloc instead of glibc's malloc: a mount decodes its index and builds
//! its inode tree as ~100k small allocations in fresh memory, on the path
//! that `mount` waits for; mimalloc makes them and faults their pages in
//! about 30 ms faster on a 50k-entry archive (`scripts/bench-mount.sh --only
//! start`).
//!
//! But mimalloc writes zeros over every zeroed block it hands out, however
//! large and however fresh. fuser allocates a zeroed 16 MiB request buffer
//! for its INIT handshake and one for each worker thread (the largest write
//! the kernel may send), of which a read-only mount touches the first few
//! pages: 80 MiB of zeros written per mountpoint while the mount starts (a
//! twelfth of its CPU time in a profile), 64 MiB of them resident for the
//! daemon's life. A fresh mapping is zero already and costs a page only
//! when that page is touched.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

use mimalloc::MiMalloc;

/// Zeroed blocks this large or larger are mapped.
const MAPPED_MIN: usize = 1 << 20;
/// Mapped blocks alive at once (a few per mountpoint); past that, zeroed
/// blocks come from mimalloc again.
const MAPPED_MAX: usize = 64;
/// Alignment a mapping always has (the smallest page size).
const PAGE: usize = 4096;

/// The addresses of the live mapped blocks (0: a free slot). A block's
/// length is its layout's size, which every later call passes again.
static MAPPED: [AtomicUsize; MAPPED_MAX] = [const { AtomicUsize::new(0) }; MAPPED_MAX];

pub struct Allocator;

impl Allocator {
    /// The slot holding `ptr`, if it is a mapped block.
    fn slot_of(ptr: *mut u8) -> Option<&'static AtomicUsize> {
        MAPPED
            .iter()
            .find(|s| s.load(Ordering::Acquire) == ptr as usize)
    }

    /// A fresh zeroed mapping of `size` bytes, recorded in a slot; None when
    /// the table is full or the kernel refuses.
    fn map(size: usize) -> Option<*mut u8> {
        let slot = MAPPED.iter().find(|s| {
            // Reserve the slot first (1 is never an address), so that a
            // mapping never exists without a slot to free it by.
            s.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        // SAFETY: an anonymous private mapping owns no caller memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            slot.store(0, Ordering::Release);
            return None;
        }
        slot.store(ptr as usize, Ordering::Release);
        Some(ptr.cast())
    }
}

fn mapped_size(layout: &Layout) -> bool {
    layout.size() >= MAPPED_MIN && layout.align() <= PAGE
}

// SAFETY: every block is served by mimalloc or by a mapping recorded in
// `MAPPED` until it is freed; each call routes a block to whichever made it.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped_size(&layout) {
            if let Some(ptr) = Self::map(layout.size()) {
                return ptr;
            }
        }
        unsafe { MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if mapped_size(&layout) {
            if let Some(slot) = Self::slot_of(ptr) {
                // The slot is freed first: once unmapped, the address may be
                // mapped again by another thread, and must then be only its.
                slot.store(0, Ordering::Release);
                // SAFETY: the block is this mapping, `layout.size()` long.
                unsafe { libc::munmap(ptr.cast(), layout.size()) };
                return;
            }
        }
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if mapped_size(&layout) {
            if let Some(slot) = Self::slot_of(ptr) {
                if new_size < MAPPED_MIN {
                    // Shrunk below the size `dealloc` looks up: mimalloc's now.
                    // SAFETY: `layout.align()` is a valid alignment; the copy
                    // is within both blocks; the mapping is `layout.size()` long.
                    unsafe {
                        let small_layout =
                            Layout::from_size_align_unchecked(new_size, layout.align());
                        let small = MiMalloc.alloc(small_layout);
                        if !small.is_null() {
                            std::ptr::copy_nonoverlapping(ptr, small, new_size);
                            slot.store(0, Ordering::Release);
                            libc::munmap(ptr.cast(), layout.size());
                        }
                        return small;
                    }
                }
                // A mapped block stays one: moved by the kernel, its new
                // pages zero, its old ones kept.
                // The slot stays reserved (1) while the old address is given
                // up, as in `dealloc`.
                slot.store(1, Ordering::Release);
                // SAFETY: the block is this mapping, `layout.size()` long.
                let moved = unsafe {
                    libc::mremap(ptr.cast(), layout.size(), new_size, libc::MREMAP_MAYMOVE)
                };
                if moved == libc::MAP_FAILED {
                    slot.store(ptr as usize, Ordering::Release);
                    return std::ptr::null_mut();
                }
                slot.store(moved as usize, Ordering::Release);
                return moved.cast();
            }
        }
        unsafe { MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot table is global: tests that count its slots run one at a time.
    static SERIAL: parking_lot::Mutex<()> = parking_lot::const_mutex(());

    fn live_mapped() -> usize {
        MAPPED
            .iter()
            .filter(|s| s.load(Ordering::Acquire) != 0)
            .count()
    }

    #[test]
    fn a_large_zeroed_block_is_mapped_zero_and_unmapped_when_freed() {
        let _serial = SERIAL.lock();
        let layout = Layout::from_size_align(16 << 20, 8).unwrap();
        unsafe {
            let p = Allocator.alloc_zeroed(layout);
            assert!(!p.is_null() && Allocator::slot_of(p).is_some());
            let block = std::slice::from_raw_parts_mut(p, layout.size());
            assert!(block.iter().all(|&b| b == 0));
            block[0] = 7;
            block[layout.size() - 1] = 9;
            // Grown, it keeps its bytes and is zero beyond them.
            let q = Allocator.realloc(p, layout, 32 << 20);
            assert!(Allocator::slot_of(q).is_some());
            let grown = std::slice::from_raw_parts(q, 32 << 20);
            assert_eq!((grown[0], grown[(16 << 20) - 1]), (7, 9));
            assert!(grown[16 << 20..].iter().all(|&b| b == 0));
            Allocator.dealloc(q, Layout::from_size_align(32 << 20, 8).unwrap());
            assert!(Allocator::slot_of(q).is_none());

            // Shrunk below the mapped size, it moves to mimalloc with its bytes.
            let p = Allocator.alloc_zeroed(layout);
            *p = 5;
            let small = Allocator.realloc(p, layout, 100);
            assert!(Allocator::slot_of(p).is_none() && Allocator::slot_of(small).is_none());
            assert_eq!((*small, *small.add(99)), (5, 0));
            Allocator.dealloc(small, Layout::from_size_align(100, 8).unwrap());
        }
    }

    #[test]
    fn other_blocks_stay_with_mimalloc_and_a_full_table_falls_back_to_it() {
        let _serial = SERIAL.lock();
        let large = Layout::from_size_align(MAPPED_MIN, 8).unwrap();
        unsafe {
            // Not zeroed, small, or aligned beyond a page: mimalloc's.
            let plain = Allocator.alloc(large);
            let small = Allocator.alloc_zeroed(Layout::from_size_align(4096, 8).unwrap());
            let aligned_layout = Layout::from_size_align(MAPPED_MIN, 1 << 16).unwrap();
            let aligned = Allocator.alloc_zeroed(aligned_layout);
            for p in [plain, small, aligned] {
                assert!(Allocator::slot_of(p).is_none());
            }
            assert!(std::slice::from_raw_parts(aligned, MAPPED_MIN)
                .iter()
                .all(|&b| b == 0));
            Allocator.dealloc(plain, large);
            Allocator.dealloc(small, Layout::from_size_align(4096, 8).unwrap());
            Allocator.dealloc(aligned, aligned_layout);

            // Fill what is free (the test harness may hold a slot too).
            let mut held = Vec::new();
            while live_mapped() < MAPPED_MAX {
                held.push(Allocator.alloc_zeroed(large));
            }
            let spilled = Allocator.alloc_zeroed(large);
            assert!(!spilled.is_null() && Allocator::slot_of(spilled).is_none());
            assert!(std::slice::from_raw_parts(spilled, MAPPED_MIN)
                .iter()
                .all(|&b| b == 0));
            Allocator.dealloc(spilled, large);
            for p in held {
                Allocator.dealloc(p, large);
            }
        }
    }
}
