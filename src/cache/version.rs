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
/// `index_hint` (a key pointer's record of where the index lies) lets the
/// index GET run alongside the tail's instead of after it. It is unpinned,
/// since the version is not known yet, and safe all the same: the index is
/// used only if it hashes to the digest in the pinned tail's comment, so its
/// bytes are that version's whichever version served them. `stats`, when
/// given, counts the requests.
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
    let read_tail = || async {
        let got = store
            .get_tail(key, archive::reader::TAIL_LEN)
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => {
                    anyhow::anyhow!("{key} does not exist in {}", store.describe())
                }
                other => anyhow::Error::from(other)
                    .context(format!("cannot read {key} from {}", store.describe())),
            })?;
        count(got.1.len());
        anyhow::Ok(got)
    };
    let read_hinted = async {
        let range = index_hint?;
        match store.get_range(key, range.clone(), None).await {
            Ok(bytes) => {
                count(bytes.len());
                Some((range.start, bytes))
            }
            Err(e) => {
                tracing::debug!(%key, error = %e, "the index hint's GET failed; reading the index after the tail");
                None
            }
        }
    };
    let started = Instant::now();
    let (tail, hinted) = futures::join!(
        async {
            let tail = read_tail().await;
            (tail, started.elapsed())
        },
        read_hinted
    );
    let (tail, mut tail_time) = tail;
    let (mut meta, mut tail) = tail?;
    // Waiting for the hinted index beyond the tail counts as index GETs.
    let hint_wait = started.elapsed().saturating_sub(tail_time);
    // Refresh the lifetime *before* pinning: the rewrite may change the ETag,
    // which would otherwise fail this mount's own reads. Young objects (the
    // common case) cost nothing here.
    if let Refresh::After(after) = refresh {
        if meta.last_modified < SystemTime::now() - after {
            refresh_lifetime(store, key, after).await;
            (meta, tail) = read_tail().await?;
            tail_time = started.elapsed().saturating_sub(hint_wait);
        }
    }
    let tail_start = meta.size - tail.len() as u64;
    let gets = parking_lot::Mutex::new((hint_wait, u32::from(hinted.is_some())));
    let (tail_ref, gets_ref, hinted_ref) = (&tail, &gets, &hinted);
    let pin = &meta.version;
    // The opener asks for the tail first: it is here already; so may the
    // index be. The hinted bytes answer only a request for exactly their
    // range, which the opener makes only for the index the pinned tail
    // names (and checks against its digest): an unpinned read never stands
    // in for the tail, the end records or a central directory.
    let fetch = |range: Range<u64>| async move {
        if let Some((start, bytes)) = hinted_ref {
            if range.start == *start && range.end - range.start == bytes.len() as u64 {
                return Ok(bytes.clone());
            }
        }
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
    let index: ArchiveIndex =
        archive::open_archive(meta.size, fetch)
            .await
            .map_err(|e| match e {
                OpenError::Format(f) => {
                    anyhow::anyhow!("{key} is not a readable cache archive: {f}")
                }
                OpenError::Source(s) => {
                    anyhow::Error::from(s).context(format!("cannot read {key}"))
                }
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
        requests: requests + 1,
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
