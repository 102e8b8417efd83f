//! What every process sharing a cache dir agrees on, under one `flock`: the
//! bytes the entries use (a counter file, so the bound holds across
//! processes), the hit figures (`cache stats`), and the eviction pass that
//! brings the entries back under the bound, oldest access first (atimes are
//! set on every hit, so recency is shared too). Scanning is also how the
//! counter is set right after a crash left it behind.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, MutexGuard};
use rustix::fs::{flock, FlockOperation};

use super::entry::is_entry_name;

/// An eviction pass brings the entries down to this share of the bound, so
/// that it does not run again at the next insert.
const EVICT_TO_PERCENT: u64 = 90;

/// The hit figures kept across processes (in this order in the file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Figures {
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    pub evicted: u64,
    pub damaged: u64,
}

impl Figures {
    const LEN: usize = 5;

    fn to_array(self) -> [u64; Figures::LEN] {
        [
            self.hits,
            self.misses,
            self.inserts,
            self.evicted,
            self.damaged,
        ]
    }

    fn from_array(a: [u64; Figures::LEN]) -> Figures {
        Figures {
            hits: a[0],
            misses: a[1],
            inserts: a[2],
            evicted: a[3],
            damaged: a[4],
        }
    }

    fn add(self, o: Figures) -> Figures {
        let (a, b) = (self.to_array(), o.to_array());
        Figures::from_array(std::array::from_fn(|i| a[i].saturating_add(b[i])))
    }
}

/// The shared state file: bytes used, then the figures, as LE u64s.
const STATE_LEN: usize = 8 * (1 + Figures::LEN);

/// The cache's bookkeeping file, locked for every change.
pub struct Ledger {
    root: PathBuf,
    file: File,
    /// `flock` excludes other processes only (it belongs to the open file):
    /// this excludes the other threads of this one.
    threads: Mutex<()>,
}

/// The state while the lock is held.
pub struct Locked<'a> {
    ledger: &'a Ledger,
    _thread: MutexGuard<'a, ()>,
    pub used: u64,
    pub figures: Figures,
}

impl Ledger {
    /// Opens (creating, 0600) the ledger of the cache at `root`; read-only
    /// when the dir is (then nothing is counted or evicted).
    pub fn open(root: &Path) -> io::Result<Ledger> {
        let path = root.join("ledger");
        let open = |write: bool| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .create(write)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
        };
        let file = open(true).or_else(|_| open(false))?;
        Ok(Ledger {
            root: root.to_path_buf(),
            file,
            threads: Mutex::new(()),
        })
    }

    /// Takes the lock (blocking: every holder only does bounded work).
    pub fn lock(&self) -> io::Result<Locked<'_>> {
        let thread = self.threads.lock();
        flock(&self.file, FlockOperation::LockExclusive)?;
        let mut buf = [0u8; STATE_LEN];
        let (used, figures) = match self.file.read_exact_at(&mut buf, 0) {
            Ok(()) => {
                let n = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap());
                (
                    Some(n(0)),
                    Figures::from_array(std::array::from_fn(|i| n(i + 1))),
                )
            }
            Err(_) => (None, Figures::default()),
        };
        let mut locked = Locked {
            ledger: self,
            _thread: thread,
            used: 0,
            figures,
        };
        // No ledger yet (a new dir) or a short one: count what is there.
        locked.used = match used {
            Some(u) => u,
            None => scan(&self.root).iter().map(|e| e.size).sum(),
        };
        Ok(locked)
    }
}

impl Locked<'_> {
    /// Adds this process's figures and writes the state back.
    pub fn save(&mut self, add: Figures) -> io::Result<()> {
        self.figures = self.figures.add(add);
        let mut buf = [0u8; STATE_LEN];
        buf[..8].copy_from_slice(&self.used.to_le_bytes());
        for (i, n) in self.figures.to_array().iter().enumerate() {
            buf[8 + i * 8..16 + i * 8].copy_from_slice(&n.to_le_bytes());
        }
        self.ledger.file.write_all_at(&buf, 0)
    }

    /// Scans the entries, sets the counter to what they really use, and
    /// deletes the least recently used ones until they fit in `limit`
    /// (to [`EVICT_TO_PERCENT`] of it). Returns how many were deleted.
    pub fn evict(&mut self, limit: u64) -> u64 {
        let mut entries = scan(&self.ledger.root);
        self.used = entries.iter().map(|e| e.size).sum();
        if self.used <= limit {
            return 0;
        }
        let target = limit / 100 * EVICT_TO_PERCENT;
        entries.sort_by_key(|e| e.atime);
        let mut deleted = 0;
        for e in entries {
            if self.used <= target {
                break;
            }
            // An open entry stays readable to whoever has it open.
            if std::fs::remove_file(&e.path).is_ok() {
                self.used = self.used.saturating_sub(e.size);
                deleted += 1;
            }
        }
        deleted
    }

    /// Deletes every entry (and nothing else).
    pub fn clear(&mut self) -> (u64, u64) {
        let mut removed = (0, 0);
        for e in scan(&self.ledger.root) {
            if std::fs::remove_file(&e.path).is_ok() {
                removed.0 += 1;
                removed.1 += e.size;
            }
        }
        self.used = scan(&self.ledger.root).iter().map(|e| e.size).sum();
        removed
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = flock(&self.ledger.file, FlockOperation::Unlock);
    }
}

/// One entry found by a scan.
pub struct Found {
    pub path: PathBuf,
    pub size: u64,
    pub atime: i64,
}

/// Every entry below `root`: only regular files named like an entry, in
/// the 256 directories named like their first byte.
pub fn scan(root: &Path) -> Vec<Found> {
    let mut out = Vec::new();
    for b in 0..=255u8 {
        let dir = root.join(hex::encode([b]));
        let Ok(read) = std::fs::read_dir(&dir) else {
            continue;
        };
        for item in read.flatten() {
            let name = item.file_name();
            if !name.to_str().is_some_and(is_entry_name) {
                continue;
            }
            let Ok(meta) = item.metadata() else { continue };
            if meta.is_file() {
                out.push(Found {
                    path: item.path(),
                    size: meta.len(),
                    atime: meta.atime(),
                });
            }
        }
    }
    out
}

/// Seconds since the epoch, for log lines and atimes.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
