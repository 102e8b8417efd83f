//! Bringing an archive from a store into a temporary file, range by range,
//! every GET pinned to one version of the object: the index first (the
//! ranges [`open_archive`] asks for), then only the byte ranges a restore needs — for a
//! restore from the disk cache, the entries that are not on disk.
//!
//! A changed object (412) keeps every finished range when its content is
//! fixed by its name (a lifetime refresh rewrote a key's blob); any other
//! change is [`DownloadError::Changed`], and the caller starts over.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use anyhow::Context;
use futures::stream::StreamExt;
use parking_lot::Mutex;

use super::Source;
use crate::archive::reader::open_archive;
use crate::archive::{self, ArchiveIndex, DataOffset, Entry, OpenError};
use crate::progress::Progress;
use crate::store::{ObjectMeta, ObjectStore, StoreError};

/// Size of one range GET.
const DOWNLOAD_CHUNK: u64 = 8 << 20;
/// Range GETs in flight at once.
const DOWNLOAD_CONCURRENCY: usize = 8;
/// How often a content-addressed download goes on after its object was
/// rewritten before giving up.
const MAX_VERSION_CHANGES: usize = 5;
/// Wanted ranges closer than this are fetched as one: a GET costs more than
/// reading through a gap of local headers and files the disk cache holds.
const MERGE_GAP: u64 = 256 << 10;
/// Bytes past a foreign entry's local header that cover its name and extra
/// fields (both at most 64 KiB), when only the header's offset is known.
const LOCAL_HEADER_MAX: u64 = archive::zip::LOCAL_HEADER_LEN as u64 + 2 * u16::MAX as u64;

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The object now holds other content: what was fetched is stale.
    #[error("{0} changed during the restore")]
    Changed(String),
    #[error("{0} kept changing during the download ({1} times); try again")]
    KeptChanging(String, usize),
}

/// One archive being downloaded into an unlinked temporary file of its size.
pub struct Download<'s, 'a, S> {
    source: &'s Source<'a, S>,
    file: File,
    state: Mutex<State>,
}

struct State {
    meta: ObjectMeta,
    /// Ranges already in the file: sorted, disjoint.
    have: Vec<Range<u64>>,
}

