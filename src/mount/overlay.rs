//! Writable mounts (`mount --writable`): each target is an overlay whose
//! lower layer is the read-only cachemount mount, mounted in a private
//! directory, and whose upper layer is a local directory that takes every
//! change. Kernel overlayfs as root, `fuse-overlayfs` otherwise.
//!
//! Each writable target has a state directory of its own, named after the
//! target's path, that holds the layers and a `state.json` saying what the
//! lower layer shows: `save` finds it from the target alone to save
//! incrementally, and `umount` to tear both layers down. The state is
//! private (see [`super::private`]), and both layers are `nosuid,nodev`.

use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::control::{self, NotOurs};
use super::preflight::{self, MountEntry};
use super::private;

const STATE_FILE: &str = "state.json";
/// The source name of the kernel overlays cachemount mounts (in /proc/self/mountinfo).
const OVERLAY_SOURCE: &std::ffi::CStr = c"cachemount";
/// fuse-overlayfs's filesystem type; it has no way to name its mounts.
const FUSE_OVERLAYFS_FSTYPE: &str = "fuse.fuse-overlayfs";

/// What a writable target is made of, as recorded in its state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritableMount {
    /// The merged view, where the user asked for the mount.
    pub target: PathBuf,
    /// The read-only cachemount mount.
    pub lower: PathBuf,
    /// Every change made at the target.
    pub upper: PathBuf,
    /// overlayfs's scratch directory.
    pub work: PathBuf,
    /// The archive name of the mounted path (`_0/node_modules`).
    pub name: Vec<u8>,
    /// The store (as `describe()` says it) and the object the lower layer shows.
    pub store: String,
    pub object: String,
    /// The blob's name when the object is a content-addressed cachemount blob.
    pub digest: Option<String>,
    /// The key it was found under (asked for, or the fallback that matched):
    /// a save of the mount without a profile of its own uses that key's.
    #[serde(default)]
    pub key: Option<String>,
    /// Whether the overlay is fuse-overlayfs (unmounted with fusermount3).
    pub fuse_overlay: bool,
}

/// Which overlay a writable mount uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayKind {
    /// `fuse-overlayfs`, which a normal user may mount.
    FuseOverlayfs,
    /// The kernel's overlayfs (root only).
    Kernel,
}

/// Where writable mounts keep their layers and which overlay they use, as
/// the CLI resolved them (`--state-dir`, the hidden `--overlay`, and their
/// variables): `mount` makes writable mounts there, `save` and `umount`
/// find them there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlays {
    /// The state directories' parent; None when the user has no cache dir.
    state_root: Option<PathBuf>,
    kind: OverlayKind,
}

impl Default for Overlays {
    /// Layers under the user's cache directory; fuse-overlayfs for normal
    /// users, kernel overlayfs for root.
    fn default() -> Self {
        Overlays::new(None, None)
    }
}

impl Overlays {
    pub fn new(state_root: Option<PathBuf>, kind: Option<OverlayKind>) -> Self {
        Overlays {
            state_root: state_root
                .or_else(|| Some(dirs::cache_dir()?.join("cachemount").join("writable"))),
            kind: kind.unwrap_or(if preflight::is_root() {
                OverlayKind::Kernel
            } else {
                OverlayKind::FuseOverlayfs
            }),
        }
    }

    pub fn kind(&self) -> OverlayKind {
        self.kind
    }

    /// The state root, created private.
    fn state_root(&self) -> anyhow::Result<&Path> {
        let Some(root) = &self.state_root else {
            bail!("this user has no cache directory for the writable mounts' layers: set HOME, or CACHEMOUNT_STATE_DIR");
        };
        private::ensure_private_dir(root)?;
        Ok(root)
    }

    /// The writable mount made at `target`, if there is one (it may be partly
    /// unmounted already: see [`WritableMount::is_mounted`]).
    pub fn find(&self, target: &Path) -> Option<WritableMount> {
        let target = preflight::absolute(target);
        let path = state_dir(self.state_root.as_deref()?, &target).join(STATE_FILE);
        let mut bytes = Vec::new();
        std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .ok()?;
        let state: WritableMount = serde_json::from_slice(&bytes).ok()?;
        (state.target == target).then_some(state)
    }

