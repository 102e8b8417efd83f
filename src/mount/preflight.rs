//! Checks made before anything is mounted, each failing with a message that
//! says what to do: is FUSE usable here (device, privileges, fusermount3), and
//! is each target a directory we may mount on (not already a mount, empty
//! unless `--force`, not a stale mount).

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// `statfs` type of FUSE mounts.
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// The FUSE device, unless the CLI names another (tests of the error path).
pub const DEV_FUSE: &str = "/dev/fuse";

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Finds `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Fails unless this process can mount a FUSE filesystem through `dev`.
pub fn check_fuse(dev: &Path) -> anyhow::Result<()> {
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "{} does not exist: FUSE is not available on this machine. Load the kernel module (`modprobe fuse`), install the \
             fuse3 package (apt-get install fuse3), and in a container pass the device (docker run --device /dev/fuse --cap-add SYS_ADMIN)",
            dev.display()
        ),
        Err(e) if is_root() => {
            bail!("cannot open {}: {e} (in a container, pass --device /dev/fuse --cap-add SYS_ADMIN)", dev.display())
        }
        Err(_) => {
            // Unprivileged mounts go through the setuid fusermount3, which opens the device itself.
        }
    }
    if !is_root() && which("fusermount3").is_none() && which("fusermount").is_none() {
        bail!("not running as root and fusermount3 is not installed: install the fuse3 package (apt-get install fuse3), or run cachemount mount as root");
    }
    Ok(())
}

pub fn cstring(path: &Path) -> anyhow::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", path.display()))
}

/// `statfs(2)` type of the filesystem at `path`.
pub fn fs_type(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// A FUSE mount whose daemon is gone. `statfs` always reaches the daemon
/// (`stat` may be answered from the kernel's attribute cache), so it is what
/// tells.
pub fn is_stale(path: &Path) -> bool {
    matches!(fs_type(path), Err(e) if is_disconnected(&e))
}

/// The errors of a FUSE mount whose daemon is gone: ENOTCONN ("Transport
/// endpoint is not connected"), or ECONNABORTED when the connection was
/// aborted with requests in flight (a daemon killed mid-read).
pub fn is_disconnected(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED))
}

/// One mount, as a line of /proc/self/mountinfo tells it: what `umount`
/// checks before unmounting anything, and what tests read the flags from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// Per-mount flags (`ro,nosuid,nodev,relatime`).
    pub options: String,
    /// `fuse.cachemount`, `overlay`, `tmpfs`, …
    pub fstype: String,
    pub source: String,
    /// The filesystem's own options (an overlay's `lowerdir=…`).
    pub super_options: String,
}

impl MountEntry {
    fn parse(line: &str) -> Option<MountEntry> {
        let (mount, fs) = line.split_once(" - ")?;
        let mount: Vec<&str> = mount.split(' ').collect();
        let mut fs = fs.splitn(3, ' ');
        let text = |s: &str| String::from_utf8_lossy(&unescape_mountinfo(s)).into_owned();
        Some(MountEntry {
            mount_point: PathBuf::from(OsString::from_vec(unescape_mountinfo(mount.get(4)?))),
            options: mount.get(5)?.to_string(),
            fstype: text(fs.next()?),
            source: text(fs.next()?),
            super_options: text(fs.next().unwrap_or("")),
        })
    }

    /// Whether the mount has the per-mount flag `flag` (`nosuid`).
    pub fn has_option(&self, flag: &str) -> bool {
        self.options.split(',').any(|o| o == flag)
    }
}

/// The mount whose root is `path` (the topmost, if several are stacked
/// there), per /proc/self/mountinfo.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .rev()
        .filter_map(MountEntry::parse)
        .find(|m| m.mount_point == path)
}

/// Whether `path` is the root of a mount (per /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> bool {
    mount_at(path).is_some()
}

pub fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // `\ooo`, three octal digits of one byte (so at most `\377`); anything
        // else is literal.
        let octal = (b[i] == b'\\' && i + 3 < b.len())
            .then(|| &b[i + 1..i + 4])
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                u8::try_from(v).ok()
            });
        if let Some(byte) = octal {
            out.push(byte);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// An absolute, lexically clean path (without following symlinks of the last
/// component, which may be a dead mount).
pub fn absolute(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut out = PathBuf::from("/");
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(p) => out.push(p),
            _ => {}
        }
    }
    out
}

/// Makes `path` ready to be mounted on: created when missing; an error when
/// it is already a mount (live or stale), not a directory, or not empty
/// without `force`.
pub fn prepare_mountpoint(path: &Path, force: bool) -> anyhow::Result<()> {
    if is_stale(path) {
        bail!(
            "{} is a stale mount (its daemon is gone: \"Transport endpoint is not connected\"); run `cachemount umount {}` first",
            path.display(),
            path.display()
        );
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).with_context(|| format!("cannot create the mountpoint {}", path.display()))?;
            return Ok(());
        }
        Err(e) if is_disconnected(&e) => bail!(
            "{} is a stale mount (its daemon is gone: \"Transport endpoint is not connected\"); run `cachemount umount {}` first",
            path.display(),
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot use {} as a mountpoint", path.display())),
        Ok(md) if !md.is_dir() => bail!("{} exists and is not a directory; cannot mount a cache there", path.display()),
        Ok(_) => {}
    }
    if is_mountpoint(path) {
        let what = if fs_type(path).ok() == Some(FUSE_SUPER_MAGIC) {
            "already mounted (a FUSE mount)"
        } else {
            "already a mount point"
        };
        bail!(
            "{} is {what}; unmount it first (cachemount umount {})",
            path.display(),
            path.display()
        );
    }
    let non_empty = std::fs::read_dir(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .next()
        .is_some();
    if non_empty && !force {
        bail!(
            "{} exists and is not empty; use --force to mount over it (its current content is hidden while mounted)",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::unescape_mountinfo;

    #[test]
    fn mountinfo_escapes_are_one_byte_or_literal() {
        assert_eq!(unescape_mountinfo("a\\040b\\011"), b"a b\t");
        assert_eq!(unescape_mountinfo("\\377"), [0xff]);
        // Found by fuzzing: `\777` overflowed a byte; it is not an escape.
        assert_eq!(unescape_mountinfo("x\\777"), b"x\\777");
        assert_eq!(unescape_mountinfo("\\04"), b"\\04");
    }
}
