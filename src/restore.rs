//! `restore`: resolve the key, download the archive with concurrent
//! ETag-pinned range GETs, verify it, extract each saved path into a
//! temporary sibling and swap it in — so a failed restore leaves the previous
//! directory as it was.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use futures::stream::StreamExt;

use crate::archive::{self, ArchiveIndex, DataOffset, Entry, EntryKind, Manifest};
use crate::cache::version::refresh_lifetime;
use crate::paths::{names, Anchors, PathSpec};
use crate::progress::Progress;
use crate::store::{ObjectMeta, ObjectStore, StoreError};
use crate::tree::beneath::{self, BeneathError};
use crate::tree::extract::{check_safe, extract, ExtractOptions, Planned};

/// Size of one range GET of a download.
const DOWNLOAD_CHUNK: u64 = 8 << 20;
/// Range GETs in flight at once.
const DOWNLOAD_CONCURRENCY: usize = 8;
/// How often a download starts over after the object changed before giving up.
const MAX_VERSION_CHANGES: usize = 5;

/// What is being restored: an object in a store and whether its content is
/// fixed by its name (content-addressed blobs), in which case a changed ETag
/// (a lifetime refresh rewrote it) keeps every finished range.
pub struct Source<'a, S> {
    pub store: &'a S,
    pub key: String,
    pub content_addressed: bool,
    /// The SHA-256 the archive's index must have (cachemount blobs), if known.
    pub expected_digest: Option<String>,
    /// The key pointer that led here (`keys/<escaped key>`): its lifetime is
    /// refreshed with the blob's, so bucket expiry never takes one without the other.
    pub pointer: Option<String>,
    /// Refresh the lifetimes when the objects are older than this.
    pub refresh_after: Duration,
}

/// Downloads the whole object into `dest`, pinned to one version at a time.
pub async fn download<S: ObjectStore>(
    source: &Source<'_, S>,
    dest: &File,
    progress: &Progress,
) -> anyhow::Result<ObjectMeta> {
    let store = source.store;
    let mut meta = store
        .head(&source.key)
        .await
        .with_context(|| format!("cannot read {}", source.key))?;
    dest.set_len(meta.size)?;
    progress.start(meta.size);
    let chunks = meta.size.div_ceil(DOWNLOAD_CHUNK);
    let mut done = vec![false; chunks as usize];
    for _attempt in 0..=MAX_VERSION_CHANGES {
        let pin = meta.version.clone();
        let pending: Vec<u64> = (0..chunks).filter(|c| !done[*c as usize]).collect();
        let results: Vec<(u64, Result<(), StoreError>)> = futures::stream::iter(pending)
            .map(|c| {
                let pin = &pin;
                let size = meta.size;
                async move {
                    let range = c * DOWNLOAD_CHUNK..((c + 1) * DOWNLOAD_CHUNK).min(size);
                    let res = match store.get_range(&source.key, range.clone(), Some(pin)).await {
                        Ok(bytes) => dest
                            .write_all_at(&bytes, range.start)
                            .map(|_| progress.advance(bytes.len() as u64))
                            .map_err(|e| StoreError::Io {
                                context: "writing the download".into(),
                                error: e,
                            }),
                        Err(e) => Err(e),
                    };
                    (c, res)
                }
            })
            .buffer_unordered(DOWNLOAD_CONCURRENCY)
            .collect()
            .await;
        let mut changed = false;
        for (c, res) in results {
            match res {
                Ok(()) => done[c as usize] = true,
                Err(StoreError::PreconditionFailed(_)) => changed = true,
                Err(e) => return Err(e).with_context(|| format!("cannot download {}", source.key)),
            }
        }
        if !changed {
            return Ok(meta);
        }
        let new_meta = store
            .head(&source.key)
            .await
            .with_context(|| format!("cannot read {}", source.key))?;
        tracing::info!(key = %source.key, old = %meta.version.etag, new = %new_meta.version.etag, "object changed during download");
        if !source.content_addressed || new_meta.size != meta.size {
            done.iter_mut().for_each(|d| *d = false);
            dest.set_len(0)?;
            dest.set_len(new_meta.size)?;
        }
        meta = new_meta;
    }
    bail!(
        "{} kept changing during the download ({} times); try again",
        source.key,
        MAX_VERSION_CHANGES + 1
    )
}