    /// Prepares fresh layers for `target`: a state directory whose upper and
    /// work dirs are empty. Changes kept from an earlier mount (`umount
    /// --keep-changes`) were moved away, so whatever is left is stale.
    pub fn prepare(
        &self,
        target: &Path,
        name: &[u8],
        store: String,
        object: String,
        digest: Option<String>,
        key: Option<String>,
    ) -> anyhow::Result<WritableMount> {
        let dir = state_dir(self.state_root()?, target);
        if dir.exists() {
            if self.find(target).is_some_and(|w| w.is_mounted()) {
                bail!("{} is already a writable mount", target.display());
            }
            remove_layers(&dir)?;
        }
        let state = WritableMount {
            target: target.to_path_buf(),
            lower: dir.join("lower"),
            upper: dir.join("upper"),
            work: dir.join("work"),
            name: name.to_vec(),
            store,
            object,
            digest,
            key,
            fuse_overlay: self.kind == OverlayKind::FuseOverlayfs,
        };
        for d in [&state.lower, &state.upper, &state.work] {
            private::create_dirs(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        private::create_file(&dir.join(STATE_FILE), true)
            .and_then(|mut f| {
                f.write_all(&serde_json::to_vec_pretty(&state).expect("state serialises"))
            })
            .with_context(|| format!("cannot write the state of {}", target.display()))?;
        Ok(state)
    }
}

/// The state directory of `target` (an absolute path) under `root`.
fn state_dir(root: &Path, target: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let hash = Sha256::digest(target.as_os_str().as_bytes());
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    root.join(hex)
}

impl WritableMount {
    /// The state directory (the parent of the layers).
    fn dir(&self) -> &Path {
        self.upper
            .parent()
            .expect("the layers are in the state dir")
    }

    /// Mounts the overlay at the target (the lower layer must be mounted).
    pub fn mount_overlay(&self) -> anyhow::Result<()> {
        self.match_root()?;
        for d in [&self.lower, &self.upper, &self.work] {
            let s = d.to_string_lossy();
            if s.contains([',', ':', '\\']) {
                bail!(
                    "cannot use {} as an overlay layer: its path contains ',', ':' or '\\' (set CACHEMOUNT_STATE_DIR to a plain path)",
                    d.display()
                );
            }
        }
        let layers = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.lower.display(),
            self.upper.display(),
            self.work.display()
        );
        if self.fuse_overlay {
            return mount_fuse_overlayfs(&format!("nosuid,nodev,{layers}"), &self.target);
        }
        // No redirects and no metadata-only copy-up: every changed file is
        // whole in the upper dir, which is what an incremental save reads.
        let options = format!("{layers},redirect_dir=off,metacopy=off,index=off");
        let c_target = preflight::cstring(&self.target)?;
        let c_options = std::ffi::CString::new(options).expect("no NUL in paths");
        // SAFETY: every pointer is a valid C string.
        let rc = unsafe {
            libc::mount(
                OVERLAY_SOURCE.as_ptr(),
                c_target.as_ptr(),
                c"overlay".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c_options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::ENODEV) => " (the kernel has no overlayfs: modprobe overlay)",
                Some(libc::EINVAL) => " (the state directory's filesystem cannot hold an overlay upper layer: set CACHEMOUNT_STATE_DIR to a directory on ext4, xfs or tmpfs)",
                Some(libc::EPERM) => " (overlayfs needs root; install fuse-overlayfs to mount writable as a normal user)",
                _ => "",
            };
            bail!(
                "cannot mount the writable overlay at {}: {e}{hint}",
                self.target.display()
            );
        }
        Ok(())
    }

    /// Gives the upper dir the lower root's mode, owner and times: overlayfs
    /// shows the upper dir's as the merged root's, and the root must look as
    /// it does in the cache until the build changes it.
    fn match_root(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let root = std::fs::metadata(&self.lower)
            .with_context(|| format!("cannot read {}", self.lower.display()))?;
        let upper = &self.upper;
        let set = || -> io::Result<()> {
            std::os::unix::fs::chown(upper, Some(root.uid()), Some(root.gid()))?;
            std::fs::set_permissions(upper, std::fs::Permissions::from_mode(root.mode() & 0o7777))?;
            let times = std::fs::FileTimes::new()
                .set_accessed(root.accessed()?)
                .set_modified(root.modified()?);
            std::fs::File::open(upper)?.set_times(times)
        };
        set().with_context(|| format!("cannot prepare {}", upper.display()))
    }

