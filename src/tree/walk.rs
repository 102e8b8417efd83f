//! Walking the saved paths into the list of entries an archive will hold:
//! depth-first with each directory's children sorted, so a directory's files
//! are adjacent in the archive (small neighbouring reads coalesce), and with
//! the metadata the index records (mode, owner, ns mtime, user xattrs).
//!
//! The tree may change between the walk and the reading of a file's bytes (a
//! build still running, or a less-trusted job swapping a file for a symlink
//! to something it wants saved): [`open_seen`] opens only the file the walk
//! saw.

use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::archive::writer::EntryMeta;
use crate::archive::Timestamp;

#[derive(Debug, Clone)]
pub enum SourceKind {
    Dir,
    /// `id` is the file the walk found; `None` for a file that was not walked
    /// (an incremental save's file of the mounted archive, known from its index).
    File {
        size: u64,
        id: Option<FileId>,
    },
    Symlink {
        target: Vec<u8>,
    },
}

/// Which file the walk found at a path (`st_dev`, `st_ino`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// A file to save is no longer the one the walk found. The save fails
/// rather than skipping it: a tree changing under `save` gives no coherent
/// cache, and a swap for a symlink must not archive what the link points to.
#[derive(Debug, thiserror::Error)]
pub enum Changed {
    #[error("{} changed while being saved: it is now {now}, not the regular file that was listed; save again once nothing changes it", .path.display())]
    NotAFile { path: PathBuf, now: &'static str },
    #[error("{} was replaced by another file while being saved; save again once nothing changes it", .path.display())]
    Replaced { path: PathBuf },
    #[error("{} changed size while being saved ({was} bytes when listed, {now} when read); save again once nothing changes it", .path.display())]
    Resized { path: PathBuf, was: u64, now: u64 },
}

/// Opens the file at `path` that the walk found (`size` bytes, `id`) for
/// reading: without following a symlink put there since (`O_NOFOLLOW`), or
/// blocking on a FIFO (`O_NONBLOCK`), and only if `fstat` shows a regular file
/// of that size and, when known, the same device and inode — which also
/// catches a parent directory swapped for a symlink. Errors name the path.
pub fn open_seen(path: &Path, size: u64, id: Option<FileId>) -> io::Result<File> {
    let changed = |c: Changed| io::Error::other(c);
    let file = match File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(changed(Changed::NotAFile {
                path: path.to_path_buf(),
                now: "a symlink",
            }))
        }
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    };
    let md = file.metadata()?;
    let ft = md.file_type();
    if !ft.is_file() {
        let now = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(changed(Changed::NotAFile {
            path: path.to_path_buf(),
            now,
        }));
    }
    if id.is_some_and(|id| (id.dev, id.ino) != (md.dev(), md.ino())) {
        return Err(changed(Changed::Replaced {
            path: path.to_path_buf(),
        }));
    }
    if md.len() != size {
        return Err(changed(Changed::Resized {
            path: path.to_path_buf(),
            was: size,
            now: md.len(),
        }));
    }
    Ok(file)
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
        SourceKind::File {
            size: md.len(),
            id: Some(FileId {
                dev: md.dev(),
                ino: md.ino(),
            }),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The file `name` in `dir` as the walk sees it: (size, id).
    fn walked(dir: &Path, name: &str) -> (u64, Option<FileId>) {
        let e = entry_of(&dir.join(name), name.into()).unwrap().unwrap();
        match e.kind {
            SourceKind::File { size, id } => (size, id),
            other => panic!("{name} is {other:?}"),
        }
    }

    fn changed(r: io::Result<File>) -> Changed {
        let e = r.expect_err("the file changed: open_seen must refuse it");
        *e.into_inner()
            .expect("a Changed error")
            .downcast::<Changed>()
            .expect("a Changed error")
    }

    #[test]
    fn open_seen_refuses_a_file_swapped_for_a_symlink_or_another_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("secret"), b"the secret").unwrap();
        fs::write(d.join("f"), b"0123456789").unwrap();
        let (size, id) = walked(d, "f");
        open_seen(&d.join("f"), size, id).expect("unchanged");

        // Swapped for a symlink to a file of the same size (the walked file
        // is kept, so that its inode number is not reused below).
        fs::rename(d.join("f"), d.join("walked")).unwrap();
        std::os::unix::fs::symlink(d.join("secret"), d.join("f")).unwrap();
        let err = changed(open_seen(&d.join("f"), size, id));
        assert!(
            matches!(
                err,
                Changed::NotAFile {
                    now: "a symlink",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&d.join("f").display().to_string()));

        // Swapped for another file of the same size (a hard link to one
        // outside, say: the walked inode is still in use, so it is not reused).
        fs::remove_file(d.join("f")).unwrap();
        fs::write(d.join("other"), b"9876543210").unwrap();
        fs::hard_link(d.join("other"), d.join("f")).unwrap();
        assert!(matches!(
            changed(open_seen(&d.join("f"), size, id)),
            Changed::Replaced { .. }
        ));

        // Swapped for a FIFO: refused without blocking on it.
        fs::remove_file(d.join("f")).unwrap();
        let c = std::ffi::CString::new(d.join("f").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            changed(open_seen(&d.join("f"), size, id)),
            Changed::NotAFile { now: "a FIFO", .. }
        ));
    }

    #[test]
    fn open_seen_refuses_a_parent_swapped_for_a_symlink_and_a_resized_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::create_dir_all(d.join("elsewhere")).unwrap();
        fs::write(d.join("sub/f"), b"abc").unwrap();
        fs::write(d.join("elsewhere/f"), b"xyz").unwrap();
        let (size, id) = walked(&d.join("sub"), "f");
        // The last component is a regular file of the same size, but not the walked one.
        fs::rename(d.join("sub"), d.join("sub-old")).unwrap();
        std::os::unix::fs::symlink(d.join("elsewhere"), d.join("sub")).unwrap();
        assert!(matches!(
            changed(open_seen(&d.join("sub/f"), size, id)),
            Changed::Replaced { .. }
        ));
        fs::remove_file(d.join("sub")).unwrap();
        fs::rename(d.join("sub-old"), d.join("sub")).unwrap();
        fs::write(d.join("sub/f"), b"abcd").unwrap(); // same inode, new size
        assert!(matches!(
            changed(open_seen(&d.join("sub/f"), size, id)),
            Changed::Resized { was: 3, now: 4, .. }
        ));
    }
}
