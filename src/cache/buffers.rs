//! Reusable 1 MiB buffers for the daemon's large, short-lived allocations:
//! reads answered from the disk cache, and decoded frames.
//!
//! The daemon returns freed pages to the system at once
//! (`MIMALLOC_PURGE_DELAY=0`, see `mount::control`), so every fresh buffer
//! was faulted in and zeroed again (the kernel zeroes a fresh huge page
//! whole, 2 MiB). That was a fifth of the daemon's time when `cat` read a
//! 200 MB cached file, and a quarter of all CPU (the store's included) on a
//! cold sequential read. So these allocations borrow a buffer from a small
//! pool, and the `Bytes` made of it gives it back when its last clone is
//! dropped (a reply sent, a block evicted from the cache).

use bytes::Bytes;
use parking_lot::Mutex;

/// Shorter buffers allocate as usual (small allocations are cheap).
const POOLED_MIN: usize = 64 * 1024;
/// Longer ones are not pooled: a FUSE read and a frame are at most 1 MiB
/// (cachemount's frame size; other frame sizes allocate as usual).
const KEPT_MAX: usize = 1 << 20;
/// Buffers kept for reuse: more than the reads and decodes in flight.
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

/// A buffer of at least [`KEPT_MAX`] bytes' capacity, from the pool if it
/// has one.
fn take() -> Vec<u8> {
    POOL.lock()
        .pop()
        .unwrap_or_else(|| Vec::with_capacity(KEPT_MAX))
}

/// `len` bytes that `fill` writes, in a reused buffer when `len` is large.
pub fn filled<E>(len: usize, fill: impl FnOnce(&mut [u8]) -> Result<(), E>) -> Result<Bytes, E> {
    if !(POOLED_MIN..=KEPT_MAX).contains(&len) {
        let mut buf = vec![0u8; len];
        fill(&mut buf)?;
        return Ok(Bytes::from(buf));
    }
    let mut buf = take();
    if buf.len() < len {
        buf.resize(KEPT_MAX, 0);
    }
    let mut pooled = Pooled { buf, len };
    fill(&mut pooled.buf[..len])?;
    Ok(Bytes::from_owner(pooled))
}

/// What `decode` appends to an empty buffer with room for `len` bytes (a
/// reused one when `len` is at least half of [`KEPT_MAX`]: a decoded frame
/// may sit in the block cache, which counts its length, not its buffer's),
/// as Bytes. `decode` must not grow it past `len`.
pub fn decoded<E>(
    len: usize,
    decode: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<Bytes, E> {
    if !(KEPT_MAX / 2..=KEPT_MAX).contains(&len) {
        let mut buf = Vec::with_capacity(len);
        decode(&mut buf)?;
        return Ok(Bytes::from(buf));
    }
    let mut buf = take();
    buf.clear();
    decode(&mut buf)?;
    let len = buf.len();
    Ok(Bytes::from_owner(Pooled { buf, len }))
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
        let small = filled::<()>(10, |b| {
            b.fill(3);
            Ok(())
        });
        assert_eq!(small.unwrap(), vec![3u8; 10]);
        assert_eq!(
            filled::<()>(KEPT_MAX + 1, |_| Ok(())).unwrap().len(),
            KEPT_MAX + 1
        );
    }

    #[test]
    fn a_decode_gets_an_empty_buffer_and_keeps_what_it_appended() {
        for round in 0..3u8 {
            let got = decoded::<()>(KEPT_MAX, |b| {
                assert!(b.is_empty() && b.capacity() >= KEPT_MAX);
                b.extend(std::iter::repeat_n(round, 100_000));
                Ok(())
            })
            .unwrap();
            assert_eq!(got, vec![round; 100_000]);
        }
        assert!(decoded(KEPT_MAX, |_| Err("corrupt")).is_err());
    }
}
