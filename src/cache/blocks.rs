//! The block cache: decompressed blocks in an LRU bounded in bytes.
//!
//! A block is one zstd frame of a file (or one fixed-size piece of a stored or
//! single-stream entry). Keys carry the id of the object *version* they were
//! read from, so after the object changes (the 412 path) nothing read from the
//! old version can be served for the new one: the new version has a new id,
//! and [`BlockCache::drop_version`] frees the old blocks.

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;

/// One block: (object version id, entry index in that version's index, block index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    pub version: u64,
    pub entry: u32,
    pub block: u32,
}

/// Why a block was fetched: a read waited for it, or it was fetched ahead of
/// any read (so the first read of it is a hit the prefetch earned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A read asked for it.
    Demand,
    /// Read-ahead of a sequential reader, small neighbours, a verify pass.
    ReadAhead,
    /// The access profile's replay.
    Replay,
}

impl Origin {
    pub fn is_speculative(self) -> bool {
        self != Origin::Demand
    }
}

struct Cached {
    data: Bytes,
    /// Why it was fetched, until its first read (then `Demand`).
    origin: Origin,
}

struct Inner {
    lru: LruCache<BlockKey, Cached>,
    bytes: u64,
    /// Bytes of prefetched blocks not read yet: held, and evicted or dropped.
    unread_held: u64,
    unread_gone: u64,
}

impl Inner {
    /// Accounts for a block leaving the cache.
    fn gone(&mut self, c: &Cached) {
        let len = c.data.len() as u64;
        self.bytes -= len;
        if c.origin.is_speculative() {
            self.unread_held -= len;
            self.unread_gone += len;
        }
    }
}

/// What a lookup found.
pub struct Hit {
    pub data: Bytes,
    /// The block's origin if this was its first read (`Demand` otherwise).
    pub origin: Origin,
}

pub struct BlockCache {
    inner: Mutex<Inner>,
    capacity: u64,
}