/// One saved path to restore or mount: archive name → local path.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: Vec<u8>,
    pub local: PathBuf,
    /// The ancestor of `local` up to which symlinks are the user's own (a
    /// PATH the user gave, or the anchor: the working dir, home, `/`). Below
    /// it, the directories come from the archive's names, so no symlink there
    /// is followed (DESIGN §7).
    pub trusted: PathBuf,
}

impl Target {
    /// Opens the directory that holds `local` without following a symlink
    /// below [`Target::trusted`], making missing directories on the way.
    pub fn open_parent(&self) -> Result<OwnedFd, BeneathError> {
        let parent = self.local.parent().unwrap_or(Path::new("/"));
        let base = beneath::open_trusted_dir(&self.trusted)?;
        let below = parent.strip_prefix(&self.trusted).unwrap_or(Path::new(""));
        beneath::open_dir_beneath(base.as_fd(), below, true, &self.trusted)
    }

    /// For a mount: the parents exist and hold no symlink below
    /// [`Target::trusted`], and the target itself is not a symlink (a mount
    /// there would land wherever it points).
    pub fn check_mountable(&self) -> anyhow::Result<()> {
        let parent = self
            .open_parent()
            .with_context(|| format!("cannot mount at {}", self.local.display()))?;
        let st = rustix::fs::statat(
            &parent,
            self.file_name(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        );
        if st.is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK) {
            bail!(
                "cannot mount at {}: it is a symlink (cachemount never mounts through one); remove it",
                self.local.display()
            );
        }
        Ok(())
    }

    /// The target's own name in its parent directory.
    fn file_name(&self) -> &OsStr {
        self.local.file_name().unwrap_or(OsStr::new("root"))
    }
}

/// Why the paths a cache declares cannot be restored or mounted.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("refusing to restore into {0} itself: the cache holds the whole {1}, and restoring it would replace everything in it; name the PATHs inside it to restore instead (for example `cachemount restore … ~/.cache/pip`)")]
    WholeAnchor(PathBuf, &'static str),
    #[error("refusing this cache: its paths {0} and {1} overlap (a crafted archive, or two namespaces mapped to one place), so one would write into the other")]
    Overlap(PathBuf, PathBuf),
}