    /// Whether this overlay is mounted at the target; an error when another
    /// mount is there. A kernel overlay is known by its source name and its
    /// lower dir; fuse-overlayfs cannot name its mounts, so one at a target
    /// this state describes is taken to be this one.
    fn overlay_mounted(&self) -> Result<bool, NotOurs> {
        let Some(entry) = preflight::mount_at(&self.target) else {
            return Ok(false);
        };
        if self.is_this_overlay(&entry) {
            Ok(true)
        } else {
            Err(NotOurs::new(entry))
        }
    }

    fn is_this_overlay(&self, entry: &MountEntry) -> bool {
        if self.fuse_overlay {
            return entry.fstype == FUSE_OVERLAYFS_FSTYPE;
        }
        let lower = format!("lowerdir={}", self.lower.display());
        entry.fstype == "overlay"
            && entry.source.as_bytes() == OVERLAY_SOURCE.to_bytes()
            && entry.super_options.split(',').any(|o| o == lower)
    }

    /// Whether the overlay is mounted at the target.
    pub fn is_mounted(&self) -> bool {
        matches!(self.overlay_mounted(), Ok(true))
    }

    /// Unmounts the overlay, then the lower layer (whose daemon then
    /// exits). Refuses when another mount covers the target.
    pub fn unmount(&self, lazy: bool) -> anyhow::Result<()> {
        if self.overlay_mounted()? {
            if self.fuse_overlay {
                control::unmount_checked(&self.target, lazy)?;
            } else {
                unmount_overlay(&self.target, lazy)?;
            }
        }
        if preflight::is_mountpoint(&self.lower) {
            control::unmount(&self.lower, true)?;
        }
        Ok(())
    }

    /// After unmounting: removes the layers, or with `keep` moves the upper
    /// dir (the changes) aside and returns where it went.
    pub fn discard(&self, keep: bool) -> anyhow::Result<Option<PathBuf>> {
        let dir = self.dir();
        let kept = if keep {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let name = dir.file_name().expect("hash-named").to_string_lossy();
            let kept = dir.parent().expect("a state dir has a root").join("kept");
            private::ensure_private_dir(&kept)?;
            let to = kept.join(format!("{name}-{secs}"));
            std::fs::rename(&self.upper, &to)
                .with_context(|| format!("cannot keep the changes of {}", self.target.display()))?;
            Some(to)
        } else {
            None
        };
        remove_layers(dir)?;
        Ok(kept)
    }
}

/// Removes a state directory whose layers are no longer mounted. The lower
/// mountpoint is only rmdir'd: never recurse into something still mounted.
fn remove_layers(dir: &Path) -> anyhow::Result<()> {
    let lower = dir.join("lower");
    if preflight::is_mountpoint(&lower) || preflight::is_stale(&lower) {
        bail!(
            "{} is still mounted; unmount it first (cachemount umount --lazy)",
            lower.display()
        );
    }
    let _ = std::fs::remove_dir(&lower);
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", dir.display())),
    }
}

fn unmount_overlay(target: &Path, lazy: bool) -> anyhow::Result<()> {
    let c = preflight::cstring(target)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: c is a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EBUSY) {
        bail!(
            "{} is busy: a process has a file open there or its working directory inside; stop it, or use --lazy to detach now",
            target.display()
        );
    }
    Err(e).with_context(|| format!("cannot unmount {}", target.display()))
}

fn mount_fuse_overlayfs(layers: &str, target: &Path) -> anyhow::Result<()> {
    let Some(bin) = preflight::which("fuse-overlayfs") else {
        bail!(
            "a writable mount as a normal user needs fuse-overlayfs: install it (apt-get install fuse-overlayfs), run as root (kernel overlayfs), or mount without --writable"
        );
    };
    let out = Command::new(bin)
        .arg("-o")
        .arg(layers)
        .arg(target)
        .output()
        .context("cannot run fuse-overlayfs")?;
    if !out.status.success() {
        bail!(
            "fuse-overlayfs cannot mount {}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
