//! `restore`: resolve the key, download the archive with concurrent
//! ETag-pinned range GETs ([`download`]), verify it, extract each saved path
//! into a temporary sibling and swap it in — so a failed restore leaves the
//! previous directory as it was.
//!
//! A key's cachemount archive is downloaded by parts: its index, then only
//! the entries the restored paths hold and the host's disk cache does not
//! (those are copied from it, checked).

mod download;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use rayon::prelude::*;

use crate::archive::{self, ArchiveIndex, Entry};
use crate::cache::disk::{DiskCache, DiskOptions, EntryKey};
use crate::cache::version::refresh_lifetime;
use crate::paths::{names, plan_targets, Anchors, PathSpec, Target};
use crate::progress::Progress;
use crate::store::{ObjectMeta, ObjectStore};
use crate::tree::beneath::{self};
use crate::tree::extract::{check_safe, extract, CachedContent, ExtractOptions, Planned};
use download::{entry_range, Download, DownloadError};

/// How often a restore starts over after the object changed under it.
const MAX_RESTARTS: usize = 5;

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

/// The entries below `target.name`, with their paths relative to it and
/// their content from the disk cache when `cached` has it (by entry index).
fn plan_entries<'a>(
    index: &'a ArchiveIndex,
    target: &Target,
    cached: &'a HashMap<usize, CachedEntry>,
) -> Vec<Planned<'a>> {
    index
        .entries
        .iter()
        .enumerate()
        .filter_map(|(i, e): (usize, &'a Entry)| {
            let rel = within(e, target)?;
            Some(Planned {
                entry: e,
                relative: PathBuf::from(OsStr::from_bytes(rel)),
                cached: cached.get(&i).map(|c| c as &dyn CachedContent),
            })
        })
        .collect()
}

/// `e`'s name relative to `target`, if it is below it.
fn within<'e>(e: &'e Entry, target: &Target) -> Option<&'e [u8]> {
    if target.name.is_empty() {
        Some(&e.name)
    } else {
        names::strip_within(&e.name, &target.name)
    }
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
    cached: &HashMap<usize, CachedEntry>,
    options: ExtractOptions,
) -> anyhow::Result<()> {
    let mut staged: Vec<Staged<'_>> = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for t in targets {
            let planned = plan_entries(index, t, cached);
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
    /// Files (and their bytes) copied from the disk cache, not downloaded.
    pub from_disk_files: u64,
    pub from_disk_bytes: u64,
}

/// An archive ready to extract: its bytes in a local file (all of them, or
/// all that extracting `targets` reads besides `cached`), checked against
/// its name.
struct Prepared {
    file: File,
    meta: ObjectMeta,
    index: ArchiveIndex,
    targets: Vec<Target>,
    /// Entries (by index) whose content comes from the disk cache.
    cached: HashMap<usize, CachedEntry>,
}

/// Restores `source` into the paths `specs` name (all its paths when
/// empty), taking files from the disk cache at `disk` where it holds them.
pub async fn restore<S: ObjectStore>(
    source: Source<'_, S>,
    specs: &[PathSpec],
    anchors: &Anchors,
    options: ExtractOptions,
    disk: Option<&DiskOptions>,
    progress: Progress,
) -> anyhow::Result<RestoreReport> {
    // Only a key's blob never changes content (see the mount's disk cache).
    let disk = disk
        .filter(|_| source.content_addressed)
        .and_then(|o| match DiskCache::open(o) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::warn!("{e}; downloading every file");
                None
            }
        });
    let (mut restarts, mut downloads) = (0, 0);
    let (targets, meta, from_disk) = loop {
        let prepared = match source.store.open_local(&source.key) {
            // A local store: read the archive in place (the open file pins its version).
            Some(opened) => {
                let (file, meta) = opened.with_context(|| format!("cannot read {}", source.key))?;
                prepare_local(&source, file, meta, specs, anchors)
            }
            None => {
                downloads += 1;
                prepare_download(&source, specs, anchors, disk.as_ref(), &progress).await
            }
        };
        progress.finish();
        let outcome = match prepared {
            Ok(p) => {
                let from_disk = (
                    p.cached.len() as u64,
                    p.cached.keys().map(|&i| p.index.entries[i].size).sum(),
                );
                extract_prepared(p, options)
                    .await
                    .map(|(targets, meta)| (targets, meta, from_disk))
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(done) => break done,
            Err(e) if is_changed(&e) || is_entry_gone(&e) => {
                if restarts == MAX_RESTARTS {
                    return Err(
                        DownloadError::KeptChanging(source.key.clone(), restarts + 1).into(),
                    );
                }
                restarts += 1;
                tracing::info!(key = %source.key, error = %format!("{e:#}"), "starting the restore over");
            }
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
        from_disk_files: from_disk.0,
        from_disk_bytes: from_disk.1,
    })
}

/// An archive of a local store, read in place.
fn prepare_local<S>(
    source: &Source<'_, S>,
    file: File,
    meta: ObjectMeta,
    specs: &[PathSpec],
    anchors: &Anchors,
) -> anyhow::Result<Prepared> {
    let index = archive::open_file(&file).map_err(|e| unreadable(source, e))?;
    if let Some(expected) = &source.expected_digest {
        verify_digest(&file, &meta, expected)
            .with_context(|| format!("{} does not match its name", source.key))?;
    }
    let targets = plan_targets(&index, specs, anchors)?;
    Ok(Prepared {
        file,
        meta,
        index,
        targets,
        cached: HashMap::new(),
    })
}

