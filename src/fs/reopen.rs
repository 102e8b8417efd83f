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

use crate::archive::{ArchiveIndex, Entry};
use crate::cache::Current;
use crate::cache::{Stats, Version};

/// Opens the object again (tail, pin, index): `mount::daemon::reopener` makes
/// it over `cache::version::open_version`.
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
        let open_ms = now.elapsed().as_millis() as u64;
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
            "{} changed in the store (ETag {} → {}); reopened in {ms} ms (HEAD + index {open_ms} ms, remap {} ms): {kept} of {} entries unchanged, {} in the new version, {dropped} cached blocks invalidated",
            self.key,
            old.pin.etag,
            new.pin.etag,
            ms - open_ms,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::{EntryKind, Timestamp};
    use crate::fs::inodes::{Tree, ROOT_INO};

    fn entry(name: &str, kind: EntryKind, size: u64, crc: u32, hash: Option<u8>) -> Entry {
        Entry {
            uid: 1,
            gid: 2,
            mtime: Timestamp { secs: 5, nanos: 6 },
            size,
            compressed_size: size,
            crc32: crc,
            content_hash: hash.map(|h| [h; 32]),
            ..Entry::new(kind, name)
        }
    }

    fn index(entries: Vec<Entry>) -> ArchiveIndex {
        ArchiveIndex {
            entries,
            ..ArchiveIndex::default()
        }
    }

    #[test]
    fn content_is_compared_by_hash_or_for_foreign_entries_by_crc() {
        let f = EntryKind::File;
        assert!(same_content(
            &entry("a", f, 3, 1, Some(7)),
            &entry("a", f, 3, 2, Some(7))
        ));
        assert!(!same_content(
            &entry("a", f, 3, 1, Some(7)),
            &entry("a", f, 3, 1, Some(8))
        ));
        assert!(!same_content(
            &entry("a", f, 3, 1, Some(7)),
            &entry("a", f, 4, 1, Some(7))
        ));
        assert!(same_content(
            &entry("a", f, 3, 1, None),
            &entry("a", f, 3, 1, None)
        ));
        assert!(!same_content(
            &entry("a", f, 3, 1, None),
            &entry("a", f, 3, 9, None)
        ));
        assert!(!same_content(
            &entry("a", f, 3, 1, None),
            &entry("a", f, 3, 1, Some(1))
        ));
        let mut b = entry("a", f, 3, 1, None);
        b.mode = 0o600;
        assert!(same_content(&entry("a", f, 3, 1, None), &b));
        assert!(!same_attrs(&entry("a", f, 3, 1, None), &b));
    }

    #[test]
    fn remap_keeps_inodes_by_path_and_reports_changes() {
        let f = EntryKind::File;
        let old = index(vec![
            entry("_0/d", EntryKind::Dir, 0, 0, None),
            entry("_0/d/changed", f, 3, 1, Some(1)),
            entry("_0/d/gone", f, 3, 1, Some(2)),
            entry("_0/d/same", f, 3, 1, Some(3)),
            entry("_0/kind", f, 3, 1, Some(4)),
        ]);
        let new = index(vec![
            entry("_0/a-new", f, 3, 1, Some(5)),
            entry("_0/d", EntryKind::Dir, 0, 0, None),
            entry("_0/d/changed", f, 3, 1, Some(9)),
            entry("_0/d/same", f, 3, 1, Some(3)),
            entry("_0/kind", EntryKind::Dir, 0, 0, None),
        ]);
        let same = unchanged_entries(&old, &new);
        assert_eq!(same, vec![Some(1), None, None, Some(3), None]);
        let t = Tree::build(&old, b"_0").unwrap();
        let d = t.lookup(ROOT_INO, b"d").unwrap();
        let ino = |t: &Tree, p: u64, n: &str| t.lookup(p, n.as_bytes());
        let (changed, gone, samef, kind) = (
            ino(&t, d, "changed").unwrap(),
            ino(&t, d, "gone").unwrap(),
            ino(&t, d, "same").unwrap(),
            ino(&t, ROOT_INO, "kind").unwrap(),
        );
        let (t2, report) = t
            .remap(
                &new,
                b"_0",
                |a, b| same[a as usize] == Some(b),
                |a, b| same_attrs(&old.entries[a as usize], &new.entries[b as usize]),
            )
            .unwrap();
        assert_eq!(t2.lookup(ROOT_INO, b"d"), Some(d));
        assert_eq!(ino(&t2, d, "changed"), Some(changed));
        assert_eq!(ino(&t2, d, "same"), Some(samef));
        assert_eq!(ino(&t2, d, "gone"), None);
        assert!(t2.get(gone).is_none());
        let new_kind = ino(&t2, ROOT_INO, "kind").unwrap();
        assert!(
            new_kind != kind && new_kind > gone,
            "a kind change gets a new inode"
        );
        let a_new = ino(&t2, ROOT_INO, "a-new").unwrap();
        assert!(a_new > gone && a_new != new_kind);
        assert_eq!(t2.get(samef).unwrap().entry, Some(3), "new entry index");
        assert_eq!(report.changed, vec![changed]);
        assert_eq!(report.added, 2);
        let mut gone_names: Vec<&[u8]> = report.gone.iter().map(|(_, n)| &n[..]).collect();
        gone_names.sort();
        assert_eq!(gone_names, vec![&b"gone"[..], b"kind"]);
        assert!(report.dirs_changed.contains(&d) && report.dirs_changed.contains(&ROOT_INO));
        assert_eq!(t2.len(), 6);
        let names: Vec<&[u8]> = t2
            .get(ROOT_INO)
            .unwrap()
            .children
            .iter()
            .map(|c| t2.name(t2.get(*c).unwrap()))
            .collect();
        assert_eq!(names, vec![&b"a-new"[..], b"d", b"kind"]);
    }
}