/// Which archive names go where. With `specs`, those paths; otherwise the
/// paths the archive holds at their anchors (see [`saved_roots`]). A zip
/// without a Buildkite manifest extracts whole into the one path given.
/// The targets are checked together: none is the home directory or `/`
/// itself, and none lies inside another.
pub fn plan_targets(
    index: &ArchiveIndex,
    specs: &[PathSpec],
    anchors: &Anchors,
) -> anyhow::Result<Vec<Target>> {
    let has = |name: &[u8]| index.entries.iter().any(|e| names::within(&e.name, name));
    let user_target = |name: Vec<u8>, spec: &PathSpec| {
        let local = spec.local_path(anchors);
        let trusted = local.parent().unwrap_or(Path::new("/")).to_path_buf();
        Target {
            name,
            local,
            trusted,
        }
    };
    let targets = if index.manifest.mappings.is_empty() {
        let [spec] = specs else {
            bail!("this zip has no Buildkite cache manifest, so it does not say where its files belong: give exactly one PATH to extract it into");
        };
        vec![user_target(Vec::new(), spec)]
    } else if !specs.is_empty() {
        specs
            .iter()
            .map(|spec| {
                let name = spec
                    .existing_archive_name(&index.manifest)
                    .filter(|n| has(n));
                let Some(name) = name else {
                    bail!(
                        "path {:?} is not in this cache (it holds: {})",
                        spec.given,
                        describe_roots(index, anchors)
                    );
                };
                Ok(user_target(name, spec))
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        saved_roots(index)
            .into_iter()
            .map(|name| target_of(&index.manifest, name, anchors))
            .collect::<anyhow::Result<_>>()?
    };
    check_targets(&targets, anchors)?;
    Ok(targets)
}

/// Refuses a set of targets that would replace home or `/` whole, or where
/// one target lies inside another (checked lexically here; symlinks below
/// the trusted dirs are refused when the parents are opened).
fn check_targets(targets: &[Target], anchors: &Anchors) -> Result<(), PlanError> {
    for t in targets {
        if t.local == Path::new("/") {
            return Err(PlanError::WholeAnchor(t.local.clone(), "root file system"));
        }
        if t.local == anchors.home {
            return Err(PlanError::WholeAnchor(t.local.clone(), "home directory"));
        }
    }
    let mut locals: Vec<&Path> = targets.iter().map(|t| t.local.as_path()).collect();
    locals.sort();
    for pair in locals.windows(2) {
        if pair[1].starts_with(pair[0]) {
            return Err(PlanError::Overlap(
                pair[0].to_path_buf(),
                pair[1].to_path_buf(),
            ));
        }
    }
    Ok(())
}

/// The paths an archive holds, as archive names. A cachemount archive has an
/// entry for every saved path, so those are its entries without an ancestor
/// entry. A foreign zip (Buildkite's among them) may have no directory
/// entries at all, so there a namespace's path is the deepest one that holds
/// all its entries — per first component, so that a namespace holding
/// `vendor/bundle/…` and `node_modules/…` never becomes the whole working
/// dir. (A directory entry for the namespace itself carries only the
/// anchor's metadata and names no path.)
pub fn saved_roots(index: &ArchiveIndex) -> Vec<Vec<u8>> {
    let foreign = index
        .entries
        .iter()
        .any(|e| matches!(e.offset, DataOffset::LocalHeader(_)));
    if foreign {
        deepest_common_roots(index)
    } else {
        top_level_entries(index)
    }
}

fn top_level_entries(index: &ArchiveIndex) -> Vec<Vec<u8>> {
    use std::collections::HashSet;
    let names: HashSet<&[u8]> = index.entries.iter().map(|e| e.name.as_slice()).collect();
    index
        .entries
        .iter()
        .filter(|e| !names::ancestors(&e.name).any(|a| names.contains(a)))
        .map(|e| e.name.clone())
        .collect()
}

fn deepest_common_roots(index: &ArchiveIndex) -> Vec<Vec<u8>> {
    use std::collections::BTreeMap;
    /// (namespace, first component) → the components all its entries share.
    type Groups<'a> = BTreeMap<(&'a [u8], &'a [u8]), Vec<&'a [u8]>>;
    let mut groups = Groups::new();
    for e in &index.entries {
        let (ns, rest) = names::split_namespace(&e.name);
        let Some(rest) = rest else {
            if e.kind != EntryKind::Dir {
                groups.entry((ns, b"")).or_default();
            }
            continue;
        };
        let parts: Vec<&[u8]> = rest.split(|b| *b == b'/').collect();
        match groups.entry((ns, parts[0])) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(parts);
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                let common = o.get_mut();
                let shared = common
                    .iter()
                    .zip(&parts)
                    .take_while(|(a, b)| a == b)
                    .count();
                common.truncate(shared);
            }
        }
    }
    groups
        .into_iter()
        .map(|((ns, _), common)| {
            let mut name = ns.to_vec();
            for part in common.iter().filter(|p| !p.is_empty()) {
                name.push(b'/');
                name.extend_from_slice(part);
            }
            name
        })
        .collect()
}

fn describe_roots(index: &ArchiveIndex, anchors: &Anchors) -> String {
    saved_roots(index)
        .into_iter()
        .map(|r| {
            let shown = String::from_utf8_lossy(&r).into_owned();
            target_of(&index.manifest, r, anchors).map_or(shown, |t| t.local.display().to_string())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where archive name `_i/rel` belongs on this machine.
pub fn local_path_of(
    manifest: &Manifest,
    name: &[u8],
    anchors: &Anchors,
) -> anyhow::Result<PathBuf> {
    Ok(target_of(manifest, name.to_vec(), anchors)?.local)
}

fn target_of(manifest: &Manifest, name: Vec<u8>, anchors: &Anchors) -> anyhow::Result<Target> {
    let (ns, rel) = names::split_namespace(&name);
    let ns = std::str::from_utf8(ns).unwrap_or_default();
    let Some(anchor) = manifest.anchor_of(ns) else {
        bail!(
            "refusing archive entry {:?}: it is in no namespace of the cache manifest, so it has no place to go",
            String::from_utf8_lossy(&name)
        );
    };
    let rel = Path::new(OsStr::from_bytes(rel.unwrap_or_default()));
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        bail!(
            "refusing archive entry {:?}: it would land outside its base",
            String::from_utf8_lossy(&name)
        );
    }
    let base = anchors.resolve(anchor);
    let local = base.join(rel);
    // The anchor itself (a saved `.`) is held by its parent, which is the user's.
    let trusted = if rel.as_os_str().is_empty() {
        base.parent().unwrap_or(Path::new("/")).to_path_buf()
    } else {
        base
    };
    Ok(Target {
        name,
        local,
        trusted,
    })
}

/// The entries below `target.name`, with their paths relative to it.
fn plan_entries<'a>(index: &'a ArchiveIndex, target: &Target) -> Vec<Planned<'a>> {
    index
        .entries
        .iter()
        .filter_map(|e: &'a Entry| {
            let rel: &[u8] = if target.name.is_empty() {
                &e.name
            } else {
                names::strip_within(&e.name, &target.name)?
            };
            Some(Planned {
                entry: e,
                relative: PathBuf::from(OsStr::from_bytes(rel)),
            })
        })
        .collect()
}

