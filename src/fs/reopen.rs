//! The 412 path (DESIGN §4 "On 412"): when the mount's object changes in the
//! store, one task reopens it (HEAD, tail, index) while the other reads that
//! hit the 412 wait on it; then every mountpoint maps its tree onto the new
//! version ([`Follower`]), the block cache drops the old version's blocks,
//! and the waiting reads retry against the new version.
//!
//! Bounded: at most [`Reopener::limit`] reopens within [`Reopener::window`];
//! beyond that the reads fail (EIO) with a log line saying the object keeps
//! changing — a read never hangs and never returns bytes of two versions.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;

use super::core::Current;
use crate::archive::{ArchiveIndex, Entry};
use crate::cache::{Stats, Version};

/// Opens the object again (HEAD, pin, tail, index): `daemon::open_version`.
pub type Opener = Box<dyn Fn() -> BoxFuture<'static, anyhow::Result<Version>> + Send + Sync>;

/// Drops the cached blocks of a version id; returns how many.
pub type Invalidator = Box<dyn Fn(u64) -> u64 + Send + Sync>;

/// Something that maps its state onto a new version (one mountpoint's core).
pub trait Follower: Send + Sync {
    /// Moves from `old` to `new`; `same[i]` is the index in `new` of `old`'s
    /// entry `i` when its content is unchanged.
    fn follow(&self, old: &Arc<Version>, new: &Arc<Version>, same: &[Option<u32>]);
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReopenError {
    #[error("{0} keeps changing in the store ({1} reopens within {2} s); reads fail with EIO")]
    KeepsChanging(String, usize, u64),
    #[error("{0} changed in the store and cannot be reopened: {1}")]
    Failed(String, String),
}

/// Default bound: this many reopens within [`DEFAULT_WINDOW`].
pub const DEFAULT_LIMIT: usize = 5;
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

/// The single-flight reopen of one mount (shared by its mountpoints).
pub struct Reopener {
    key: String,
    current: Arc<Current>,
    open: Opener,
    invalidate: Invalidator,
    /// Start times of recent reopens; the lock is the single flight.
    gate: tokio::sync::Mutex<VecDeque<Instant>>,
    followers: Mutex<Vec<Weak<dyn Follower>>>,
    stats: Arc<Stats>,
    pub limit: usize,
    pub window: Duration,
}

impl Reopener {
    pub fn new(
        current: Arc<Current>,
        open: Opener,
        invalidate: Invalidator,
        stats: Arc<Stats>,
    ) -> Arc<Self> {
        let key = current.load().key.clone();
        Arc::new(Reopener {
            key,
            current,
            open,
            invalidate,
            gate: tokio::sync::Mutex::new(VecDeque::new()),
            followers: Mutex::new(Vec::new()),
            stats,
            limit: DEFAULT_LIMIT,
            window: DEFAULT_WINDOW,
        })
    }

    /// With another bound (tests).
    pub fn with_limit(mut self: Arc<Self>, limit: usize, window: Duration) -> Arc<Self> {
        let this = Arc::get_mut(&mut self).expect("set the bound before sharing");
        this.limit = limit;
        this.window = window;
        self
    }

    pub fn current(&self) -> &Arc<Current> {
        &self.current
    }

    pub fn follow(&self, f: Weak<dyn Follower>) {
        self.followers.lock().push(f);
    }

    /// Called by a read that got a 412 on version `seen`: reopens unless
    /// another read already did (then just waits for it); returns the version
    /// to retry against.
    pub async fn reopen(&self, seen: u64) -> Result<Arc<Version>, ReopenError> {
        Stats::inc(&self.stats.reopen_waits);
        let mut recent = self.gate.lock().await;
        let cur = self.current.load();
        if cur.id != seen {
            return Ok(cur);
        }
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            recent.pop_front();
        }
        if recent.len() >= self.limit {
            Stats::inc(&self.stats.reopen_refused);
            let e =
                ReopenError::KeepsChanging(self.key.clone(), recent.len(), self.window.as_secs());
            tracing::error!("{e}");
            return Err(e);
        }
        recent.push_back(now);
        let opened = (self.open)().await.map_err(|e| {
            let e = ReopenError::Failed(self.key.clone(), format!("{e:#}"));
            tracing::error!("{e}; reads fail with EIO");
            e
        })?;
        let new = Arc::new(opened);
        let same = unchanged_entries(&cur.index, &new.index);
        let old = self.current.swap(new.clone());
        let followers: Vec<Arc<dyn Follower>> = {
            let mut fs = self.followers.lock();
            fs.retain(|f| f.strong_count() > 0);
            fs.iter().filter_map(Weak::upgrade).collect()
        };
        for f in followers {
            f.follow(&old, &new, &same);
        }
        let dropped = (self.invalidate)(old.id);
        let ms = now.elapsed().as_millis() as u64;
        Stats::inc(&self.stats.reopens);
        Stats::add(&self.stats.reopen_ms, ms);
        Stats::max(&self.stats.reopen_max_ms, ms);
        Stats::add(&self.stats.invalidated_blocks, dropped);
        let kept = same.iter().filter(|s| s.is_some()).count();
        tracing::warn!(
            "{} changed in the store (ETag {} → {}); reopened in {ms} ms: {kept} of {} entries unchanged, {} in the new version, {dropped} cached blocks invalidated",
            self.key,
            old.pin.etag,
            new.pin.etag,
            old.index.entries.len(),
            new.index.entries.len(),
        );
        Ok(new)
    }
}

/// Whether two entries hold the same content: same kind, size and content
/// hash (foreign archives have none: same CRC-32 then), same link target.
pub fn same_content(a: &Entry, b: &Entry) -> bool {
    a.kind == b.kind
        && a.size == b.size
        && a.link_target == b.link_target
        && match (&a.content_hash, &b.content_hash) {
            (Some(x), Some(y)) => x == y,
            (None, None) => a.crc32 == b.crc32,
            _ => false,
        }
}

/// Whether the attributes `stat` and `getxattr` show are the same.
pub fn same_attrs(a: &Entry, b: &Entry) -> bool {
    a.mode == b.mode
        && a.uid == b.uid
        && a.gid == b.gid
        && a.mtime == b.mtime
        && a.xattrs == b.xattrs
}

/// For each entry of `old`, the index of the entry of `new` at the same path
/// with the same content.
pub fn unchanged_entries(old: &ArchiveIndex, new: &ArchiveIndex) -> Vec<Option<u32>> {
    let by_name: HashMap<&[u8], u32> = new
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.name.as_slice(), i as u32))
        .collect();
    old.entries
        .iter()
        .map(|e| {
            by_name
                .get(e.name.as_slice())
                .copied()
                .filter(|&j| same_content(e, &new.entries[j as usize]))
        })
        .collect()
}
