//! The fetcher: turns "bytes `offset..offset+len` of entry `i`" into verified,
//! cached blocks, with as few store requests as it can.
//!
//! - A *block* is one zstd frame of a multi-frame file, or a fixed
//!   [`BLOCK_SIZE`] piece of a stored or single-stream entry.
//! - Concurrent misses of one block fetch it once: an in-flight map holds a
//!   shared future per block being fetched, which later readers join.
//! - Misses of one read, and the speculative pieces added to it, are sorted by
//!   archive offset and merged into one range GET when they are adjacent
//!   (gap ≤ [`FetchConfig::merge_gap`]), up to [`FetchConfig::max_get`] bytes.
//! - A small file's miss also fetches the small files after it in the same
//!   directory (adjacent in the archive, because entries are in path order),
//!   so a directory walk that reads every file costs one GET per directory
//!   rather than one per file.
//! - Sequential readers get a read-ahead window that doubles per sequential
//!   read (1 → [`FetchConfig::readahead_max_blocks`] blocks), fetched in
//!   batches of at least half the window; read-ahead in flight is bounded
//!   globally by a semaphore of bytes.
//! - No unverified byte is served. A frame is checked against its checksum
//!   before it enters the cache; a failed check is an error for that read
//!   only. A foreign entry has one CRC-32 for all of its content: a small one
//!   is fetched and checked whole; a larger one (more than one block) is
//!   decoded whole once by a verify pass ([`super::verify`]) before its first
//!   byte is served, which records a checksum of every block, so a block
//!   evicted and decoded again later is checked against it. A foreign entry
//!   that fails its check twice (one re-fetch: the damage may have happened
//!   in transit) is bad: every read of it fails, logged once.
//! - Entries that are one compressed stream and too large to fetch whole
//!   (foreign deflate / single-frame zstd) are, after their verify pass,
//!   decoded again where evicted blocks are read, by a per-entry cursor that
//!   caches every block it passes; a read behind the cursor restarts it from
//!   the entry's start (a deflate or zstd stream cannot be entered in the
//!   middle), blocks still cached are served without that.
//!
//! Every GET is pinned to the mount's [`Version`] (If-Match). A 412 fails the
//! read with [`FetchError::Changed`]; reopening is the job of the layer above
//! ([`crate::fs::reopen`]), which swaps in a new `Version` (with a new id, so
//! no old block is served) and calls [`Fetcher::drop_version`].

use std::collections::HashMap;
use std::io::{self, Read};
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::blocks::{BlockCache, BlockKey};
use super::stats::Stats;
use super::verify::{BlockSink, BlockSums, Verified, Verifier};
use super::version::Version;
use crate::archive::decode::{decode_entry, decode_entry_to, decode_frame};
use crate::archive::zip::{local_header_data_start, LOCAL_HEADER_LEN};
use crate::archive::{Compression, DataOffset, Entry, EntryKind};
use crate::store::{ObjectStore, StoreError};

/// Block size of entries that are not split into frames (stored, deflate,
/// single-stream zstd): the unit of caching and of random access.
pub const BLOCK_SIZE: u64 = 1 << 20;
/// Extra bytes fetched after a foreign entry's local header, when its data
/// offset is not known yet, to cover the header's name and extra fields.
const LOCAL_HEADER_SLACK: u64 = 1024;

/// Tuning of the fetcher; the defaults are what the benchmark measured best.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Largest merged range GET.
    pub max_get: u64,
    /// Largest hole between two wanted ranges that is still fetched through
    /// (downloading it costs less than the latency of a second request).
    pub merge_gap: u64,
    /// A file whose compressed size is at most this is "small": its miss also
    /// fetches its small neighbours.
    pub small_file: u64,
    /// Compressed bytes of neighbours fetched along with a small file's miss.
    pub neighbour_bytes: u64,
    /// Most neighbours fetched along with a small file's miss.
    pub neighbour_files: usize,
    /// The largest read-ahead window, in blocks.
    pub readahead_max_blocks: u32,
    /// Read-ahead bytes in flight at once, over all files and mounts.
    pub readahead_memory: u64,
    /// Single-stream entries up to this size (compressed and not) are fetched
    /// and decoded whole on first read; larger ones are decoded sequentially.
    pub whole_max: u64,
    /// Compressed bytes per GET of a sequentially decoded entry.
    pub stream_chunk: u64,
    /// Blocks a sequential stream reader decodes ahead of the reads.
    pub stream_ahead_blocks: u32,
}

impl FetchConfig {
    /// The defaults, with `CACHEMOUNT_MAX_GET`, `CACHEMOUNT_READAHEAD_BLOCKS`
    /// and `CACHEMOUNT_NEIGHBOUR_BYTES` overriding them (for benchmarking).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let mut c = FetchConfig::default();
        if let Some(v) = var("CACHEMOUNT_MAX_GET") {
            c.max_get = v;
        }
        if let Some(v) = var("CACHEMOUNT_READAHEAD_BLOCKS") {
            c.readahead_max_blocks = v as u32;
        }
        if let Some(v) = var("CACHEMOUNT_NEIGHBOUR_BYTES") {
            c.neighbour_bytes = v;
        }
        c
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            max_get: 8 << 20,
            merge_gap: 64 << 10,
            small_file: 256 << 10,
            neighbour_bytes: 4 << 20,
            neighbour_files: 1024,
            readahead_max_blocks: 32,
            readahead_memory: 256 << 20,
            whole_max: 16 << 20,
            stream_chunk: 4 << 20,
            stream_ahead_blocks: 4,
        }
    }
}

/// Why a read failed. Cloneable: one failed fetch fails every read that joined it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The object is no longer the pinned version (HTTP 412).
    #[error("{0}")]
    Changed(String),
    #[error("{0}")]
    Store(String),
    /// The data failed its checksum or does not decode.
    #[error("{0}")]
    Corrupt(String),
    /// The entry was found damaged before (its data failed its check twice):
    /// every read of it fails at once, without another fetch or log line.
    #[error("{0}")]
    Damaged(String),
}

