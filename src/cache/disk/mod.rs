//! The local disk cache, shared by every mount (and restore) on the host and
//! surviving them: whole files' decompressed content, one file per entry,
//! named by content ([`entry::EntryKey`]), bounded in bytes with LRU
//! eviction across processes ([`ledger`]), filled whole or frame by frame
//! ([`fill`]).
//!
//! - **Safe to share.** A cachemount entry is filed under a key made from
//!   its content hash only after its bytes were hashed and matched it, so
//!   an archive that lies about a hash cannot put other bytes under it; keys
//!   are scoped by store, so an archive can name only bytes an archive of
//!   the same store put there. A foreign entry's key is its pinned object
//!   version: nothing can mix.
//! - **Crash-safe.** An entry is written to a temporary file (with its
//!   checksum as an attribute) and renamed into place whole; a killed
//!   writer leaves only a temporary file, swept by the next process.
//! - **Checked on every read.** This process reads an entry only after its
//!   bytes matched the checksum beside it (once per file identity); a
//!   damaged entry is deleted and the block fetched again.
//! - **Never fatal.** A cache dir that cannot be made, or writes that fail
//!   (full, read-only), cost one log line: the mount goes on with the
//!   in-memory cache (and serves what the dir holds, when it can be read).
//!
//! [`DiskCache`] is the host-wide cache; [`MountDisk`] is one fetcher's view
//! of it ([`mount`]).

mod ahead;
mod entry;
mod fill;
mod ledger;
mod mount;

use std::collections::HashMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

pub use entry::EntryKey;
use entry::{Bad, Checked};
use fill::Fills;
pub use ledger::Figures;
use ledger::Ledger;
pub use mount::MountDisk;

use crate::archive::{Entry, EntryKind};

/// Name of the layout version directory below the cache dir: a future
/// layout uses another name and never misreads this one.
const LAYOUT: &str = "v1";
/// An entry larger than this share of the bound is not cached (it would
/// evict too much of everything else).
const MAX_ENTRY_SHARE: u64 = 8;
/// A hit sets an entry's atime only when it is older than this (seconds):
/// recency for eviction without a write per read.
const TOUCH_AFTER_SECS: i64 = 60;
/// Figures are written to the shared ledger at least every this many events.
const SAVE_EVERY: u64 = 256;

/// Where the cache is and how large it may grow.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    pub dir: PathBuf,
    /// The bound asked for; the cache also never takes more than half the
    /// free space of its file system (counting its own entries as free).
    pub max_bytes: u64,
}

/// Why the cache cannot be used at all (the caller logs it and goes on).
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot use the disk cache at {dir}: {error}")]
    Io { dir: PathBuf, error: io::Error },
    #[error("not using the disk cache at {0}: it is not a private directory of this user (mode 0700, owned by uid {1})")]
    NotPrivate(PathBuf, u32),
}

/// The host-wide disk cache.
pub struct DiskCache {
    root: PathBuf,
    tmp: PathBuf,
    limit: u64,
    ledger: Ledger,
    /// Cleared (once, with a log line) when a write fails: the dir is full
    /// or read-only, and this process stops filling it.
    writable: AtomicBool,
    /// Figures not written to the ledger yet.
    unsaved: [AtomicU64; 5],
    /// Figures of this process since it opened the cache.
    totals: [AtomicU64; 5],
    events: AtomicU64,
    /// Entry files this process has checked, by identity.
    checked: Mutex<HashMap<EntryKey, Checked>>,
    fills: Fills,
    next_tmp: AtomicU64,
}

/// Indices into [`DiskCache::unsaved`], in [`Figures`] order.
#[derive(Clone, Copy)]
enum Fig {
    Hit = 0,
    Miss = 1,
    Insert = 2,
    Evicted = 3,
    Damaged = 4,
}

