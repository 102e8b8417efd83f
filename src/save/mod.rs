//! `save`: walk the paths, compress in parallel, write the archive to a
//! temporary file, upload it under its content address unless the store has
//! it already, and write the key pointer last (DESIGN §2). Paths that are
//! writable mounts are saved incrementally ([`incremental`]); a full save
//! lays the key's access profile out first ([`order`]).

pub mod incremental;
pub mod order;

use std::fs::File;
use std::io::{self, BufWriter};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use anyhow::{bail, Context};
use rayon::prelude::*;

use crate::archive::writer::{compress_frame, CompressedFrame};
use crate::archive::{ArchiveWriter, Entry, FinishedArchive, Manifest, WriterOptions};
use crate::mount::overlay::Overlays;
use crate::paths::{Anchors, PathSpec};
use crate::progress::Progress;
use crate::store::layout::{self, KeyPointer};
use crate::store::{Composition, ObjectStore, PutSource, TransferCounts};
use crate::tree::walk::{open_seen, walk, Changed, FileId, Skipped, SourceEntry, SourceKind};

/// How many small entries are compressed together before being written.
const SMALL_BATCH_BYTES: u64 = 32 << 20;
const SMALL_BATCH_ENTRIES: usize = 4096;
/// Recorded in key pointers: the version of the archive layout written.
pub const FORMAT_VERSION: u32 = 1;

/// The saved tree, in archive order.
pub struct Collected<'a> {
    pub entries: Vec<SourceEntry>,
    /// For each entry, the base archive's entry it still is (incremental saves).
    pub reuse: Vec<Option<&'a Entry>>,
    pub skipped: Skipped,
}

/// Walks `specs` into a list of entries (the manifest gains their
/// namespaces). A path that is a writable mount of `base` is not walked: its
/// tree is the base's index with the overlay's changes applied, and each of
/// its entries comes with the base's entry it still is (see [`incremental`]).
pub fn collect<'a>(
    specs: &[PathSpec],
    anchors: &Anchors,
    manifest: &mut Manifest,
    base: Option<&'a incremental::Base>,
) -> anyhow::Result<Collected<'a>> {
    let mut entries = Vec::new();
    let mut reuse = Vec::new();
    let mut skipped = Skipped::default();
    let mut names: Vec<Vec<u8>> = Vec::new();
    for spec in specs {
        let name = spec.archive_name(manifest);
        // A path inside (or equal to) another saved path is already covered.
        let covered = names.iter().any(|n| crate::paths::names::within(&name, n));
        if covered {
            continue;
        }
        names.push(name.clone());
        let local = spec.local_path(anchors);
        let context = || format!("cannot save path {:?}", spec.given);
        match base.and_then(|b| Some((b, b.layer(&local, &name)?))) {
            Some((base, layer)) => {
                let merged = base
                    .merged(layer, &mut skipped.special)
                    .with_context(context)?;
                for (entry, reused) in merged {
                    entries.push(entry);
                    reuse.push(reused);
                }
            }
            None => {
                walk(&local, &name, &mut entries, &mut skipped).with_context(context)?;
                reuse.resize(entries.len(), None);
            }
        }
    }
    // A saved path that contains an earlier one: drop the earlier copy.
    let mut seen = std::collections::HashSet::new();
    let keep: Vec<bool> = entries
        .iter()
        .map(|e| seen.insert(e.meta.name.clone()))
        .collect();
    let mut keep_iter = keep.iter();
    entries.retain(|_| *keep_iter.next().expect("one flag per entry"));
    let mut keep_iter = keep.iter();
    reuse.retain(|_| *keep_iter.next().expect("one flag per entry"));
    Ok(Collected {
        entries,
        reuse,
        skipped,
    })
}

