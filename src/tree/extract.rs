//! Writing an archive's entries to disk, safely.
//!
//! Every entry is checked before anything is written: no `..`, no absolute
//! or empty components, no entry below a symlink entry (which could point
//! anywhere), no repeated names. Extraction goes into a fresh directory that
//! only this process writes to, and every entry is created by directory fd
//! ([`super::beneath`]), so not even a symlink raced into the staging tree is
//! followed. Symlinks are created after every file, and directory modes and
//! mtimes are set last (deepest first) so restoring read-only directories and
//! their mtimes works. A restore grants nothing the restoring user did not
//! have: no setuid/setgid bits, only `user.*` xattrs, and the archived owner
//! only when asked (`--same-owner`).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rustix::fs::{AtFlags, Mode, OFlags};

use super::beneath::{open_dir_beneath, open_extracted_dir, BeneathError, Dir};
use crate::archive::decode::{decode_entry_to, DecodeError};
use crate::archive::reader::resolve_data_offset;
use crate::archive::{Entry, EntryKind};

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("refusing to extract {name:?}: {reason} (the archive is corrupt or malicious; nothing was written outside the target)")]
    Unsafe { name: String, reason: &'static str },
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Beneath(#[from] BeneathError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ExtractError {
    let context = context.into();
    move |source| ExtractError::Io { context, source }
}

/// One entry to write, at `relative` below the extraction root (empty = the root itself).
pub struct Planned<'a> {
    pub entry: &'a Entry,
    pub relative: PathBuf,
    /// Where the file's whole content is outside the archive (a disk cache
    /// entry): it is copied instead of decoded.
    pub cached: Option<&'a dyn CachedContent>,
}

/// A file's content kept outside the archive, opened only when the file is
/// written (a restore of many files must not hold them all open).
pub trait CachedContent: Sync {
    /// The content, checked, at offset 0.
    fn open(&self) -> io::Result<File>;
}

/// Checks `relative` names and the entries as a whole; see the module comment.
pub fn check_safe(planned: &[Planned<'_>]) -> Result<(), ExtractError> {
    let unsafe_entry = |p: &Planned<'_>, reason| ExtractError::Unsafe {
        name: String::from_utf8_lossy(&p.entry.name).into_owned(),
        reason,
    };
    let mut names = HashSet::new();
    let mut symlinks = HashSet::new();
    for p in planned {
        let bytes = p.relative.as_os_str().as_bytes();
        if bytes.starts_with(b"/") {
            return Err(unsafe_entry(p, "absolute path"));
        }
        if !bytes.is_empty()
            && bytes
                .split(|b| *b == b'/')
                .any(|c| c.is_empty() || c == b"." || c == b"..")
        {
            return Err(unsafe_entry(p, "path with '..', '.' or empty components"));
        }
        if bytes.contains(&0) {
            return Err(unsafe_entry(p, "path with a NUL byte"));
        }
        if !names.insert(bytes) {
            return Err(unsafe_entry(p, "entry appears twice"));
        }
        if p.entry.kind == EntryKind::Symlink {
            symlinks.insert(bytes);
        }
    }
    for p in planned {
        let bytes = p.relative.as_os_str().as_bytes();
        let through_link = bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'/')
            .any(|(i, _)| symlinks.contains(&bytes[..i]));
        if through_link || (!bytes.is_empty() && symlinks.contains(&b""[..])) {
            return Err(unsafe_entry(p, "entry below a symlink"));
        }
    }
    Ok(())
}

/// The compressed bytes of an entry, read from the archive file on demand.
struct EntryData<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for EntryData<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive is truncated",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

fn entry_data<'a>(archive: &'a File, entry: &Entry) -> Result<EntryData<'a>, ExtractError> {
    let read_at = |off: u64, len: usize| {
        let mut buf = vec![0u8; len];
        archive.read_exact_at(&mut buf, off).map(|_| buf)
    };
    let start = resolve_data_offset(entry, read_at).map_err(|e| match e {
        crate::archive::OpenError::Format(f) => ExtractError::Decode(DecodeError::Corrupt(f)),
        crate::archive::OpenError::Source(s) => ExtractError::Io {
            context: "reading the archive".into(),
            source: s,
        },
    })?;
    Ok(EntryData {
        file: archive,
        pos: start,
        end: start + entry.compressed_size,
    })
}

/// Copies `size` bytes of a cached entry into `to` (`copy_file_range`,
/// which shares extents where the file system can). The entry was checked
/// to have exactly that size; one that shrank since is an error, not a
/// short file.
fn copy_cached(from: &File, to: &File, size: u64) -> io::Result<()> {
    let copied = io::copy(&mut io::Read::take(from, size), &mut &*to)?;
    if copied != size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the disk cache entry ended after {copied} of {size} bytes"),
        ));
    }
    Ok(())
}

