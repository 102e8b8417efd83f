//! One mount's view of the disk cache ([`MountDisk`]): the store its keys
//! are scoped to, which entries it found, the entries it keeps open, and
//! the reads ahead that make cached files read like a local tree: the next
//! small files of a walk in archive order ([`super::ahead`]) and the next
//! stretch of a large file read sequentially.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::ahead;
use super::entry::EntryKey;
use super::{DiskCache, Fig, Figures};
use crate::archive::{Entry, EntryKind};
use crate::buffers;
use crate::cache::version::Version;

/// Entries a mount keeps open. A large file is read in many requests: one
/// open serves them all, and the kernel's read-ahead, which lives in the
/// open file, carries from one request to the next. An entry evicted
/// meanwhile stays readable (and its space held) until it leaves this list.
const OPEN_FILES: usize = 16;
/// Threads that open and read the entries ahead of a walk at once (the
/// disk's queue depth, not the cores: they wait on I/O).
const WARM_THREADS: usize = 8;
/// Larger entries are not warmed ahead: the kernel's read-ahead serves a
/// large file's sequential reads, and warming one a walk skips costs much.
const WARM_MAX_SIZE: u64 = 1 << 20;
/// How far ahead of a sequential reader of a large entry the kernel is
/// asked to read, off the reader's thread. Left to itself, the kernel
/// reads the cache file ahead only as the daemon's reads reach it, so each
/// FUSE read would wait on the disk and then on its reply in turn.
const SEQUENTIAL_AHEAD: u64 = 8 << 20;

/// An entry kept open, and how far the kernel was asked to read it ahead.
struct OpenEntry {
    file: Arc<File>,
    ahead_to: AtomicU64,
}

