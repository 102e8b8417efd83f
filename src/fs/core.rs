//! The filesystem core of one mountpoint: every operation the mount answers,
//! as plain methods returning `Result<_, FsError>`, generic over the store —
//! so it is tested without a kernel ([`super::fuse`] only translates).
//!
//! Metadata comes from the in-memory [`Tree`]; file content from the shared
//! [`Fetcher`], always through the mount's [`Current`] archive version (the
//! object a later layer swaps when the archive changes in the store). Nothing
//! here mutates anything: the mount is read-only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use super::handed::Handed;
use super::inodes::{Node, Tree, ROOT_INO};
use super::reopen::{same_attrs, Follower, ReopenError, Reopener};
use crate::archive::{EntryKind, Timestamp};
use crate::cache::{Current, FetchError, Fetcher, Version};
use crate::profile::usage::usage;
use crate::profile::Recorder;
use crate::store::ObjectStore;

/// The root's extended attribute that `cachemount stats` reads (not listed).
pub const STATS_XATTR: &[u8] = b"user.cachemount.stats";
/// The root's extended attribute that `cachemount report PATH` reads: the
/// usage of the archive by the reads recorded so far, as JSON (not listed).
pub const USAGE_XATTR: &[u8] = b"user.cachemount.usage";

/// Why an operation failed; [`super::fuse`] maps it to an errno in one place.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("not a symlink")]
    NotSymlink,
    #[error("no such extended attribute")]
    NoXattr,
    #[error("buffer too small")]
    Range,
    #[error("read-only file system")]
    ReadOnly,
    /// The object changed in the store (412) and could not be reopened
    /// (or keeps changing); the read failed.
    #[error("archive changed in the store: {0}")]
    Changed(#[source] Cause),
    /// The file was opened on content that is no longer in the store.
    #[error("the file changed in the store since it was opened")]
    Stale,
    #[error("I/O error: {0}")]
    Io(#[source] Cause),
}

/// What a failed read came from, kept whole (with its own sources) rather
/// than as text.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Cause {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Reopen(#[from] ReopenError),
    /// `read` of a symlink (the kernel reads a link's target with `readlink`).
    #[error("read of a symlink")]
    SymlinkRead,
}

/// Errors compare by kind and message: their causes (store errors) are not
/// comparable themselves.
impl PartialEq for FsError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl Eq for FsError {}

