//! The mount daemon: opens the archive once (HEAD, pin, tail, index), mounts
//! every saved path with its own inode tree but one shared fetcher, block
//! cache and store client, waits until each mountpoint answers, and then
//! serves until every mountpoint is unmounted or a signal asks it to stop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::control;
use super::overlay::{Overlays, WritableMount};
use super::preflight::{self, FUSE_SUPER_MAGIC};
use super::startup::Phases;
use super::warm::Warmed;
use crate::cache::disk::{DiskCache, DiskOptions, MountDisk};
use crate::cache::version::{open_version, Refresh};
use crate::cache::{Current, FetchConfig, Fetcher, Stats, Version};
use crate::fs::fuse::KernelNotifier;
use crate::fs::{FsCore, FuseFs, Reopener, Tree};
use crate::paths::Target;
use crate::store::ObjectStore;

/// How long a new mountpoint may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Kernel read-ahead of the mount's backing device, in KiB, unless the CLI
/// sets another (the FUSE INIT reply cannot raise it above the kernel's
/// default of 128 KiB; sysfs can).
pub const BDI_READ_AHEAD_KB: u32 = 1024;

#[derive(Debug, Clone)]
pub struct MountOptions {
    pub force: bool,
    pub cache_size: u64,
    pub fetch: FetchConfig,
    /// FUSE worker threads per mountpoint.
    pub fuse_threads: usize,
    /// Each target an overlay over the read-only mount (`--writable`).
    pub writable: bool,
    /// Where writable mounts keep their layers, and which overlay they use.
    pub overlays: Overlays,
    /// The FUSE device ([`preflight::DEV_FUSE`] unless a test names another).
    pub dev_fuse: PathBuf,
    /// The kernel read-ahead set on each mount, in KiB.
    pub read_ahead_kb: u32,
    /// The host's disk cache, unless turned off.
    pub disk: Option<DiskOptions>,
    /// Open files wholly in the disk cache with FUSE passthrough.
    pub passthrough: bool,
    /// Where every mountpoint records its reads (`None`: `--no-record`).
    pub recorder: Option<Arc<crate::profile::Recorder>>,
    /// Replay the key's access profile once the mount answers (not `--no-prefetch`).
    pub prefetch: bool,
    /// The key the archive was found under (the one asked for or the
    /// fallback that matched); `None` for a URL. Kept in a writable mount's
    /// state, so a save of it can lay out by that key's access profile.
    pub mounted_key: Option<String>,
}

/// The single-flight reopen of a mount: `open_version` again (checking the
/// name of a content-addressed blob), dropping the old version's blocks.
pub fn reopener<S: ObjectStore>(
    store: Arc<S>,
    current: Arc<Current>,
    expected_digest: Option<String>,
    fetcher: &Arc<Fetcher<S>>,
    stats: Arc<Stats>,
) -> Arc<Reopener> {
    let key = current.load().key.clone();
    let open_stats = stats.clone();
    let open: crate::fs::reopen::Opener = Box::new(move || {
        let store = store.clone();
        let key = key.clone();
        let digest = expected_digest.clone();
        let stats = open_stats.clone();
        Box::pin(async move {
            open_version(
                &*store,
                &key,
                digest.as_deref(),
                None,
                Refresh::Never,
                Some(&stats),
            )
            .await
        })
    });
    let f = Arc::downgrade(fetcher);
    let invalidate: crate::fs::reopen::Invalidator =
        Box::new(move |id| f.upgrade().map_or(0, |f| f.drop_version(id)));
    Reopener::new(current, open, invalidate, stats)
}

/// The signals that stop a daemon, registered before anything is mounted so
/// that one arriving while mounting is not lost (it then unmounts at once).
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn register() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// A mounted path.
pub struct Mounted {
    /// Where the user sees it.
    pub path: PathBuf,
    pub name: Vec<u8>,
    pub nodes: usize,
    /// For a writable mount, its layers (the FUSE mount is the lower one).
    pub writable: Option<WritableMount>,
}

impl Mounted {
    /// `writable` or `read-only`, as `mount` reports it.
    pub fn mode(&self) -> &'static str {
        if self.writable.is_some() {
            "writable"
        } else {
            "read-only"
        }
    }

    /// Unmounts the path (both layers of a writable one). The changes of a
    /// writable mount are kept aside unless `discard_changes`: a signal must
    /// not lose a build's work.
    fn unmount(&self, discard_changes: bool) -> anyhow::Result<()> {
        match &self.writable {
            None => control::unmount(&self.path, true),
            Some(w) => {
                w.unmount(true)?;
                if let Some(kept) = w.discard(!discard_changes)? {
                    tracing::warn!(
                        "the changes made at {} are kept in {}",
                        self.path.display(),
                        kept.display()
                    );
                }
                Ok(())
            }
        }
    }
}

