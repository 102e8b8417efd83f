//! Files and directories only this user may read or change: the mount
//! daemon's logs and the writable mounts' state (their layers and
//! `state.json`). They live under the user's cache directory (or a directory
//! the user names), never at a shared, predictable path such as
//! `/tmp/cachemount`, where another user could have put a symlink or a
//! directory of their own first. Directories are `0700`, files `0600`, and
//! nothing is opened through a symlink.

use std::fs::{DirBuilder, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// `<cache dir>/cachemount/<name>`, made private ([`ensure_private_dir`]).
pub fn user_dir(name: &str) -> anyhow::Result<PathBuf> {
    let Some(cache) = dirs::cache_dir() else {
        bail!("this user has no cache directory: set HOME (or XDG_CACHE_HOME)");
    };
    let dir = cache.join("cachemount").join(name);
    ensure_private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` and its missing ancestors `0700`; existing ones stay as they are.
pub fn create_dirs(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Makes `dir` a directory only this user can enter: created `0700` when
/// missing; an existing one must be a real directory (not a symlink) owned by
/// this user, and loses any group or other permission it had (an older
/// cachemount made them `0755`).
pub fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    create_dirs(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let md =
        std::fs::symlink_metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if !md.is_dir() {
        bail!(
            "{} is not a directory (a symlink?); cachemount keeps private files there: remove it",
            dir.display()
        );
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if md.uid() != me {
        bail!(
            "{} belongs to uid {}, not to this user (uid {me}); cachemount keeps private files there: remove it, or choose another directory",
            dir.display(),
            md.uid()
        );
    }
    if md.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private (chmod 700)", dir.display()))?;
    }
    Ok(())
}

/// Opens `path` for appending, created `0600`, never through a symlink
/// (`O_NOFOLLOW`); with `new`, only if it does not exist yet (`O_EXCL`).
pub fn create_file(path: &Path, new: bool) -> io::Result<File> {
    let mut options = File::options();
    options
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW);
    if new {
        options.create_new(true);
    } else {
        options.create(true);
    }
    options.open(path)
}