/// What the compressing side hands the writing side, in archive order.
enum Item<'a> {
    Dir(&'a SourceEntry),
    Symlink(&'a SourceEntry, &'a [u8]),
    /// A file of one frame (or none), already compressed.
    Small(&'a SourceEntry, u64, CompressedFrame),
    /// A file of many frames; they follow on the channel, in order.
    Large(&'a SourceEntry, u64, Receiver<io::Result<CompressedFrame>>),
    /// A file whose bytes are the base archive's (incremental save).
    Reused(&'a Entry),
}

/// Items in flight between compressing and writing: enough to keep both busy.
const PIPELINE_DEPTH: usize = 8192;

/// Archive bytes that already exist: the first `len` bytes of another
/// archive, and for each entry to write, the file of that archive it is
/// (`None`: read and compress it). A full save has none.
#[derive(Default)]
pub struct Reuse<'a> {
    pub len: u64,
    pub entries: Vec<Option<&'a Entry>>,
}

impl<'a> Reuse<'a> {
    fn get(&self, i: usize) -> Option<&'a Entry> {
        self.entries.get(i).copied().flatten()
    }
}

/// Writes the archive of `entries` to `out` (everything after `reuse.len`
/// bytes): compression on all cores (rayon) overlaps with writing (one
/// thread), which keeps archive order.
pub fn write_archive(
    entries: &[SourceEntry],
    reuse: &Reuse<'_>,
    manifest: Manifest,
    options: WriterOptions,
    out: &File,
    progress: &Progress,
) -> anyhow::Result<FinishedArchive> {
    let writer = ArchiveWriter::append_to(
        BufWriter::with_capacity(1 << 20, out),
        reuse.len,
        manifest,
        options,
    )?;
    let (tx, rx) = sync_channel::<Item<'_>>(PIPELINE_DEPTH);
    std::thread::scope(|scope| {
        let writing = scope.spawn(move || write_items(writer, rx, progress));
        let compressed = compress_items(entries, reuse, options, tx, progress);
        let written = writing.join().expect("archive writer thread panicked");
        // A failure to read a source file is the cause; the writer only saw the channel close.
        compressed?;
        written
    })
}

/// The writing side of [`write_archive`].
fn write_items<W: std::io::Write + std::io::Seek>(
    mut writer: ArchiveWriter<W>,
    rx: Receiver<Item<'_>>,
    progress: &Progress,
) -> anyhow::Result<FinishedArchive> {
    for item in rx {
        match item {
            Item::Dir(e) => writer.add_dir(e.meta.clone())?,
            Item::Symlink(e, target) => writer.add_symlink(e.meta.clone(), target)?,
            Item::Small(e, size, frame) => {
                writer.add_file(e.meta.clone(), size, [Ok(frame)])?;
                progress.advance(size);
            }
            Item::Large(e, size, frames) => writer
                .add_file(e.meta.clone(), size, frames)
                .with_context(|| format!("cannot save {}", e.path.display()))?,
            Item::Reused(entry) => writer.add_reused(entry)?,
        }
    }
    Ok(writer.finish()?)
}

/// The compressing side of [`write_archive`]: small entries in parallel
/// batches, large files a chunk of frames at a time. Stops early (Ok) when the
/// writer has gone away; its error is the one to report then.
fn compress_items<'a>(
    entries: &'a [SourceEntry],
    reuse: &Reuse<'a>,
    options: WriterOptions,
    tx: SyncSender<Item<'a>>,
    progress: &Progress,
) -> anyhow::Result<()> {
    let frame_size = u64::from(options.frame_size);
    let mut i = 0;
    while i < entries.len() {
        if let Some(entry) = reuse.get(i) {
            if tx.send(Item::Reused(entry)).is_err() {
                return Ok(());
            }
            i += 1;
            continue;
        }
        if let SourceKind::File { size, id } = entries[i].kind {
            if size > frame_size {
                let (ftx, frx) = sync_channel(large_chunk() as usize * 2);
                if tx.send(Item::Large(&entries[i], size, frx)).is_err() {
                    return Ok(());
                }
                send_large_frames(&entries[i].path, size, id, options, progress, ftx);
                i += 1;
                continue;
            }
        }
        // A run of small entries, compressed in parallel, sent in order.
        let mut end = i;
        let mut bytes = 0;
        while end < entries.len()
            && end - i < SMALL_BATCH_ENTRIES
            && bytes < SMALL_BATCH_BYTES
            && reuse.get(end).is_none()
        {
            match entries[end].kind {
                SourceKind::File { size, .. } if size > frame_size => break,
                SourceKind::File { size, .. } => bytes += size,
                _ => {}
            }
            end += 1;
        }
        let batch = &entries[i..end];
        let compressed: Vec<Option<CompressedFrame>> = batch
            .par_iter()
            .map(|e| match e.kind {
                SourceKind::File { size, id } => {
                    read_small(&e.path, size, id, options.level).map(Some)
                }
                _ => Ok(None),
            })
            .collect::<io::Result<_>>()
            .context("cannot read a file to save")?;
        for (e, frame) in batch.iter().zip(compressed) {
            let item = match (&e.kind, frame) {
                (SourceKind::Dir, _) => Item::Dir(e),
                (SourceKind::Symlink { target }, _) => Item::Symlink(e, target),
                (SourceKind::File { size, .. }, Some(frame)) => Item::Small(e, *size, frame),
                (SourceKind::File { .. }, None) => unreachable!("files are compressed above"),
            };
            if tx.send(item).is_err() {
                return Ok(());
            }
        }
        i = end;
    }
    Ok(())
}