/// Every mountpoint of one daemon and the sessions serving them.
pub struct Daemon<S> {
    pub mounted: Vec<Mounted>,
    /// Each mountpoint's core, where the kernel serves it.
    warmed: Vec<Warmed<S>>,
    sessions: Vec<fuser::BackgroundSession>,
    fetcher: Arc<Fetcher<S>>,
    current: Arc<Current>,
}

impl<S: ObjectStore> Daemon<S> {
    /// Unmounts everything and waits for the sessions (the mount could not
    /// be reported, so it must not stay).
    pub fn abandon(self) {
        for m in &self.mounted {
            let _ = m.unmount(true);
        }
        for s in self.sessions {
            let _ = s.join();
        }
    }

    pub fn fetcher(&self) -> &Arc<Fetcher<S>> {
        &self.fetcher
    }

    /// The mountpoints replay may warm the kernel's caches of.
    pub fn warmed(&self) -> Vec<Warmed<S>> {
        self.warmed.clone()
    }

    /// The archive version the mount reads now (a reopen swaps it).
    pub fn current(&self) -> &Arc<Current> {
        &self.current
    }

    /// Serves until every mountpoint is gone (unmounted by `cachemount
    /// umount` or anyone else), or SIGTERM/SIGINT/SIGHUP, which unmount them.
    pub async fn serve(self, signals: Signals) -> anyhow::Result<()> {
        let Signals {
            mut term,
            mut int,
            mut hup,
        } = signals;
        let joins = futures::future::join_all(
            self.sessions
                .into_iter()
                .map(|s| tokio::task::spawn_blocking(move || s.join())),
        );
        tokio::pin!(joins);
        let signalled = tokio::select! {
            _ = &mut joins => None,
            _ = term.recv() => Some("SIGTERM"),
            _ = int.recv() => Some("SIGINT"),
            _ = hup.recv() => Some("SIGHUP"),
        };
        if let Some(sig) = signalled {
            tracing::info!(
                "{sig}: unmounting {}",
                self.mounted
                    .iter()
                    .map(|m| m.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for m in &self.mounted {
                if let Err(e) = m.unmount(false) {
                    tracing::warn!("cannot unmount {}: {e:#}", m.path.display());
                }
            }
            if tokio::time::timeout(Duration::from_secs(10), &mut joins)
                .await
                .is_err()
            {
                tracing::warn!(
                    "FUSE sessions did not end within 10 s of unmounting; exiting anyway"
                );
            }
        }
        tracing::info!(
            "all mountpoints are gone; exiting. {}",
            self.fetcher.render_stats().replace('\n', " ")
        );
        self.fetcher.save_disk_figures();
        Ok(())
    }
}

/// Mounts every target (blocking: run it off the async workers). On any
/// failure, whatever was mounted is unmounted again.
///
/// `expected_digest` is the blob's name when the object is content-addressed
/// (a key mount): a reopen after a 412 checks it again, and the content can
/// never change, so open files need no handles. Without it (a raw URL) the
/// object may be overwritten with other content: handles are tracked.
/// `phases` gets the tree build, FUSE init and readiness.
#[allow(clippy::too_many_arguments)]
pub fn mount_all<S: ObjectStore>(
    store: Arc<S>,
    version: Version,
    expected_digest: Option<String>,
    targets: &[Target],
    options: &MountOptions,
    stats: Arc<Stats>,
    runtime: tokio::runtime::Handle,
    phases: &mut Phases,
) -> anyhow::Result<Daemon<S>> {
    preflight::check_fuse(&options.dev_fuse)?;
    let targets: Vec<Target> = targets
        .iter()
        .map(|t| Target {
            local: preflight::absolute(&t.local),
            ..t.clone()
        })
        .collect();
    for (i, t) in targets.iter().enumerate() {
        if targets[..i].iter().any(|o| o.local == t.local) {
            bail!("{} is given twice", t.local.display());
        }
        preflight::prepare_mountpoint(&t.local, options.force)?;
    }
    phases.mark("mountpoint checks");
    let fsname = format!("{}{}", control::FSNAME_PREFIX, version.key);
    let object = version.key.clone();
    let current = Current::new(version);
    let content_addressed = expected_digest.is_some();
    if options.writable && !content_addressed {
        // overlayfs does not allow its lower layer to change, and a raw
        // object may be overwritten with other content (a key's blob never is).
        bail!("--writable needs a cache mounted by --key: an archive URL may be overwritten with other content under the overlay");
    }
    let store_name = store.describe();
    let digest = expected_digest.clone();
    // Only a key's blob never changes content: a raw URL's object may be
    // rewritten with the same ETag granularity (a local file's mtime), so its
    // mounts stay off the shared disk cache rather than risk two versions.
    let disk = options
        .disk
        .as_ref()
        .filter(|_| content_addressed)
        .and_then(|o| match DiskCache::open(o) {
            Ok(c) => Some(MountDisk::new(Arc::new(c), store_name.clone())),
            Err(e) => {
                tracing::warn!("{e}; reads use the in-memory cache only");
                None
            }
        });
    let fetcher = Fetcher::with_disk(
        store.clone(),
        options.cache_size,
        stats.clone(),
        options.fetch.clone(),
        disk,
    );
    let reopener = reopener(store, current.clone(), expected_digest, &fetcher, stats);
    let mut trees = Vec::new();
    for t in &targets {
        trees.push(Tree::build(&current.load().index, &t.name)?);
    }
    phases.mark("tree build");
    let mut daemon = Daemon {
        mounted: Vec::new(),
        warmed: Vec::new(),
        sessions: Vec::new(),
        fetcher: fetcher.clone(),
        current: current.clone(),
    };
    let result = (|| -> anyhow::Result<()> {
        for (t, tree) in targets.iter().zip(trees) {
            let nodes = tree.len();
            let writable = if options.writable {
                Some(options.overlays.prepare(
                    &t.local,
                    &t.name,
                    store_name.clone(),
                    object.clone(),
                    digest.clone(),
                    options.mounted_key.clone(),
                )?)
            } else {
                None
            };
            let fuse_path = writable
                .as_ref()
                .map_or(t.local.clone(), |w| w.lower.clone());
            let core = FsCore::with_reopen(
                tree,
                &t.name,
                reopener.clone(),
                fetcher.clone(),
                !content_addressed,
            );
            if let Some(r) = &options.recorder {
                core.set_recorder(r.clone());
            }
            let fs = FuseFs::new(core.clone(), runtime.clone());
            let fs = if options.passthrough {
                fs
            } else {
                fs.without_passthrough()
            };
            let mut config = fuser::Config::default();
            config.mount_options = vec![
                fuser::MountOption::RO,
                fuser::MountOption::FSName(fsname.clone()),
                fuser::MountOption::Subtype("cachemount".into()),
                fuser::MountOption::DefaultPermissions,
                fuser::MountOption::NoDev,
                fuser::MountOption::NoSuid,
            ];
            // As root, let the build's (possibly other) user read the mount; the
            // kernel still checks permission bits (default_permissions).
            config.acl = if preflight::is_root() {
                fuser::SessionACL::All
            } else {
                fuser::SessionACL::Owner
            };
            config.n_threads = Some(options.fuse_threads.max(1));
            config.clone_fd = true;
            let session = fuser::Session::new(fs, &fuse_path, &config)
                .map_err(|e| mount_error(&fuse_path, e))?;
            core.set_kernel(Arc::new(KernelNotifier(session.notifier())));
            if options.prefetch {
                core.await_profile();
            }
            let session = session
                .spawn()
                .with_context(|| format!("cannot start serving {}", t.local.display()))?;
            daemon.sessions.push(session);
            daemon.warmed.push(Warmed {
                core,
                path: fuse_path.clone(),
            });
            phases.mark("FUSE init");
            daemon.mounted.push(Mounted {
                path: t.local.clone(),
                name: t.name.clone(),
                nodes,
                writable,
            });
            wait_ready(&fuse_path)?;
            phases.mark("readiness");
            raise_read_ahead(&fuse_path, options.read_ahead_kb);
            let mounted = daemon.mounted.last().expect("just pushed");
            if let Some(w) = &mounted.writable {
                w.mount_overlay()?;
                if let Err(e) = std::fs::metadata(&t.local) {
                    bail!(
                        "the writable overlay at {} does not answer: {e}",
                        t.local.display()
                    );
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        for m in &daemon.mounted {
            let _ = m.unmount(true);
        }
        for s in daemon.sessions.drain(..) {
            let _ = s.join();
        }
        return Err(e);
    }
    Ok(daemon)
}

fn mount_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    let hint = match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (mounting needs root with CAP_SYS_ADMIN, or the setuid fusermount3 from the fuse3 package; in a container pass --cap-add SYS_ADMIN --device /dev/fuse)"
        }
        Some(libc::ENODEV) | Some(libc::ENOENT) => " (is the fuse kernel module loaded? modprobe fuse; install fuse3)",
        Some(libc::EBUSY) => " (the mountpoint is busy)",
        _ => "",
    };
    anyhow::anyhow!("cannot mount {}: {e}{hint}", path.display())
}

/// Waits until `path` is served by FUSE (statfs says so and stat answers).
fn wait_ready(path: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if preflight::fs_type(path).ok() == Some(FUSE_SUPER_MAGIC)
            && std::fs::metadata(path).is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} was mounted but does not answer within {} s",
                path.display(),
                READY_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Best effort: raise the kernel's read-ahead for this mount through sysfs.
fn raise_read_ahead(path: &Path, kb: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(path) else {
        return;
    };
    let dev = md.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&sys, kb.to_string()) {
        Ok(()) => tracing::debug!("kernel read-ahead of {} set to {kb} KiB", path.display()),
        Err(e) => tracing::debug!("cannot set {sys}: {e} (kernel read-ahead stays at its default)"),
    }
}