impl From<FetchError> for FsError {
    fn from(e: FetchError) -> Self {
        if e.is_changed() {
            FsError::Changed(e.into())
        } else {
            FsError::Io(e.into())
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// Attributes of one node, as `stat` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: EntryKind,
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    /// Permission bits (no type bits).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub nlink: u32,
}

/// One directory entry; `offset` is the cookie of the entry after it.
#[derive(Debug, Clone)]
pub struct DirEntry<'a> {
    pub ino: u64,
    pub offset: u64,
    pub kind: EntryKind,
    pub name: &'a [u8],
    pub attr: Attr,
}

/// What statfs reports.
#[derive(Debug, Clone, Copy)]
pub struct FsStat {
    pub blocks: u64,
    pub files: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// One mountpoint's view: the version it reads and its tree over that
/// version's index, swapped together (a remap never shows half of either).
pub struct Mapped {
    pub version: Arc<Version>,
    pub tree: Arc<Tree>,
}

/// An open file: the version and entry it was opened on, so that it keeps
/// reading that content, follows it to a new version when it is unchanged,
/// and fails with `ESTALE` when it changed (never a mix of two versions).
#[derive(Debug, Clone, Copy)]
struct Handle {
    ino: u64,
    version: u64,
    entry: Option<u32>,
    /// Something was read through it: from then on it keeps to its content.
    read: bool,
    stale: bool,
}

/// What the kernel must forget after a remap (sent by the FUSE layer).
#[derive(Debug, Default, Clone)]
pub struct Invalidations {
    /// Inodes whose data (page cache) and attributes changed.
    pub data: Vec<u64>,
    /// Inodes whose attributes only changed.
    pub attrs: Vec<u64>,
    /// (parent, name) of directory entries gone.
    pub entries: Vec<(u64, Box<[u8]>)>,
}

impl Invalidations {
    pub fn is_empty(&self) -> bool {
        self.data.is_empty() && self.attrs.is_empty() && self.entries.is_empty()
    }
}

/// The kernel's caches of one mountpoint, as the core may change them (the
/// FUSE notifier; a test's recorder).
pub trait KernelCache: Send + Sync {
    /// Forgets what a remap changed (best effort).
    fn invalidate(&self, inval: Invalidations);
    /// Puts `data` into the page cache of inode `ino` at `offset`.
    fn store(&self, ino: u64, offset: u64, data: &[u8]) -> std::io::Result<()>;
}

pub struct FsCore<S> {
    state: RwLock<Arc<Mapped>>,
    /// The archive name this mountpoint shows (`_0/node_modules`).
    root: Vec<u8>,
    fetcher: Arc<Fetcher<S>>,
    reopener: Option<Arc<Reopener>>,
    /// Whether open files get handles of their own (the object may change
    /// content: raw-URL mounts); otherwise reads go by inode only.
    track_handles: bool,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    kernel: Mutex<Option<Arc<dyn KernelCache>>>,
    /// Where reads are recorded (the daemon's one recorder), if recording.
    recorder: std::sync::OnceLock<Arc<Recorder>>,
    /// The files replay put into the kernel's page cache, and whether opens
    /// must be seen to account for them ([`super::handed`]).
    pub(super) handed: Handed,
}

impl<S: ObjectStore> FsCore<S> {
    pub fn new(tree: Tree, current: Arc<Current>, fetcher: Arc<Fetcher<S>>) -> Self {
        let version = current.load();
        FsCore {
            state: RwLock::new(Arc::new(Mapped {
                version,
                tree: Arc::new(tree),
            })),
            root: Vec::new(),
            fetcher,
            reopener: None,
            track_handles: false,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            kernel: Mutex::new(None),
            recorder: std::sync::OnceLock::new(),
            handed: Handed::default(),
        }
    }

    /// A core that survives changes of its object: a 412 reopens through
    /// `reopener` and the tree (built from the archive name `root`) is
    /// remapped. With `track_handles`, open files keep to their content.
    /// Register the returned core as a follower of `reopener`.
    pub fn with_reopen(
        tree: Tree,
        root: &[u8],
        reopener: Arc<Reopener>,
        fetcher: Arc<Fetcher<S>>,
        track_handles: bool,
    ) -> Arc<Self> {
        let mut core = FsCore::new(tree, reopener.current().clone(), fetcher).at_root(root);
        core.reopener = Some(reopener.clone());
        core.track_handles = track_handles;
        let core = Arc::new(core);
        let weak: std::sync::Weak<dyn Follower> = Arc::downgrade(&core) as _;
        reopener.follow(weak);
        core
    }

    /// The core of a tree built from the archive name `root` (names in the
    /// archive are then found under it).
    pub fn at_root(mut self, root: &[u8]) -> Self {
        self.root = root.to_vec();
        self
    }