/// A target extracted next to where it goes, waiting to be swapped in.
struct Staged<'t> {
    target: &'t Target,
    parent: OwnedFd,
    name: OsString,
}

impl Staged<'_> {
    fn remove(&self) {
        if let Err(e) = beneath::remove_at(self.parent.as_fd(), &self.name) {
            tracing::warn!(path = %self.target.local.display(), error = %e, "cannot remove a staged restore");
        }
    }
}

/// Extracts every target from the downloaded `archive` and swaps them in.
/// Nothing is swapped unless every target extracted and verified; a swap
/// that fails removes what is still staged.
pub fn extract_targets(
    archive: &File,
    index: &ArchiveIndex,
    targets: &[Target],
    options: ExtractOptions,
) -> anyhow::Result<()> {
    let mut staged: Vec<Staged<'_>> = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for t in targets {
            let planned = plan_entries(index, t);
            check_safe(&planned)?;
            let parent = t
                .open_parent()
                .with_context(|| format!("cannot restore {}", t.local.display()))?;
            sweep_leftovers(parent.as_fd(), t);
            let name = staging_name(t.file_name(), "restoring");
            let shown = t.local.with_file_name(&name);
            let s = Staged {
                target: t,
                parent,
                name,
            };
            let extracted = extract(
                archive,
                &planned,
                s.parent.as_fd(),
                &s.name,
                &shown,
                options,
            );
            staged.push(s);
            extracted.with_context(|| format!("cannot restore {}", t.local.display()))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        staged.iter().for_each(Staged::remove);
        return Err(e);
    }
    for (i, s) in staged.iter().enumerate() {
        let aside = staging_name(s.target.file_name(), "old");
        if let Err(e) = beneath::replace_at(s.parent.as_fd(), &s.name, s.target.file_name(), &aside)
        {
            staged[i..].iter().for_each(Staged::remove);
            return Err(e).with_context(|| {
                format!(
                    "cannot move the restored {} into place",
                    s.target.local.display()
                )
            });
        }
    }
    Ok(())
}

/// `.{name}.cachemount-{what}-{pid}-{nonce}`: hidden, next to its target, and
/// recognisable by [`sweep_leftovers`].
fn staging_name(name: &OsStr, what: &str) -> OsString {
    let mut staged = OsString::from(".");
    staged.push(name);
    staged.push(format!(
        ".cachemount-{what}-{}-{:08x}",
        std::process::id(),
        rand_nonce()
    ));
    staged
}

