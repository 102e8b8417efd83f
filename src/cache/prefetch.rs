//! Fetching before the reader asks: a small file's miss also fetches the
//! small files after it in the same directory (adjacent in the archive,
//! because entries are in path order), so a directory walk costs one GET per
//! directory rather than one per file, and a walk in archive order gets the
//! next batch while it is still in the previous one; sequential readers get
//! a read-ahead window that doubles per sequential read
//! (1 → [`FetchConfig::readahead_max_blocks`] blocks) but reaches no further
//! than the reader's measured rate covers in
//! [`FetchConfig::readahead_horizon`], fetched in batches of at least half
//! the window. Read-ahead in flight is bounded globally, over
//! all files and mounts, by a semaphore of bytes.
//!
//! Drop-behind: once a reader is a stream (sequential for
//! [`STREAM_BLOCKS`] blocks), the frames it has passed are dropped from the block
//! cache. The kernel's page cache holds what it read; keeping a second copy
//! would only push out the cache's working set, and freeing them lets the
//! next frames decode into the buffers just freed instead of into fresh
//! memory that must fault in page by page (a quarter of the daemon's CPU on
//! a cold `cat` of a large file). A single-stream entry keeps its blocks:
//! decoding one again means decoding from the entry's start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::blocks::Origin;
use super::config::FetchConfig;
use super::fetch::Fetcher;
use super::plan::{is_small, Layout, Piece, Span};
use super::version::Version;
use crate::archive::EntryKind;
use crate::store::ObjectStore;

/// Sequential-read detection for one entry.
#[derive(Debug, Clone, Copy, Default)]
struct Seq {
    /// Offset of the previous read.
    last: Option<u64>,
    /// End of the previous read.
    next: u64,
    window: u32,
    /// The first block not dropped behind the reader.
    behind: u32,
    /// When and where the current sequential run began: its rate.
    since: Option<(Instant, u64)>,
}

impl Seq {
    /// The window the reader's rate so far fills in `horizon` (no limit
    /// while the run is too young to tell).
    fn paced(&self, now: Instant, horizon: Duration, block_size: u64) -> u32 {
        let Some((began, from)) = self.since else {
            return u32::MAX;
        };
        let elapsed = now.saturating_duration_since(began);
        if elapsed < horizon / 8 {
            return u32::MAX;
        }
        let ahead = (self.next.saturating_sub(from) as f64 * horizon.as_secs_f64()
            / elapsed.as_secs_f64()) as u64;
        (ahead.div_ceil(block_size.max(1)).min(u64::from(u32::MAX)) as u32).max(2)
    }
}

/// A sequential run this many blocks long is a stream: the blocks it passed
/// are dropped behind it.
const STREAM_BLOCKS: u64 = 8;
/// Blocks just behind a stream's read are kept: the kernel's read-ahead
/// sends several reads at once, which may arrive out of order.
const DROP_BEHIND_LAG: u32 = 2;

/// A reader walking the archive in order (a tree walk reads files in path
/// order, which is archive order): small-file batches follow each other
/// across directories, and the next batch is fetched while the reader is
/// still in the middle of the previous one.
#[derive(Debug, Clone, Copy, Default)]
struct Walk {
    version: u64,
    /// The entry after the last batch.
    next: u32,
    /// A first read of a prefetched file at or after this entry starts the next batch.
    trigger: u32,
}

/// Misses this many entries past the last batch still count as a walk (a
/// sorted sample of files skips some).
const WALK_SLACK: u32 = 256;

impl Walk {
    fn continues(&self, version: u64, entry: u32) -> bool {
        self.version == version && entry >= self.next && entry - self.next <= WALK_SLACK
    }

    fn after_batch(&mut self, version: u64, anchor: u32, batch: &[Piece]) {
        let Some(last) = batch.last() else {
            *self = Walk {
                version,
                next: anchor + 1,
                trigger: u32::MAX,
            };
            return;
        };
        *self = Walk {
            version,
            next: last.entry + 1,
            trigger: batch[batch.len() / 2].entry,
        };
    }
}
/// Read-ahead memory is counted in units of this many bytes (semaphore permits are u32).
const PERMIT_UNIT: u64 = 4096;