/// How extraction treats what the archive claims about ownership (DESIGN §7:
/// a cache grants nothing).
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtractOptions {
    /// Apply the archived uid/gid (`--same-owner`); otherwise files belong to
    /// whoever restores them.
    pub same_owner: bool,
}

/// Permission bits a restore sets: never setuid or setgid, whatever the
/// archive says (rwx and the sticky bit are kept).
pub const RESTORABLE_MODE: u32 = 0o1777;
/// Extended attributes a restore sets: the `user.*` namespace, which is what
/// `save` records; `security.*`, `trusted.*` and `system.*` would grant.
pub const RESTORABLE_XATTR_PREFIX: &[u8] = b"user.";
/// The kernel's limit on a symlink target.
const PATH_MAX: u64 = libc::PATH_MAX as u64;

/// An entry's place: its parent directory (open) and its name there.
struct Place<'a> {
    dir: Dir<'a>,
    name: &'a OsStr,
}

/// One extraction: the staged root below `parent` and what every entry needs.
struct Extraction<'a> {
    archive: &'a File,
    parent: BorrowedFd<'a>,
    staged: &'a OsStr,
    /// The staged root when it is a directory.
    root: Option<BorrowedFd<'a>>,
    shown: &'a Path,
    options: ExtractOptions,
}

/// Extracts `planned` (already checked with [`check_safe`]) from `archive`
/// as `staged` in the directory `parent`, which must not hold `staged` yet.
/// Every entry is created below `staged` by directory fd, never through a
/// symlink. `shown` is the path of `staged`, for messages.
pub fn extract(
    archive: &File,
    planned: &[Planned<'_>],
    parent: BorrowedFd<'_>,
    staged: &OsStr,
    shown: &Path,
    options: ExtractOptions,
) -> Result<(), ExtractError> {
    let root_entry = planned.iter().find(|p| p.relative.as_os_str().is_empty());
    let root_is_dir = root_entry.is_none_or(|p| p.entry.kind == EntryKind::Dir);
    let root_fd = if root_is_dir {
        rustix::fs::mkdirat(parent, staged, Mode::from_raw_mode(0o700))
            .map_err(|e| io_err(format!("cannot create {}", shown.display()))(e.into()))?;
        Some(
            rustix::fs::openat(parent, staged, DIR_OPEN, Mode::empty())
                .map_err(|e| io_err(format!("cannot open {}", shown.display()))(e.into()))?,
        )
    } else {
        None
    };
    let x = Extraction {
        archive,
        parent,
        staged,
        root: root_fd.as_ref().map(|fd| fd.as_fd()),
        shown,
        options,
    };
    // Directories first, parents before children (the names are sorted),
    // owner-only until their metadata is applied at the end.
    let mut dirs: Vec<&Planned<'_>> = planned
        .iter()
        .filter(|p| p.entry.kind == EntryKind::Dir && !p.relative.as_os_str().is_empty())
        .collect();
    dirs.sort_by(|a, b| a.relative.cmp(&b.relative));
    for p in &dirs {
        let place = x.place(p)?;
        match rustix::fs::mkdirat(&place.dir, place.name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => {
                return Err(io_err(format!("cannot create {}", x.path(p).display()))(
                    e.into(),
                ))
            }
        }
    }
    planned
        .par_iter()
        .filter(|p| p.entry.kind == EntryKind::File)
        .try_for_each(|p| x.write_file(p))?;
    for p in planned
        .iter()
        .filter(|p| p.entry.kind == EntryKind::Symlink)
    {
        x.write_symlink(p)?;
    }
    // Directory metadata last, deepest first, so setting a read-only mode or
    // an mtime is not undone by creating the entries inside.
    dirs.reverse();
    for p in dirs {
        let place = x.place(p)?;
        let fd = rustix::fs::openat(&place.dir, place.name, DIR_OPEN, Mode::empty())
            .map_err(|e| io_err(format!("cannot open {}", x.path(p).display()))(e.into()))?;
        x.apply_metadata(fd.as_fd(), p)?;
    }
    if let (Some(root), Some(p)) = (x.root, root_entry.filter(|_| root_is_dir)) {
        x.apply_metadata(root, p)?;
    }
    Ok(())
}

/// Flags to open a directory for metadata and `*at` calls, never through a symlink.
const DIR_OPEN: OFlags = OFlags::DIRECTORY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC)
    .union(OFlags::RDONLY);

impl<'a> Extraction<'a> {
    fn path(&self, p: &Planned<'_>) -> PathBuf {
        if p.relative.as_os_str().is_empty() {
            self.shown.to_path_buf()
        } else {
            self.shown.join(&p.relative)
        }
    }

