//! Test support for real FUSE mounts: mounting with the real binary, a guard
//! that always unmounts (lazily) and stops the daemon, even when the test
//! panics, and time bounds around anything that could hang on a broken mount.
//!
//! Tests that need FUSE are `#[ignore = "fuse: …"]` (their own tier, see
//! tests/common/skip.rs) and call [`fuse_available`] first.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::cli::Sandbox;

/// How long `mount` may take in a test (a big index from S3 included).
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether this machine can make real FUSE mounts (root and /dev/fuse).
pub fn fuse_usable() -> Result<(), &'static str> {
    if unsafe { libc::geteuid() } != 0 {
        Err("not root (the FUSE tests mount with mount(2))")
    } else if !Path::new("/dev/fuse").exists() {
        Err("no /dev/fuse")
    } else {
        Ok(())
    }
}

/// Whether real FUSE mounts can run here. FUSE tests are `#[ignore = "fuse:
/// …"]`, a tier `scripts/test` runs only where FUSE is usable (reported as
/// skipped elsewhere); a FUSE test run by hand without FUSE is a skip through
/// tests/common/skip.rs (a failure in CI).
pub fn fuse_available(test: &str) -> bool {
    match fuse_usable() {
        Ok(()) => true,
        Err(r) => {
            crate::common::skip::missing(test, crate::common::skip::Need::Fuse, r);
            false
        }
    }
}

pub use crate::common::cli::run_bounded;

/// Runs `f` on another thread and panics if it takes longer than `timeout`
/// (a hung FUSE read must fail the test, so the guards can unmount).
pub fn bounded<T: Send + 'static>(
    timeout: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}

/// A live mount made by `cachemount mount`; dropping it unmounts every path
/// (lazily) and makes sure the daemon is gone.
pub struct Mount {
    pub paths: Vec<PathBuf>,
    pub pid: u32,
    pub log: PathBuf,
    pub stdout: String,
}

impl Mount {
    /// `cachemount mount ARGS` in `sandbox`; panics unless it succeeds.
    pub fn new(sandbox: &Sandbox, args: &[&str]) -> Mount {
        let mut full = vec!["mount"];
        full.extend_from_slice(args);
        let out = run_bounded(sandbox.command(&full), MOUNT_TIMEOUT);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "cachemount {full:?} failed: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self::parse(&stdout)
    }

    /// Reads the mount's paths, pid and log from `mount`'s output.
    pub fn parse(stdout: &str) -> Mount {
        let mut paths = Vec::new();
        let mut pid = 0;
        let mut log = PathBuf::new();
        for line in stdout.lines() {
            if let (Some(at), Some(paren)) = (line.find(" at /"), line.rfind(" (")) {
                if line.starts_with("mounted ") {
                    paths.push(PathBuf::from(&line[at + 4..paren]));
                }
            }
            if let Some(rest) = line.strip_prefix("daemon pid ") {
                let (p, l) = rest.split_once(", log ").expect("daemon line");
                pid = p.parse().unwrap();
                log = PathBuf::from(l);
            }
        }
        assert!(
            pid != 0 && !paths.is_empty(),
            "unexpected mount output: {stdout}"
        );
        Mount {
            paths,
            pid,
            log,
            stdout: stdout.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.paths[0]
    }

    /// The daemon's counters.
    pub fn stats(&self, sandbox: &Sandbox) -> BTreeMap<String, u64> {
        let p = self.path().display().to_string();
        let out = run_bounded(sandbox.command(&["stats", &p]), Duration::from_secs(20));
        assert!(
            out.status.success(),
            "stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cachemount::cache::stats::parse(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .collect()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn daemon_alive(&self) -> bool {
        process_alive(self.pid)
    }

    /// Waits until the daemon has exited; false on timeout.
    pub fn wait_daemon_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.daemon_alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        for p in &self.paths {
            if is_mounted(p) {
                if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
        // A writable mount's daemon still serves its private lower layer:
        // SIGTERM makes it unmount that too.
        if !self.wait_daemon_gone(Duration::from_secs(2)) {
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        }
        if !self.wait_daemon_gone(Duration::from_secs(5)) {
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Alive and not a zombie (daemons are reparented; nobody may reap them).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Whether `path` is a mount point right now (/proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.display().to_string().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Runs the cachemount binary and expects failure; returns (exit code, stderr).
pub fn mount_fails(sandbox: &Sandbox, args: &[&str]) -> (i32, String) {
    let mut full = vec!["mount"];
    full.extend_from_slice(args);
    let out = run_bounded(sandbox.command(&full), MOUNT_TIMEOUT);
    assert!(
        !out.status.success(),
        "cachemount {full:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
