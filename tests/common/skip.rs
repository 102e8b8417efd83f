//! The one place a test may skip (all or part of itself), with the reason.
//!
//! Two kinds of skip:
//!
//! - A missing environment ([`Need`]): no S3 test server, no moto, no root,
//!   no /dev/fuse, a temp file system without user xattrs, no
//!   fuse-overlayfs, no `CARGO`, a server that does not version buckets.
//!   `scripts/test` provides every one of them (as root); in CI (`CI` set) a
//!   missing one is a failure, never a skip. Elsewhere the test prints
//!   `SKIP <test>: <reason>` and the skip is appended to
//!   `$CACHEMOUNT_TEST_SKIP_LOG`, which `scripts/test` prints at the end, so
//!   a green run says what it did not check.
//! - A known limit of a test server ([`Allowed`]): the only skips CI allows,
//!   each listed here with why it is not a gap in what is tested.
//!
//! Whole FUSE tests are not skipped at run time: they are `#[ignore]`d with a
//! reason starting `fuse:` and run as their own tier (`scripts/test` passes
//! `--run-ignored`), so nextest's summary counts them as skipped, not passed,
//! where they cannot run.

#![allow(dead_code)]

use std::io::Write;

/// What a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The SeaweedFS test server (`CACHEMOUNT_TEST_S3_ENDPOINT`).
    S3,
    /// The moto test server (`CACHEMOUNT_TEST_MOTO_ENDPOINT`), which rewrites
    /// ETags on a self-copy as AWS does.
    Moto,
    /// Root and /dev/fuse (the FUSE tests mount with mount(2)).
    Fuse,
    /// Root (chown to other owners).
    Root,
    /// User xattrs on the temp file system.
    Xattrs,
    /// The fuse-overlayfs binary.
    FuseOverlayfs,
    /// `CARGO` in the environment (a test that runs cargo).
    Cargo,
    /// A test server whose buckets keep versions.
    Versioning,
}

impl Need {
    fn how(self) -> &'static str {
        match self {
            Need::S3 => "run scripts/test, or scripts/s3-server.sh start",
            Need::Moto => "run scripts/test, or scripts/s3-server.sh start moto",
            Need::Fuse => "run as root with /dev/fuse (modprobe fuse)",
            Need::Root => "run as root",
            Need::Xattrs => "use a TMPDIR on ext4 or tmpfs",
            Need::FuseOverlayfs => "apt-get install fuse-overlayfs",
            Need::Cargo => "run under cargo",
            Need::Versioning => "use a test server that versions buckets",
        }
    }
}

/// Whether a missing [`Need`] fails the test rather than skipping it.
pub fn strict() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// `test` cannot run (or run the part `what`) without `need`: panics in CI,
/// else prints and logs a SKIP. Returns so the caller can `return`.
pub fn missing(test: &str, need: Need, detail: &str) {
    if strict() {
        panic!(
            "{test}: {detail} ({need:?}; {}), but CI must run every test",
            need.how()
        );
    }
    record(test, &format!("{detail} ({})", need.how()));
}

/// Server limits CI allows a test to skip part of itself for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// moto ignores `CopySourceIfMatch`, so a compose whose base is replaced
    /// between the HEAD and the copy cannot be caught there; the same
    /// scenario runs, and asserts, on SeaweedFS.
    MotoIgnoresCopySourceIfMatch,
}

impl Allowed {
    fn reason(self) -> &'static str {
        match self {
            Allowed::MotoIgnoresCopySourceIfMatch => {
                "moto ignores CopySourceIfMatch (checked on SeaweedFS instead)"
            }
        }
    }
}

/// `test` skips the part `what` for a reason CI allows.
pub fn allowed(test: &str, what: &str, why: Allowed) {
    record(test, &format!("{what}: {}", why.reason()));
}

fn record(test: &str, reason: &str) {
    let line = format!("SKIP {test}: {reason}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("CACHEMOUNT_TEST_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}