    /// Records every read from now on in `recorder`.
    pub fn set_recorder(&self, recorder: Arc<Recorder>) {
        let _ = self.recorder.set(recorder);
        let stats = self.fetcher.stats();
        stats
            .recording
            .store(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A read returned `len` bytes at `offset` of `entry`: recorded.
    pub(super) fn note_read(&self, v: &Version, entry: u32, offset: u64, len: usize) {
        if let Some(r) = self.recorder.get() {
            if r.record(v, entry, offset, len as u64) {
                crate::cache::Stats::inc(&self.fetcher.stats().files_read);
            }
        }
    }

    /// Whether a read of `entry` has been recorded (false when not recording).
    pub(super) fn was_read(&self, v: &Version, entry: u32) -> bool {
        self.recorder.get().is_some_and(|r| r.has(v, entry))
    }

    /// The kernel caches this mountpoint: remaps invalidate them, replay
    /// may fill them.
    pub fn set_kernel(&self, kernel: Arc<dyn KernelCache>) {
        *self.kernel.lock() = Some(kernel);
    }

    pub(super) fn kernel(&self) -> Option<Arc<dyn KernelCache>> {
        self.kernel.lock().clone()
    }

    /// Whether open files get handles of their own (their content may change).
    pub fn tracks_handles(&self) -> bool {
        self.track_handles
    }

    /// Archive name `name` as a path under this mountpoint, if it is under it.
    pub fn relative<'a>(&self, name: &'a [u8]) -> Option<&'a [u8]> {
        match self.root.as_slice() {
            [] => Some(name),
            root => name.strip_prefix(root)?.strip_prefix(b"/"),
        }
    }

    pub fn fetcher(&self) -> &Arc<Fetcher<S>> {
        &self.fetcher
    }

    /// The version and tree this mountpoint answers from now.
    pub fn mapped(&self) -> Arc<Mapped> {
        self.state.read().clone()
    }

    fn attr_of(&self, ino: u64, n: &Node) -> Attr {
        Attr {
            ino,
            kind: n.kind,
            size: n.size,
            blocks: n.size.div_ceil(512),
            perm: n.mode & 0o7777,
            uid: n.uid,
            gid: n.gid,
            mtime: n.mtime,
            nlink: n.nlink,
        }
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let m = self.mapped();
        let dir = node(&m, parent)?;
        if dir.kind != EntryKind::Dir {
            return Err(FsError::NotDir);
        }
        let ino = match name {
            b"." => parent,
            b".." => dir.parent,
            _ => m.tree.lookup(parent, name).ok_or(FsError::NotFound)?,
        };
        Ok(self.attr_of(ino, node(&m, ino)?))
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let m = self.mapped();
        Ok(self.attr_of(ino, node(&m, ino)?))
    }

    /// Calls `add` for each entry from cookie `offset` on (`.` and `..`
    /// first) until it returns `true` (its buffer is full).
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(DirEntry<'_>) -> bool,
    ) -> FsResult<()> {
        let m = self.mapped();
        let dir = node(&m, ino)?;
        if dir.kind != EntryKind::Dir {
            return Err(FsError::NotDir);
        }
        let total = dir.children.len() as u64 + 2;
        for pos in offset..total {
            let (child, name): (u64, &[u8]) = match pos {
                0 => (ino, b"."),
                1 => (dir.parent, b".."),
                _ => {
                    let c = dir.children[(pos - 2) as usize];
                    (c, m.tree.name(node(&m, c)?))
                }
            };
            let n = node(&m, child)?;
            let entry = DirEntry {
                ino: child,
                offset: pos + 1,
                kind: n.kind,
                name,
                attr: self.attr_of(child, n),
            };
            if add(entry) {
                break;
            }
        }
        Ok(())
    }

    /// The symlink's target: from the index, or (foreign archives) its data.
    pub async fn readlink(&self, ino: u64) -> FsResult<Bytes> {
        if let Some(target) = self.readlink_cached(ino)? {
            return Ok(target);
        }
        let mut attempts = 0;
        loop {
            let m = self.mapped();
            let entry = node(&m, ino)?.entry.ok_or(FsError::NotSymlink)?;
            let v = &m.version;
            let size = v.entry(entry).size.min(u64::from(u32::MAX)) as u32;
            match self.fetcher.read(v, entry, 0, size).await {
                Err(e) if e.is_changed() => self.after_412(v, e, &mut attempts).await?,
                Err(e) => {
                    self.log_failure(v, entry, &e);
                    return Err(e.into());
                }
                Ok(b) => return Ok(b),
            }
        }
    }