/// How an entry's content is cut into blocks and fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// One block per zstd frame, fetched and verified independently.
    Frames,
    /// Raw bytes: blocks are ranges of the data.
    Stored,
    /// One compressed stream small enough to fetch and decode in one go.
    Whole,
    /// One large compressed stream, decoded sequentially.
    Stream,
}

/// The unit fetched and decoded together: a frame, a stored block, or a whole entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    entry: u32,
    /// 0 for a whole entry.
    block: u32,
}

type Outcome = Result<Arc<Vec<Bytes>>, FetchError>;
type Pending = Shared<BoxFuture<'static, Outcome>>;

struct Job {
    piece: Piece,
    tx: oneshot::Sender<Outcome>,
    speculative: bool,
}

/// Sequential-read detection for one entry.
#[derive(Debug, Clone, Copy, Default)]
struct Seq {
    /// Offset of the previous read.
    last: Option<u64>,
    /// End of the previous read.
    next: u64,
    window: u32,
}

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

/// The decoding position in a [`Layout::Stream`] entry.
struct StreamCursor {
    next_block: u32,
    decoder: Box<dyn Read + Send>,
    /// A store error met by the reader under the decoder (told apart from corruption).
    source_error: Arc<Mutex<Option<FetchError>>>,
}

type CursorSlot = Arc<tokio::sync::Mutex<Option<StreamCursor>>>;

/// The fetcher of one mount daemon, shared by all its mountpoints.
pub struct Fetcher<S> {
    store: Arc<S>,
    cache: BlockCache,
    stats: Arc<Stats>,
    config: FetchConfig,
    /// Pieces being fetched, and whether speculatively (read-ahead, neighbours).
    inflight: Mutex<HashMap<BlockKey, (Pending, bool)>>,
    readahead: Arc<Semaphore>,
    sequential: Mutex<lru::LruCache<(u64, u32), Seq>>,
    streams: Mutex<HashMap<(u64, u32), CursorSlot>>,
    /// Verify passes and block sums of entries with one CRC-32 over many blocks.
    verify: Verifier,
    /// Verify passes running at once: each holds a GET buffer, one block and
    /// a decoder's window, and decoding is CPU-bound anyway.
    passes: Semaphore,
    /// Where the last neighbour batch ended, to tell walks in archive order.
    walk: Mutex<Walk>,
}

/// Most verify passes running at once.
const MAX_PASSES: usize = 4;

/// Decoded bytes per blocking decode task.
const DECODE_CHUNK: u64 = 2 << 20;

/// Read-ahead memory is counted in units of this many bytes (semaphore permits are u32).
const PERMIT_UNIT: u64 = 4096;