impl DiskCache {
    /// Opens (creating, private) the cache at `opts.dir`. A dir that exists
    /// but cannot be written is opened read-only (its entries are served).
    pub fn open(opts: &DiskOptions) -> Result<DiskCache, DiskError> {
        let io_err = |error| DiskError::Io {
            dir: opts.dir.clone(),
            error,
        };
        let root = opts.dir.join(LAYOUT);
        let created = DirBuilder::new().recursive(true).mode(0o700).create(&root);
        let meta = std::fs::symlink_metadata(&root).map_err(|e| match created {
            Err(c) => io_err(c),
            Ok(()) => io_err(e),
        })?;
        let uid = rustix::process::geteuid().as_raw();
        if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
            return Err(DiskError::NotPrivate(root, uid));
        }
        let tmp = root.join("tmp");
        let _ = DirBuilder::new().mode(0o700).create(&tmp);
        let ledger = Ledger::open(&root).map_err(io_err)?;
        let writable = writable_dir(&tmp);
        if !writable {
            tracing::warn!(
                "the disk cache at {} is read-only: its entries are served, new blocks stay in memory",
                opts.dir.display()
            );
        }
        let limit = free_space_bound(&root, &ledger).min(opts.max_bytes);
        if writable {
            fill::sweep_dead(&tmp);
        }
        Ok(DiskCache {
            limit,
            root,
            tmp,
            ledger,
            writable: AtomicBool::new(writable),
            unsaved: Default::default(),
            totals: Default::default(),
            events: AtomicU64::new(0),
            checked: Mutex::new(HashMap::new()),
            fills: Fills::default(),
            next_tmp: AtomicU64::new(0),
        })
    }

    /// The bound in force (after the free-space cap).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether an entry can be cached at all: a non-empty file no larger
    /// than its share of the bound.
    pub fn may_hold(&self, e: &Entry) -> bool {
        e.kind == EntryKind::File && e.size > 0 && e.size <= self.limit / MAX_ENTRY_SHARE
    }

    pub fn dir(&self) -> &Path {
        self.root.parent().unwrap_or(&self.root)
    }

    /// Counts one event, and now and then writes the figures to the ledger
    /// (never call it with the ledger locked).
    fn count(&self, f: Fig) {
        self.add(f, 1);
        if self.events.fetch_add(1, Ordering::Relaxed) % SAVE_EVERY == SAVE_EVERY - 1 {
            self.save_figures();
        }
    }

    fn add(&self, f: Fig, n: u64) {
        self.unsaved[f as usize].fetch_add(n, Ordering::Relaxed);
        self.totals[f as usize].fetch_add(n, Ordering::Relaxed);
    }

    fn take_unsaved(&self) -> Figures {
        let t = |f: Fig| self.unsaved[f as usize].swap(0, Ordering::Relaxed);
        Figures {
            hits: t(Fig::Hit),
            misses: t(Fig::Miss),
            inserts: t(Fig::Insert),
            evicted: t(Fig::Evicted),
            damaged: t(Fig::Damaged),
        }
    }

    /// Writes this process's figures to the ledger (best effort).
    pub fn save_figures(&self) {
        if !self.writable.load(Ordering::Relaxed) {
            return;
        }
        let add = self.take_unsaved();
        if let Ok(mut l) = self.ledger.lock() {
            let _ = l.save(add);
        }
    }

    /// Opens the entry `key` of `size` bytes after checking it, or `None`
    /// (a miss; a damaged entry is deleted and counted).
    pub fn open_entry(&self, key: &EntryKey, size: u64) -> Option<File> {
        let file = self.open_checked(key, size)?;
        self.count(Fig::Hit);
        Some(file)
    }

    /// [`DiskCache::open_entry`] for an entry this process already found
    /// (its hit counted then): checked again only if it was replaced since.
    pub fn reopen_entry(&self, key: &EntryKey, size: u64) -> Option<File> {
        self.open_checked(key, size)
    }

    /// Opens (and, the first time, checks) the entry `key` before anyone
    /// asks for it and has the kernel read it into the page cache, counting
    /// no hit: whether it is there.
    fn warm_entry(&self, key: &EntryKey, size: u64) -> bool {
        let Some(file) = self.open_checked(key, size) else {
            return false;
        };
        let _ = rustix::fs::fadvise(
            &file,
            0,
            std::num::NonZeroU64::new(size),
            rustix::fs::Advice::WillNeed,
        );
        true
    }

    fn open_checked(&self, key: &EntryKey, size: u64) -> Option<File> {
        let path = key.path(&self.root);
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path);
        let Ok(file) = opened else {
            self.count(Fig::Miss);
            return None;
        };
        let meta = file.metadata().ok()?;
        let id = Checked::of(&meta);
        let known = self.checked.lock().get(key) == Some(&id);
        if !known {
            match entry::check(&file, size) {
                Ok(()) => {
                    self.checked.lock().insert(*key, id);
                }
                Err(Bad::Missing) => {
                    self.count(Fig::Miss);
                    return None;
                }
                Err(Bad::Damaged(why)) => {
                    self.count(Fig::Miss);
                    if drop_damaged(&path, id) {
                        tracing::warn!(
                            "disk cache entry {} is damaged ({why}): dropped, fetching it again",
                            path.display()
                        );
                        self.count(Fig::Damaged);
                    }
                    return None;
                }
            }
        }
        if ledger::now_secs() - meta.atime() > TOUCH_AFTER_SECS {
            touch(&file);
        }
        Some(file)
    }

    /// Files a whole entry's content (its blocks in order) under `key`.
    fn insert_whole(&self, key: EntryKey, e: &Entry, blocks: &[Bytes]) -> bool {
        let sums: Vec<[u8; 32]> = blocks.iter().map(|b| Sha256::digest(b).into()).collect();
        if !entry::may_file(e, &sums) {
            tracing::warn!(
                "content of {} does not match its content hash: not cached",
                String::from_utf8_lossy(&e.name)
            );
            return false;
        }
        let Some((file, tmp)) = self.temp_file(&key) else {
            return false;
        };
        let mut crc = crc32fast::Hasher::new();
        let mut pos = 0;
        let written = blocks.iter().try_for_each(|b| {
            crc.update(b);
            file.write_all_at(b, pos)?;
            pos += b.len() as u64;
            Ok(())
        });
        self.commit(key, file, &tmp, written.map(|()| crc.finalize()), e.size)
    }

    /// A new temporary file (0600) for filling `key`.
    fn temp_file(&self, key: &EntryKey) -> Option<(File, PathBuf)> {
        if !self.writable.load(Ordering::Relaxed) {
            return None;
        }
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .tmp
            .join(format!("{}.{}.{n}", key.hex(), std::process::id()));
        let created = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp);
        // The lock marks the file as being filled until this process ends
        // (the kernel drops it then, zombie or not): see `fill::sweep_dead`.
        let locked = created.and_then(|f| {
            rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)?;
            Ok(f)
        });
        match locked {
            Ok(f) => Some((f, tmp)),
            Err(e) => {
                self.write_failed(&e);
                None
            }
        }
    }

    /// Puts a filled temporary file in place: checksum attribute, rename,
    /// then the shared counter (and an eviction pass when over the bound).
    fn commit(
        &self,
        key: EntryKey,
        file: File,
        tmp: &Path,
        crc: io::Result<u32>,
        size: u64,
    ) -> bool {
        let done = crc.and_then(|crc| {
            entry::set_sum(&file, crc, size)?;
            let path = key.path(&self.root);
            if let Some(dir) = path.parent() {
                match DirBuilder::new().mode(0o700).create(dir) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(tmp, &path)?;
            if let Ok(meta) = file.metadata() {
                // Written and checked here: no need to read it again.
                self.checked.lock().insert(key, Checked::of(&meta));
            }
            Ok(())
        });
        if let Err(e) = done {
            let _ = std::fs::remove_file(tmp);
            self.write_failed(&e);
            return false;
        }
        self.count(Fig::Insert);
        if let Ok(mut l) = self.ledger.lock() {
            l.used += size;
            if l.used > self.limit {
                let evicted = l.evict(self.limit);
                self.add(Fig::Evicted, evicted);
                tracing::debug!("disk cache: evicted {evicted} entries");
            }
            let add = self.take_unsaved();
            let _ = l.save(add);
        }
        true
    }

    /// A write failed: the dir is full or read-only (or went away). Stop
    /// filling it, with one log line; reads go on through memory.
    fn write_failed(&self, e: &io::Error) {
        if self.writable.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "cannot write to the disk cache at {} ({e}): from now on new blocks stay in memory only",
                self.dir().display()
            );
        }
    }

    /// Size, entries and the shared hit figures (for `cache stats`).
    pub fn summary(&self) -> Summary {
        self.save_figures();
        let entries = ledger::scan(&self.root);
        let figures = self.ledger.lock().map(|l| l.figures).unwrap_or_default();
        Summary {
            dir: self.dir().to_path_buf(),
            bytes: entries.iter().map(|e| e.size).sum(),
            entries: entries.len() as u64,
            limit: self.limit,
            figures,
        }
    }

    /// Deletes every entry (`cache clear`): returns (entries, bytes) removed.
    pub fn clear(&self) -> io::Result<(u64, u64)> {
        let mut l = self.ledger.lock()?;
        let removed = l.clear();
        self.checked.lock().clear();
        let add = self.take_unsaved();
        l.save(add)?;
        Ok(removed)
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        self.fills.abandon();
        self.save_figures();
    }
}

