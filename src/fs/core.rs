//! The filesystem core of one mountpoint: every operation the mount answers,
//! as plain methods returning `Result<_, FsError>`, generic over the store —
//! so it is tested without a kernel ([`super::fuse`] only translates).
//!
//! Metadata comes from the in-memory [`Tree`]; file content from the shared
//! [`Fetcher`], always through the mount's [`Current`] archive version (the
//! object a later layer swaps when the archive changes in the store). Nothing
//! here mutates anything: the mount is read-only.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;

use super::tree::{Node, Tree, ROOT_INO};
use crate::archive::{EntryKind, Timestamp};
use crate::cache::{FetchError, Fetcher, Version};
use crate::store::ObjectStore;

/// The root's extended attribute that `cachemount stats` reads (not listed).
pub const STATS_XATTR: &[u8] = b"user.cachemount.stats";

/// Why an operation failed; [`super::fuse`] maps it to an errno in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
    /// The object changed in the store (412); the read failed.
    #[error("archive changed in the store: {0}")]
    Changed(String),
    #[error("I/O error: {0}")]
    Io(String),
}

impl From<FetchError> for FsError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Changed(m) => FsError::Changed(m),
            FetchError::Store(m) | FetchError::Corrupt(m) => FsError::Io(m),
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

/// The archive version a mount reads from, swappable as a whole: a read takes
/// the current version once and uses it throughout, so it never mixes two.
pub struct Current {
    version: RwLock<Arc<Version>>,
}

impl Current {
    pub fn new(version: Version) -> Arc<Self> {
        Arc::new(Current {
            version: RwLock::new(Arc::new(version)),
        })
    }

    pub fn load(&self) -> Arc<Version> {
        self.version.read().clone()
    }

    /// Makes `version` the one new reads use; returns the old one.
    pub fn swap(&self, version: Arc<Version>) -> Arc<Version> {
        std::mem::replace(&mut *self.version.write(), version)
    }
}

pub struct FsCore<S> {
    tree: Tree,
    current: Arc<Current>,
    fetcher: Arc<Fetcher<S>>,
}

impl<S: ObjectStore> FsCore<S> {
    pub fn new(tree: Tree, current: Arc<Current>, fetcher: Arc<Fetcher<S>>) -> Self {
        FsCore {
            tree,
            current,
            fetcher,
        }
    }

    pub fn fetcher(&self) -> &Arc<Fetcher<S>> {
        &self.fetcher
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    fn node(&self, ino: u64) -> FsResult<&Node> {
        self.tree.get(ino).ok_or(FsError::NotFound)
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
        let dir = self.node(parent)?;
        if dir.kind != EntryKind::Dir {
            return Err(FsError::NotDir);
        }
        let ino = match name {
            b"." => parent,
            b".." => dir.parent,
            _ => self.tree.lookup(parent, name).ok_or(FsError::NotFound)?,
        };
        self.getattr(ino)
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        Ok(self.attr_of(ino, self.node(ino)?))
    }

    /// Calls `add` for each entry from cookie `offset` on (`.` and `..`
    /// first) until it returns `true` (its buffer is full).
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(DirEntry<'_>) -> bool,
    ) -> FsResult<()> {
        let dir = self.node(ino)?;
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
                    (c, &self.node(c)?.name)
                }
            };
            let n = self.node(child)?;
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
        let n = self.node(ino)?;
        let entry = n.entry.ok_or(FsError::NotSymlink)?;
        let v = self.current.load();
        let size = v.entry(entry).size.min(u64::from(u32::MAX)) as u32;
        Ok(self
            .fetcher
            .read(&v, entry, 0, size)
            .await
            .inspect_err(|e| self.log_failure(&v, entry, e))?)
    }

    /// The target when the index has it (no I/O); `None` when it must be read.
    pub fn readlink_cached(&self, ino: u64) -> FsResult<Option<Bytes>> {
        let n = self.node(ino)?;
        if n.kind != EntryKind::Symlink {
            return Err(FsError::NotSymlink);
        }
        let entry = n.entry.ok_or(FsError::NotSymlink)?;
        let v = self.current.load();
        Ok(v.entry(entry)
            .link_target
            .as_ref()
            .map(|t| Bytes::copy_from_slice(t)))
    }

    /// Opening for writing fails; opening anything else needs no state.
    pub fn open(&self, ino: u64, write: bool) -> FsResult<()> {
        self.node(ino)?;
        if write {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }

    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let n = self.node(ino)?;
        match n.kind {
            EntryKind::Dir => return Err(FsError::IsDir),
            EntryKind::Symlink => return Err(FsError::Io("read of a symlink".into())),
            EntryKind::File => {}
        }
        let Some(entry) = n.entry else {
            return Err(FsError::NotFound);
        };
        let v = self.current.load();
        self.fetcher
            .read(&v, entry, offset, size)
            .await
            .map_err(|e| {
                self.log_failure(&v, entry, &e);
                e.into()
            })
    }

    /// The read if the cache can answer it alone (no waiting); `None` otherwise.
    pub fn read_cached(&self, ino: u64, offset: u64, size: u32) -> Option<FsResult<Bytes>> {
        let n = self.tree.get(ino)?;
        let entry = n.entry.filter(|_| n.kind == EntryKind::File)?;
        let v = self.current.load();
        Some(
            self.fetcher
                .read_cached(&v, entry, offset, size)?
                .map_err(|e| {
                    self.log_failure(&v, entry, &e);
                    e.into()
                }),
        )
    }

    fn log_failure(&self, v: &Version, entry: u32, e: &FetchError) {
        crate::cache::Stats::inc(&self.fetcher.stats().read_errors);
        tracing::warn!("read of {} failed with EIO: {e}", v.name(entry));
    }

    pub fn release(&self, _ino: u64) {}

    pub fn statfs(&self) -> FsStat {
        FsStat {
            blocks: self.tree.total_size().div_ceil(4096),
            files: self.tree.len() as u64,
            block_size: 4096,
            name_max: 255,
        }
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        if ino == ROOT_INO && name == STATS_XATTR {
            return Ok(self.fetcher.render_stats().into_bytes());
        }
        let n = self.node(ino)?;
        let Some(entry) = n.entry else {
            return Err(FsError::NoXattr);
        };
        let v = self.current.load();
        v.entry(entry)
            .xattrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, val)| val.clone())
            .ok_or(FsError::NoXattr)
    }

    /// The attribute names, each followed by a NUL (the listxattr format).
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let n = self.node(ino)?;
        let mut out = Vec::new();
        if let Some(entry) = n.entry {
            let v = self.current.load();
            for (k, _) in &v.entry(entry).xattrs {
                out.extend_from_slice(k);
                out.push(0);
            }
        }
        Ok(out)
    }

    /// `access(2)`: anything but write access is allowed (the kernel checks
    /// permission bits itself: the mount uses `default_permissions`).
    pub fn access(&self, ino: u64, mask: i32) -> FsResult<()> {
        self.node(ino)?;
        if mask & libc::W_OK != 0 {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }
}