impl OpenEntry {
    /// A read of `offset..end` was answered: when it is inside what was
    /// read ahead (a sequential reader; the first read starts at 0) and
    /// near its end, the next stretch is asked for in the background.
    fn read_ahead(self: &Arc<Self>, offset: u64, end: u64, size: u64) {
        let to = self.ahead_to.load(Ordering::Relaxed);
        if offset > to || end + SEQUENTIAL_AHEAD / 2 <= to || to >= size {
            return;
        }
        let new_to = (end + SEQUENTIAL_AHEAD).min(size);
        if self
            .ahead_to
            .compare_exchange(to, new_to, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (this, from) = (self.clone(), to.max(end));
        runtime.spawn_blocking(move || {
            let _ = rustix::fs::fadvise(
                &*this.file,
                from,
                std::num::NonZeroU64::new(new_to - from),
                rustix::fs::Advice::WillNeed,
            );
        });
    }
}

/// One fetcher's view of the disk cache: the store it is scoped to, which
/// entries of its versions it already looked up (so a read of an entry that
/// is not on disk costs no system call after the first), the entries it
/// keeps open, and the walk in archive order it reads ahead of.
pub struct MountDisk {
    cache: Arc<DiskCache>,
    namespace: String,
    /// (version id, entry) → found on disk.
    known: Mutex<HashMap<(u64, u32), bool>>,
    open: Mutex<lru::LruCache<(u64, u32), Arc<OpenEntry>>>,
    walk: Mutex<ahead::Walk>,
}

impl MountDisk {
    pub fn new(cache: Arc<DiskCache>, namespace: String) -> MountDisk {
        MountDisk {
            cache,
            namespace,
            known: Mutex::new(HashMap::new()),
            open: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(OPEN_FILES).expect("not zero"),
            )),
            walk: Mutex::new(ahead::Walk::default()),
        }
    }

    pub fn cache(&self) -> &Arc<DiskCache> {
        &self.cache
    }

    fn cacheable(&self, e: &Entry) -> bool {
        self.cache.may_hold(e)
    }

    /// The entry's whole content, checked, if it is on disk.
    pub fn file(&self, v: &Version, entry: u32) -> Option<Arc<File>> {
        self.opened(v, entry).map(|o| o.file.clone())
    }

    fn opened(&self, v: &Version, entry: u32) -> Option<Arc<OpenEntry>> {
        if let Some(o) = self.open.lock().get(&(v.id, entry)) {
            return Some(o.clone());
        }
        let e = v.entry(entry);
        if !self.cacheable(e) || self.known.lock().get(&(v.id, entry)) == Some(&false) {
            return None;
        }
        let found = self
            .cache
            .open_entry(&EntryKey::of(&self.namespace, v, entry), e.size)
            .map(|file| {
                Arc::new(OpenEntry {
                    file: Arc::new(file),
                    ahead_to: AtomicU64::new(0),
                })
            });
        self.known.lock().insert((v.id, entry), found.is_some());
        if let Some(o) = &found {
            self.open.lock().put((v.id, entry), o.clone());
        }
        found
    }

    /// Reads `offset..offset+len` of the entry (clamped to its size) from
    /// disk, if it is there whole. A sequential reader of a large entry
    /// has the kernel read ahead of it; a walk has the next entries warmed.
    pub fn read(
        self: &Arc<Self>,
        v: &Arc<Version>,
        entry: u32,
        offset: u64,
        len: u32,
    ) -> Option<Bytes> {
        let o = self.opened(v, entry)?;
        let size = v.entry(entry).size;
        let end = offset.saturating_add(u64::from(len)).min(size);
        let len = end.saturating_sub(offset) as usize;
        let data = buffers::filled(len, |buf| o.file.read_exact_at(buf, offset)).ok()?;
        if offset == 0 {
            self.first_read(v, entry);
        }
        if size > SEQUENTIAL_AHEAD {
            o.read_ahead(offset, end, size);
        }
        Some(data)
    }

    /// A read of `entry` from offset 0 was answered from disk: if it
    /// continues a walk in archive order, the small entries the walk reads
    /// next are opened and checked now, on a few threads, so the page cache
    /// holds them when the walk gets there.
    fn first_read(self: &Arc<Self>, v: &Arc<Version>, entry: u32) {
        let count = v.index.entries.len() as u32;
        let Some((from, to)) = self.walk.lock().first_read(v.id, entry, count) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let todo: Vec<u32> = {
            let known = self.known.lock();
            (from..to)
                .filter(|&i| {
                    let e = v.entry(i);
                    e.kind == EntryKind::File
                        && e.size <= WARM_MAX_SIZE
                        && self.cacheable(e)
                        && known.get(&(v.id, i)) != Some(&false)
                })
                .collect()
        };
        if todo.is_empty() {
            return;
        }
        // Thread k takes every WARM_THREADS-th entry from k: the next few
        // entries of the walk are read at once.
        let todo = Arc::new(todo);
        for k in 0..WARM_THREADS.min(todo.len()) {
            let (this, v, todo) = (self.clone(), v.clone(), todo.clone());
            runtime.spawn_blocking(move || {
                for &i in todo.iter().skip(k).step_by(WARM_THREADS) {
                    let key = EntryKey::of(&this.namespace, &v, i);
                    let found = this.cache.warm_entry(&key, v.entry(i).size);
                    // An entry filed meanwhile stays found.
                    let mut known = this.known.lock();
                    let k = known.entry((v.id, i)).or_insert(found);
                    *k |= found;
                }
            });
        }
    }

    /// Whether the entry is on disk (not checked: enough to skip fetching
    /// it speculatively; a read checks it).
    pub fn has(&self, v: &Version, entry: u32) -> bool {
        let e = v.entry(entry);
        if !self.cacheable(e) {
            return false;
        }
        if let Some(&known) = self.known.lock().get(&(v.id, entry)) {
            return known;
        }
        EntryKey::of(&self.namespace, v, entry)
            .path(&self.cache.root)
            .exists()
    }

    /// Verified blocks of `entry` were decoded: `blocks` starting at block
    /// `first`, of `block_size` bytes each (the last may be shorter), out of
    /// `count`. The whole content is filed at once; parts are assembled
    /// until the entry is complete.
    pub fn offer(
        &self,
        v: &Version,
        entry: u32,
        first: u32,
        blocks: &[Bytes],
        block_size: u64,
        count: u32,
    ) {
        let e = v.entry(entry);
        if !self.cacheable(e) || self.known.lock().get(&(v.id, entry)) == Some(&true) {
            return;
        }
        let key = EntryKey::of(&self.namespace, v, entry);
        let filed = if first == 0 && blocks.len() as u32 == count {
            self.cache.insert_whole(key, e, blocks)
        } else {
            blocks.iter().enumerate().fold(false, |done, (i, b)| {
                done || self
                    .cache
                    .fill_block(key, e, first + i as u32, b, block_size, count)
            })
        };
        if filed {
            self.known.lock().insert((v.id, entry), true);
        }
    }

    /// Forgets what it found for version `id` (the mount moved on).
    pub fn drop_version(&self, id: u64) {
        self.known.lock().retain(|(v, _), _| *v != id);
        let mut open = self.open.lock();
        let old: Vec<(u64, u32)> = open
            .iter()
            .map(|(k, _)| *k)
            .filter(|(v, _)| *v == id)
            .collect();
        for k in old {
            open.pop(&k);
        }
    }

    /// `disk_*` lines for the mount's `stats`.
    pub fn render(&self) -> String {
        let t = |f: Fig| self.cache.totals[f as usize].load(Ordering::Relaxed);
        let s = Figures {
            hits: t(Fig::Hit),
            misses: t(Fig::Miss),
            inserts: t(Fig::Insert),
            evicted: t(Fig::Evicted),
            damaged: t(Fig::Damaged),
        };
        format!(
            "disk_hits {}\ndisk_misses {}\ndisk_inserts {}\ndisk_evicted {}\ndisk_damaged {}\n",
            s.hits, s.misses, s.inserts, s.evicted, s.damaged
        )
    }
}
