//! Talking to mounts from outside: starting the daemon and waiting until it
//! says every mountpoint answers, unmounting (stale mounts included), and
//! reading a mount's counters.
//!
//! The daemon is this same binary re-executed with `--daemon-child` in a new
//! session (so the terminal's SIGINT does not reach it), its stderr appended to
//! the log file and its stdout a pipe to the parent that carries the readiness
//! protocol: `ready\t<report>` (the CLI's report of the mount, which this
//! module carries without reading), or `error\t<exit code>\t<message>`. The
//! daemon closes the pipe once ready.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};

use super::{preflight, private};
use crate::fs::{STATS_XATTR, USAGE_XATTR};

/// What the daemon reported when it became ready.
#[derive(Debug, Clone)]
pub struct Started {
    pub pid: u32,
    /// What the daemon reported of the mount (the CLI's report, as text).
    pub report: String,
}

/// The daemon reported a failure; `code` is the exit code it chose.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DaemonFailed {
    pub code: u8,
    pub message: String,
}

/// One readiness-protocol line, tab-separated, with newlines escaped.
pub fn protocol_line(kind: &str, fields: &[&str]) -> String {
    let mut line = kind.to_string();
    for f in fields {
        line.push('\t');
        line.push_str(
            &f.replace('\\', "\\\\")
                .replace('\n', "\\n")
                .replace('\t', "\\t"),
        );
    }
    line.push('\n');
    line
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(o) => out.push(o),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Starts `exe args… --daemon-child` detached, logging to `log`, and waits
/// (at most `timeout`) until it reports ready or fails.
/// `new_log`: the log is the default path, which must not exist yet (see [`open_log`]).
pub fn spawn_daemon(
    args: &[OsString],
    log: &Path,
    new_log: bool,
    timeout: Duration,
) -> anyhow::Result<Started> {
    let exe = std::env::current_exe().context("cannot find the cachemount executable")?;
    let log_file = open_log(log, new_log)?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .arg("--daemon-child")
        // For the daemon's start-up clock (its first phase is its own start).
        .arg("--spawned-at")
        .arg(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                .to_string(),
        )
        // mimalloc keeps freed pages 10 ms before it returns them; a daemon
        // streaming through its block cache frees and refills all the time,
        // and the kept pages took its peak RSS past the bound the README
        // promises (243 MiB against 225 in tests/mount_memory.rs).
        .env("MIMALLOC_PURGE_DELAY", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file));
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the mount daemon")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let mut parts = line.split('\t').map(unescape);
                match parts.next().as_deref() {
                    Some("ready") => {
                        return Ok(Started {
                            pid: child.id(),
                            report: parts.next().unwrap_or_default(),
                        });
                    }
                    Some("error") => {
                        let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or(1);
                        let message = parts.next().unwrap_or_default();
                        let _ = child.wait();
                        return Err(DaemonFailed { code, message }.into());
                    }
                    _ => {}
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait()?;
                bail!(
                    "the mount daemon exited ({status}) before it was ready; see its log {}",
                    log.display()
                );
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // SIGTERM makes the daemon unmount whatever it mounted.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                let _ = child.wait();
                bail!(
                    "the mount daemon was not ready within {} s; stopped it (see {})",
                    timeout.as_secs(),
                    log.display()
                );
            }
        }
    }
}

/// After readiness: stdout of the daemon now goes nowhere (the parent has exited).
pub fn detach_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: both fds are valid; dup2 replaces fd 1 atomically.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

/// Whether `entry` is one of cachemount's read-only mounts: FUSE (`fuse`
/// when mounted by root with mount(2), `fuse.cachemount` through
/// fusermount3) with the source name the daemon gives them.
pub fn is_cachemount(entry: &preflight::MountEntry) -> bool {
    matches!(entry.fstype.as_str(), "fuse" | "fuse.cachemount")
        && entry.source.starts_with(FSNAME_PREFIX)
}

/// The daemon names its mounts `cachemount:<object>`.
pub const FSNAME_PREFIX: &str = "cachemount:";

/// `umount` was asked to unmount something cachemount did not mount.
#[derive(Debug, thiserror::Error)]
#[error("{} is a {fstype} mount of {device}, not one cachemount made; refusing to unmount it (use umount(8) if you mean to)", .path.display())]
pub struct NotOurs {
    pub path: PathBuf,
    pub fstype: String,
    /// What is mounted (mountinfo's source field).
    pub device: String,
}

