//! File-system operations below a trusted directory that never follow a
//! symlink (DESIGN §7).
//!
//! A restore writes where an untrusted archive says, into trees that an
//! earlier restore (of another, possibly malicious, archive) may have filled
//! with symlinks. Path-based calls (`create_dir_all`, `rename`, `remove_dir_all`
//! by path) follow such links and can be raced between a check and a use. So
//! everything here works from an open directory: parents are walked one
//! component at a time with `O_NOFOLLOW` (or by the kernel with `openat2`'s
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), and every create, rename and
//! remove is relative to a directory fd that cannot be swapped under us.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

/// Why a directory below a trusted one could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BeneathError {
    #[error("{0} is a symlink (cachemount never writes through a symlink below the directory a cache restores into; replace it with a real directory)")]
    Symlink(PathBuf),
    #[error("{0} is not a directory")]
    NotDir(PathBuf),
    #[error("cannot open {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl BeneathError {
    fn io(path: &Path, e: rustix::io::Errno) -> Self {
        BeneathError::Io {
            path: path.to_path_buf(),
            source: e.into(),
        }
    }
}

/// A directory fd borrowed from the caller or opened for one use.
pub enum Dir<'a> {
    Borrowed(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl AsFd for Dir<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Dir::Borrowed(fd) => *fd,
            Dir::Owned(fd) => fd.as_fd(),
        }
    }
}

const DIR_FLAGS: OFlags = OFlags::DIRECTORY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC)
    .union(OFlags::RDONLY);

/// Opens a directory the user named (symlinks in it are the user's own and
/// are followed).
pub fn open_trusted_dir(path: &Path) -> Result<OwnedFd, BeneathError> {
    rustix::fs::open(
        path,
        OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::RDONLY,
        Mode::empty(),
    )
    .map_err(|e| BeneathError::io(path, e))
}

/// Opens the directory `relative` below `dir`, one component at a time
/// without following symlinks; with `create`, missing components are made
/// (mode `0o755` less the umask). `shown` is how `dir` is named in errors.
pub fn open_dir_beneath(
    dir: BorrowedFd<'_>,
    relative: &Path,
    create: bool,
    shown: &Path,
) -> Result<OwnedFd, BeneathError> {
    let mut current = rustix::fs::openat(dir, ".", DIR_FLAGS, Mode::empty())
        .map_err(|e| BeneathError::io(shown, e))?;
    let mut path = shown.to_path_buf();
    for c in relative.components() {
        let Component::Normal(name) = c else {
            continue;
        };
        path.push(name);
        current = open_child_dir(current.as_fd(), name, create, &path)?;
    }
    Ok(current)
}

fn open_child_dir(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    create: bool,
    path: &Path,
) -> Result<OwnedFd, BeneathError> {
    use rustix::io::Errno;
    loop {
        match rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => continue,
                    Err(e) => return Err(BeneathError::io(path, e)),
                }
            }
            // O_NOFOLLOW|O_DIRECTORY on a symlink gives ELOOP (or ENOTDIR on some kernels).
            Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
                return Err(
                    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) if is_symlink(st.st_mode) => {
                            BeneathError::Symlink(path.to_path_buf())
                        }
                        Ok(_) => BeneathError::NotDir(path.to_path_buf()),
                        Err(_) => BeneathError::io(path, e),
                    },
                )
            }
            Err(e) => return Err(BeneathError::io(path, e)),
        }
    }
}

fn is_symlink(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFLNK
}

/// Opens the directory `relative` below `root` that extraction made: one
/// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` (the kernel refuses
/// any symlink or `..` on the way), or the component walk where the kernel
/// has no `openat2`.
pub fn open_extracted_dir<'a>(
    root: BorrowedFd<'a>,
    relative: &Path,
    shown: &Path,
) -> Result<Dir<'a>, BeneathError> {
    use rustix::io::Errno;
    if relative.as_os_str().is_empty() {
        return Ok(Dir::Borrowed(root));
    }
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rustix::fs::openat2(root, relative, DIR_FLAGS, Mode::empty(), resolve) {
        Ok(fd) => Ok(Dir::Owned(fd)),
        Err(Errno::NOENT) => Err(BeneathError::io(&shown.join(relative), Errno::NOENT)),
        // No openat2 here, or a refusal: the walk says which component is wrong.
        Err(_) => open_dir_beneath(root, relative, false, shown).map(Dir::Owned),
    }
}