/// The prefetch state of one fetcher: the global read-ahead budget, the
/// sequential state of each entry read, and the walk in archive order.
pub struct Prefetch {
    budget: Arc<Semaphore>,
    sequential: Mutex<lru::LruCache<(u64, u32), Seq>>,
    /// Where the last neighbour batch ended, to tell walks in archive order.
    walk: Mutex<Walk>,
}

impl Prefetch {
    pub fn new(config: &FetchConfig, cache_bytes: u64) -> Self {
        // Read-ahead lands in the cache: more of it than half the cache would
        // be evicted before it is read, and would only grow the daemon's memory.
        let readahead_memory = config.readahead_memory.min(cache_bytes / 2);
        let permits = (readahead_memory / PERMIT_UNIT).clamp(1, u64::from(u32::MAX >> 4)) as usize;
        Prefetch {
            budget: Arc::new(Semaphore::new(permits)),
            sequential: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(4096).unwrap(),
            )),
            walk: Mutex::new(Walk::default()),
        }
    }

    /// Forgets the sequential state of version `id`'s entries.
    pub fn drop_version(&self, id: u64) {
        let mut seq = self.sequential.lock();
        let old: Vec<(u64, u32)> = seq
            .iter()
            .filter(|((v, _), _)| *v == id)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            seq.pop(&k);
        }
    }

    /// Room for `bytes` of read-ahead in the global budget, if there is.
    fn permit(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let units = bytes.div_ceil(PERMIT_UNIT).min(u64::from(u32::MAX)) as u32;
        self.budget.clone().try_acquire_many_owned(units).ok()
    }
}

impl<S: ObjectStore> Fetcher<S> {
    /// The small files fetched along with a small file's miss (the next
    /// batch of a walk when the miss continues one).
    pub(super) fn neighbour_batch(&self, v: &Version, entry: u32) -> Vec<Piece> {
        let mut walk = self.prefetch.walk.lock();
        let batch = self.neighbours(v, entry, walk.continues(v.id, entry));
        walk.after_batch(v.id, entry, &batch);
        batch
    }

    /// A prefetched small file was read: if it is inside the last batch,
    /// fetch the next batch now (in the background).
    pub(super) fn continue_walk(self: &Arc<Self>, v: &Arc<Version>, entry: u32) {
        let batch = {
            let mut walk = self.prefetch.walk.lock();
            if walk.version != v.id
                || entry < walk.trigger
                || entry >= walk.next
                || !is_small(v.entry(entry), &self.config)
            {
                return;
            }
            let anchor = walk.next - 1;
            let batch = self.neighbours(v, anchor, true);
            walk.after_batch(v.id, anchor, &batch);
            batch
        };
        if batch.is_empty() {
            return;
        }
        let bytes: u64 = batch.iter().map(|p| v.entry(p.entry).compressed_size).sum();
        if let Some(permit) = self.prefetch.permit(bytes) {
            self.start(v, &[], &batch, Origin::ReadAhead, Some(permit));
        }
    }

    /// The small files after `entry` in its directory, adjacent in the archive.
    fn neighbours(&self, v: &Version, entry: u32, across_dirs: bool) -> Vec<Piece> {
        let entries = &v.index.entries;
        let name = &entries[entry as usize].name;
        let dir_len = name.iter().rposition(|b| *b == b'/').map_or(0, |p| p + 1);
        let dir = &name[..dir_len];
        let mut out = Vec::new();
        let mut bytes = 0;
        let e = &entries[entry as usize];
        let mut prev_end = v.approx_start(entry) + e.compressed_size;
        // A walk takes bigger batches: fewer GETs, and each one covers the
        // latency of the next.
        let (byte_scale, file_scale) = if across_dirs { (4, 4) } else { (1, 1) };
        for (j, n) in entries.iter().enumerate().skip(entry as usize + 1) {
            if !across_dirs && !n.name.starts_with(dir) {
                break;
            }
            let start = v.approx_start(j as u32);
            if start.saturating_sub(prev_end) > self.config.merge_gap {
                break;
            }
            prev_end = start + n.compressed_size;
            let in_subdir = !across_dirs && n.name[dir_len..].contains(&b'/');
            if n.kind != EntryKind::File || in_subdir || n.size == 0 {
                continue;
            }
            if !is_small(n, &self.config) {
                break;
            }
            bytes += n.compressed_size;
            if bytes > byte_scale * self.config.neighbour_bytes
                || out.len() >= file_scale * self.config.neighbour_files
            {
                break;
            }
            out.push(Piece {
                entry: j as u32,
                block: 0,
            });
        }
        out
    }