impl BlockCache {
    /// A cache holding at most `capacity` bytes of block data (a block larger
    /// than the whole cache is not kept at all).
    pub fn new(capacity: u64) -> Self {
        BlockCache {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
                unread_held: 0,
                unread_gone: 0,
            }),
            capacity,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of block data held now.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().bytes
    }

    /// Bytes prefetched (read-ahead, neighbours, profile replay) that no read
    /// has used: those still held and those evicted or dropped unread.
    pub fn unread_prefetched_bytes(&self) -> u64 {
        let inner = self.inner.lock();
        inner.unread_held + inner.unread_gone
    }

    pub fn get(&self, key: &BlockKey) -> Option<Hit> {
        let mut inner = self.inner.lock();
        let c = inner.lru.get_mut(key)?;
        let origin = std::mem::replace(&mut c.origin, Origin::Demand);
        let data = c.data.clone();
        if origin.is_speculative() {
            inner.unread_held -= data.len() as u64;
        }
        Some(Hit { data, origin })
    }

    /// The block's bytes without marking it read or touching its recency
    /// (a copy handed on elsewhere is not a read: see [`super::handoff`]).
    pub fn peek(&self, key: &BlockKey) -> Option<Bytes> {
        self.inner.lock().lru.peek(key).map(|c| c.data.clone())
    }

    /// Whether `key` is cached, without touching its recency.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.inner.lock().lru.contains(key)
    }

    /// Adds a block, evicting the least recently used ones to stay in bounds.
    pub fn insert(&self, key: BlockKey, data: Bytes, origin: Origin) {
        let len = data.len() as u64;
        if len > self.capacity {
            return;
        }
        let mut inner = self.inner.lock();
        if let Some(old) = inner.lru.put(key, Cached { data, origin }) {
            inner.gone(&old);
        }
        inner.bytes += len;
        if origin.is_speculative() {
            inner.unread_held += len;
        }
        while inner.bytes > self.capacity {
            match inner.lru.pop_lru() {
                Some((_, evicted)) => inner.gone(&evicted),
                None => break,
            }
        }
    }

    /// Frees one block (a sequential reader is past it: see
    /// [`super::prefetch`]'s drop-behind).
    pub fn remove(&self, key: &BlockKey) {
        let mut inner = self.inner.lock();
        if let Some(c) = inner.lru.pop(key) {
            inner.gone(&c);
        }
    }

    /// Frees every block of `version` (after the mount moved to a new
    /// version); returns how many there were.
    pub fn drop_version(&self, version: u64) -> u64 {
        self.drop_where(|k| k.version == version)
    }

    /// Frees every block of one entry of `version` (blocks a verify pass
    /// decoded from data that then failed its check: never served, and
    /// better not left to crowd out good ones).
    pub fn drop_entry(&self, version: u64, entry: u32) -> u64 {
        self.drop_where(|k| k.version == version && k.entry == entry)
    }

    fn drop_where(&self, pred: impl Fn(&BlockKey) -> bool) -> u64 {
        let mut inner = self.inner.lock();
        let keys: Vec<BlockKey> = inner
            .lru
            .iter()
            .filter(|(k, _)| pred(k))
            .map(|(k, _)| *k)
            .collect();
        let n = keys.len() as u64;
        for k in keys {
            if let Some(c) = inner.lru.pop(&k) {
                inner.gone(&c);
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(block: u32) -> BlockKey {
        BlockKey {
            version: 1,
            entry: 0,
            block,
        }
    }

    #[test]
    fn stays_within_its_byte_bound_and_evicts_lru() {
        let cache = BlockCache::new(100);
        cache.insert(key(0), Bytes::from(vec![0; 40]), Origin::Demand);
        cache.insert(key(1), Bytes::from(vec![1; 40]), Origin::Demand);
        assert!(cache.get(&key(0)).is_some()); // 0 is now most recent
        cache.insert(key(2), Bytes::from(vec![2; 40]), Origin::Demand);
        assert!(cache.bytes() <= 100);
        assert!(cache.contains(&key(0)) && cache.contains(&key(2)) && !cache.contains(&key(1)));
        cache.insert(key(3), Bytes::from(vec![3; 101]), Origin::Demand);
        assert!(!cache.contains(&key(3)));
    }

    #[test]
    fn a_prefetched_origin_is_reported_once_and_versions_drop() {
        let cache = BlockCache::new(1000);
        cache.insert(key(0), Bytes::from_static(b"abc"), Origin::ReadAhead);
        cache.insert(key(1), Bytes::from_static(b"wxyz"), Origin::Replay);
        assert_eq!(cache.unread_prefetched_bytes(), 7);
        assert_eq!(cache.get(&key(0)).unwrap().origin, Origin::ReadAhead);
        assert_eq!(cache.get(&key(0)).unwrap().origin, Origin::Demand);
        assert_eq!(cache.unread_prefetched_bytes(), 4);
        cache.insert(
            BlockKey {
                version: 2,
                entry: 0,
                block: 0,
            },
            Bytes::from_static(b"de"),
            Origin::Demand,
        );
        cache.drop_version(1);
        assert_eq!(cache.bytes(), 2);
        // Dropped unread: still prefetched for nothing.
        assert_eq!(cache.unread_prefetched_bytes(), 4);
        assert!(!cache.contains(&key(0)));
    }

    #[test]
    fn dropping_an_entry_keeps_its_neighbours() {
        let cache = BlockCache::new(1000);
        let other = BlockKey {
            version: 1,
            entry: 1,
            block: 0,
        };
        cache.insert(key(0), Bytes::from_static(b"abc"), Origin::Demand);
        cache.insert(key(1), Bytes::from_static(b"def"), Origin::Demand);
        cache.insert(other, Bytes::from_static(b"gh"), Origin::Demand);
        assert_eq!(cache.drop_entry(1, 0), 2);
        assert_eq!(cache.bytes(), 2);
        assert!(cache.contains(&other));
    }
}
