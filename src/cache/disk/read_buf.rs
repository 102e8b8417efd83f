//! Reusable buffers for large reads answered from the disk cache.
//!
//! A read of a large cached file arrives as one FUSE request per MiB. A
//! fresh buffer for each cost more than the copy into it: the allocator
//! zeroes it and the kernel faults its pages in (a fifth of the daemon's
//! time when `cat` read a 200 MB cached file), since freed pages go back to
//! the system at once (`MIMALLOC_PURGE_DELAY=0`, see `mount::control`). So
//! such a read borrows a buffer from a small pool, and the reply's `Bytes`
//! gives it back when dropped.

use bytes::Bytes;
use parking_lot::Mutex;

/// Reads shorter than this allocate as usual (small allocations are cheap).
const POOLED_MIN: usize = 64 * 1024;
/// Buffers longer than this are not kept: a FUSE read is at most 1 MiB.
const KEPT_MAX: usize = 1 << 20;
/// Buffers kept for reuse: more than the FUSE threads that read at once.
const KEPT: usize = 16;

static POOL: Mutex<Vec<Vec<u8>>> = parking_lot::const_mutex(Vec::new());

/// A pooled buffer holding `len` bytes of data.
struct Pooled {
    buf: Vec<u8>,
    len: usize,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut pool = POOL.lock();
        if pool.len() < KEPT {
            pool.push(buf);
        }
    }
}

/// `len` bytes that `fill` writes, in a reused buffer when `len` is large.
pub fn filled<E>(len: usize, fill: impl FnOnce(&mut [u8]) -> Result<(), E>) -> Result<Bytes, E> {
    if !(POOLED_MIN..=KEPT_MAX).contains(&len) {
        let mut buf = vec![0u8; len];
        fill(&mut buf)?;
        return Ok(Bytes::from(buf));
    }
    let mut buf = POOL.lock().pop().unwrap_or_default();
    if buf.len() < len {
        buf.resize(KEPT_MAX, 0);
    }
    let mut pooled = Pooled { buf, len };
    fill(&mut pooled.buf[..len])?;
    Ok(Bytes::from_owner(pooled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_for_the_next_read_with_the_new_bytes_only() {
        let first = filled::<()>(POOLED_MIN + 1, |b| {
            b.fill(1);
            Ok(())
        })
        .unwrap();
        drop(first);
        let second = filled::<()>(POOLED_MIN, |b| {
            b.fill(2);
            Ok(())
        })
        .unwrap();
        assert_eq!(second.len(), POOLED_MIN);
        assert!(second.iter().all(|&b| b == 2));
        // A failed fill returns no bytes; small and huge reads are not pooled.
        assert!(filled(POOLED_MIN, |_| Err("io")).is_err());
        assert_eq!(
            filled::<()>(10, |b| {
                b.fill(3);
                Ok(())
            })
            .unwrap(),
            vec![3u8; 10]
        );
        assert_eq!(
            filled::<()>(KEPT_MAX + 1, |_| Ok(())).unwrap().len(),
            KEPT_MAX + 1
        );
    }
}
