//! Writing an archive's entries to disk, safely.
//!
//! Every entry is checked before anything is written: no `..`, no absolute
//! or empty components, no entry below a symlink entry (which could point
//! anywhere), no repeated names. Extraction goes into a fresh directory that
//! only this process writes to; symlinks are created after every file, and
//! directory modes and mtimes are set last (deepest first) so restoring
//! read-only directories and their mtimes works.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use filetime::FileTime;
use rayon::prelude::*;

use crate::archive::decode::{decode_entry, decode_entry_to, DecodeError};
use crate::archive::reader::resolve_data_offset;
use crate::archive::{Entry, EntryKind};

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("refusing to extract {name:?}: {reason} (the archive is corrupt or malicious; nothing was written outside the target)")]
    Unsafe { name: String, reason: &'static str },
    #[error(transparent)]
    Decode(#[from] DecodeError),
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

/// Extracts `planned` (already checked with [`check_safe`]) from `archive`
/// into `root`, which must not exist yet. `preserve_owner`: chown to the
/// archived uid/gid (as root).
pub fn extract(
    archive: &File,
    planned: &[Planned<'_>],
    root: &Path,
    preserve_owner: bool,
) -> Result<(), ExtractError> {
    let root_is_dir = planned
        .iter()
        .any(|p| p.relative.as_os_str().is_empty() && p.entry.kind == EntryKind::Dir)
        || !planned.iter().any(|p| p.relative.as_os_str().is_empty());
    if root_is_dir {
        fs::create_dir(root).map_err(io_err(format!("cannot create {}", root.display())))?;
    }
    let target = |p: &Planned<'_>| {
        if p.relative.as_os_str().is_empty() {
            root.to_path_buf()
        } else {
            root.join(&p.relative)
        }
    };
    // Directories first (owner-writable until the end), then files in parallel.
    for p in planned
        .iter()
        .filter(|p| p.entry.kind == EntryKind::Dir && !p.relative.as_os_str().is_empty())
    {
        let path = target(p);
        fs::create_dir_all(&path).map_err(io_err(format!("cannot create {}", path.display())))?;
    }
    planned
        .par_iter()
        .filter(|p| p.entry.kind == EntryKind::File)
        .try_for_each(|p| {
            let path = target(p);
            let create = || {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&path)
            };
            // Parents normally exist (directory entries come first); foreign
            // zips may have no directory entries, so create them on demand.
            let file = match create() {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if let Some(parent) = path.parent() {
                        fs::create_dir_all(parent)
                            .map_err(io_err(format!("cannot create {}", parent.display())))?;
                    }
                    create()
                }
                other => other,
            }
            .map_err(io_err(format!("cannot create {}", path.display())))?;
            let buffer = p.entry.size.clamp(1, 1 << 20) as usize;
            decode_entry_to(
                p.entry,
                entry_data(archive, p.entry)?,
                BufWriter::with_capacity(buffer, &file),
            )?;
            apply_file_metadata(&file, &path, p.entry, preserve_owner)
        })?;
    for p in planned
        .iter()
        .filter(|p| p.entry.kind == EntryKind::Symlink)
    {
        let path = target(p);
        let link = match &p.entry.link_target {
            Some(t) => t.clone(),
            None => {
                let mut data = Vec::new();
                entry_data(archive, p.entry)?
                    .read_to_end(&mut data)
                    .map_err(io_err("reading the archive"))?;
                decode_entry(p.entry, &data)?
            }
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .map_err(io_err(format!("cannot create {}", parent.display())))?;
        }
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&link), &path)
            .map_err(io_err(format!("cannot create symlink {}", path.display())))?;
        apply_metadata(&path, p.entry, preserve_owner, true)?;
    }
    let mut dirs: Vec<&Planned<'_>> = planned
        .iter()
        .filter(|p| p.entry.kind == EntryKind::Dir)
        .collect();
    dirs.sort_by(|a, b| b.relative.cmp(&a.relative));
    for p in dirs {
        apply_metadata(&target(p), p.entry, preserve_owner, false)?;
    }
    Ok(())
}

/// Like [`apply_metadata`] through the open file (no path lookups: the hot
/// path when restoring many small files).
fn apply_file_metadata(
    file: &File,
    path: &Path,
    entry: &Entry,
    preserve_owner: bool,
) -> Result<(), ExtractError> {
    use xattr::FileExt as _;
    let ctx = || format!("cannot set metadata of {}", path.display());
    for (name, value) in &entry.xattrs {
        file.set_xattr(std::ffi::OsStr::from_bytes(name), value)
            .map_err(io_err(ctx()))?;
    }
    if preserve_owner {
        std::os::unix::fs::fchown(file, Some(entry.uid), Some(entry.gid)).map_err(io_err(ctx()))?;
    }
    file.set_permissions(fs::Permissions::from_mode(entry.mode))
        .map_err(io_err(ctx()))?;
    let mtime = FileTime::from_unix_time(entry.mtime.secs, entry.mtime.nanos);
    filetime::set_file_handle_times(file, Some(mtime), Some(mtime)).map_err(io_err(ctx()))?;
    Ok(())
}

fn apply_metadata(
    path: &Path,
    entry: &Entry,
    preserve_owner: bool,
    is_link: bool,
) -> Result<(), ExtractError> {
    let ctx = || format!("cannot set metadata of {}", path.display());
    if !is_link {
        for (name, value) in &entry.xattrs {
            xattr::set(path, std::ffi::OsStr::from_bytes(name), value).map_err(io_err(ctx()))?;
        }
    }
    if preserve_owner {
        std::os::unix::fs::lchown(path, Some(entry.uid), Some(entry.gid)).map_err(io_err(ctx()))?;
    }
    if !is_link {
        fs::set_permissions(path, fs::Permissions::from_mode(entry.mode)).map_err(io_err(ctx()))?;
    }
    let mtime = FileTime::from_unix_time(entry.mtime.secs, entry.mtime.nanos);
    filetime::set_symlink_file_times(path, mtime, mtime).map_err(io_err(ctx()))?;
    Ok(())
}