/// What `cache stats` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub dir: PathBuf,
    pub bytes: u64,
    pub entries: u64,
    pub limit: u64,
    #[serde(flatten)]
    pub figures: Figures,
}

/// Half the free space of the cache's file system, its own entries
/// counted as free.
fn free_space_bound(root: &Path, ledger: &Ledger) -> u64 {
    let used = ledger.lock().map_or(0, |l| l.used);
    match rustix::fs::statvfs(root) {
        Ok(s) => s.f_bavail.saturating_mul(s.f_frsize).saturating_add(used) / 2,
        Err(_) => u64::MAX,
    }
}

/// Whether new files can be made in `dir` (a read-only mount cannot).
fn writable_dir(dir: &Path) -> bool {
    rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).is_ok()
        && rustix::fs::statvfs(dir)
            .is_ok_and(|s| !s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// Sets the atime of an entry to now (its recency for eviction).
fn touch(file: &File) {
    use rustix::fs::{Timespec, Timestamps, UTIME_NOW, UTIME_OMIT};
    let _ = rustix::fs::futimens(
        file,
        &Timestamps {
            last_access: Timespec {
                tv_sec: 0,
                tv_nsec: UTIME_NOW,
            },
            last_modification: Timespec {
                tv_sec: 0,
                tv_nsec: UTIME_OMIT,
            },
        },
    );
}

/// Deletes the damaged entry at `path` if it is still the file `found`,
/// and says whether this call is the one that found it: readers that find
/// one entry damaged at once (a replay and the build, or two daemons) then
/// count and log it once, and none deletes a good entry that another filed
/// at the same path since. An entry that cannot be deleted (a read-only
/// cache dir) is still counted: it is never served either way.
fn drop_damaged(path: &Path, found: Checked) -> bool {
    let still_there = std::fs::symlink_metadata(path).is_ok_and(|m| Checked::of(&m) == found);
    still_there
        && match std::fs::remove_file(path) {
            Ok(()) => true,
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(path: &Path) -> Checked {
        Checked::of(&std::fs::symlink_metadata(path).unwrap())
    }

    #[test]
    fn a_damaged_entry_is_dropped_and_counted_by_the_one_that_finds_it_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entry");
        std::fs::write(&path, b"damaged").unwrap();
        let found = checked(&path);
        assert!(drop_damaged(&path, found), "the first finder drops it");
        assert!(!path.exists());
        assert!(
            !drop_damaged(&path, found),
            "a second finder counts nothing"
        );
    }

    #[test]
    fn a_good_entry_filed_since_at_the_same_path_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entry");
        std::fs::write(&path, b"damaged").unwrap();
        let found = checked(&path);
        let fresh = dir.path().join("fresh");
        std::fs::write(&fresh, b"good").unwrap();
        std::fs::rename(&fresh, &path).unwrap();
        assert!(!drop_damaged(&path, found));
        assert_eq!(std::fs::read(&path).unwrap(), b"good");
    }
}