/// Removes staging and set-aside trees of `target` that a killed restore
/// left in its parent: only names of [`staging_name`]'s form for this
/// target, and only when the process that made them is gone.
fn sweep_leftovers(parent: BorrowedFd<'_>, target: &Target) {
    let Ok(names) = beneath::list_at(parent) else {
        return;
    };
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(target.file_name().as_bytes());
    prefix.extend_from_slice(b".cachemount-");
    for n in names {
        let Some(rest) = n.as_bytes().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        let rest = String::from_utf8_lossy(rest);
        let mut parts = rest.split('-');
        let (Some("restoring" | "old"), Some(pid), Some(nonce), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        if nonce.len() != 8 || process_alive(pid) {
            continue;
        }
        tracing::info!(path = %target.local.with_file_name(&n).display(), "removing what a killed restore left behind");
        if let Err(e) = beneath::remove_at(parent, &n) {
            tracing::warn!(error = %e, "cannot remove a leftover staging dir");
        }
    }
}

fn process_alive(pid: i32) -> bool {
    if pid <= 0 || pid as u32 == std::process::id() {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn rand_nonce() -> u32 {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(16)
}

/// What `restore` did.
#[derive(Debug)]
pub struct RestoreReport {
    pub restored: Vec<PathBuf>,
    pub archive_size: u64,
}

/// Restores `source` into the paths `specs` name (all its paths when empty).
pub async fn restore<S: ObjectStore>(
    source: Source<'_, S>,
    specs: &[PathSpec],
    anchors: &Anchors,
    options: ExtractOptions,
    progress: Progress,
) -> anyhow::Result<RestoreReport> {
    let mut downloads = 0;
    let (targets, meta) = loop {
        let (file, meta) = match source.store.open_local(&source.key) {
            // A local store: read the archive in place (the open file pins its version).
            Some(opened) => opened.with_context(|| format!("cannot read {}", source.key))?,
            None => {
                let tmp = tempfile::tempfile()
                    .context("cannot create a temporary file for the download")?;
                let meta = download(&source, &tmp, &progress).await?;
                downloads += 1;
                (tmp, meta)
            }
        };
        progress.finish();
        match verify_and_extract(&source, file, &meta, specs, anchors, options).await {
            Ok(targets) => break (targets, meta),
            // Damage may have happened in transit: download once more before
            // blaming the stored bytes. The previous targets are untouched.
            Err(e) if downloads == 1 && is_corruption(&e) => {
                tracing::warn!(key = %source.key, error = %format!("{e:#}"), "corrupt data after download; downloading once more");
            }
            Err(e) => return Err(e),
        }
    };
    refresh_lifetime(source.store, &source.key, source.refresh_after).await;
    if let Some(pointer) = &source.pointer {
        refresh_lifetime(source.store, pointer, source.refresh_after).await;
    }
    Ok(RestoreReport {
        restored: targets.into_iter().map(|t| t.local).collect(),
        archive_size: meta.size,
    })
}

/// Opens the archive in `file`, checks it against its name, and extracts it.
async fn verify_and_extract<S: ObjectStore>(
    source: &Source<'_, S>,
    file: File,
    meta: &ObjectMeta,
    specs: &[PathSpec],
    anchors: &Anchors,
    options: ExtractOptions,
) -> anyhow::Result<Vec<Target>> {
    let archive = Arc::new(file);
    let index = archive::open_file(&archive).map_err(|e| {
        anyhow::Error::new(e).context(format!("{} is not a readable cache archive", source.key))
    })?;
    if let Some(expected) = &source.expected_digest {
        verify_digest(&archive, meta, expected)
            .with_context(|| format!("{} does not match its name", source.key))?;
    }
    let targets = plan_targets(&index, specs, anchors)?;
    let planned = targets.clone();
    tokio::task::spawn_blocking(move || extract_targets(&archive, &index, &planned, options))
        .await??;
    Ok(targets)
}

/// Whether `e` says the archive's bytes are damaged (rather than, say, the disk being full).
fn is_corruption(e: &anyhow::Error) -> bool {
    use crate::archive::decode::DecodeError;
    use crate::tree::extract::ExtractError;
    e.chain().any(|cause| {
        cause.is::<archive::FormatError>()
            || matches!(
                cause.downcast_ref::<archive::OpenError<std::io::Error>>(),
                Some(archive::OpenError::Format(_))
            )
            || matches!(
                cause.downcast_ref::<DecodeError>(),
                Some(DecodeError::Corrupt(_))
            )
            || matches!(
                cause.downcast_ref::<ExtractError>(),
                Some(ExtractError::Decode(DecodeError::Corrupt(_)))
            )
    })
}

/// A cachemount blob's name is the SHA-256 of its index; the index's own
/// check (in the reader) proves the index matches the EOCD comment, and this
/// proves the comment names the blob. Foreign blobs are named by their bytes.
fn verify_digest(archive: &File, meta: &ObjectMeta, expected: &str) -> anyhow::Result<()> {
    let tail_len = meta.size.min(archive::zip::MAX_EOCD_SEARCH as u64);
    let mut tail = vec![0u8; tail_len as usize];
    archive.read_exact_at(&mut tail, meta.size - tail_len)?;
    if let Some(digest) = archive::reader::tail_index_digest(&tail, meta.size)? {
        if digest != expected {
            bail!("its index digest is not {expected}");
        }
        return Ok(());
    }
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < meta.size {
        let n = archive.read_at(&mut buf, pos)?;
        if n == 0 {
            bail!("archive is truncated");
        }
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        bail!("its SHA-256 is {actual}, not {expected}");
    }
    Ok(())
}