    /// Sequential readers get the next blocks fetched before they ask.
    pub(super) fn read_ahead(
        self: &Arc<Self>,
        v: &Arc<Version>,
        entry: u32,
        layout: Layout,
        span: &Span,
    ) {
        let (offset, end, last) = (span.offset, span.end, span.last);
        let e = v.entry(entry);
        let (window, passed) = {
            let mut seq = self.prefetch.sequential.lock();
            let st = seq.get_or_insert_mut((v.id, entry), Seq::default);
            let bs = span.block_size;
            // Sequential: the first read starts at 0, every later one starts
            // near the end of the reads so far (the kernel's read-ahead sends
            // several reads at once, which may arrive out of order); a read
            // of the same offset again (concurrent readers) is not progress.
            let near = (u64::from(st.window) + 1) * bs;
            let sequential = match st.last {
                None => offset == 0,
                Some(last) => {
                    offset != last && offset + near >= st.next && offset <= st.next + near
                }
            };
            let now = Instant::now();
            if st.last.is_none() || !sequential {
                st.since = Some((now, offset));
            }
            st.last = Some(offset);
            st.next = if sequential { st.next.max(end) } else { end };
            st.window = if sequential {
                (st.window * 2)
                    .clamp(1, self.config.readahead_max_blocks)
                    .min(st.paced(now, self.config.readahead_horizon, bs))
            } else {
                0
            };
            let passed = if !sequential {
                st.behind = span.first;
                0..0
            } else if st
                .since
                .is_some_and(|(_, from)| st.next.saturating_sub(from) >= STREAM_BLOCKS * bs)
            {
                let to = span.first.saturating_sub(DROP_BEHIND_LAG).max(st.behind);
                std::mem::replace(&mut st.behind, to)..to
            } else {
                0..0
            };
            (st.window, passed)
        };
        if window == 0 {
            return;
        }
        match layout {
            Layout::Frames | Layout::Stored => {
                for block in passed {
                    self.cache.remove(&Piece { entry, block }.key(v.id));
                }
            }
            Layout::Stream => {
                let next = Piece {
                    entry,
                    block: last + 1,
                }
                .key(v.id);
                if last + 1 < layout.block_count(e) && !self.cache.contains(&next) {
                    let this = self.clone();
                    let v = v.clone();
                    let target =
                        (last + self.config.stream_ahead_blocks).min(layout.block_count(e) - 1);
                    tokio::spawn(async move {
                        let _ = this.stream_decode(&v, entry, &[], target).await;
                    });
                }
                return;
            }
            Layout::Whole => return,
        }
        let count = layout.block_count(e);
        // Keep read-ahead well inside the cache so it does not evict what it prefetched.
        let cache_blocks = (self.cache.capacity() / layout.block_size(e) / 4).max(1) as u32;
        let to = (last.saturating_add(window.min(cache_blocks))).min(count.saturating_sub(1));
        let pieces: Vec<Piece> = {
            let inflight = self.inflight.lock();
            (last + 1..=to)
                .map(|block| Piece { entry, block })
                .filter(|p| {
                    let key = p.key(v.id);
                    !self.cache.contains(&key) && !inflight.contains_key(&key)
                })
                .collect()
        };
        // Fetch ahead in batches of at least half the window (fewer, larger
        // GETs), unless the very next block is missing.
        let next_missing = pieces.first().is_some_and(|p| p.block == last + 1);
        if pieces.is_empty() || (!next_missing && (pieces.len() as u32) * 2 < window) {
            return;
        }
        let bytes: u64 = pieces.iter().map(|p| p.range_len(v, &self.config)).sum();
        let Some(permit) = self.prefetch.permit(bytes) else {
            tracing::debug!(
                "read-ahead memory exhausted; not reading ahead in {}",
                v.name(entry)
            );
            return;
        };
        self.start(v, &[], &pieces, Origin::ReadAhead, Some(permit));
    }
}