/// Reads and compresses a file of one frame, the one the walk found (`id`).
fn read_small(
    path: &Path,
    size: u64,
    id: Option<FileId>,
    level: i32,
) -> io::Result<CompressedFrame> {
    let file = open_seen(path, size, id)?;
    let mut content = Vec::with_capacity(size as usize);
    // One byte more than expected tells a file that grew since it was opened.
    io::Read::read_to_end(&mut io::Read::take(file, size + 1), &mut content)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    if content.len() as u64 != size {
        return Err(io::Error::other(Changed::Resized {
            path: path.to_path_buf(),
            was: size,
            now: content.len() as u64,
        }));
    }
    compress_frame(&content, level, true)
}

/// Frames compressed together: enough to keep every core busy.
fn large_chunk() -> u64 {
    (rayon::current_num_threads() as u64 * 4).max(8)
}

/// Compresses a large file's frames a chunk at a time in parallel and sends
/// them in order; a read error is sent as the last item.
fn send_large_frames(
    path: &Path,
    size: u64,
    id: Option<FileId>,
    options: WriterOptions,
    progress: &Progress,
    ftx: SyncSender<io::Result<CompressedFrame>>,
) {
    let frame_size = u64::from(options.frame_size);
    let frame_count = size.div_ceil(frame_size);
    let chunk = large_chunk();
    let file = match open_seen(path, size, id) {
        Ok(f) => f,
        Err(e) => {
            let _ = ftx.send(Err(e));
            return;
        }
    };
    for c in 0..frame_count.div_ceil(chunk) {
        let frames: Vec<io::Result<CompressedFrame>> = (c * chunk
            ..((c + 1) * chunk).min(frame_count))
            .into_par_iter()
            .map(|f| {
                let start = f * frame_size;
                let len = frame_size.min(size - start) as usize;
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, start).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("{} changed while being saved: {e}", path.display()),
                    )
                })?;
                progress.advance(len as u64);
                compress_frame(&buf, options.level, false)
            })
            .collect();
        for frame in frames {
            let failed = frame.is_err();
            if ftx.send(frame).is_err() || failed {
                return;
            }
        }
    }
}

/// What `save` did.
#[derive(Debug)]
pub struct SaveReport {
    pub digest: String,
    pub archive_size: u64,
    /// Where the archive's stored index lies, for the key pointer's hint
    /// (unknown when an unchanged base is saved again).
    pub index_range: Option<std::ops::Range<u64>>,
    pub entries: usize,
    pub uploaded: bool,
    /// Incremental saves: files reused from the mounted cache, and their bytes.
    pub reused_files: usize,
    pub reused_bytes: u64,
    /// Nothing changed since the writable mount's cache: only the pointer was written.
    pub unchanged: bool,
    /// What this save moved to and inside the store.
    pub transfer: TransferCounts,
}

/// How `save` writes: the archive's options, and where to look for the
/// writable mounts it can save incrementally.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    pub archive: WriterOptions,
    pub overlays: Overlays,
}

