//! Replaying an access profile: the entries the last builds read are fetched
//! in profile order, right after the mount answers, so the build finds them
//! cached instead of discovering them one miss at a time.
//!
//! Replay goes through the fetcher's own machinery: its pieces are
//! speculative pieces of [`Fetcher::start`] (skipped when cached or in
//! flight, merged into range GETs when adjacent, decoded, verified and
//! cached like any other; a demand read of a piece in flight joins it). What
//! replay adds is the order and the pacing:
//!
//! - the profile's pieces merged into ranges by archive offset, the ranges
//!   in the order of the earliest piece each holds, in batches of at most
//!   [`FetchConfig::max_get`] bytes and [`MAX_GROUPS`] ranges, at most
//!   [`IN_FLIGHT`] batches at once: an archive laid out in profile order
//!   (`save`) is a few large GETs, a scattered one a GET per neighbourhood,
//!   never a flood of small ones;
//! - demand first: a demand miss never waits for replay (it starts its own
//!   GET at once, or joins the replay's fetch of that piece); while a build
//!   is reading (a demand fetch seen in the last [`QUIET`]), replay sends
//!   one range of at most [`SMALL_GET`] at a time, so a demand GET shares
//!   the store with at most that; a batch starts only when no demand fetch
//!   is in flight (waiting at most [`YIELD`], so a build that keeps missing
//!   does not stop replay altogether);
//! - memory: replay stops after half the block cache's capacity (more would
//!   evict what it fetched before the build reads it).
//!
//! Entries the archive does not hold (the profile is untrusted and may be
//! older than the archive), directories, empty files and foreign entries
//! that need a whole verify pass first are skipped, and so are entries the
//! host's disk cache holds whole (reads of them cost no GET already, and
//! they do not count against the memory bound). What replay fetches is
//! filed in the disk cache like any fetched block. A reopen (412) ends
//! replay: its pieces named the old version's entries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::blocks::Origin;
use super::config::FetchConfig;
use super::fetch::Fetcher;
use super::plan::{Layout, Piece, Span};
use super::stats::Stats;
use super::version::{Current, Version};
use crate::archive::EntryKind;
use crate::profile::Profile;
use crate::store::ObjectStore;

/// Replay batches in flight at once.
const IN_FLIGHT: u32 = 2;
/// The longest range replay fetches while a build is reading (batches of
/// several are merged into GETs of up to `max_get` when it is not).
const SMALL_GET: u64 = 128 << 10;
/// A demand fetch seen this recently means a build is reading.
const QUIET: Duration = Duration::from_millis(100);
/// Separate ranges (GETs) in one batch.
const MAX_GROUPS: usize = 16;
/// Longest a batch waits for demand fetches to finish before it starts
/// anyway. Short: a build that misses continuously would otherwise hold
/// replay back until the build has fetched everything itself.
const YIELD: Duration = Duration::from_millis(2);
/// How often a waiting batch looks again.
const POLL: Duration = Duration::from_millis(1);

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Profile entries the archive holds (and replay could fetch).
    pub entries: u64,
    /// Profile entries skipped: not in the archive, or not a fetchable file.
    pub skipped: u64,
    /// Profile entries the host's disk cache holds whole (nothing to fetch).
    pub on_disk: u64,
    /// Pieces fetched (not cached or in flight when their batch started).
    pub pieces: u64,
    /// The replay stopped early: the archive changed, or the cache bound.
    pub stopped: Option<&'static str>,
}

impl<S: ObjectStore> Fetcher<S> {
    /// Prefetches `profile`'s entries in profile order (see the module doc).
    pub async fn replay(self: &Arc<Self>, current: &Current, profile: &Profile) -> Replayed {
        let v = current.load();
        let mut out = Replayed::default();
        let mut pieces = self.replay_pieces(&v, profile, &mut out);
        Stats::add(&self.stats.profile_entries, out.entries);
        // Within half the cache, in profile order.
        let mut budget = self.cache.capacity() / 2;
        let within = pieces.iter().position(|p| {
            let e = v.entry(p.entry);
            let decoded = Layout::of(e, &self.config).block_size(e).min(e.size);
            let over = decoded > budget;
            budget = budget.saturating_sub(decoded);
            over
        });
        if let Some(n) = within {
            pieces.truncate(n);
            out.stopped = Some("half the block cache is prefetched");
        }
        let in_flight = Arc::new(Semaphore::new(IN_FLIGHT as usize));
        let ranges = self.replay_ranges(&v, &pieces);
        let mut next = ranges.iter().peekable();
        let mut last_demand: Option<Instant> = None;
        while next.peek().is_some() {
            if current.load().id != v.id {
                out.stopped = Some("the archive changed in the store");
                break;
            }
            if self.demand_in_flight() {
                last_demand = Some(Instant::now());
            }
            let busy = last_demand.is_some_and(|t| t.elapsed() < QUIET);
            // A build is reading: one small GET at a time, so a demand GET
            // never waits long behind replay's; otherwise large merged ones.
            let (permits, max_bytes, max_ranges) = if busy {
                (IN_FLIGHT, 0, 1)
            } else {
                (1, self.config.max_get, MAX_GROUPS)
            };
            let permit = in_flight
                .clone()
                .acquire_many_owned(permits)
                .await
                .expect("never closed");
            self.yield_to_demand().await;
            let (mut batch, mut bytes, mut count) = (Vec::new(), 0, 0);
            while let Some((len, members)) =
                next.next_if(|_| count < max_ranges && (count == 0 || bytes < max_bytes))
            {
                batch.extend_from_slice(members);
                bytes += len;
                count += 1;
            }
            out.pieces += self.start_replay(&v, &batch, permit);
        }
        // Wait for the last batches, so the caller knows when replay is done.
        let _ = in_flight.acquire_many(IN_FLIGHT).await;
        out
    }

