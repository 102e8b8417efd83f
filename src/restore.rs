//! `restore`: resolve the key, download the archive with concurrent
//! ETag-pinned range GETs, verify it, extract each saved path into a
//! temporary sibling and swap it in — so a failed restore leaves the previous
//! directory as it was.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use futures::stream::StreamExt;

use crate::archive::{self, ArchiveIndex, Entry};
use crate::cache::version::refresh_lifetime;
use crate::paths::{names, plan_targets, Anchors, PathSpec, Target};
use crate::progress::Progress;
use crate::store::{ObjectMeta, ObjectStore, StoreError};
use crate::tree::beneath::{self};
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