    /// The open parent of `p` and its name there. Foreign zips may have no
    /// directory entries, so missing parents are made (by the same walk that
    /// refuses symlinks).
    fn place<'p>(&self, p: &'p Planned<'_>) -> Result<Place<'p>, ExtractError>
    where
        'a: 'p,
    {
        let Some(name) = p.relative.file_name() else {
            return Ok(Place {
                dir: Dir::Borrowed(self.parent),
                name: self.staged,
            });
        };
        let Some(root) = self.root else {
            return Err(ExtractError::Unsafe {
                name: String::from_utf8_lossy(&p.entry.name).into_owned(),
                reason: "entry below a file",
            });
        };
        let parent = p.relative.parent().unwrap_or(Path::new(""));
        let dir = match open_extracted_dir(root, parent, self.shown) {
            Err(BeneathError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                open_dir_beneath(root, parent, true, self.shown).map(Dir::Owned)
            }
            other => other,
        }?;
        Ok(Place { dir, name })
    }

    fn write_file(&self, p: &Planned<'_>) -> Result<(), ExtractError> {
        let place = self.place(p)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&place.dir, place.name, flags, Mode::from_raw_mode(0o600))
            .map_err(|e| io_err(format!("cannot create {}", self.path(p).display()))(e.into()))?;
        let file = File::from(fd);
        match p.cached {
            Some(cached) => cached
                .open()
                .and_then(|from| copy_cached(&from, &file, p.entry.size))
                .map_err(io_err(format!("cannot write {}", self.path(p).display())))?,
            None => {
                let buffer = p.entry.size.clamp(1, 1 << 20) as usize;
                decode_entry_to(
                    p.entry,
                    entry_data(self.archive, p.entry)?,
                    BufWriter::with_capacity(buffer, &file),
                )?;
            }
        }
        self.apply_metadata(file.as_fd(), p)
    }

    fn write_symlink(&self, p: &Planned<'_>) -> Result<(), ExtractError> {
        let too_long = ExtractError::Unsafe {
            name: String::from_utf8_lossy(&p.entry.name).into_owned(),
            reason: "symlink target longer than PATH_MAX",
        };
        let target = match &p.entry.link_target {
            Some(t) => t.clone(),
            None if p.entry.size >= PATH_MAX => return Err(too_long),
            None => {
                // Streamed and bounded by the declared size, whatever the data inflates to.
                let mut target = Vec::new();
                decode_entry_to(p.entry, entry_data(self.archive, p.entry)?, &mut target)?;
                target
            }
        };
        if target.len() as u64 >= PATH_MAX {
            return Err(too_long);
        }
        let place = self.place(p)?;
        rustix::fs::symlinkat(OsStr::from_bytes(&target), &place.dir, place.name).map_err(|e| {
            io_err(format!("cannot create symlink {}", self.path(p).display()))(e.into())
        })?;
        let ctx = || format!("cannot set metadata of {}", self.path(p).display());
        if self.options.same_owner {
            rustix::fs::chownat(
                &place.dir,
                place.name,
                Some(rustix::fs::Uid::from_raw(p.entry.uid)),
                Some(rustix::fs::Gid::from_raw(p.entry.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_err(ctx())(e.into()))?;
        }
        rustix::fs::utimensat(
            &place.dir,
            place.name,
            &timestamps(p.entry),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err(ctx())(e.into()))
    }

    /// Sets `user.*` xattrs, the owner (with `--same-owner`), the mode without
    /// setuid/setgid, and the times, all through the open `fd`.
    fn apply_metadata(&self, fd: BorrowedFd<'_>, p: &Planned<'_>) -> Result<(), ExtractError> {
        let ctx = || format!("cannot set metadata of {}", self.path(p).display());
        let fail = |e: rustix::io::Errno| io_err(ctx())(e.into());
        for (name, value) in &p.entry.xattrs {
            if name.starts_with(RESTORABLE_XATTR_PREFIX) {
                rustix::fs::fsetxattr(
                    fd,
                    OsStr::from_bytes(name),
                    value,
                    rustix::fs::XattrFlags::empty(),
                )
                .map_err(fail)?;
            }
        }
        if self.options.same_owner {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(p.entry.uid)),
                Some(rustix::fs::Gid::from_raw(p.entry.gid)),
            )
            .map_err(fail)?;
        }
        rustix::fs::fchmod(fd, Mode::from_raw_mode(p.entry.mode & RESTORABLE_MODE))
            .map_err(fail)?;
        rustix::fs::futimens(fd, &timestamps(p.entry)).map_err(fail)
    }
}

fn timestamps(entry: &Entry) -> rustix::fs::Timestamps {
    let t = rustix::fs::Timespec {
        tv_sec: entry.mtime.secs,
        tv_nsec: entry.mtime.nanos.into(),
    };
    rustix::fs::Timestamps {
        last_access: t,
        last_modification: t,
    }
}
