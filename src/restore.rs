//! `restore`: resolve the key, download the archive with concurrent
//! ETag-pinned range GETs, verify it, extract each saved path into a
//! temporary sibling and swap it in — so a failed restore leaves the previous
//! directory as it was.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use futures::stream::StreamExt;

use crate::archive::{self, ArchiveIndex, Entry, Manifest};
use crate::paths::{Anchors, PathSpec};
use crate::progress::Progress;
use crate::store::{ObjectMeta, ObjectStore, RefreshOutcome, StoreError};
use crate::tree::extract::{check_safe, extract, Planned};

/// Size of one range GET of a download.
const DOWNLOAD_CHUNK: u64 = 8 << 20;
/// Range GETs in flight at once.
const DOWNLOAD_CONCURRENCY: usize = 8;
/// How often a download starts over after the object changed before giving up.
const MAX_VERSION_CHANGES: usize = 5;
/// Blobs older than this get their lifetime refreshed (DESIGN §2).
pub const REFRESH_AFTER: Duration = Duration::from_secs(12 * 3600);

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

/// How old an object must be for `mount` and `restore` to refresh it:
/// [`REFRESH_AFTER`], or `CACHEMOUNT_REFRESH_AFTER_SECS` (to match a bucket
/// lifecycle rule, or 0 to refresh every time).
pub fn refresh_after() -> Duration {
    std::env::var("CACHEMOUNT_REFRESH_AFTER_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(REFRESH_AFTER, Duration::from_secs)
}

/// Refreshes the blob's lifetime, best effort (never fails the command).
pub async fn refresh_lifetime<S: ObjectStore>(store: &S, key: &str) {
    let threshold = SystemTime::now() - refresh_after();
    match store.refresh(key, threshold).await {
        Ok(RefreshOutcome::Refreshed) => tracing::info!(%key, "refreshed the cache's lifetime"),
        Ok(RefreshOutcome::StillFresh) => {
            tracing::debug!(%key, "cache is young; no lifetime refresh")
        }
        Err(e) => {
            tracing::warn!(%key, error = %e, "could not refresh the cache's lifetime (the restore is fine)")
        }
    }
}

/// One saved path to restore: archive name → local path.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: Vec<u8>,
    pub local: PathBuf,
}

/// Which archive names go where. With `specs`, those paths; otherwise every
/// top-level path of the archive at its anchor. A zip without a Buildkite
/// manifest extracts whole into the one path given.
pub fn plan_targets(
    index: &ArchiveIndex,
    specs: &[PathSpec],
    anchors: &Anchors,
) -> anyhow::Result<Vec<Target>> {
    let has = |name: &[u8]| {
        index.entries.iter().any(|e| {
            e.name == name || (e.name.starts_with(name) && e.name.get(name.len()) == Some(&b'/'))
        })
    };
    if index.manifest.mappings.is_empty() {
        let [spec] = specs else {
            bail!("this zip has no Buildkite cache manifest, so it does not say where its files belong: give exactly one PATH to extract it into");
        };
        return Ok(vec![Target {
            name: Vec::new(),
            local: spec.local_path(anchors),
        }]);
    }
    if !specs.is_empty() {
        return specs
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
                Ok(Target {
                    name,
                    local: spec.local_path(anchors),
                })
            })
            .collect();
    }
    roots(index)
        .into_iter()
        .map(|name| {
            Ok(Target {
                local: local_path_of(&index.manifest, &name, anchors)?,
                name,
            })
        })
        .collect()
}

/// Top-level names: entries with no ancestor entry. Foreign zips often have
/// no directory entries; there a deep file's root is the first directory of
/// its namespace (restoring `_0/deps/a/b.js` replaces `./deps`), while a
/// cachemount archive always has an entry for each saved path itself.
pub fn roots(index: &ArchiveIndex) -> Vec<Vec<u8>> {
    use std::collections::{BTreeSet, HashSet};
    let names: HashSet<&[u8]> = index.entries.iter().map(|e| e.name.as_slice()).collect();
    let parents = |name: &[u8]| -> Vec<usize> {
        name.iter()
            .enumerate()
            .filter(|(_, b)| **b == b'/')
            .map(|(i, _)| i)
            .collect()
    };
    let mut candidates: BTreeSet<&[u8]> = BTreeSet::new();
    for e in &index.entries {
        let slashes = parents(&e.name);
        if slashes.iter().any(|&i| names.contains(&e.name[..i])) {
            continue;
        }
        let implied_dirs = e.content_hash.is_none() && slashes.len() >= 2;
        candidates.insert(if implied_dirs {
            &e.name[..slashes[1]]
        } else {
            &e.name
        });
    }
    candidates
        .iter()
        .filter(|c| !parents(c).iter().any(|&i| candidates.contains(&c[..i])))
        .map(|c| c.to_vec())
        .collect()
}

