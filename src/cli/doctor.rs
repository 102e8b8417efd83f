//! `cachemount doctor`: what works on this machine, each check with what to
//! do when it does not — FUSE (the device, and fusermount3 for a normal
//! user), the overlay a writable mount would use, FUSE passthrough, and the
//! store (reachable, credentials accepted). CI glue runs it to choose between
//! `mount` and `restore`; a user runs it when a mount fails.

use std::path::Path;

use serde::Serialize;

use crate::mount::overlay::{OverlayKind, Overlays};
use crate::mount::preflight;
use crate::store::{AnyStore, ObjectStore, StoreError};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, with a limit worth knowing (the fallback is used).
    Warn,
    /// Does not work: the command that needs it fails.
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was found, and what to do about it when it is not ok.
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub command: &'static str,
    /// `mount` works here (else use `restore`).
    pub mount: bool,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn human(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            out += &format!("{tag} {:<12} {}\n", c.name, c.detail);
        }
        out += if self.mount {
            "mount works here\n"
        } else {
            "mount does not work here: use `cachemount restore`, or fix what FAILs above\n"
        };
        out
    }

    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }
}

fn check(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
    }
}

/// Runs every check; `store` is None when it could not be opened (`opened`
/// says why).
pub async fn run(dev_fuse: &Path, overlays: &Overlays, store: Result<&AnyStore, String>) -> Report {
    let mut checks = Vec::new();
    let fuse = match preflight::check_fuse(dev_fuse) {
        Ok(()) => check(
            "fuse",
            Status::Ok,
            format!("{} is usable", dev_fuse.display()),
        ),
        Err(e) => check("fuse", Status::Fail, format!("{e:#}")),
    };
    let mount = fuse.status == Status::Ok;
    checks.push(fuse);
    checks.push(overlay_check(overlays.kind()));
    checks.push(passthrough_check());
    checks.push(match store {
        Err(why) => check("store", Status::Fail, why),
        Ok(store) => store_check(store).await,
    });
    Report {
        command: "doctor",
        mount,
        checks,
    }
}

fn overlay_check(kind: OverlayKind) -> Check {
    match kind {
        OverlayKind::Kernel => {
            let listed = std::fs::read_to_string("/proc/filesystems")
                .is_ok_and(|f| f.lines().any(|l| l.ends_with("\toverlay")));
            if listed {
                check("overlay", Status::Ok, "kernel overlayfs (root) for --writable")
            } else {
                check("overlay", Status::Warn, "the kernel lists no overlay filesystem: --writable fails until `modprobe overlay`")
            }
        }
        OverlayKind::FuseOverlayfs => match preflight::which("fuse-overlayfs") {
            Some(p) => check("overlay", Status::Ok, format!("fuse-overlayfs ({}) for --writable", p.display())),
            None => check("overlay", Status::Warn, "fuse-overlayfs is missing: --writable fails as a normal user (apt-get install fuse-overlayfs)"),
        },
    }
}

/// FUSE passthrough (reads served by the kernel from a local file) needs
/// Linux 6.9 and root; cachemount reads through the daemon without it.
fn passthrough_check() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version >= (6, 9) && preflight::is_root() {
        check(
            "passthrough",
            Status::Ok,
            format!("Linux {release} supports FUSE passthrough"),
        )
    } else {
        check("passthrough", Status::Warn, format!("Linux {release}: no FUSE passthrough (needs 6.9 and root); reads go through the daemon"))
    }
}

/// A HEAD of a name no cache has: NotFound means the store answered and
/// took the credentials.
async fn store_check(store: &AnyStore) -> Check {
    match store.head("keys/.cachemount-doctor-probe").await {
        Ok(_) | Err(StoreError::NotFound(_)) => {
            check("store", Status::Ok, format!("{} answers", store.describe()))
        }
        Err(e) => check("store", Status::Fail, format!("{}: {e}", store.describe())),
    }
}