    /// The target when the index has it (no I/O); `None` when it must be read.
    pub fn readlink_cached(&self, ino: u64) -> FsResult<Option<Bytes>> {
        let m = self.mapped();
        let n = node(&m, ino)?;
        if n.kind != EntryKind::Symlink {
            return Err(FsError::NotSymlink);
        }
        let entry = n.entry.ok_or(FsError::NotSymlink)?;
        Ok(m.version
            .entry(entry)
            .link_target
            .as_ref()
            .map(|t| Bytes::copy_from_slice(t)))
    }

    /// Opening for writing fails. Returns the file handle: 0 unless handles
    /// are tracked (then one recording the version and entry opened).
    pub fn open(&self, ino: u64, write: bool) -> FsResult<u64> {
        let mut handles = self.handles.lock();
        let m = self.mapped();
        let n = node(&m, ino)?;
        if write {
            return Err(FsError::ReadOnly);
        }
        if !self.track_handles {
            drop(handles);
            self.opened_handed(ino, &m);
            return Ok(0);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        handles.insert(
            fh,
            Handle {
                ino,
                version: m.version.id,
                entry: n.entry,
                read: false,
                stale: false,
            },
        );
        Ok(fh)
    }

    /// Bytes were returned through `fh`: from now on it keeps to its content.
    fn mark_read(&self, fh: u64) {
        if fh != 0 {
            if let Some(h) = self.handles.lock().get_mut(&fh) {
                h.read = true;
            }
        }
    }

    /// The version and entry a read of `ino` through handle `fh` reads.
    fn resolve(&self, ino: u64, fh: u64) -> FsResult<(Arc<Version>, u32)> {
        let handles = self.handles.lock();
        let m = self.mapped();
        let n = node(&m, ino)?;
        match n.kind {
            EntryKind::Dir => return Err(FsError::IsDir),
            EntryKind::Symlink => return Err(FsError::Io(Cause::SymlinkRead)),
            EntryKind::File => {}
        }
        let entry = match handles.get(&fh) {
            Some(h) if h.stale => {
                return Err(FsError::Stale);
            }
            Some(h) if h.version == m.version.id => h.entry,
            // Handles are moved with the tree (under the same lock): a handle
            // of another version is a bug; fail rather than guess.
            Some(_) => return Err(FsError::Stale),
            None => n.entry,
        };
        let entry = entry.ok_or(FsError::NotFound)?;
        Ok((m.version.clone(), entry))
    }

    /// The file's whole content in the disk cache (checked), for opening it
    /// in passthrough mode; `None` when it is not there whole, or when the
    /// object may change to other content under the mount (handles are
    /// tracked): the kernel keeps one backing file per inode while it is
    /// open, so a new open could not be given the new content.
    pub fn passthrough_file(&self, ino: u64) -> Option<std::sync::Arc<std::fs::File>> {
        if self.track_handles {
            return None;
        }
        let (v, entry) = self.resolve(ino, 0).ok()?;
        self.fetcher.disk_file(&v, entry)
    }

    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        self.read_fh(ino, 0, offset, size).await
    }

    /// Reads through handle `fh` (0: by inode). A 412 reopens the object
    /// (or waits for the reopen under way) and retries on the new version.
    pub async fn read_fh(&self, ino: u64, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let mut attempts = 0;
        loop {
            let (v, entry) = self.resolve(ino, fh)?;
            match self.fetcher.read(&v, entry, offset, size).await {
                Ok(b) => {
                    self.mark_read(fh);
                    self.note_read(&v, entry, offset, b.len());
                    return Ok(b);
                }
                Err(e) if e.is_changed() => self.after_412(&v, e, &mut attempts).await?,
                Err(e) => {
                    self.log_failure(&v, entry, &e);
                    return Err(e.into());
                }
            }
        }
    }