/// Whether `name` exists in `dir` (without following it).
pub fn exists_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Removes `name` in `dir`, a file or a whole tree, by directory fd: no
/// symlink is followed and no path is looked up twice. Read-only directories
/// are made writable on the way. Missing is not an error.
pub fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    use rustix::io::Errno;
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR | Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    let sub = match rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let _ = rustix::fs::fchmod(&sub, Mode::from_raw_mode(0o700));
    let children = list_at(sub.as_fd())?;
    for child in children {
        remove_at(sub.as_fd(), &child)?;
    }
    drop(sub);
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Names in `dir` (without `.` and `..`).
pub fn list_at(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let fd = rustix::fs::openat(dir, ".", DIR_FLAGS, Mode::empty())?;
    let listing = rustix::fs::Dir::read_from(&fd)?;
    let mut names = Vec::new();
    for entry in listing {
        let entry = entry?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    Ok(names)
}

/// Puts `staged` in place of `name` (both in `dir`): an atomic exchange when
/// `name` exists (then the old content, now at `staged`, is removed), a
/// no-replace rename when it does not. File systems without
/// `RENAME_EXCHANGE` get a move aside, a rename and a removal.
pub fn replace_at(
    dir: BorrowedFd<'_>,
    staged: &OsStr,
    name: &OsStr,
    aside: &OsStr,
) -> io::Result<()> {
    use rustix::fs::RenameFlags;
    use rustix::io::Errno;
    if !exists_at(dir, name)? {
        return rustix::fs::renameat_with(dir, staged, dir, name, RenameFlags::NOREPLACE)
            .map_err(Into::into);
    }
    match rustix::fs::renameat_with(dir, staged, dir, name, RenameFlags::EXCHANGE) {
        Ok(()) => return remove_at(dir, staged),
        Err(Errno::INVAL | Errno::NOSYS | Errno::NOTSUP) => {}
        Err(e) => return Err(e.into()),
    }
    rustix::fs::renameat(dir, name, dir, aside)?;
    if let Err(e) = rustix::fs::renameat(dir, staged, dir, name) {
        let _ = rustix::fs::renameat(dir, aside, dir, name);
        return Err(e.into());
    }
    remove_at(dir, aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd(p: &Path) -> OwnedFd {
        open_trusted_dir(p).unwrap()
    }

    #[test]
    fn walk_refuses_a_symlink_and_creates_missing_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("link")).unwrap();
        let root = fd(tmp.path());
        let err =
            open_dir_beneath(root.as_fd(), Path::new("link/x"), true, tmp.path()).unwrap_err();
        assert!(
            matches!(err, BeneathError::Symlink(ref p) if p.ends_with("link")),
            "{err}"
        );
        assert!(!outside.path().join("x").exists());
        open_dir_beneath(root.as_fd(), Path::new("a/b"), true, tmp.path()).unwrap();
        assert!(tmp.path().join("a/b").is_dir());
        let err = open_extracted_dir(root.as_fd(), Path::new("link"), tmp.path())
            .err()
            .unwrap();
        assert!(matches!(err, BeneathError::Symlink(_)), "{err}");
    }

    #[test]
    fn remove_never_follows_links_out() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"keep").unwrap();
        let tree = tmp.path().join("t");
        std::fs::create_dir_all(tree.join("ro/sub")).unwrap();
        std::fs::write(tree.join("ro/sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), tree.join("ro/out")).unwrap();
        std::fs::set_permissions(tree.join("ro"), std::fs::Permissions::from_mode(0o500)).unwrap();
        remove_at(fd(tmp.path()).as_fd(), OsStr::new("t")).unwrap();
        assert!(!tree.exists());
        assert!(outside.path().join("keep").exists());
    }

    #[test]
    fn replace_swaps_in_and_removes_the_old() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("new")).unwrap();
        std::fs::write(tmp.path().join("new/f"), b"new").unwrap();
        std::fs::create_dir(tmp.path().join("cur")).unwrap();
        std::fs::write(tmp.path().join("cur/old"), b"old").unwrap();
        let dir = fd(tmp.path());
        replace_at(
            dir.as_fd(),
            OsStr::new("new"),
            OsStr::new("cur"),
            OsStr::new("aside"),
        )
        .unwrap();
        assert_eq!(std::fs::read(tmp.path().join("cur/f")).unwrap(), b"new");
        let mut left = list_at(dir.as_fd()).unwrap();
        left.sort();
        assert_eq!(left, vec![OsString::from("cur")]);
    }
}
