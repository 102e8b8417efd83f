//! An archive opened in a store, pinned to one version: what `mount`,
//! `restore` and incremental `save` read through.
//!
//! - [`Version`]: the pinned object (ETag, versionId, size) and its index;
//!   every block key and every GET of a mount carries it.
//! - [`open_version`]: the tail (one suffix GET, which pins the version),
//!   the index (alongside the tail when a key pointer says where it lies),
//!   and — for a content-addressed blob — the check that the index is the
//!   one its name commits to.
//! - [`Current`]: the version a mount reads now, swapped whole by the 412
//!   reopen ([`crate::fs::reopen`]), so a read never mixes two.
//! - [`refresh_lifetime`]: the best-effort self-copy that keeps a blob alive
//!   under bucket expiry rules (DESIGN §2).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::bail;
use futures::StreamExt;
use parking_lot::RwLock;

use super::Stats;
use crate::archive::{self, ArchiveIndex, DataOffset, Entry, OpenError};
use crate::store::{ObjectStore, ObjectVersion, RefreshOutcome, StoreError};

static NEXT_VERSION_ID: AtomicU64 = AtomicU64::new(1);

/// One version of the archive object: what every read of a mount is pinned
/// to. A mount holds its current `Version` behind a swappable pointer; when
/// the object changes, a new `Version` (new id) replaces it.
pub struct Version {
    /// Unique in this process; part of every block key.
    pub id: u64,
    /// The object's key in the store.
    pub key: String,
    pub pin: ObjectVersion,
    pub size: u64,
    pub index: ArchiveIndex,
    /// How long opening it took, by part.
    pub opened: OpenTimes,
    /// Each entry's data offset; 0 while unknown (a foreign entry whose local
    /// header has not been read — data never starts at 0).
    offsets: Vec<AtomicU64>,
}

/// How long [`open_version`] took, by part (the rest is decoding the index).
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenTimes {
    /// The read of the tail, which also gives the size and version (and a
    /// lifetime refresh when one was due).
    pub tail: Duration,
    /// The range GETs after it: the index or central directory.
    pub gets: Duration,
    /// How many GETs in all, the tail's included.
    pub requests: u32,
    /// Decoding (and checking) the index or central directory.
    pub decode: Duration,
}

impl Version {
    pub fn new(key: String, pin: ObjectVersion, size: u64, index: ArchiveIndex) -> Self {
        let offsets = index
            .entries
            .iter()
            .map(|e| {
                AtomicU64::new(match e.offset {
                    DataOffset::Data(o) => o,
                    DataOffset::LocalHeader(_) => 0,
                })
            })
            .collect();
        Version {
            id: NEXT_VERSION_ID.fetch_add(1, Ordering::Relaxed),
            key,
            pin,
            size,
            index,
            opened: OpenTimes::default(),
            offsets,
        }
    }

    pub fn entry(&self, i: u32) -> &Entry {
        &self.index.entries[i as usize]
    }

    /// The entry's path, for log lines.
    pub fn name(&self, i: u32) -> String {
        String::from_utf8_lossy(&self.entry(i).name).into_owned()
    }

    /// Records where a foreign entry's data starts, once its local header was read.
    pub(crate) fn set_offset(&self, i: u32, offset: u64) {
        self.offsets[i as usize].store(offset, Ordering::Relaxed);
    }

    pub(crate) fn known_offset(&self, i: u32) -> Option<u64> {
        match self.offsets[i as usize].load(Ordering::Relaxed) {
            0 => None,
            o => Some(o),
        }
    }

    /// Where the entry starts in the archive, exactly or (foreign) its local header.
    pub(crate) fn approx_start(&self, i: u32) -> u64 {
        self.known_offset(i).unwrap_or(match self.entry(i).offset {
            DataOffset::Data(o) | DataOffset::LocalHeader(o) => o,
        })
    }
}

/// The archive version a mount reads from, swappable as a whole: a read takes
/// the current version once and uses it throughout, so it never mixes two.
pub struct Current {
    version: RwLock<Arc<Version>>,
}