    /// `pieces` (in profile order) merged into ranges by archive offset, as
    /// a GET would merge them (gap at most `merge_gap`, at most
    /// [`SMALL_GET`] long: a batch of consecutive ranges is merged again into
    /// GETs of up to `max_get`), in the order of the earliest piece each
    /// holds: (bytes, pieces). An archive laid out in profile order is then
    /// one range after another; a sorted one whose profile files are
    /// scattered still gets each neighbourhood in one range, in about
    /// profile order.
    fn replay_ranges(&self, v: &Version, pieces: &[Piece]) -> Vec<(u64, Vec<Piece>)> {
        let mut by_offset: Vec<(std::ops::Range<u64>, usize)> = pieces
            .iter()
            .enumerate()
            .map(|(rank, p)| (p.range(v, &self.config).0, rank))
            .collect();
        by_offset.sort_by_key(|(r, _)| r.start);
        // (range, earliest rank, piece ranks)
        let mut groups: Vec<(std::ops::Range<u64>, usize, Vec<usize>)> = Vec::new();
        for (r, rank) in by_offset {
            match groups.last_mut() {
                Some((g, first, members))
                    if r.start <= g.end + self.config.merge_gap
                        && r.end.max(g.end) - g.start <= SMALL_GET =>
                {
                    g.end = g.end.max(r.end);
                    *first = (*first).min(rank);
                    members.push(rank);
                }
                _ => groups.push((r.clone(), rank, vec![rank])),
            }
        }
        groups.sort_by_key(|(_, first, _)| *first);
        groups
            .into_iter()
            .map(|(g, _, members)| {
                (
                    g.end - g.start,
                    members.into_iter().map(|r| pieces[r]).collect(),
                )
            })
            .collect()
    }

    /// The pieces of the profile's entries this archive holds, in profile order.
    fn replay_pieces(&self, v: &Version, profile: &Profile, out: &mut Replayed) -> Vec<Piece> {
        let mut pieces = Vec::new();
        for pe in &profile.entries {
            let found = v
                .index
                .entries
                .binary_search_by(|e| e.name.as_slice().cmp(&pe.name))
                .ok();
            let Some(entry) = found.filter(|&i| fetchable(v, i as u32, &self.config)) else {
                out.skipped += 1;
                continue;
            };
            let entry = entry as u32;
            out.entries += 1;
            if self.on_disk(v, Piece { entry, block: 0 }) {
                out.on_disk += 1;
                continue;
            }
            let e = v.entry(entry);
            let layout = Layout::of(e, &self.config);
            if layout == Layout::Whole {
                pieces.push(Piece { entry, block: 0 });
                continue;
            }
            let range = pe.bytes(e.size);
            let len = (range.end - range.start).clamp(1, u64::from(u32::MAX)) as u32;
            let start = range.start.min(e.size - 1);
            if let Some(span) = Span::of(e, layout, start, len) {
                pieces.extend(span.blocks().map(|block| Piece { entry, block }));
            }
        }
        pieces
    }

    /// Waits (a little) until no demand fetch is in flight.
    async fn yield_to_demand(&self) {
        let until = Instant::now() + YIELD;
        while Instant::now() < until && self.demand_in_flight() {
            tokio::time::sleep(POLL).await;
        }
    }

    fn demand_in_flight(&self) -> bool {
        self.inflight
            .lock()
            .values()
            .any(|(_, origin)| !origin.is_speculative())
    }

    /// Starts one batch; returns how many of its pieces it fetches.
    fn start_replay(
        self: &Arc<Self>,
        v: &Arc<Version>,
        batch: &[Piece],
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> u64 {
        let new: Vec<Piece> = {
            let inflight = self.inflight.lock();
            batch
                .iter()
                .copied()
                .filter(|p| {
                    let key = p.key(v.id);
                    !self.cache.contains(&key) && !inflight.contains_key(&key)
                })
                .collect()
        };
        let bytes: u64 = new.iter().map(|p| p.range_len(v, &self.config)).sum();
        Stats::add(&self.stats.replay_blocks, new.len() as u64);
        Stats::add(&self.stats.replay_bytes, bytes);
        self.start(v, &[], &new, Origin::Replay, Some(permit));
        new.len() as u64
    }
}

/// A file replay can fetch as pieces: not empty, and not a foreign entry
/// whose blocks are served only after a whole verify pass.
fn fetchable(v: &Version, entry: u32, config: &FetchConfig) -> bool {
    let e = v.entry(entry);
    e.kind == EntryKind::File && e.size > 0 && !Layout::of(e, config).needs_pass(e)
}
