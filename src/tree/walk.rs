//! Walking the saved paths into the list of entries an archive will hold:
//! depth-first with each directory's children sorted, so a directory's files
//! are adjacent in the archive (small neighbouring reads coalesce), and with
//! the metadata the index records (mode, owner, ns mtime, user xattrs).

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::archive::writer::EntryMeta;
use crate::archive::Timestamp;

#[derive(Debug, Clone)]
pub enum SourceKind {
    Dir,
    File { size: u64 },
    Symlink { target: Vec<u8> },
}

/// One path to archive.
#[derive(Debug, Clone)]
pub struct SourceEntry {
    pub path: PathBuf,
    pub kind: SourceKind,
    pub meta: EntryMeta,
}

#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("cannot read {path}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the walk skipped, so the caller can warn.
#[derive(Debug, Default)]
pub struct Skipped {
    /// Sockets, devices and FIFOs, which an archive cannot hold.
    pub special: Vec<PathBuf>,
}

/// Walks `root`, naming entries `name_prefix/<relative path>`. Directories'
/// subtrees are walked in parallel (the walk is syscall-bound) and joined in
/// order, so the result is the same as a sequential depth-first walk.
pub fn walk(
    root: &Path,
    name_prefix: &[u8],
    out: &mut Vec<SourceEntry>,
    skipped: &mut Skipped,
) -> Result<(), WalkError> {
    let (entries, special) = visit(root, name_prefix.to_vec())?;
    out.extend(entries);
    skipped.special.extend(special);
    Ok(())
}

fn unreadable(path: &Path) -> impl FnOnce(std::io::Error) -> WalkError + '_ {
    move |source| WalkError::Unreadable {
        path: path.to_path_buf(),
        source,
    }
}

/// The entry for `path` itself, named `name`; None for sockets, devices and
/// FIFOs, which an archive cannot hold.
pub fn entry_of(path: &Path, name: Vec<u8>) -> Result<Option<SourceEntry>, WalkError> {
    let md = fs::symlink_metadata(path).map_err(unreadable(path))?;
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        SourceKind::Dir
    } else if ft.is_file() {
        SourceKind::File { size: md.len() }
    } else if ft.is_symlink() {
        SourceKind::Symlink {
            target: fs::read_link(path)
                .map_err(unreadable(path))?
                .as_os_str()
                .as_bytes()
                .to_vec(),
        }
    } else {
        return Ok(None);
    };
    let xattrs = if ft.is_symlink() {
        Vec::new()
    } else {
        user_xattrs(path).map_err(unreadable(path))?
    };
    let meta = EntryMeta {
        name,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: Timestamp {
            secs: md.mtime(),
            nanos: md.mtime_nsec() as u32,
        },
        xattrs,
    };
    Ok(Some(SourceEntry {
        path: path.to_path_buf(),
        kind,
        meta,
    }))
}

/// The entries of `path`'s subtree in depth-first order, and the special files skipped.
fn visit(path: &Path, name: Vec<u8>) -> Result<(Vec<SourceEntry>, Vec<PathBuf>), WalkError> {
    let Some(entry) = entry_of(path, name.clone())? else {
        return Ok((Vec::new(), vec![path.to_path_buf()]));
    };
    let is_dir = matches!(entry.kind, SourceKind::Dir);
    let mut entries = vec![entry];
    let mut special = Vec::new();
    if is_dir {
        let mut children = fs::read_dir(path)
            .map_err(unreadable(path))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unreadable(path))?;
        children.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let subtrees: Vec<_> = children
            .par_iter()
            .map(|child| {
                let mut child_name = name.clone();
                if !child_name.is_empty() {
                    child_name.push(b'/');
                }
                child_name.extend_from_slice(child.as_bytes());
                visit(&path.join(child), child_name)
            })
            .collect::<Result<_, _>>()?;
        for (e, s) in subtrees {
            entries.extend(e);
            special.extend(s);
        }
    }
    Ok((entries, special))
}

/// The `user.*` extended attributes of `path` (others belong to the system or
/// need privileges to restore). A filesystem without xattr support has none.
fn user_xattrs(path: &Path) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names {
        if !name.as_bytes().starts_with(b"user.") {
            continue;
        }
        if let Some(value) = xattr::get(path, &name)? {
            out.push((name.as_bytes().to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}
