//! The fetcher: turns "bytes `offset..offset+len` of entry `i`" into verified,
//! cached blocks, with as few store requests as it can. This file ties the
//! parts together — a read's span and cache lookups, the verify pass that
//! gates foreign entries, the pinned GET — and the jobs live beside it:
//!
//! - the block plan, [`super::plan`]: a *block* is one zstd frame of a
//!   multi-frame file, or a fixed [`BLOCK_SIZE`] piece of a stored or
//!   single-stream entry;
//! - the in-flight table, [`super::inflight`]: concurrent misses of one block
//!   fetch it once; the misses of one read, and the speculative pieces added
//!   to it, are merged into range GETs when they are adjacent
//!   (gap ≤ [`FetchConfig::merge_gap`]), up to [`FetchConfig::max_get`] bytes;
//! - prefetching, [`super::prefetch`]: a small file's miss also fetches the
//!   small files after it in the same directory, and sequential readers get
//!   a read-ahead window bounded globally in bytes;
//! - stream decoding, [`super::stream`]: entries that are one compressed
//!   stream too large to fetch whole are decoded sequentially by a cursor.
//!
//! No unverified byte is served. A frame is checked against its checksum
//! before it enters the cache; a failed check is an error for that read
//! only. A foreign entry has one CRC-32 for all of its content: a small one
//! is fetched and checked whole; a larger one (more than one block) is
//! decoded whole once by a verify pass ([`super::verify`]) before its first
//! byte is served, which records a checksum of every block, so a block
//! evicted and decoded again later is checked against it. A foreign entry
//! that fails its check twice (one re-fetch: the damage may have happened in
//! transit) is bad: every read of it fails, logged once.
//!
//! Every GET is pinned to the mount's [`Version`] (If-Match). A 412 fails the
//! read with [`FetchError::Changed`]; reopening is the job of the layer above
//! ([`crate::fs::reopen`]), which swaps in a new `Version` (with a new id, so
//! no old block is served) and calls [`Fetcher::drop_version`].

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::FutureExt;
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::blocks::{BlockCache, BlockKey, Hit, Origin};
use super::config::FetchConfig;
use super::disk::MountDisk;
use super::error::FetchError;
use super::inflight::InFlight;
use super::plan::{is_small, Layout, Piece, Span, BLOCK_SIZE};
use super::prefetch::Prefetch;
use super::stats::Stats;
use super::stream::CursorSlot;
use super::verify::{BlockSink, Verified, Verifier};
use super::version::Version;
use crate::archive::decode::decode_entry_to;
use crate::archive::zip::{local_header_data_start, LOCAL_HEADER_LEN};
use crate::archive::DataOffset;
use crate::store::{ObjectStore, StoreError};

/// The merge gap of a fetcher with a disk cache: a zip local header and a
/// long name fit (the hole between two adjacent entries), a neighbouring
/// file does not. A node_modules file compresses to 1-4 KiB: at 8 KiB, a
/// second key with 2% of its files changed fetched 1.87x their bytes, the
/// holes being files the disk cache held (1.05x at 1 KiB, 11% more GETs).
const DISK_MERGE_GAP: u64 = 1 << 10;

/// The fetcher of one mount daemon, shared by all its mountpoints. Its parts
/// are `pub(super)` for the files of this module that hold its other jobs.
pub struct Fetcher<S> {
    pub(super) store: Arc<S>,
    pub(super) cache: BlockCache,
    pub(super) stats: Arc<Stats>,
    pub(super) config: FetchConfig,
    pub(super) inflight: InFlight,
    pub(super) prefetch: Prefetch,
    pub(super) streams: Mutex<HashMap<(u64, u32), CursorSlot>>,
    /// Verify passes and block sums of entries with one CRC-32 over many blocks.
    pub(super) verify: Verifier,
    /// Verify passes running at once: each holds a GET buffer, one block and
    /// a decoder's window, and decoding is CPU-bound anyway.
    passes: Semaphore,
    /// The host's disk cache, if used.
    pub(super) disk: Option<Arc<MountDisk>>,
}

/// Most verify passes running at once.
const MAX_PASSES: usize = 4;