fn describe_roots(index: &ArchiveIndex, anchors: &Anchors) -> String {
    roots(index)
        .iter()
        .map(|r| {
            local_path_of(&index.manifest, r, anchors).map_or_else(
                |_| String::from_utf8_lossy(r).into_owned(),
                |p| p.display().to_string(),
            )
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
    let (ns, rel) = match name.iter().position(|b| *b == b'/') {
        Some(i) => (&name[..i], &name[i + 1..]),
        None => (name, &b""[..]),
    };
    let ns = std::str::from_utf8(ns).unwrap_or_default();
    let Some(anchor) = manifest.anchor_of(ns) else {
        bail!(
            "refusing archive entry {:?}: it is in no namespace of the cache manifest, so it has no place to go",
            String::from_utf8_lossy(name)
        );
    };
    let rel = Path::new(std::ffi::OsStr::from_bytes(rel));
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        bail!(
            "refusing archive entry {:?}: it would land outside its base",
            String::from_utf8_lossy(name)
        );
    }
    Ok(anchors.resolve(anchor).join(rel))
}

/// The entries below `target.name`, with their paths relative to it.
fn plan_entries<'a>(index: &'a ArchiveIndex, target: &Target) -> Vec<Planned<'a>> {
    index
        .entries
        .iter()
        .filter_map(|e: &'a Entry| {
            let rel: &[u8] = if target.name.is_empty() {
                &e.name
            } else if e.name == target.name {
                b""
            } else if e.name.starts_with(&target.name)
                && e.name.get(target.name.len()) == Some(&b'/')
            {
                &e.name[target.name.len() + 1..]
            } else {
                return None;
            };
            Some(Planned {
                entry: e,
                relative: PathBuf::from(std::ffi::OsStr::from_bytes(rel)),
            })
        })
        .collect()
}

/// Extracts every target from the downloaded `archive` and swaps them in.
/// Nothing is swapped unless every target extracted and verified.
pub fn extract_targets(
    archive: &File,
    index: &ArchiveIndex,
    targets: &[Target],
) -> anyhow::Result<()> {
    let preserve_owner = unsafe { libc::geteuid() } == 0;
    let mut staged: Vec<(PathBuf, &Target)> = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for t in targets {
            let planned = plan_entries(index, t);
            check_safe(&planned)?;
            let parent = t.local.parent().unwrap_or(Path::new("/"));
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
            let tmp = sibling(&t.local, "restoring");
            staged.push((tmp.clone(), t));
            extract(archive, &planned, &tmp, preserve_owner)
                .with_context(|| format!("cannot restore {}", t.local.display()))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for (tmp, _) in &staged {
            remove_any(tmp);
        }
        return Err(e);
    }
    for (tmp, t) in staged {
        let old = sibling(&t.local, "old");
        let had_old = std::fs::symlink_metadata(&t.local).is_ok();
        if had_old {
            std::fs::rename(&t.local, &old)
                .with_context(|| format!("cannot move {} aside", t.local.display()))?;
        }
        if let Err(e) = std::fs::rename(&tmp, &t.local) {
            if had_old {
                let _ = std::fs::rename(&old, &t.local);
            }
            remove_any(&tmp);
            return Err(e).with_context(|| {
                format!("cannot move the restored {} into place", t.local.display())
            });
        }
        if had_old {
            remove_any(&old);
        }
    }
    Ok(())
}

fn sibling(path: &Path, what: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into());
    let nonce: u32 = rand_nonce();
    path.with_file_name(format!(
        ".{name}.cachemount-{what}-{}-{nonce:08x}",
        std::process::id()
    ))
}

fn rand_nonce() -> u32 {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(16)
}

/// Removes a file or a tree, making read-only directories writable first.
fn remove_any(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return;
    };
    if md.is_dir() {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
        if let Ok(rd) = std::fs::read_dir(path) {
            for e in rd.flatten() {
                remove_any(&e.path());
            }
        }
        let _ = std::fs::remove_dir(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
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
        match verify_and_extract(&source, file, &meta, specs, anchors).await {
            Ok(targets) => break (targets, meta),
            // Damage may have happened in transit: download once more before
            // blaming the stored bytes. The previous targets are untouched.
            Err(e) if downloads == 1 && is_corruption(&e) => {
                tracing::warn!(key = %source.key, error = %format!("{e:#}"), "corrupt data after download; downloading once more");
            }
            Err(e) => return Err(e),
        }
    };
    refresh_lifetime(source.store, &source.key).await;
    if let Some(pointer) = &source.pointer {
        refresh_lifetime(source.store, pointer).await;
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
    tokio::task::spawn_blocking(move || extract_targets(&archive, &index, &planned)).await??;
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
    let eocd = archive::zip::find_eocd(&tail, meta.size)?;
    let comment = String::from_utf8_lossy(&eocd.comment);
    if comment.starts_with("cachemount:index:") {
        if !comment.ends_with(expected) {
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
