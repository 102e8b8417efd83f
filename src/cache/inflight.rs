//! The in-flight table and the fetches it starts: concurrent misses of one
//! block join one fetch (a shared future per piece being fetched, which later
//! readers await), the pieces of one start are sorted by archive offset and
//! merged into range GETs when adjacent, and each fetched piece is checked,
//! decoded and cached before its readers wake.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::blocks::{BlockKey, Origin};
use super::error::FetchError;
use super::fetch::Fetcher;
use super::plan::{Layout, Piece, BLOCK_SIZE};
use super::stats::Stats;
use super::version::Version;
use crate::archive::decode::{decode_entry, decode_frame_into};
use crate::archive::zip::{local_header_data_start, LOCAL_HEADER_LEN};
use crate::archive::DataOffset;
use crate::store::ObjectStore;

/// A fetched piece: its decoded blocks (one, or all of a whole entry).
pub type Outcome = Result<Arc<Vec<Bytes>>, FetchError>;
/// The answer of a piece in flight, awaited by every reader that joined it.
pub type Pending = Shared<BoxFuture<'static, Outcome>>;
/// Pieces being fetched, and why (a read, read-ahead or neighbours, replay).
pub type InFlight = Mutex<HashMap<BlockKey, (Pending, Origin)>>;

/// One piece to fetch, and where its outcome goes.
struct Job {
    piece: Piece,
    tx: oneshot::Sender<Outcome>,
    origin: Origin,
}

/// Decoded bytes per blocking decode task.
const DECODE_CHUNK: u64 = 2 << 20;

impl<S: ObjectStore> Fetcher<S> {
    /// Registers `required` (awaited by the caller) and `optional` (fetched
    /// ahead for `ahead`'s sake, skipped when already cached, in flight or on
    /// disk) pieces and starts one task
    /// fetching every piece nobody is fetching yet. Returns, for each required
    /// piece, the future of its blocks.
    pub(super) fn start(
        self: &Arc<Self>,
        v: &Arc<Version>,
        required: &[Piece],
        optional: &[Piece],
        ahead: Origin,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Vec<Pending> {
        let mut jobs = Vec::new();
        let mut waits = Vec::with_capacity(required.len());
        {
            let mut inflight = self.inflight.lock();
            for &piece in required {
                let key = piece.key(v.id);
                if let Some((f, origin)) = inflight.get(&key) {
                    // Joining a prefetch in flight is a hit it earned too.
                    self.stats.prefetch_hit(*origin);
                    waits.push(f.clone());
                    continue;
                }
                let (tx, rx) = oneshot::channel();
                let fut = pending(rx);
                inflight.insert(key, (fut.clone(), Origin::Demand));
                waits.push(fut);
                jobs.push(Job {
                    piece,
                    tx,
                    origin: Origin::Demand,
                });
            }
            for &piece in optional {
                let key = piece.key(v.id);
                if inflight.contains_key(&key)
                    || self.cache.contains(&key)
                    || self.on_disk(v, piece)
                {
                    continue;
                }
                let (tx, rx) = oneshot::channel();
                inflight.insert(key, (pending(rx), ahead));
                jobs.push(Job {
                    piece,
                    tx,
                    origin: ahead,
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

    /// Fetches and decodes `jobs`: merged into as few GETs as the config allows,
    /// the GETs run concurrently.
    async fn run(self: &Arc<Self>, v: &Arc<Version>, jobs: Vec<Job>) {
        let mut planned: Vec<(Range<u64>, Job)> = jobs
            .into_iter()
            .map(|j| (j.piece.range(v, &self.config).0, j))
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
                    Ok(_) => self.get(v, job.piece.range(v, &self.config).0).await,
                    Err(e) => Err(e),
                },
            };
            sliced.push((job, bytes));
        }
        // Readers waiting first; then cut into chunks of about DECODE_CHUNK
        // output bytes, each decoded on one blocking thread (many small files
        // would drown in per-task overhead; large frames decode in parallel).
        sliced.sort_by_key(|(job, _)| job.origin.is_speculative());
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
                            if Layout::of(v.entry(job.piece.entry), &this.config) != Layout::Frames
                            {
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
        let (range, needs_header) = piece.range(v, &self.config);
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
        let (_, needs_header) = p.range(v, &self.config);
        if needs_header {
            let DataOffset::LocalHeader(lh) = v.entry(p.entry).offset else {
                return None;
            };
            let at = (lh - base) as usize;
            let header = data.get(at..at + LOCAL_HEADER_LEN)?;
            let start = local_header_data_start(header).ok()?;
            v.set_offset(p.entry, lh + start);
        }
        let (range, _) = p.range(v, &self.config);
        let from = (range.start.checked_sub(base)?) as usize;
        let to = (range.end - base) as usize;
        (to <= data.len()).then(|| data.slice(from..to))
    }

    fn decode(&self, v: &Version, p: Piece, bytes: &[u8]) -> Outcome {
        let e = v.entry(p.entry);
        let corrupt = |reason: String| FetchError::Corrupt(reason);
        let blocks = match Layout::of(e, &self.config) {
            Layout::Frames => {
                let i = p.block as usize;
                vec![crate::buffers::decoded(e.frame_len(i) as usize, |out| {
                    decode_frame_into(e, i, bytes, out).map_err(|err| corrupt(err.to_string()))
                })?]
            }
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
        let key = job.piece.key(v.id);
        if let Ok(blocks) = &outcome {
            let whole = matches!(
                Layout::of(v.entry(job.piece.entry), &self.config),
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
                    job.origin,
                );
                if job.origin.is_speculative() {
                    Stats::inc(&self.stats.prefetched_blocks);
                }
            }
            self.to_disk(v, job.piece, whole, blocks);
        }
        self.inflight.lock().remove(&key);
        let _ = job.tx.send(outcome);
    }
}

fn pending(rx: oneshot::Receiver<Outcome>) -> Pending {
    rx.map(|r| r.unwrap_or_else(|_| Err(FetchError::Abandoned)))
        .boxed()
        .shared()
}