/// Saves `specs` under `key` in `store`. Paths that are writable mounts of
/// a cache in this store are saved incrementally ([`incremental`]).
pub async fn save<S: ObjectStore>(
    store: &S,
    key: &str,
    specs: &[PathSpec],
    anchors: &Anchors,
    options: SaveOptions,
    progress: Progress,
) -> anyhow::Result<SaveReport> {
    // Before anything is uploaded: a key the store cannot hold leaves no blob behind.
    layout::checked_pointer_key(store, key)?;
    if specs.is_empty() {
        bail!("nothing to save: name at least one PATH");
    }
    let transfer_before = store.transfer_counts();
    let started = std::time::Instant::now();
    // The archive names the paths get (collect gives them in the same order).
    let mut names = Manifest::default();
    for spec in specs {
        spec.archive_name(&mut names);
    }
    let base = incremental::find_base(store, &options.overlays, specs, anchors, &names).await;
    // The saved key's own profile, else that of the key its mounts came from.
    let mounted_key = base.as_ref().and_then(|b| b.mounted_key.as_deref());
    let profile_keys: Vec<&str> = std::iter::once(key)
        .chain(mounted_key.filter(|k| *k != key))
        .collect();
    let profile = crate::profile::load_first(store, &profile_keys)
        .await
        .map(|(_, p)| p);
    let options = options.archive;
    let specs_owned = specs.to_vec();
    let anchors_owned = anchors.clone();
    let tmp =
        tempfile::NamedTempFile::new().context("cannot create a temporary file for the archive")?;
    let tmp_file = tmp.as_file().try_clone()?;
    let tmp_path = tmp.path().to_path_buf();
    let (mut report, upload_as) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut manifest = Manifest::default();
        let Collected {
            mut entries,
            reuse,
            skipped,
        } = collect(&specs_owned, &anchors_owned, &mut manifest, base.as_ref())?;
        tracing::info!(entries = entries.len(), elapsed = ?started.elapsed(), "listed the paths");
        for path in &skipped.special {
            tracing::warn!(
                "skipped {} (sockets, devices and FIFOs cannot be cached)",
                path.display()
            );
        }
        let plan = base.as_ref().and_then(|b| b.plan(reuse, &manifest));
        let (reuse, reused_files, reused_bytes, unchanged) = match plan {
            Some(p) => (p.reuse, p.reused_files, p.reused_bytes, p.unchanged),
            None => {
                if let Some(p) = &profile {
                    let moved = order::profile_first(&mut entries, p);
                    tracing::info!("{moved} files of the access profile go first");
                }
                (Reuse::default(), 0, 0, false)
            }
        };
        let mut report = SaveReport {
            digest: String::new(),
            archive_size: 0,
            index_range: None,
            entries: 0,
            uploaded: false,
            reused_files,
            reused_bytes,
            unchanged,
            transfer: TransferCounts::default(),
        };
        if unchanged {
            let base = base.as_ref().expect("planned on a base");
            report.digest = base.digest.clone();
            report.archive_size = base.size;
            report.entries = base.index.entries.len();
            return Ok((report, None));
        }
        let total: u64 = entries
            .iter()
            .zip(reuse.entries.iter().chain(std::iter::repeat(&None)))
            .map(|(e, reused)| match (&e.kind, reused) {
                (SourceKind::File { size, .. }, None) => *size,
                _ => 0,
            })
            .sum();
        progress.start(total);
        let finished = write_archive(&entries, &reuse, manifest, options, &tmp_file, &progress)?;
        progress.finish();
        tracing::info!(bytes = finished.size, elapsed = ?started.elapsed(), "wrote the archive");
        let prefix_len = reuse.len;
        drop(reuse); // it borrows the base's index
        let upload_as = match base.filter(|_| prefix_len > 0) {
            Some(b) => Upload::Composed(Composition {
                base_key: b.key,
                base_version: b.version,
                prefix_len,
                tail: tmp_path,
            }),
            None => Upload::Whole(tmp_path),
        };
        report.digest = finished.digest;
        report.archive_size = finished.size;
        report.index_range = Some(finished.index_range);
        report.entries = finished.index.entries.len();
        Ok((report, Some(upload_as)))
    })
    .await??;
    if let Some(upload_as) = upload_as {
        report.uploaded = upload(store, &report.digest, report.archive_size, upload_as).await?;
    }
    let pointer = KeyPointer {
        digest: report.digest.clone(),
        size: report.archive_size,
        created: layout::unix_now(),
        paths: specs.iter().map(|s| s.given.clone()).collect(),
        format_version: FORMAT_VERSION,
        index: report.index_range.as_ref().map(|r| layout::IndexLocation {
            offset: r.start,
            len: r.end - r.start,
        }),
    };
    layout::write_pointer(store, key, &pointer)
        .await
        .with_context(|| format!("cannot write key {key:?}"))?;
    // The temporary archive lives until here: the store may have read it.
    drop(tmp);
    report.transfer = store.transfer_counts().since(transfer_before);
    Ok(report)
}

/// How a written archive goes into the store.
enum Upload {
    /// The file is the whole archive.
    Whole(PathBuf),
    /// The file follows the first bytes of a base archive.
    Composed(Composition),
}

/// Stores the archive named `digest` unless the store has it already.
/// Returns whether anything was stored.
async fn upload<S: ObjectStore>(
    store: &S,
    digest: &str,
    size: u64,
    upload_as: Upload,
) -> anyhow::Result<bool> {
    let blob = layout::blob_key(digest);
    let started = std::time::Instant::now();
    if matches!(store.head(&blob).await, Ok(meta) if meta.size == size) {
        return Ok(false);
    }
    match upload_as {
        Upload::Whole(path) => store.put(&blob, PutSource::File(path)).await,
        Upload::Composed(composition) => store.compose(&blob, composition).await,
    }
    .with_context(|| format!("cannot upload the archive to {}", store.describe()))?;
    tracing::info!(elapsed = ?started.elapsed(), "stored the archive");
    Ok(true)
}