    /// A read of `v` got a 412: reopens (bounded) and returns to retry, or fails.
    async fn after_412(&self, v: &Version, e: FetchError, attempts: &mut usize) -> FsResult<()> {
        let Some(r) = &self.reopener else {
            crate::cache::Stats::inc(&self.fetcher.stats().read_errors);
            tracing::warn!("{e}; the read fails with EIO");
            return Err(FsError::Changed(e.into()));
        };
        *attempts += 1;
        if *attempts > r.limit + 1 {
            crate::cache::Stats::inc(&self.fetcher.stats().read_errors);
            tracing::error!(
                "{} keeps changing in the store; the read fails with EIO",
                v.key
            );
            return Err(FsError::Changed(e.into()));
        }
        match r.reopen(v.id).await {
            Ok(_) => Ok(()),
            Err(e) => {
                crate::cache::Stats::inc(&self.fetcher.stats().read_errors);
                Err(FsError::Changed(e.into()))
            }
        }
    }

    /// The read if the cache can answer it alone (no waiting); `None` otherwise.
    pub fn read_cached(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Option<FsResult<Bytes>> {
        let (v, entry) = match self.resolve(ino, fh) {
            Ok(x) => x,
            Err(FsError::Stale) => return Some(Err(FsError::Stale)),
            Err(_) => return None,
        };
        Some(
            self.fetcher
                .read_cached(&v, entry, offset, size)?
                .inspect(|b| {
                    self.mark_read(fh);
                    self.note_read(&v, entry, offset, b.len());
                })
                .map_err(|e| {
                    self.log_failure(&v, entry, &e);
                    e.into()
                }),
        )
    }

    fn log_failure(&self, v: &Version, entry: u32, e: &FetchError) {
        crate::cache::Stats::inc(&self.fetcher.stats().read_errors);
        // A damaged entry was logged once, when it was found: not on every read.
        if !matches!(e, FetchError::Damaged(_)) {
            tracing::warn!("read of {} failed with EIO: {e}", v.name(entry));
        }
    }

    pub fn release(&self, _ino: u64, fh: u64) {
        if fh != 0 {
            self.handles.lock().remove(&fh);
        }
    }

    pub fn statfs(&self) -> FsStat {
        let m = self.mapped();
        FsStat {
            blocks: m.tree.total_size().div_ceil(4096),
            files: m.tree.len() as u64,
            block_size: 4096,
            name_max: 255,
        }
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        if ino == ROOT_INO && name == STATS_XATTR {
            return Ok(self.fetcher.render_stats().into_bytes());
        }
        let m = self.mapped();
        if ino == ROOT_INO && name == USAGE_XATTR {
            let names = self.recorder.get().map(|r| r.names()).unwrap_or_default();
            let u = usage(&m.version.index, names.iter().map(|n| &**n));
            return Ok(serde_json::to_vec(&u).expect("usage serialises"));
        }
        let n = node(&m, ino)?;
        let Some(entry) = n.entry else {
            return Err(FsError::NoXattr);
        };
        m.version
            .entry(entry)
            .xattrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, val)| val.clone())
            .ok_or(FsError::NoXattr)
    }

    /// The attribute names, each followed by a NUL (the listxattr format).
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let m = self.mapped();
        let n = node(&m, ino)?;
        let mut out = Vec::new();
        if let Some(entry) = n.entry {
            for (k, _) in &m.version.entry(entry).xattrs {
                out.extend_from_slice(k);
                out.push(0);
            }
        }
        Ok(out)
    }