impl<S: ObjectStore> Fetcher<S> {
    pub fn new(
        store: Arc<S>,
        cache_bytes: u64,
        stats: Arc<Stats>,
        config: FetchConfig,
    ) -> Arc<Self> {
        Self::with_disk(store, cache_bytes, stats, config, None)
    }

    /// A fetcher that also reads and fills the host's disk cache. Its holes
    /// between wanted pieces are mostly files the disk already holds, so it
    /// fetches through holes of at most `DISK_MERGE_GAP`.
    pub fn with_disk(
        store: Arc<S>,
        cache_bytes: u64,
        stats: Arc<Stats>,
        mut config: FetchConfig,
        disk: Option<MountDisk>,
    ) -> Arc<Self> {
        if disk.is_some() {
            config.merge_gap = config.merge_gap.min(DISK_MERGE_GAP);
        }
        Arc::new(Fetcher {
            store,
            cache: BlockCache::new(cache_bytes),
            stats,
            prefetch: Prefetch::new(&config, cache_bytes),
            config,
            inflight: InFlight::default(),
            streams: Mutex::new(HashMap::new()),
            verify: Verifier::default(),
            passes: Semaphore::new(MAX_PASSES),
            disk: disk.map(Arc::new),
        })
    }

    /// Forgets everything of version `id` (after the mount moved to a new
    /// version): its cached blocks, verification states, stream cursors and
    /// sequential state. Returns how many cached blocks were dropped.
    pub fn drop_version(&self, id: u64) -> u64 {
        self.streams.lock().retain(|(v, _), _| *v != id);
        self.verify.drop_version(id);
        self.prefetch.drop_version(id);
        if let Some(d) = &self.disk {
            d.drop_version(id);
        }
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
        let mut out = self.stats.render(&self.cache);
        if let Some(d) = &self.disk {
            out.push_str(&d.render());
        }
        out
    }

    /// Writes this process's disk cache figures to the shared ledger.
    pub fn save_disk_figures(&self) {
        if let Some(d) = &self.disk {
            d.cache().save_figures();
        }
    }

    pub fn has_disk(&self) -> bool {
        self.disk.is_some()
    }

    /// The entry's whole content in the disk cache, checked, if it is there.
    pub fn disk_file(&self, v: &Version, entry: u32) -> Option<Arc<std::fs::File>> {
        self.disk.as_ref()?.file(v, entry)
    }

    /// Whether the piece's entry is whole in the disk cache (so fetching it
    /// speculatively would be waste).
    pub(super) fn on_disk(&self, v: &Version, piece: Piece) -> bool {
        self.disk.as_ref().is_some_and(|d| d.has(v, piece.entry))
    }