impl Current {
    pub fn new(version: Version) -> Arc<Self> {
        Arc::new(Current {
            version: RwLock::new(Arc::new(version)),
        })
    }

    pub fn load(&self) -> Arc<Version> {
        self.version.read().clone()
    }

    /// Makes `version` the one new reads use; returns the old one.
    pub fn swap(&self, version: Arc<Version>) -> Arc<Version> {
        std::mem::replace(&mut *self.version.write(), version)
    }
}

/// Blobs older than this get their lifetime refreshed (DESIGN §2).
pub const REFRESH_AFTER: Duration = Duration::from_secs(12 * 3600);

/// Whether opening an object first refreshes its lifetime.
#[derive(Debug, Clone, Copy)]
pub enum Refresh {
    /// When it is older than this (a mount, a restore).
    After(Duration),
    /// Never (a reopen after a 412: the object was just rewritten).
    Never,
}

/// Reads `key`'s tail (which tells its size and version, and pins the
/// version), then its index. With `expected_digest` (a content-addressed
/// cachemount blob), checks the index is the one the name commits to.
///
/// `index_hint` (a key pointer's record of where the index lies) lets the
/// index download run alongside the tail's, and its decoding alongside the
/// download ([`archive::arriving`]), so start-up waits after the last byte
/// only for the last chunks. That GET is unpinned, since the version is not
/// known yet, and safe all the same: its decoding is used only when the
/// pinned tail names exactly that range and the bytes hash to the digest the
/// tail's comment gives, so they are that version's whichever version
/// served them. Otherwise (a stale hint, a failed download) the index is
/// read again, pinned. `stats`, when given, counts the requests.
pub async fn open_version<S: ObjectStore>(
    store: &S,
    key: &str,
    expected_digest: Option<&str>,
    index_hint: Option<Range<u64>>,
    refresh: Refresh,
    stats: Option<&Stats>,
) -> anyhow::Result<Version> {
    let count = |bytes: usize| {
        if let Some(stats) = stats {
            Stats::inc(&stats.requests);
            Stats::add(&stats.bytes_fetched, bytes as u64);
        }
    };
    // With the index fetched beside it, the tail need hold only the end records.
    let tail_len = match index_hint {
        Some(_) => archive::reader::END_RECORDS_LEN,
        None => archive::reader::TAIL_LEN,
    };
    let read_tail = || async {
        let got = store.get_tail(key, tail_len).await.map_err(|e| match e {
            StoreError::NotFound(_) => {
                anyhow::anyhow!("{key} does not exist in {}", store.describe())
            }
            other => anyhow::Error::from(other)
                .context(format!("cannot read {key} from {}", store.describe())),
        })?;
        count(got.1.len());
        anyhow::Ok(got)
    };
    let started = Instant::now();
    let (arrivals, decoder) = match &index_hint {
        Some(range) => {
            let (arrivals, received) = std::sync::mpsc::channel();
            let len = (range.end - range.start) as usize;
            let decoder = tokio::task::spawn_blocking(move || {
                archive::arriving::decode_arriving(received, len)
            });
            (Some(arrivals), Some(decoder))
        }
        None => (None, None),
    };
    // The tail, then (when it is old) the lifetime refresh and the tail
    // again: refreshing *before* pinning, since the rewrite may change the
    // ETag, which would otherwise fail this mount's own reads. Young objects
    // (the common case) cost nothing here. Its end record, once read, gives
    // the streamed decoding its bound — only when it names the hinted range.
    let (tail_arrivals, tail_hint) = (arrivals.clone(), index_hint.clone());
    let tail_part = async move {
        let (mut meta, mut tail) = read_tail().await?;
        let mut requests = 1;
        if let Refresh::After(after) = refresh {
            if meta.last_modified < SystemTime::now() - after {
                refresh_lifetime(store, key, after).await;
                (meta, tail) = read_tail().await?;
                requests += 1;
            }
        }
        // (Without a hint nothing streams: the opener below reads the records.)
        let record = tail_arrivals.and_then(|arrivals| {
            let mut opener = archive::reader::Opener::new(meta.size, tail_len);
            opener.add(meta.size - tail.len() as u64, tail.clone());
            let record = opener
                .index_record()
                .ok()
                .flatten()
                .filter(|record| Some(&record.range) == tail_hint.as_ref())?;
            let _ = arrivals.send(archive::arriving::Arrival::Bound(record.bound));
            Some(record)
        });
        anyhow::Ok((meta, tail, record, requests, started.elapsed()))
    };
    // The hinted index, handed to the decoder piece by piece. A failure
    // only ends the stream; the pinned read after the tail stands in.
    let index_part = async move {
        let (Some(range), Some(arrivals)) = (index_hint.clone(), arrivals) else {
            return anyhow::Ok(None);
        };
        let mut received = 0;
        match store.get_range_pieces(key, range).await {
            Ok(mut pieces) => {
                while let Some(piece) = pieces.next().await {
                    match piece {
                        Ok(piece) => {
                            received += piece.len();
                            if arrivals
                                .send(archive::arriving::Arrival::Piece(piece))
                                .is_err()
                            {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::debug!(%key, error = %e, "the index hint's GET broke off; reading the index after the tail");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(%key, error = %e, "the index hint's GET failed; reading the index after the tail");
            }
        }
        count(received);
        anyhow::Ok(Some(started.elapsed()))
    };
    let ((meta, tail, record, tail_requests, tail_time), downloaded) =
        futures::future::try_join(tail_part, index_part).await?;
    let arrived = match decoder {
        Some(decoder) => decoder.await.ok().flatten(),
        None => None,
    };
    // Waiting for the hinted index beyond the tail counts as index GETs.
    let hint_wait = downloaded.map_or(Duration::ZERO, |at| at.saturating_sub(tail_time));
    let streamed = match (record, arrived) {
        (Some(record), Some(arrived)) if arrived.digest.eq_ignore_ascii_case(&record.sha256) => {
            Some(arrived.index.and_then(|index| record.accept(index)))
        }
        _ => None,
    };
    let tail_start = meta.size - tail.len() as u64;
    let gets = parking_lot::Mutex::new((hint_wait, u32::from(downloaded.is_some())));
    let (tail_ref, gets_ref) = (&tail, &gets);
    let pin = &meta.version;
    // The opener asks for the tail first: it is here already.
    let fetch = |range: Range<u64>| async move {
        if range.start >= tail_start {
            let at = (range.start - tail_start) as usize;
            let end = range.end.min(meta.size).saturating_sub(tail_start) as usize;
            return Ok(tail_ref.slice(at..end.max(at)));
        }
        let t0 = Instant::now();
        let r = store.get_range(key, range, Some(pin)).await;
        {
            let mut g = gets_ref.lock();
            g.0 += t0.elapsed();
            g.1 += 1;
        }
        match &r {
            Ok(b) => count(b.len()),
            Err(_) => count(0),
        }
        r
    };
    let opened = match streamed {
        Some(decoded) => decoded.map_err(OpenError::Format),
        None => archive::open_archive(meta.size, tail_len, fetch).await,
    };
    let index = opened.map_err(|e| match e {
        OpenError::Format(f) => anyhow::anyhow!("{key} is not a readable cache archive: {f}"),
        OpenError::Source(s) => anyhow::Error::from(s).context(format!("cannot read {key}")),
    })?;
    if let Some(expected) = expected_digest {
        let digest = archive::reader::tail_index_digest(&tail, meta.size)?;
        if digest.is_some_and(|d| d != expected) {
            bail!("{key} does not match its name: its index digest is not {expected}");
        }
    }
    let (gets, requests) = gets.into_inner();
    let mut version = Version::new(key.to_string(), meta.version, meta.size, index);
    version.opened = OpenTimes {
        tail: tail_time,
        gets,
        requests: requests + tail_requests,
        decode: started.elapsed().saturating_sub(tail_time + gets),
    };
    Ok(version)
}

/// Refreshes the object's lifetime when it is older than `after`, best
/// effort (never fails the command).
pub async fn refresh_lifetime<S: ObjectStore>(store: &S, key: &str, after: Duration) {
    let threshold = SystemTime::now() - after;
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