/// Downloads what the restore needs. A key's cachemount archive (its tail
/// names its index digest, so the index alone proves every entry's
/// content) is fetched by parts: only the entries of the restored paths
/// that `disk` does not hold. Anything else is fetched whole.
async fn prepare_download<S: ObjectStore>(
    source: &Source<'_, S>,
    specs: &[PathSpec],
    anchors: &Anchors,
    disk: Option<&Arc<DiskCache>>,
    progress: &Progress,
) -> anyhow::Result<Prepared> {
    let download = Download::start(source).await?;
    let index = download.open_index().await?;
    let by_parts = source.content_addressed && download.tail_digest()?.is_some();
    if !by_parts {
        download.fetch_all(progress).await?;
    }
    let meta = download.meta();
    if let Some(expected) = &source.expected_digest {
        verify_digest(download.file(), &meta, expected)
            .with_context(|| format!("{} does not match its name", source.key))?;
    }
    let targets = plan_targets(&index, specs, anchors)?;
    let mut cached = HashMap::new();
    if by_parts {
        let wanted = wanted_entries(&index, &targets);
        if let Some(disk) = disk {
            cached = cached_entries(disk, source, &meta, &index, &wanted).await?;
        }
        let ranges: Vec<_> = wanted
            .iter()
            .filter(|i| !cached.contains_key(i))
            .map(|&i| entry_range(&index.entries[i], meta.size))
            .collect();
        download.fetch(&ranges, progress).await?;
    }
    let meta = download.meta();
    Ok(Prepared {
        file: download.into_file(),
        meta,
        index,
        targets,
        cached,
    })
}

/// The entries (by index) below any of `targets` whose data extraction reads.
fn wanted_entries(index: &ArchiveIndex, targets: &[Target]) -> Vec<usize> {
    index
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| match e.kind {
            archive::EntryKind::File => e.compressed_size > 0,
            archive::EntryKind::Symlink => e.link_target.is_none(),
            archive::EntryKind::Dir => false,
        })
        .filter(|(_, e)| targets.iter().any(|t| within(e, t).is_some()))
        .map(|(i, _)| i)
        .collect()
}

/// A file the disk cache was found to hold (checked) when the restore
/// planned its downloads.
pub struct CachedEntry {
    disk: Arc<DiskCache>,
    key: EntryKey,
    size: u64,
}

/// The disk cache entry went away (evicted by another process) between
/// planning and extraction: its bytes were not downloaded, so the restore
/// starts over.
#[derive(Debug, thiserror::Error)]
#[error("a disk cache entry went away during the restore")]
struct EntryGone;

impl CachedContent for CachedEntry {
    fn open(&self) -> std::io::Result<File> {
        self.disk
            .reopen_entry(&self.key, self.size)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, EntryGone))
    }
}

/// Whether `e` says a disk cache entry the restore counted on went away.
fn is_entry_gone(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| inner.is::<EntryGone>())
    })
}

/// The smallest entry (archive bytes) a restore takes from the disk cache.
/// Smaller ones are downloaded even when cached: they lie side by side in
/// the archive, so a few large GETs carry thousands of them, while each one
/// taken from the cache is a random open, a read to check it and a copy. A
/// 40k-file tree (plus 2 x 200 MB) whose files were all cached restored in
/// 3.5-4.0 s from the cache against 1.1-1.2 s downloaded from SeaweedFS on
/// this host; its large files are what the cache saves.
const FROM_DISK_MIN: u64 = 1 << 20;

/// The `wanted` entries of at least [`FROM_DISK_MIN`] archive bytes that the
/// disk cache holds (each checked once now).
async fn cached_entries<S: ObjectStore>(
    disk: &Arc<DiskCache>,
    source: &Source<'_, S>,
    meta: &ObjectMeta,
    index: &ArchiveIndex,
    wanted: &[usize],
) -> anyhow::Result<HashMap<usize, CachedEntry>> {
    let namespace = source.store.describe();
    let keys: Vec<(usize, EntryKey, u64)> = wanted
        .iter()
        .map(|&i| (i, &index.entries[i]))
        .filter(|(_, e)| disk.may_hold(e) && e.compressed_size >= FROM_DISK_MIN)
        .map(|(i, e)| {
            let key = EntryKey::of_entry(
                &namespace,
                &source.key,
                &meta.version,
                meta.size,
                i as u32,
                e,
            );
            (i, key, e.size)
        })
        .collect();
    let disk = disk.clone();
    // Each hit is read whole to check it: off the async threads, in parallel.
    let found = tokio::task::spawn_blocking(move || {
        keys.into_par_iter()
            .filter(|(_, key, size)| disk.open_entry(key, *size).is_some())
            .map(|(i, key, size)| {
                let disk = disk.clone();
                (i, CachedEntry { disk, key, size })
            })
            .collect::<HashMap<usize, CachedEntry>>()
    })
    .await?;
    Ok(found)
}

/// Extracts a prepared archive (off the async threads).
async fn extract_prepared(
    p: Prepared,
    options: ExtractOptions,
) -> anyhow::Result<(Vec<Target>, ObjectMeta)> {
    let Prepared {
        file,
        meta,
        index,
        targets,
        cached,
    } = p;
    let planned = targets.clone();
    tokio::task::spawn_blocking(move || extract_targets(&file, &index, &planned, &cached, options))
        .await??;
    Ok((targets, meta))
}

fn unreadable<S>(source: &Source<'_, S>, e: archive::OpenError<std::io::Error>) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("{} is not a readable cache archive", source.key))
}

/// Whether `e` says the object holds other content than when the restore began.
fn is_changed(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref(), Some(DownloadError::Changed(_)))
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
