//! Sequential decoding of entries that are one compressed stream too large
//! to fetch whole (foreign deflate / single-frame zstd): after their verify
//! pass, evicted blocks are decoded again by a per-entry cursor that caches
//! every block it passes, each checked against the sums of that pass. A read
//! behind the cursor restarts it from the entry's start (a deflate or zstd
//! stream cannot be entered in the middle); blocks still cached are served
//! without that.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::blocks::{BlockKey, Origin};
use super::error::FetchError;
use super::fetch::Fetcher;
use super::plan::{Layout, BLOCK_SIZE};
use super::stats::Stats;
use super::verify::BlockSums;
use super::version::Version;
use crate::archive::Compression;
use crate::store::ObjectStore;

/// The decoding position in a [`Layout::Stream`] entry.
pub struct StreamCursor {
    next_block: u32,
    decoder: Box<dyn Read + Send>,
    /// A store error met by the reader under the decoder (told apart from corruption).
    source_error: Arc<Mutex<Option<FetchError>>>,
}

pub type CursorSlot = Arc<tokio::sync::Mutex<Option<StreamCursor>>>;

impl<S: ObjectStore> Fetcher<S> {
    /// The blocks `wanted` (ascending) of a stream entry.
    pub(super) async fn stream_blocks(
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
    pub(super) async fn stream_decode(
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
                        if cursor.next_block < Layout::Stream.block_count(v.entry(entry)) {
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
    pub(super) fn range_reader(
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
        let count = Layout::Stream.block_count(e);
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
                if is_wanted {
                    Origin::Demand
                } else {
                    Origin::ReadAhead
                },
            );
            if is_wanted {
                got.push((b, data));
            }
        }
        Ok(got)
    }
}

/// Blocking `Read` over a byte range of the pinned object, in chunks of
/// pinned range GETs (runs on a blocking thread, drives the runtime by handle).
pub struct RangeReader<S> {
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