impl NotOurs {
    pub fn new(entry: preflight::MountEntry) -> Self {
        NotOurs {
            path: entry.mount_point,
            fstype: entry.fstype,
            device: entry.source,
        }
    }
}

/// Unmounts the cachemount mount at `path`, refusing any other mount. A
/// stale mount (daemon killed) is detached; a busy mount is an error unless
/// `lazy` (then it is detached and goes away when the last user leaves).
pub fn unmount(path: &Path, lazy: bool) -> anyhow::Result<()> {
    let path = preflight::absolute(path);
    let Some(entry) = preflight::mount_at(&path) else {
        if std::fs::symlink_metadata(&path).is_err() {
            bail!("{} does not exist", path.display());
        }
        bail!("{} is not mounted", path.display());
    };
    if !is_cachemount(&entry) {
        return Err(NotOurs::new(entry).into());
    }
    unmount_checked(&path, lazy)
}

/// Unmounts `path` (an absolute path), which the caller has checked is a
/// mount cachemount made: one of its own, or a fuse-overlayfs overlay.
pub(super) fn unmount_checked(path: &Path, lazy: bool) -> anyhow::Result<()> {
    let stale = preflight::is_stale(path);
    if !preflight::is_root() {
        return fusermount_unmount(path, lazy || stale);
    }
    let c = preflight::cstring(path)?;
    // SAFETY: c is a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EBUSY) if lazy || stale => detach(&c, path),
        Some(libc::EBUSY) => bail!(
            "{} is busy: a process has a file open there or its working directory inside; stop it, or use --lazy to detach now",
            path.display()
        ),
        Some(libc::EPERM) => fusermount_unmount(path, lazy || stale),
        _ if stale => detach(&c, path),
        _ => Err(err).with_context(|| format!("cannot unmount {}", path.display())),
    }
}

fn detach(c: &std::ffi::CStr, path: &Path) -> anyhow::Result<()> {
    // SAFETY: c is a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    Err(std::io::Error::last_os_error())
        .with_context(|| format!("cannot unmount {}", path.display()))
}

fn fusermount_unmount(path: &Path, lazy: bool) -> anyhow::Result<()> {
    let bin = preflight::which("fusermount3").or_else(|| preflight::which("fusermount")).ok_or_else(|| {
        anyhow::anyhow!("cannot unmount {} as a normal user without fusermount3: install the fuse3 package, or run as root", path.display())
    })?;
    let mut cmd = Command::new(bin);
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd.arg(path).output().context("cannot run fusermount3")?;
    if !out.status.success() {
        bail!(
            "cannot unmount {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The counters of the mount at `path`.
pub fn stats(path: &Path) -> anyhow::Result<String> {
    root_xattr(path, STATS_XATTR, "counters")
}

/// The usage report of the mount at `path` (JSON), from the reads recorded so far.
pub fn usage(path: &Path) -> anyhow::Result<String> {
    root_xattr(path, USAGE_XATTR, "usage report")
}

/// One of the extended attributes the root of a mount answers.
fn root_xattr(path: &Path, name: &[u8], what: &str) -> anyhow::Result<String> {
    match xattr::get(path, std::str::from_utf8(name).expect("ASCII")) {
        Ok(Some(v)) => Ok(String::from_utf8_lossy(&v).into_owned()),
        Ok(None) => bail!("{} is not the root of a cachemount mount", path.display()),
        Err(e) if preflight::is_disconnected(&e) => {
            bail!("{} is a stale mount (its daemon is gone)", path.display())
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
            bail!("{} is not the root of a cachemount mount", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read the {what} of {}", path.display())),
    }
}

/// Where a daemon logs unless `--log-file` says otherwise: a new file in the
/// user's private log directory (never a shared, predictable path).
pub fn default_log_path() -> anyhow::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = private::user_dir("logs")?;
    Ok(dir.join(format!("mount-{secs}-{}.log", std::process::id())))
}

/// Opens the daemon's log for appending: created `0600`, never through a
/// symlink (`O_NOFOLLOW`), and with `new` (the default log path) only if it
/// does not exist yet (`O_EXCL`). A given `--log-file` may be an existing log.
pub fn open_log(path: &Path, new: bool) -> anyhow::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        private::create_dirs(dir)
            .with_context(|| format!("cannot create the log directory {}", dir.display()))?;
    }
    private::create_file(path, new)
        .with_context(|| format!("cannot open the log file {}", path.display()))
}