impl<'s, 'a, S: ObjectStore> Download<'s, 'a, S> {
    /// HEADs the object and makes the (sparse) file for it.
    pub async fn start(source: &'s Source<'a, S>) -> anyhow::Result<Self> {
        let meta = source
            .store
            .head(&source.key)
            .await
            .with_context(|| format!("cannot read {}", source.key))?;
        let file =
            tempfile::tempfile().context("cannot create a temporary file for the download")?;
        file.set_len(meta.size)
            .context("cannot size the temporary file for the download")?;
        Ok(Download {
            source,
            file,
            state: Mutex::new(State {
                meta,
                have: Vec::new(),
            }),
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn into_file(self) -> File {
        self.file
    }

    /// The version the downloaded bytes are of.
    pub fn meta(&self) -> ObjectMeta {
        self.state.lock().meta.clone()
    }

    /// Opens the archive's index, downloading the ranges it is read from.
    pub async fn open_index(&self) -> anyhow::Result<ArchiveIndex> {
        let fetch = |range: Range<u64>| async move {
            self.fetch(std::slice::from_ref(&range), &Progress::hidden())
                .await?;
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            self.file.read_exact_at(&mut buf, range.start)?;
            anyhow::Ok(bytes::Bytes::from(buf))
        };
        open_archive(self.meta().size, crate::archive::reader::TAIL_LEN, fetch)
            .await
            .map_err(|e| match e {
                OpenError::Source(e) => e,
                OpenError::Format(f) => anyhow::Error::new(f).context(format!(
                    "{} is not a readable cache archive",
                    self.source.key
                )),
            })
    }

    /// The index digest the archive's tail names (None for a foreign zip);
    /// the tail was downloaded by [`Download::open_index`].
    pub fn tail_digest(&self) -> anyhow::Result<Option<String>> {
        let size = self.meta().size;
        let tail_len = size.min(archive::zip::MAX_EOCD_SEARCH as u64);
        let mut tail = vec![0u8; tail_len as usize];
        self.file.read_exact_at(&mut tail, size - tail_len)?;
        Ok(archive::reader::tail_index_digest(&tail, size)?)
    }

    /// Downloads the whole object.
    pub async fn fetch_all(&self, progress: &Progress) -> anyhow::Result<()> {
        let size = self.meta().size;
        self.fetch(std::slice::from_ref(&(0..size)), progress).await
    }

    /// Downloads what `wanted` covers and the file does not hold yet.
    pub async fn fetch(&self, wanted: &[Range<u64>], progress: &Progress) -> anyhow::Result<()> {
        let store = self.source.store;
        let key = &self.source.key;
        let mut pending = {
            let state = self.state.lock();
            chunks(&missing(wanted, &state.have), DOWNLOAD_CHUNK)
        };
        progress.start(pending.iter().map(|r| r.end - r.start).sum());
        for _ in 0..=MAX_VERSION_CHANGES {
            if pending.is_empty() {
                return Ok(());
            }
            let pin = self.state.lock().meta.version.clone();
            let results: Vec<(Range<u64>, Result<(), StoreError>)> = futures::stream::iter(pending)
                .map(|range| {
                    let pin = &pin;
                    async move {
                        let res = match store.get_range(key, range.clone(), Some(pin)).await {
                            Ok(bytes) => self
                                .file
                                .write_all_at(&bytes, range.start)
                                .map(|()| progress.advance(bytes.len() as u64))
                                .map_err(|e| StoreError::Io {
                                    context: "writing the download".into(),
                                    error: e,
                                }),
                            Err(e) => Err(e),
                        };
                        (range, res)
                    }
                })
                .buffer_unordered(DOWNLOAD_CONCURRENCY)
                .collect()
                .await;
            let mut again = Vec::new();
            let mut fetched = Vec::new();
            for (range, res) in results {
                match res {
                    Ok(()) => fetched.push(range),
                    Err(StoreError::PreconditionFailed(_)) => again.push(range),
                    Err(e) => {
                        return Err(anyhow::Error::new(e).context(format!("cannot download {key}")))
                    }
                }
            }
            {
                let mut state = self.state.lock();
                let had = std::mem::take(&mut state.have);
                state.have = merge(had.into_iter().chain(fetched), 0);
            }
            if again.is_empty() {
                return Ok(());
            }
            let new_meta = store
                .head(key)
                .await
                .map_err(|e| anyhow::Error::new(e).context(format!("cannot read {key}")))?;
            let mut state = self.state.lock();
            tracing::info!(key = %key, old = %state.meta.version.etag, new = %new_meta.version.etag, "object changed during download");
            if !self.source.content_addressed || new_meta.size != state.meta.size {
                return Err(DownloadError::Changed(key.clone()).into());
            }
            state.meta = new_meta;
            pending = again;
        }
        Err(DownloadError::KeptChanging(key.clone(), MAX_VERSION_CHANGES + 1).into())
    }
}

/// The archive bytes extracting `e` reads: its data (after its local
/// header, for a foreign entry), within an archive of `size` bytes.
pub fn entry_range(e: &Entry, size: u64) -> Range<u64> {
    let (start, head) = match e.offset {
        DataOffset::Data(off) => (off, 0),
        DataOffset::LocalHeader(off) => (off, LOCAL_HEADER_MAX),
    };
    let end = start
        .saturating_add(head)
        .saturating_add(e.compressed_size)
        .min(size);
    start.min(end)..end
}

/// `ranges` sorted and merged where they overlap or lie within `gap` of
/// each other.
fn merge(ranges: impl IntoIterator<Item = Range<u64>>, gap: u64) -> Vec<Range<u64>> {
    let mut sorted: Vec<Range<u64>> = ranges.into_iter().filter(|r| r.start < r.end).collect();
    sorted.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(gap) => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// What of `wanted` (merged across [`MERGE_GAP`]) is not in `have`.
fn missing(wanted: &[Range<u64>], have: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for w in merge(wanted.iter().cloned(), MERGE_GAP) {
        let mut start = w.start;
        for h in have.iter().filter(|h| h.end > w.start && h.start < w.end) {
            if h.start > start {
                out.push(start..h.start);
            }
            start = start.max(h.end);
        }
        if start < w.end {
            out.push(start..w.end);
        }
    }
    out
}

/// `ranges` cut into pieces of at most `max` bytes.
fn chunks(ranges: &[Range<u64>], max: u64) -> Vec<Range<u64>> {
    ranges
        .iter()
        .flat_map(|r| {
            (r.start..r.end)
                .step_by(max as usize)
                .map(move |s| s..(s + max).min(r.end))
        })
        .collect()
}

#[cfg(test)]
// One-range slices are what these functions take, not typos for vectors.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn wanted_ranges_merge_across_small_gaps_and_skip_what_is_had() {
        let wanted = [10..20, 0..5, 20 + MERGE_GAP + 1..20 + MERGE_GAP + 10];
        assert_eq!(
            merge(wanted.iter().cloned(), MERGE_GAP),
            vec![0..20, 20 + MERGE_GAP + 1..20 + MERGE_GAP + 10]
        );
        assert_eq!(
            missing(&[0..100], &[10..20, 50..60]),
            vec![0..10, 20..50, 60..100]
        );
        assert_eq!(missing(&[0..100], &[0..100]), Vec::<Range<u64>>::new());
        assert_eq!(missing(&[5..10], &[0..7]), vec![7..10]);
    }

    #[test]
    fn chunks_cut_ranges_into_bounded_pieces() {
        assert_eq!(
            chunks(&[0..25, 30..31], 10),
            vec![0..10, 10..20, 20..25, 30..31]
        );
        assert!(chunks(&[], 10).is_empty());
    }

    #[test]
    fn an_entry_range_stays_inside_the_archive() {
        let mut e = Entry::new(crate::archive::EntryKind::File, "f");
        e.offset = DataOffset::Data(100);
        e.compressed_size = 50;
        assert_eq!(entry_range(&e, 1000), 100..150);
        e.offset = DataOffset::LocalHeader(900);
        assert_eq!(entry_range(&e, 1000), 900..1000);
        e.compressed_size = u64::MAX;
        assert_eq!(entry_range(&e, 1000), 900..1000);
        e.offset = DataOffset::Data(2000);
        assert_eq!(entry_range(&e, 1000), 1000..1000);
    }
}