    /// `access(2)`: anything but write access is allowed (the kernel checks
    /// permission bits itself: the mount uses `default_permissions`).
    pub fn access(&self, ino: u64, mask: i32) -> FsResult<()> {
        node(&self.mapped(), ino)?;
        if mask & libc::W_OK != 0 {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }
}

fn node(m: &Mapped, ino: u64) -> FsResult<&Node> {
    m.tree.get(ino).ok_or(FsError::NotFound)
}

impl<S: ObjectStore> Follower for FsCore<S> {
    fn follow(&self, old: &Arc<Version>, new: &Arc<Version>, same: &[Option<u32>]) {
        let stats = self.fetcher.stats().clone();
        let inval = {
            let mut handles = self.handles.lock();
            let m = self.mapped();
            if m.version.id != old.id {
                tracing::warn!(
                    "mountpoint was on version {} while {} was replaced; remapping anyway",
                    m.version.id,
                    old.id
                );
            }
            let mv = &m.version;
            let same_in = |a: u32| {
                if mv.id == old.id {
                    same.get(a as usize).copied().flatten()
                } else {
                    None
                }
            };
            // The same index (a content-addressed blob rewritten): the tree
            // stays as it is, every handle follows entry for entry.
            let identical = mv.id == old.id
                && same.len() == new.index.entries.len()
                && same.iter().enumerate().all(|(i, s)| *s == Some(i as u32))
                && (0..same.len() as u32).all(|i| same_attrs(mv.entry(i), new.entry(i)));
            if identical {
                for h in handles.values_mut().filter(|h| !h.stale) {
                    h.version = new.id;
                }
                *self.state.write() = Arc::new(Mapped {
                    version: new.clone(),
                    tree: m.tree.clone(),
                });
                return;
            }
            // Entries are numbered anew: what was handed to the kernel is
            // no longer known by these numbers (its reads go unrecorded).
            self.handed.forget();
            let remapped = m.tree.remap(
                &new.index,
                &self.root,
                |a, b| same_in(a) == Some(b),
                |a, b| same_attrs(mv.entry(a), new.entry(b)),
            );
            let (tree, report) = match remapped {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!("{e}: the mountpoint is now empty");
                    m.tree
                        .remap(
                            &crate::archive::ArchiveIndex::default(),
                            b"",
                            |_, _| false,
                            |_, _| false,
                        )
                        .expect("an empty index maps")
                }
            };
            for h in handles.values_mut().filter(|h| !h.stale) {
                match h.entry {
                    Some(e) => match same_in(e) {
                        Some(n) => {
                            h.entry = Some(n);
                            h.version = new.id;
                        }
                        // Nothing read through it yet: it simply opens
                        // the new content (no mix is possible).
                        None if !h.read
                            && tree.get(h.ino).is_some_and(|n| {
                                n.kind == EntryKind::File && n.entry.is_some()
                            }) =>
                        {
                            h.entry = tree.get(h.ino).and_then(|n| n.entry);
                            h.version = new.id;
                        }
                        None => {
                            h.stale = true;
                            crate::cache::Stats::inc(&stats.stale_handles);
                        }
                    },
                    None => h.version = new.id,
                }
            }
            crate::cache::Stats::add(&stats.changed_files, report.changed.len() as u64);
            if !report.changed.is_empty() || !report.gone.is_empty() || report.added > 0 {
                tracing::warn!(
                    "mountpoint {:?} remapped: {} files changed, {} paths gone, {} new",
                    String::from_utf8_lossy(&self.root),
                    report.changed.len(),
                    report.gone.len(),
                    report.added
                );
            }
            *self.state.write() = Arc::new(Mapped {
                version: new.clone(),
                tree: Arc::new(tree),
            });
            let mut data = report.changed;
            data.extend(report.dirs_changed);
            Invalidations {
                data,
                attrs: report.attrs_changed,
                entries: report.gone,
            }
        };
        // Sent from another thread, not awaited: the kernel may hold a page
        // lock for a read that is waiting for this very reopen to finish.
        if let Some(kernel) = self.kernel() {
            if !inval.is_empty() {
                std::thread::spawn(move || kernel.invalidate(inval));
            }
        }
    }
}
