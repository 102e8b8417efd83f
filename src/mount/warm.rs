//! Warming the kernel from the access profile, beside replay: what replay
//! brings into the block cache is handed on to the kernel, so that the
//! build's reads of it never wait on a FUSE round trip at all.
//!
//! - Directory entries: the directories of the profile's files are listed on
//!   the mountpoint, in profile order (each listing is one READDIRPLUS: the
//!   kernel then knows every name and inode in it, and the build's opens need
//!   no LOOKUP).
//! - Pages: each profile file, once listed and once replay has fetched it, is
//!   pushed into the kernel's page cache ([`FsCore::hand_to_kernel`]); its
//!   first open then records the read ([`crate::fs::handed`]).
//!
//! Both run on threads of their own, in profile order, the pusher never
//! ahead of the lister (the kernel drops pages of an inode it does not know
//! yet). Demand reads are not delayed: neither fetches anything, and the
//! lister is one request per directory. Both stop at the first sign that the
//! mount is gone.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::fs::{FsCore, HandOver};
use crate::profile::Profile;
use crate::store::ObjectStore;

/// Directories that may fail to list in a row before the lister decides
/// the mount is gone.
const MAX_FAILURES: u32 = 16;
/// How often the pusher looks again for a file replay has not fetched yet.
const POLL: Duration = Duration::from_millis(1);

/// One mountpoint to warm: its core and where the kernel serves it (the
/// FUSE mount: a writable mount's lower layer).
pub struct Warmed<S> {
    pub core: Arc<FsCore<S>>,
    pub path: PathBuf,
}

impl<S> Clone for Warmed<S> {
    fn clone(&self) -> Self {
        Warmed {
            core: self.core.clone(),
            path: self.path.clone(),
        }
    }
}

/// Which mountpoint shows archive name `name`.
fn locate<S: ObjectStore>(mounts: &[Warmed<S>], name: &[u8]) -> Option<usize> {
    mounts.iter().position(|m| m.core.relative(name).is_some())
}

/// Starts warming the kernel with `profile`; `replaying` is true until
/// replay has fetched everything it will. When the pusher is done, each
/// core is told that nothing more will be handed over.
pub fn spawn<S: ObjectStore>(
    mounts: Vec<Warmed<S>>,
    profile: Arc<Profile>,
    replaying: Arc<AtomicBool>,
) {
    for m in &mounts {
        m.core.handing_over();
    }
    let listed = Arc::new(AtomicUsize::new(0));
    let spawned = {
        let (mounts, profile, listed) = (mounts.clone(), profile.clone(), listed.clone());
        std::thread::Builder::new()
            .name("warm-dirs".into())
            .spawn(move || list_dirs(&mounts, &profile, &listed))
    };
    let spawned = spawned.and_then(|_| {
        let mounts2 = mounts.clone();
        std::thread::Builder::new()
            .name("warm-pages".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let (files, bytes) = push_pages(&mounts2, &profile, &listed, &replaying);
                tracing::info!(
                    "handed {files} profile files ({bytes} bytes) to the kernel's page cache in {} ms",
                    started.elapsed().as_millis()
                );
                for m in &mounts2 {
                    m.core.handed_all();
                }
            })
    });
    if let Err(e) = spawned {
        tracing::warn!(
            "cannot start warming the kernel's caches ({e}); replay fills the block cache only"
        );
        for m in &mounts {
            m.core.handed_all();
        }
    }
}

/// Lists the directory of each profile file (one the tree has), in profile
/// order, once each;
/// `listed` is the number of profile entries passed (all of them at the end,
/// even when the lister stops early).
fn list_dirs<S: ObjectStore>(mounts: &[Warmed<S>], profile: &Profile, listed: &AtomicUsize) {
    let mut seen: HashSet<(usize, &[u8])> = HashSet::new();
    let mut failures = 0;
    for (rank, pe) in profile.entries.iter().enumerate() {
        let found =
            locate(mounts, &pe.name).and_then(|i| Some((i, mounts[i].core.dir_of(&pe.name)?)));
        if let Some((i, dir)) = found.filter(|&at| seen.insert(at)) {
            let path = mounts[i].path.join(OsStr::from_bytes(dir));
            match std::fs::read_dir(&path) {
                Ok(entries) => {
                    entries.for_each(drop);
                    failures = 0;
                }
                Err(e) => {
                    tracing::debug!("cannot list {}: {e}", path.display());
                    failures += 1;
                    if failures >= MAX_FAILURES {
                        tracing::debug!(
                            "{MAX_FAILURES} directories in a row did not list; the mount is gone"
                        );
                        break;
                    }
                }
            }
        }
        listed.store(rank + 1, Ordering::Release);
    }
    listed.store(usize::MAX, Ordering::Release);
}

/// Pushes each profile file into the kernel's page cache, in profile order,
/// once its directory is listed and replay has fetched it (a file replay
/// did not fetch is skipped once replay is over). Returns files and bytes.
fn push_pages<S: ObjectStore>(
    mounts: &[Warmed<S>],
    profile: &Profile,
    listed: &AtomicUsize,
    replaying: &AtomicBool,
) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    for (rank, pe) in profile.entries.iter().enumerate() {
        while listed.load(Ordering::Acquire) <= rank {
            std::thread::sleep(POLL / 4);
        }
        let Some(i) = locate(mounts, &pe.name) else {
            continue;
        };
        loop {
            let last_try = !replaying.load(Ordering::Acquire);
            match mounts[i]
                .core
                .hand_to_kernel(&pe.name, |size| pe.bytes(size))
            {
                Ok(HandOver::Done(n)) => {
                    files += 1;
                    bytes += n;
                    break;
                }
                Ok(HandOver::Skipped) => break,
                Ok(HandOver::NotCached) if last_try => break,
                Ok(HandOver::NotCached) => std::thread::sleep(POLL),
                Err(e) => {
                    tracing::debug!("the kernel refused pages ({e}); the mount is gone");
                    return (files, bytes);
                }
            }
        }
    }
    (files, bytes)
}