    /// Verified blocks of `piece` were decoded (all of the entry's when
    /// `whole`): the disk cache files them (the one place it is filled).
    pub(super) fn to_disk(&self, v: &Version, piece: Piece, whole: bool, blocks: &[Bytes]) {
        if let Some(d) = &self.disk {
            let e = v.entry(piece.entry);
            let layout = Layout::of(e, &self.config);
            let first = if whole { 0 } else { piece.block };
            d.offer(
                v,
                piece.entry,
                first,
                blocks,
                layout.block_size(e),
                layout.block_count(e),
            );
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
        let layout = Layout::of(e, &self.config);
        let Some(span) = Span::of(e, layout, offset, len) else {
            return Ok(Bytes::new());
        };
        self.gate(v, entry, layout).await?;
        let first = span.first;
        let mut blocks: Vec<Option<Bytes>> = vec![None; span.block_count()];
        let mut missing = Vec::new();
        for b in span.blocks() {
            match self.cache.get(&Piece { entry, block: b }.key(v.id)) {
                Some(hit) => {
                    blocks[(b - first) as usize] = Some(self.count_hit(v, entry, hit));
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
                let optional = if is_small(e, &self.config) {
                    self.neighbour_batch(v, entry)
                } else {
                    Vec::new()
                };
                let pending = self.start(v, &required, &optional, Origin::ReadAhead, None);
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
        self.read_ahead(v, entry, layout, &span);
        span.assemble(v, entry, blocks)
    }

    /// Counts a block read from the block cache (and a prefetch's hit, which
    /// also lets a small-file walk go on); returns its bytes.
    fn count_hit(self: &Arc<Self>, v: &Arc<Version>, entry: u32, hit: Hit) -> Bytes {
        Stats::inc(&self.stats.hits);
        if hit.origin.is_speculative() {
            self.stats.prefetch_hit(hit.origin);
            self.continue_walk(v, entry);
        }
        hit.data
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
        if layout.needs_pass(v.entry(entry)) {
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
                this.cache.insert(key, data, Origin::ReadAhead);
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
    pub(super) fn sums(&self, v: &Version, entry: u32) -> Verified {
        self.verify.settled((v.id, entry)).unwrap_or_else(|| {
            Err(FetchError::Reopened {
                key: v.key.clone(),
                name: v.name(entry),
            })
        })
    }

    /// The read answered from the disk cache or the block cache alone, or
    /// `None` if any block is missing (no network, no waiting on other
    /// tasks: callable on a FUSE thread inside the runtime's context).
    pub fn read_cached(
        self: &Arc<Self>,
        v: &Arc<Version>,
        entry: u32,
        offset: u64,
        len: u32,
    ) -> Option<Result<Bytes, FetchError>> {
        let e = v.entry(entry);
        let layout = Layout::of(e, &self.config);
        let Some(span) = Span::of(e, layout, offset, len) else {
            return Some(Ok(Bytes::new()));
        };
        // A FUSE thread may wait on the local disk (not on the network).
        if let Some(data) = self
            .disk
            .as_ref()
            .and_then(|d| d.read(v, entry, offset, len))
        {
            return Some(Ok(data));
        }
        let blocks = self.cached_blocks(v, entry, layout, &span, |key| {
            let hit = self.cache.get(key)?;
            Some(self.count_hit(v, entry, hit))
        })?;
        let blocks = match blocks {
            Ok(blocks) => blocks,
            Err(e) => return Some(Err(e)),
        };
        self.read_ahead(v, entry, layout, &span);
        Some(span.assemble(v, entry, blocks))
    }

    /// The blocks of `span`, each taken by `take`, if the block cache holds
    /// every one and they may be served; an error if the entry is known to
    /// be bad; `None` if anything must be fetched or verified first.
    pub(super) fn cached_blocks(
        &self,
        v: &Version,
        entry: u32,
        layout: Layout,
        span: &Span,
        mut take: impl FnMut(&BlockKey) -> Option<Bytes>,
    ) -> Option<Result<Vec<Option<Bytes>>, FetchError>> {
        if layout != Layout::Frames {
            match self.verify.settled((v.id, entry)) {
                Some(Err(err)) => return Some(Err(err)),
                None if layout.needs_pass(v.entry(entry)) => return None,
                _ => {}
            }
        }
        let key = |block| Piece { entry, block }.key(v.id);
        if !span.blocks().all(|b| self.cache.contains(&key(b))) {
            return None;
        }
        let mut blocks = Vec::with_capacity(span.block_count());
        for b in span.blocks() {
            blocks.push(Some(take(&key(b))?));
        }
        Some(Ok(blocks))
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
                    return Err(FetchError::ShortRead {
                        key: v.key.clone(),
                        range,
                        got: bytes.len(),
                    });
                }
                Ok(bytes)
            }
            Err(e @ StoreError::PreconditionFailed(_)) => {
                let StoreError::PreconditionFailed(what) = &e else {
                    unreachable!("matched above")
                };
                Stats::inc(&self.stats.precondition_failed);
                tracing::info!(
                    "{what} changed in the store (HTTP 412 on If-Match {}): reopening",
                    v.pin.etag
                );
                Err(FetchError::Changed {
                    object: what.clone(),
                    cause: Arc::new(e),
                })
            }
            Err(e) => Err(FetchError::Store(Arc::new(e))),
        }
    }

    /// The entry's data offset, reading its local header if needed.
    pub(super) async fn data_offset(&self, v: &Version, entry: u32) -> Result<u64, FetchError> {
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
}