impl<S: ObjectStore> Fetcher<S> {
    pub fn new(
        store: Arc<S>,
        cache_bytes: u64,
        stats: Arc<Stats>,
        config: FetchConfig,
    ) -> Arc<Self> {
        // Read-ahead lands in the cache: more of it than half the cache would
        // be evicted before it is read, and would only grow the daemon's memory.
        let readahead_memory = config.readahead_memory.min(cache_bytes / 2);
        let permits = (readahead_memory / PERMIT_UNIT).clamp(1, u64::from(u32::MAX >> 4)) as usize;
        Arc::new(Fetcher {
            store,
            cache: BlockCache::new(cache_bytes),
            stats,
            readahead: Arc::new(Semaphore::new(permits)),
            config,
            inflight: Mutex::new(HashMap::new()),
            sequential: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(4096).unwrap(),
            )),
            streams: Mutex::new(HashMap::new()),
            verify: Verifier::default(),
            passes: Semaphore::new(MAX_PASSES),
            walk: Mutex::new(Walk::default()),
        })
    }

    /// Forgets everything of version `id` (after the mount moved to a new
    /// version): its cached blocks, verification states, stream cursors and
    /// sequential state. Returns how many cached blocks were dropped.
    pub fn drop_version(&self, id: u64) -> u64 {
        self.streams.lock().retain(|(v, _), _| *v != id);
        self.verify.drop_version(id);
        let mut seq = self.sequential.lock();
        let old: Vec<(u64, u32)> = seq
            .iter()
            .filter(|((v, _), _)| *v == id)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            seq.pop(&k);
        }
        drop(seq);
        self.cache.drop_version(id)
    }

    pub fn cache(&self) -> &BlockCache {
        &self.cache
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The counters as `name value` lines.
    pub fn render_stats(&self) -> String {
        self.stats.render(self.cache.bytes(), self.cache.capacity())
    }

    fn layout(&self, e: &Entry) -> Layout {
        if !e.frames.is_empty() {
            return Layout::Frames;
        }
        match e.compression {
            Compression::Stored => Layout::Stored,
            _ if e.size <= self.config.whole_max && e.compressed_size <= self.config.whole_max => {
                Layout::Whole
            }
            _ => Layout::Stream,
        }
    }

    /// An entry with one checksum (the CRC-32 of its content) over more than
    /// one block: served only after a verify pass.
    fn needs_pass(e: &Entry, layout: Layout) -> bool {
        match layout {
            Layout::Stream => true,
            Layout::Stored => e.size > BLOCK_SIZE,
            Layout::Frames | Layout::Whole => false,
        }
    }

    fn block_size(e: &Entry, layout: Layout) -> u64 {
        match layout {
            Layout::Frames if e.frame_size > 0 => u64::from(e.frame_size),
            Layout::Frames => e.size.max(1),
            _ => BLOCK_SIZE,
        }
    }

    fn block_count(e: &Entry, layout: Layout) -> u32 {
        match layout {
            Layout::Frames => e.frames.len() as u32,
            _ => e.size.div_ceil(BLOCK_SIZE) as u32,
        }
    }

    /// Small enough that fetching its neighbours along with it pays.
    fn is_small(&self, e: &Entry) -> bool {
        e.kind == EntryKind::File
            && e.size > 0
            && e.compressed_size <= self.config.small_file
            && match self.layout(e) {
                Layout::Frames => e.frames.len() == 1,
                Layout::Stored => e.size <= BLOCK_SIZE,
                Layout::Whole => true,
                Layout::Stream => false,
            }
    }

    fn piece_key(&self, v: &Version, p: Piece) -> BlockKey {
        BlockKey {
            version: v.id,
            entry: p.entry,
            block: p.block,
        }
    }

    /// Reads `offset..offset+len` of entry `entry` (clamped to its size).
    pub async fn read(
        self: &Arc<Self>,
        v: &Arc<Version>,
        entry: u32,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, FetchError> {
        let e = v.entry(entry);
        if offset >= e.size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + u64::from(len)).min(e.size);
        let layout = self.layout(e);
        self.gate(v, entry, layout).await?;
        let bs = Self::block_size(e, layout);
        let first = (offset / bs) as u32;
        let last = ((end - 1) / bs) as u32;
        let mut blocks: Vec<Option<Bytes>> = vec![None; (last - first + 1) as usize];
        let mut missing = Vec::new();
        for b in first..=last {
            match self.cache.get(&BlockKey {
                version: v.id,
                entry,
                block: b,
            }) {
                Some(hit) => {
                    Stats::inc(&self.stats.hits);
                    if hit.prefetched {
                        Stats::inc(&self.stats.readahead_hits);
                        self.continue_walk(v, entry);
                    }
                    blocks[(b - first) as usize] = Some(hit.data);
                }
                None => {
                    Stats::inc(&self.stats.misses);
                    missing.push(b);
                }
            }
        }
        if !missing.is_empty() {
            if layout == Layout::Stream {
                let got = self.stream_blocks(v, entry, &missing).await?;
                for (b, data) in missing.iter().zip(got) {
                    blocks[(b - first) as usize] = Some(data);
                }
            } else {
                let required: Vec<Piece> = if layout == Layout::Whole {
                    vec![Piece { entry, block: 0 }]
                } else {
                    missing
                        .iter()
                        .map(|&block| Piece { entry, block })
                        .collect()
                };
                let optional = if self.is_small(e) {
                    let mut walk = self.walk.lock();
                    let batch = self.neighbours(v, entry, walk.continues(v.id, entry));
                    walk.after_batch(v.id, entry, &batch);
                    batch
                } else {
                    Vec::new()
                };
                let pending = self.start(v, &required, &optional, None);
                for (piece, fut) in required.iter().zip(pending) {
                    let out = fut.await?;
                    if layout == Layout::Whole {
                        for &b in &missing {
                            blocks[(b - first) as usize] = out.get(b as usize).cloned();
                        }
                    } else {
                        blocks[(piece.block - first) as usize] = out.first().cloned();
                    }
                }
            }
        }
        self.read_ahead(v, entry, layout, offset, end, last);
        Self::assemble(v, entry, blocks, first, bs, offset, end)
    }

    /// What must hold before any byte of a foreign entry is served: one with
    /// a verify pass has passed it (waiting for it, or starting it); any
    /// other is not known to be bad.
    async fn gate(
        self: &Arc<Self>,
        v: &Arc<Version>,
        entry: u32,
        layout: Layout,
    ) -> Result<(), FetchError> {
        if layout == Layout::Frames {
            return Ok(());
        }
        if Self::needs_pass(v.entry(entry), layout) {
            return self.verified(v, entry).await.map(drop);
        }
        match self.verify.settled((v.id, entry)) {
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// The entry's block sums once its verify pass succeeded: at once when it
    /// did, else after the pass (joined, or started here if none ran yet).
    async fn verified(self: &Arc<Self>, v: &Arc<Version>, entry: u32) -> Verified {
        let key = (v.id, entry);
        if let Some(done) = self.verify.settled(key) {
            return done;
        }
        let pass = self.verify.join(key, |ticket| {
            let this = self.clone();
            let v = v.clone();
            // Spawned: the pass finishes (and settles) even if its readers give up.
            tokio::spawn(async move {
                let outcome = this.verify_pass(&v, entry).await;
                this.verify.settle(ticket, &outcome);
                outcome
            })
            .map(|joined| {
                joined.unwrap_or_else(|e| {
                    Err(FetchError::Corrupt(format!("verifying panicked: {e}")))
                })
            })
            .boxed()
            .shared()
        });
        pass.await
    }

    /// One verify pass, with the one re-fetch a failed check gets (the damage
    /// may have happened in transit); a second failure makes the entry bad,
    /// logged here, once.
    async fn verify_pass(self: &Arc<Self>, v: &Arc<Version>, entry: u32) -> Verified {
        let _permit = self.passes.acquire().await.expect("never closed");
        let mut outcome = self.decode_pass(v, entry).await;
        if let Err(FetchError::Corrupt(reason)) = &outcome {
            tracing::warn!("{reason}; fetching it once more");
            outcome = self.decode_pass(v, entry).await;
        }
        match outcome {
            Err(FetchError::Corrupt(reason)) => {
                Stats::inc(&self.stats.corrupt_blocks);
                tracing::error!("{reason}; every read of it fails with EIO");
                Err(FetchError::Damaged(reason))
            }
            other => other,
        }
    }

    /// Decodes the whole entry once, streaming: its blocks go to the cache
    /// (not served before the pass settles; dropped if it fails), their sums
    /// to the table, and the content is checked against the entry's size and
    /// CRC-32.
    async fn decode_pass(self: &Arc<Self>, v: &Arc<Version>, entry: u32) -> Verified {
        Stats::inc(&self.stats.verify_passes);
        tracing::debug!("verifying {}: decoding it whole", v.name(entry));
        let start = self.data_offset(v, entry).await?;
        let (reader, source_error) = self.range_reader(v, start, v.entry(entry).compressed_size);
        let this = self.clone();
        let v2 = v.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut sink = BlockSink::new(BLOCK_SIZE as usize, |block, data| {
                Stats::inc(&this.stats.prefetched_blocks);
                let key = BlockKey {
                    version: v2.id,
                    entry,
                    block,
                };
                this.cache.insert(key, data, true);
            });
            decode_entry_to(v2.entry(entry), reader, &mut sink).map(|()| sink.finish())
        })
        .await;
        let outcome = match done {
            Ok(Ok(sums)) => Ok(Arc::new(sums)),
            Ok(Err(err)) => Err(source_error
                .lock()
                .take()
                .unwrap_or_else(|| FetchError::Corrupt(err.to_string()))),
            Err(panic) => Err(FetchError::Corrupt(format!(
                "verifying {} panicked: {panic}",
                v.name(entry)
            ))),
        };
        if outcome.is_err() {
            self.cache.drop_entry(v.id, entry);
        }
        outcome
    }

    /// The block sums of an entry whose pass succeeded. Its state is gone only
    /// when a reopen dropped the version meanwhile: `Changed`, so the read is
    /// retried on the new version.
    fn sums(&self, v: &Version, entry: u32) -> Verified {
        self.verify.settled((v.id, entry)).unwrap_or_else(|| {
            Err(FetchError::Changed(format!(
                "{} was reopened while {} was read",
                v.key,
                v.name(entry)
            )))
        })
    }

    /// The bytes `offset..end` from the blocks `first..` (block size `bs`).
    fn assemble(
        v: &Version,
        entry: u32,
        blocks: Vec<Option<Bytes>>,
        first: u32,
        bs: u64,
        offset: u64,
        end: u64,
    ) -> Result<Bytes, FetchError> {
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for (i, block) in blocks.into_iter().enumerate() {
            let block = block.ok_or_else(|| {
                FetchError::Corrupt(format!(
                    "{}: block {} is missing after its fetch",
                    v.name(entry),
                    first as usize + i
                ))
            })?;
            let block_start = (first as u64 + i as u64) * bs;
            let from = offset.saturating_sub(block_start) as usize;
            let to = ((end - block_start) as usize).min(block.len());
            if from > to {
                return Err(FetchError::Corrupt(format!(
                    "{}: block {} is shorter than the index says",
                    v.name(entry),
                    first as usize + i
                )));
            }
            if out.is_empty() && to - from == (end - offset) as usize {
                return Ok(block.slice(from..to));
            }
            out.extend_from_slice(&block[from..to]);
        }
        if out.len() as u64 != end - offset {
            return Err(FetchError::Corrupt(format!(
                "{}: blocks are shorter than the index says",
                v.name(entry)
            )));
        }
        Ok(out.freeze())
    }

    /// The read answered from the cache alone, or `None` if any block is
    /// missing (no I/O, no waiting: callable on a FUSE thread inside the
    /// runtime's context).
    pub fn read_cached(
        self: &Arc<Self>,
        v: &Arc<Version>,
        entry: u32,
        offset: u64,
        len: u32,
    ) -> Option<Result<Bytes, FetchError>> {
        let e = v.entry(entry);
        if offset >= e.size || len == 0 {
            return Some(Ok(Bytes::new()));
        }
        let end = (offset + u64::from(len)).min(e.size);
        let layout = self.layout(e);
        if layout != Layout::Frames {
            match self.verify.settled((v.id, entry)) {
                Some(Err(err)) => return Some(Err(err)),
                None if Self::needs_pass(e, layout) => return None,
                _ => {}
            }
        }
        let bs = Self::block_size(e, layout);
        let first = (offset / bs) as u32;
        let last = ((end - 1) / bs) as u32;
        let key = |block| BlockKey {
            version: v.id,
            entry,
            block,
        };
        if !(first..=last).all(|b| self.cache.contains(&key(b))) {
            return None;
        }
        let mut blocks = Vec::with_capacity((last - first + 1) as usize);
        for b in first..=last {
            let hit = self.cache.get(&key(b))?;
            Stats::inc(&self.stats.hits);
            if hit.prefetched {
                Stats::inc(&self.stats.readahead_hits);
                self.continue_walk(v, entry);
            }
            blocks.push(Some(hit.data));
        }
        self.read_ahead(v, entry, layout, offset, end, last);
        Some(Self::assemble(v, entry, blocks, first, bs, offset, end))
    }

    /// A prefetched small file was read: if it is inside the last batch,
    /// fetch the next batch now (in the background).
    fn continue_walk(self: &Arc<Self>, v: &Arc<Version>, entry: u32) {
        let batch = {
            let mut walk = self.walk.lock();
            if walk.version != v.id
                || entry < walk.trigger
                || entry >= walk.next
                || !self.is_small(v.entry(entry))
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
        let units = bytes.div_ceil(PERMIT_UNIT).min(u64::from(u32::MAX)) as u32;
        if let Ok(permit) = self.readahead.clone().try_acquire_many_owned(units) {
            self.start(v, &[], &batch, Some(permit));
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
            if !self.is_small(n) {
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
    fn read_ahead(
        self: &Arc<Self>,
        v: &Arc<Version>,
        entry: u32,
        layout: Layout,
        offset: u64,
        end: u64,
        last: u32,
    ) {
        let e = v.entry(entry);
        let window = {
            let mut seq = self.sequential.lock();
            let st = seq.get_or_insert_mut((v.id, entry), Seq::default);
            let bs = Self::block_size(e, layout);
            // Sequential: the first read starts at 0, every later one starts
            // near the end of the reads so far (the kernel's read-ahead sends
            // several reads at once, which may arrive out of order); a read
            // of the same offset again (concurrent readers) is not progress.
            let span = (u64::from(st.window) + 1) * bs;
            let sequential = match st.last {
                None => offset == 0,
                Some(last) => {
                    offset != last && offset + span >= st.next && offset <= st.next + span
                }
            };
            st.window = if sequential {
                (st.window * 2).clamp(1, self.config.readahead_max_blocks)
            } else {
                0
            };
            st.last = Some(offset);
            st.next = if sequential { st.next.max(end) } else { end };
            st.window
        };
        if window == 0 {
            return;
        }
        match layout {
            Layout::Frames | Layout::Stored => {}
            Layout::Stream => {
                let next = BlockKey {
                    version: v.id,
                    entry,
                    block: last + 1,
                };
                if last + 1 < Self::block_count(e, layout) && !self.cache.contains(&next) {
                    let this = self.clone();
                    let v = v.clone();
                    let target = (last + self.config.stream_ahead_blocks)
                        .min(Self::block_count(e, layout) - 1);
                    tokio::spawn(async move {
                        let _ = this.stream_decode(&v, entry, &[], target).await;
                    });
                }
                return;
            }
            Layout::Whole => return,
        }
        let count = Self::block_count(e, layout);
        // Keep read-ahead well inside the cache so it does not evict what it prefetched.
        let cache_blocks = (self.cache.capacity() / Self::block_size(e, layout) / 4).max(1) as u32;
        let to = (last.saturating_add(window.min(cache_blocks))).min(count.saturating_sub(1));
        let pieces: Vec<Piece> = {
            let inflight = self.inflight.lock();
            (last + 1..=to)
                .map(|block| Piece { entry, block })
                .filter(|p| {
                    let key = self.piece_key(v, *p);
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
        let bytes: u64 = pieces.iter().map(|p| self.piece_range_len(v, *p)).sum();
        let units = bytes.div_ceil(PERMIT_UNIT).min(u64::from(u32::MAX)) as u32;
        let Ok(permit) = self.readahead.clone().try_acquire_many_owned(units) else {
            tracing::debug!(
                "read-ahead memory exhausted; not reading ahead in {}",
                v.name(entry)
            );
            return;
        };
        self.start(v, &[], &pieces, Some(permit));
    }

    fn piece_range_len(&self, v: &Version, p: Piece) -> u64 {
        let e = v.entry(p.entry);
        match self.layout(e) {
            Layout::Frames => u64::from(e.frames[p.block as usize].compressed_len),
            Layout::Stored => BLOCK_SIZE.min(e.size - u64::from(p.block) * BLOCK_SIZE),
            _ => e.compressed_size,
        }
    }

    /// Registers `required` (awaited by the caller) and `optional` (speculative,
    /// skipped when already cached or in flight) pieces and starts one task
    /// fetching every piece nobody is fetching yet. Returns, for each required
    /// piece, the future of its blocks.
    fn start(
        self: &Arc<Self>,
        v: &Arc<Version>,
        required: &[Piece],
        optional: &[Piece],
        permit: Option<OwnedSemaphorePermit>,
    ) -> Vec<Pending> {
        let mut jobs = Vec::new();
        let mut waits = Vec::with_capacity(required.len());
        {
            let mut inflight = self.inflight.lock();
            for &piece in required {
                let key = self.piece_key(v, piece);
                if let Some((f, speculative)) = inflight.get(&key) {
                    // Joining a read-ahead in flight is a read-ahead hit too.
                    if *speculative {
                        Stats::inc(&self.stats.readahead_hits);
                    }
                    waits.push(f.clone());
                    continue;
                }
                let (tx, rx) = oneshot::channel();
                let fut = pending(rx);
                inflight.insert(key, (fut.clone(), false));
                waits.push(fut);
                jobs.push(Job {
                    piece,
                    tx,
                    speculative: false,
                });
            }
            for &piece in optional {
                let key = self.piece_key(v, piece);
                if inflight.contains_key(&key) || self.cache.contains(&key) {
                    continue;
                }
                let (tx, rx) = oneshot::channel();
                inflight.insert(key, (pending(rx), true));
                jobs.push(Job {
                    piece,
                    tx,
                    speculative: true,
                });
            }
        }
        if !jobs.is_empty() {
            let this = self.clone();
            let v = v.clone();
            tokio::spawn(async move {
                this.run(&v, jobs).await;
                drop(permit);
            });
        }
        waits
    }

    /// Where a piece's bytes are: exact when the entry's data offset is known,
    /// else from its local header with slack for the header (`true`).
    fn piece_range(&self, v: &Version, p: Piece) -> (Range<u64>, bool) {
        let e = v.entry(p.entry);
        let rel = match self.layout(e) {
            Layout::Frames => {
                let (start, _) = e.frame_span(p.block as usize);
                start..start + u64::from(e.frames[p.block as usize].compressed_len)
            }
            Layout::Stored => {
                let start = u64::from(p.block) * BLOCK_SIZE;
                start..(start + BLOCK_SIZE).min(e.size)
            }
            Layout::Whole | Layout::Stream => 0..e.compressed_size,
        };
        match (v.known_offset(p.entry), e.offset) {
            (Some(off), _) => (off + rel.start..off + rel.end, false),
            (None, DataOffset::LocalHeader(lh)) | (None, DataOffset::Data(lh)) => {
                let end = (lh
                    + LOCAL_HEADER_LEN as u64
                    + e.name.len() as u64
                    + 1
                    + LOCAL_HEADER_SLACK
                    + rel.end)
                    .min(v.size);
                (lh..end, true)
            }
        }
    }

    /// Fetches and decodes `jobs`: merged into as few GETs as the config allows,
    /// the GETs run concurrently.
    async fn run(self: &Arc<Self>, v: &Arc<Version>, jobs: Vec<Job>) {
        let mut planned: Vec<(Range<u64>, Job)> = jobs
            .into_iter()
            .map(|j| (self.piece_range(v, j.piece).0, j))
            .collect();
        planned.sort_by_key(|(r, _)| r.start);
        let mut groups: Vec<(Range<u64>, Vec<Job>)> = Vec::new();
        for (range, job) in planned {
            match groups.last_mut() {
                Some((g, members))
                    if range.start <= g.end + self.config.merge_gap
                        && range.end.max(g.end) - g.start <= self.config.max_get =>
                {
                    g.end = g.end.max(range.end);
                    members.push(job);
                }
                _ => groups.push((range, vec![job])),
            }
        }
        futures::future::join_all(
            groups
                .into_iter()
                .map(|(range, members)| self.run_group(v, range, members)),
        )
        .await;
    }

    async fn run_group(self: &Arc<Self>, v: &Arc<Version>, range: Range<u64>, jobs: Vec<Job>) {
        let data = match self.get(v, range.clone()).await {
            Ok(d) => d,
            Err(e) => {
                let names: Vec<String> =
                    jobs.iter().take(3).map(|j| v.name(j.piece.entry)).collect();
                tracing::error!("read of {} failed: {e}", names.join(", "));
                for job in jobs {
                    self.finish(v, job, Err(e.clone()));
                }
                return;
            }
        };
        // Slice each piece out of the buffer (rarely: fetch it exactly).
        let mut sliced = Vec::with_capacity(jobs.len());
        for job in jobs {
            let bytes = match self.slice_piece(v, job.piece, range.start, &data) {
                Some(b) => Ok(b),
                // The local header was longer than the slack allowed for: fetch exactly.
                None => match self.data_offset(v, job.piece.entry).await {
                    Ok(_) => self.get(v, self.piece_range(v, job.piece).0).await,
                    Err(e) => Err(e),
                },
            };
            sliced.push((job, bytes));
        }
        // Readers waiting first; then cut into chunks of about DECODE_CHUNK
        // output bytes, each decoded on one blocking thread (many small files
        // would drown in per-task overhead; large frames decode in parallel).
        sliced.sort_by_key(|(job, _)| job.speculative);
        let mut chunks: Vec<Vec<(Job, Result<Bytes, FetchError>)>> = Vec::new();
        let mut chunk_bytes = u64::MAX;
        for item in sliced {
            if chunk_bytes >= DECODE_CHUNK {
                chunks.push(Vec::new());
                chunk_bytes = 0;
            }
            chunk_bytes += v.entry(item.0.piece.entry).size.min(BLOCK_SIZE);
            chunks.last_mut().expect("pushed above").push(item);
        }
        let runtime = tokio::runtime::Handle::current();
        futures::future::join_all(chunks.into_iter().map(|chunk| {
            let this = self.clone();
            let v = v.clone();
            let runtime = runtime.clone();
            async move {
                let done = tokio::task::spawn_blocking(move || {
                    for (job, bytes) in chunk {
                        let mut outcome = bytes.and_then(|b| this.decode(&v, job.piece, &b));
                        if let Err(FetchError::Corrupt(_)) = &outcome {
                            outcome = this.refetch_and_decode(&v, job.piece, &runtime);
                        }
                        if let Err(FetchError::Corrupt(e)) = &outcome {
                            Stats::inc(&this.stats.corrupt_blocks);
                            tracing::error!(
                                "corrupt data in {}: {e}; reads of it fail with EIO",
                                v.name(job.piece.entry)
                            );
                            // A foreign entry's one checksum failed twice: bad for good.
                            if this.layout(v.entry(job.piece.entry)) != Layout::Frames {
                                let reason = e.clone();
                                this.verify
                                    .mark_bad((v.id, job.piece.entry), reason.clone());
                                outcome = Err(FetchError::Damaged(reason));
                            }
                        }
                        this.finish(&v, job, outcome);
                    }
                })
                .await;
                if let Err(e) = done {
                    tracing::error!("decoding panicked: {e}");
                }
            }
        }))
        .await;
    }

    /// A corrupt piece is fetched once more on its own before it counts as
    /// corrupt: the damage may have happened in transit. Runs on a blocking
    /// decode thread, so it may wait on the runtime.
    fn refetch_and_decode(
        &self,
        v: &Version,
        piece: Piece,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Arc<Vec<Bytes>>, FetchError> {
        let (range, needs_header) = self.piece_range(v, piece);
        tracing::warn!(
            "corrupt data in {}: fetching it once more",
            v.name(piece.entry)
        );
        let fetched = runtime.block_on(self.get(v, range.clone()))?;
        let bytes = if needs_header {
            self.slice_piece(v, piece, range.start, &fetched)
                .ok_or_else(|| {
                    FetchError::Corrupt(format!("{}: local header", v.name(piece.entry)))
                })?
        } else {
            fetched
        };
        self.decode(v, piece, &bytes)
    }

    /// The piece's compressed bytes from a fetched buffer starting at `base`,
    /// resolving a foreign entry's data offset from its local header first.
    fn slice_piece(&self, v: &Version, p: Piece, base: u64, data: &Bytes) -> Option<Bytes> {
        let (_, needs_header) = self.piece_range(v, p);
        if needs_header {
            let DataOffset::LocalHeader(lh) = v.entry(p.entry).offset else {
                return None;
            };
            let at = (lh - base) as usize;
            let header = data.get(at..at + LOCAL_HEADER_LEN)?;
            let start = local_header_data_start(header).ok()?;
            v.set_offset(p.entry, lh + start);
        }
        let (range, _) = self.piece_range(v, p);
        let from = (range.start.checked_sub(base)?) as usize;
        let to = (range.end - base) as usize;
        (to <= data.len()).then(|| data.slice(from..to))
    }

    fn decode(&self, v: &Version, p: Piece, bytes: &[u8]) -> Outcome {
        let e = v.entry(p.entry);
        let corrupt = |reason: String| FetchError::Corrupt(reason);
        let blocks = match self.layout(e) {
            Layout::Frames => vec![Bytes::from(
                decode_frame(e, p.block as usize, bytes).map_err(|err| corrupt(err.to_string()))?,
            )],
            Layout::Stored if e.size <= BLOCK_SIZE => {
                // A one-block stored entry is checked whole.
                if bytes.len() as u64 != e.size || crc32fast::hash(bytes) != e.crc32 {
                    return Err(corrupt(format!(
                        "{}: CRC-32 or size does not match the index",
                        v.name(p.entry)
                    )));
                }
                vec![Bytes::copy_from_slice(bytes)]
            }
            Layout::Stored => {
                // A larger one was verified whole; this block is read again.
                if !self.sums(v, p.entry)?.check(p.block, bytes) {
                    return Err(corrupt(format!(
                        "{}: block {} differs from the verified entry",
                        v.name(p.entry),
                        p.block
                    )));
                }
                Stats::inc(&self.stats.redecoded_blocks);
                vec![Bytes::copy_from_slice(bytes)]
            }
            Layout::Whole | Layout::Stream => {
                let all =
                    Bytes::from(decode_entry(e, bytes).map_err(|err| corrupt(err.to_string()))?);
                (0..all.len().div_ceil(BLOCK_SIZE as usize))
                    .map(|i| {
                        all.slice(
                            i * BLOCK_SIZE as usize..((i + 1) * BLOCK_SIZE as usize).min(all.len()),
                        )
                    })
                    .collect()
            }
        };
        Ok(Arc::new(blocks))
    }

    /// Caches a finished piece's blocks, then wakes its readers.
    fn finish(&self, v: &Version, job: Job, outcome: Outcome) {
        let key = self.piece_key(v, job.piece);
        if let Ok(blocks) = &outcome {
            let whole = matches!(
                self.layout(v.entry(job.piece.entry)),
                Layout::Whole | Layout::Stream
            );
            for (i, b) in blocks.iter().enumerate() {
                let block = if whole { i as u32 } else { job.piece.block };
                self.cache.insert(
                    BlockKey {
                        version: v.id,
                        entry: job.piece.entry,
                        block,
                    },
                    b.clone(),
                    job.speculative,
                );
                if job.speculative {
                    Stats::inc(&self.stats.prefetched_blocks);
                }
            }
        }
        self.inflight.lock().remove(&key);
        let _ = job.tx.send(outcome);
    }

    /// One pinned range GET, counted.
    pub async fn get(&self, v: &Version, range: Range<u64>) -> Result<Bytes, FetchError> {
        Stats::inc(&self.stats.requests);
        match self
            .store
            .get_range(&v.key, range.clone(), Some(&v.pin))
            .await
        {
            Ok(bytes) => {
                Stats::add(&self.stats.bytes_fetched, bytes.len() as u64);
                if bytes.len() as u64 != range.end - range.start {
                    return Err(FetchError::Store(format!(
                        "{}: short read of {range:?} ({} bytes)",
                        v.key,
                        bytes.len()
                    )));
                }
                Ok(bytes)
            }
            Err(StoreError::PreconditionFailed(what)) => {
                Stats::inc(&self.stats.precondition_failed);
                tracing::info!(
                    "{what} changed in the store (HTTP 412 on If-Match {}): reopening",
                    v.pin.etag
                );
                Err(FetchError::Changed(format!(
                    "{what} changed in the store since it was mounted"
                )))
            }
            Err(e) => Err(FetchError::Store(e.to_string())),
        }
    }

    /// The entry's data offset, reading its local header if needed.
    async fn data_offset(&self, v: &Version, entry: u32) -> Result<u64, FetchError> {
        if let Some(o) = v.known_offset(entry) {
            return Ok(o);
        }
        let DataOffset::LocalHeader(lh) = v.entry(entry).offset else {
            unreachable!("known offsets are never 0")
        };
        let header = self
            .get(v, lh..(lh + LOCAL_HEADER_LEN as u64).min(v.size))
            .await?;
        let start = local_header_data_start(&header)
            .map_err(|e| FetchError::Corrupt(format!("{}: {e}", v.name(entry))))?;
        v.set_offset(entry, lh + start);
        Ok(lh + start)
    }

    // ---- sequentially decoded entries ----

    /// The blocks `wanted` (ascending) of a stream entry.
    async fn stream_blocks(
        self: &Arc<Self>,
        v: &Arc<Version>,
        entry: u32,
        wanted: &[u32],
    ) -> Result<Vec<Bytes>, FetchError> {
        let target = *wanted.last().expect("at least one block");
        let got = self.stream_decode(v, entry, wanted, target).await?;
        Ok(got)
    }

    /// Advances the entry's cursor to block `target` (restarting it when it is
    /// past the first block needed that is not cached), caching every block it
    /// passes; returns the `wanted` blocks.
    async fn stream_decode(
        self: &Arc<Self>,
        v: &Arc<Version>,
        entry: u32,
        wanted: &[u32],
        target: u32,
    ) -> Result<Vec<Bytes>, FetchError> {
        let slot = self
            .streams
            .lock()
            .entry((v.id, entry))
            .or_default()
            .clone();
        let mut guard = slot.lock().await;
        // Another reader may have decoded what we want while we waited.
        let mut have: HashMap<u32, Bytes> = HashMap::new();
        for &b in wanted {
            if let Some(hit) = self.cache.get(&BlockKey {
                version: v.id,
                entry,
                block: b,
            }) {
                have.insert(b, hit.data);
            }
        }
        let first_needed = wanted.iter().copied().find(|b| !have.contains_key(b));
        let needs_work =
            first_needed.is_some() || guard.as_ref().is_none_or(|c| c.next_block <= target);
        if needs_work {
            let sums = self.sums(v, entry)?;
            let restart_before = first_needed.unwrap_or(target);
            let mut cursor = match guard.take() {
                Some(c) if c.next_block <= restart_before => c,
                _ => self.new_cursor(v, entry).await?,
            };
            let wanted_owned: Arc<[u32]> = wanted
                .iter()
                .copied()
                .filter(|b| !have.contains_key(b))
                .collect();
            let mut retried = false;
            loop {
                let this = self.clone();
                let v2 = v.clone();
                let (sums, wanted) = (sums.clone(), wanted_owned.clone());
                let res = tokio::task::spawn_blocking(move || {
                    let r = this.advance(&v2, entry, &mut cursor, target, &wanted, &sums);
                    (cursor, r)
                })
                .await;
                match res {
                    Ok((cursor, Ok(got))) => {
                        if cursor.next_block < Self::block_count(v.entry(entry), Layout::Stream) {
                            *guard = Some(cursor);
                        }
                        have.extend(got);
                        break;
                    }
                    // Decoded differently than when verified: once more from
                    // the start (transit damage), then the entry is bad.
                    Ok((_, Err(FetchError::Corrupt(reason)))) if !retried => {
                        tracing::warn!("{reason}; fetching it once more");
                        retried = true;
                        cursor = self.new_cursor(v, entry).await?;
                    }
                    Ok((_, Err(FetchError::Corrupt(reason)))) => {
                        Stats::inc(&self.stats.corrupt_blocks);
                        tracing::error!("{reason}; every read of it fails with EIO");
                        self.verify.mark_bad((v.id, entry), reason.clone());
                        self.cache.drop_entry(v.id, entry);
                        return Err(FetchError::Damaged(reason));
                    }
                    Ok((_, Err(e))) => return Err(e),
                    Err(e) => {
                        return Err(FetchError::Corrupt(format!(
                            "decoding {} panicked: {e}",
                            v.name(entry)
                        )))
                    }
                }
            }
        }
        wanted
            .iter()
            .map(|b| {
                have.remove(b).ok_or_else(|| {
                    FetchError::Corrupt(format!(
                        "{}: block {b} not produced by its stream",
                        v.name(entry)
                    ))
                })
            })
            .collect()
    }

    async fn new_cursor(
        self: &Arc<Self>,
        v: &Arc<Version>,
        entry: u32,
    ) -> Result<StreamCursor, FetchError> {
        let e = v.entry(entry);
        let start = self.data_offset(v, entry).await?;
        let (reader, source_error) = self.range_reader(v, start, e.compressed_size);
        let decoder: Box<dyn Read + Send> = match e.compression {
            Compression::Deflate => Box::new(flate2::read::DeflateDecoder::new(reader)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(reader)
                    .map_err(|err| FetchError::Corrupt(format!("{}: {err}", v.name(entry))))?,
            ),
            Compression::Stored => Box::new(reader),
        };
        tracing::debug!("decoding {} sequentially from its start", v.name(entry));
        Ok(StreamCursor {
            next_block: 0,
            decoder,
            source_error,
        })
    }

    /// A blocking reader of `len` archive bytes from `start`, and where it
    /// leaves a store error (to tell it apart from corruption in the decoder
    /// reading it).
    fn range_reader(
        self: &Arc<Self>,
        v: &Arc<Version>,
        start: u64,
        len: u64,
    ) -> (RangeReader<S>, Arc<Mutex<Option<FetchError>>>) {
        let error = Arc::new(Mutex::new(None));
        let reader = RangeReader {
            fetcher: self.clone(),
            version: v.clone(),
            handle: tokio::runtime::Handle::current(),
            pos: start,
            end: start + len,
            chunk: self.config.stream_chunk,
            buf: Bytes::new(),
            error: error.clone(),
        };
        (reader, error)
    }

    /// Blocking: decodes blocks up to `target`, each checked against the sums
    /// of the entry's verify pass, caching each; returns those in `wanted`.
    fn advance(
        &self,
        v: &Version,
        entry: u32,
        cursor: &mut StreamCursor,
        target: u32,
        wanted: &[u32],
        sums: &BlockSums,
    ) -> Result<Vec<(u32, Bytes)>, FetchError> {
        let e = v.entry(entry);
        let count = Self::block_count(e, Layout::Stream);
        let mut got = Vec::new();
        while cursor.next_block <= target && cursor.next_block < count {
            let b = cursor.next_block;
            let len = (e.size - u64::from(b) * BLOCK_SIZE).min(BLOCK_SIZE) as usize;
            let mut buf = vec![0u8; len];
            if let Err(err) = cursor.decoder.read_exact(&mut buf) {
                if let Some(source) = cursor.source_error.lock().take() {
                    return Err(source);
                }
                return Err(FetchError::Corrupt(format!(
                    "corrupt data in {}: {err}",
                    v.name(entry)
                )));
            }
            if !sums.check(b, &buf) {
                return Err(FetchError::Corrupt(format!(
                    "corrupt data in {}: block {b} decodes differently than when the entry was verified",
                    v.name(entry)
                )));
            }
            Stats::inc(&self.stats.redecoded_blocks);
            cursor.next_block += 1;
            let data = Bytes::from(buf);
            let is_wanted = wanted.contains(&b);
            if !is_wanted {
                Stats::inc(&self.stats.prefetched_blocks);
            }
            self.cache.insert(
                BlockKey {
                    version: v.id,
                    entry,
                    block: b,
                },
                data.clone(),
                !is_wanted,
            );
            if is_wanted {
                got.push((b, data));
            }
        }
        Ok(got)
    }
}

fn pending(rx: oneshot::Receiver<Outcome>) -> Pending {
    rx.map(|r| r.unwrap_or_else(|_| Err(FetchError::Store("the fetch was abandoned".into()))))
        .boxed()
        .shared()
}

/// Blocking `Read` over a byte range of the pinned object, in chunks of
/// pinned range GETs (runs on a blocking thread, drives the runtime by handle).
struct RangeReader<S> {
    fetcher: Arc<Fetcher<S>>,
    version: Arc<Version>,
    handle: tokio::runtime::Handle,
    pos: u64,
    end: u64,
    chunk: u64,
    buf: Bytes,
    error: Arc<Mutex<Option<FetchError>>>,
}

impl<S: ObjectStore> Read for RangeReader<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.buf.is_empty() {
            if self.pos >= self.end {
                return Ok(0);
            }
            let range = self.pos..(self.pos + self.chunk).min(self.end);
            match self
                .handle
                .block_on(self.fetcher.get(&self.version, range.clone()))
            {
                Ok(b) => {
                    self.pos = range.end;
                    self.buf = b;
                }
                Err(e) => {
                    *self.error.lock() = Some(e.clone());
                    return Err(io::Error::other(e.to_string()));
                }
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}
