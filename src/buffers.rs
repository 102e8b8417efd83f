//! Reusable buffers for the daemon's large, short-lived allocations: 1 MiB
//! ones for reads answered from the disk cache, reads across blocks and
//! decoded frames, and up to 8 MiB ones for the bodies of range GETs.
//!
//! The daemon returns freed pages to the system at once
//! (`MIMALLOC_PURGE_DELAY=0`, see `mount::control`), so every fresh buffer
//! was faulted in and zeroed again (the kernel zeroes a fresh huge page
//! whole, 2 MiB). That was a fifth of the daemon's time when `cat` read a
//! 200 MB cached file, and a quarter of all CPU (the store's included) on a
//! cold sequential read. So these allocations borrow a buffer from a small
//! pool, and the `Bytes` made of it gives it back when its last clone is
//! dropped (a reply sent, a block evicted from the cache, the last frame of
//! a GET decoded).

use bytes::Bytes;
use parking_lot::Mutex;

/// Buffers of one capacity, a few of them kept for reuse.
struct Pool {
    capacity: usize,
    kept: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    const fn new(capacity: usize, kept: usize) -> Self {
        Pool {
            capacity,
            kept,
            free: parking_lot::const_mutex(Vec::new()),
        }
    }

    /// A buffer of the pool's capacity, reused if one is free (holding
    /// what its last user left in it).
    fn take(&'static self) -> Vec<u8> {
        self.free
            .lock()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    /// The first `len` bytes of `buf` (taken from this pool) as Bytes that
    /// give it back when dropped.
    fn share(&'static self, buf: Vec<u8>, len: usize) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            len,
            pool: self,
        })
    }
}

/// Shorter buffers allocate as usual (small allocations are cheap).
const POOLED_MIN: usize = 64 * 1024;
/// Longer ones are not pooled: a FUSE read and a frame are at most 1 MiB
/// (cachemount's frame size; other frame sizes allocate as usual).
const KEPT_MAX: usize = 1 << 20;
/// As many as a sequential reader has decoded ahead of it (its read-ahead
/// reaches 32 frames) and more: a miss is a fresh MiB the kernel zeroes.
static BLOCKS: Pool = Pool::new(KEPT_MAX, 48);
/// GET bodies from 1 MiB up to the fetcher's largest merged GET (8 MiB);
/// a sequential reader keeps 2-4 in flight. At most 32 MiB kept idle.
static GETS: Pool = Pool::new(8 << 20, 4);

/// A pooled buffer holding `len` bytes of data.
struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: &'static Pool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut free = self.pool.free.lock();
        if free.len() < self.pool.kept {
            free.push(buf);
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
    let mut buf = BLOCKS.take();
    // Zeroed once, when the buffer is new: what a reuse finds there is
    // overwritten by `fill`.
    if buf.len() < len {
        buf.resize(KEPT_MAX, 0);
    }
    fill(&mut buf[..len])?;
    Ok(BLOCKS.share(buf, len))
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
    let mut buf = BLOCKS.take();
    buf.clear();
    decode(&mut buf)?;
    let len = buf.len();
    Ok(BLOCKS.share(buf, len))
}

/// An empty buffer for a GET body of `len` bytes, to be made Bytes by
/// [`get_body_bytes`]: reused when `len` is from 1 MiB to 8 MiB.
pub fn get_body(len: usize) -> Vec<u8> {
    if (KEPT_MAX..=GETS.capacity).contains(&len) {
        let mut buf = GETS.take();
        buf.clear();
        buf
    } else {
        Vec::with_capacity(len)
    }
}

/// A GET body from [`get_body`] as Bytes (its buffer goes back to the pool
/// when they are dropped, if it came from there).
pub fn get_body_bytes(buf: Vec<u8>) -> Bytes {
    if buf.capacity() == GETS.capacity {
        let len = buf.len();
        GETS.share(buf, len)
    } else {
        Bytes::from(buf)
    }
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
    fn a_get_body_buffer_comes_back_empty_and_only_large_bodies_are_pooled() {
        let mut body = get_body(2 << 20);
        assert!(body.is_empty() && body.capacity() >= 2 << 20);
        body.extend(std::iter::repeat_n(4u8, 2 << 20));
        let (at, bytes) = (body.as_ptr(), get_body_bytes(body));
        assert_eq!(bytes, vec![4u8; 2 << 20]);
        drop(bytes);
        let again = get_body(3 << 20);
        assert!(
            again.is_empty() && again.as_ptr() == at,
            "the buffer is reused"
        );
        drop(get_body_bytes(again));
        let small = get_body(1000);
        assert!(small.capacity() < GETS.capacity);
        assert_eq!(get_body_bytes(small), Bytes::new());
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
