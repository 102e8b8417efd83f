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
//! - batches of at most [`FetchConfig::max_get`] compressed bytes and
//!   [`MAX_GROUPS`] separate ranges, at most [`IN_FLIGHT`] batches at once, so
//!   an archive laid out in profile order (`save`) is a few large GETs and a
//!   scattered one never a flood of small ones;
//! - demand first: a batch starts only when no demand fetch is in flight
//!   (waiting at most [`YIELD`] for them, so a build that keeps missing does
//!   not stop replay altogether), and in-flight batches are few;
//! - memory: replay stops after half the block cache's capacity (more would
//!   evict what it fetched before the build reads it).
//!
//! Entries the archive does not hold (the profile is untrusted and may be
//! older than the archive), directories, empty files and foreign entries
//! that need a whole verify pass first are skipped. A reopen (412) ends
//! replay: its pieces named the old version's entries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::config::FetchConfig;
use super::fetch::Fetcher;
use super::plan::{Layout, Piece, Span};
use super::stats::Stats;
use super::version::{Current, Version};
use crate::archive::EntryKind;
use crate::profile::Profile;
use crate::store::ObjectStore;

/// Replay batches in flight at once.
const IN_FLIGHT: usize = 2;
/// Separate ranges (GETs) in one batch.
const MAX_GROUPS: usize = 16;
/// Longest a batch waits for demand fetches to finish before it starts anyway.
const YIELD: Duration = Duration::from_millis(50);
/// How often a waiting batch looks again.
const POLL: Duration = Duration::from_millis(1);

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Profile entries the archive holds (and replay could fetch).
    pub entries: u64,
    /// Profile entries skipped: not in the archive, or not a fetchable file.
    pub skipped: u64,
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
        let pieces = self.replay_pieces(&v, profile, &mut out);
        Stats::add(&self.stats.profile_entries, out.entries);
        let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut budget = self.cache.capacity() / 2;
        let mut batch: Vec<Piece> = Vec::new();
        let (mut bytes, mut groups, mut prev_end) = (0u64, 0usize, None::<u64>);
        let mut rest = pieces.into_iter().peekable();
        while let Some(p) = rest.next() {
            let e = v.entry(p.entry);
            let decoded = Layout::of(e, &self.config).block_size(e).min(e.size);
            if decoded > budget {
                out.stopped = Some("half the block cache is prefetched");
                break;
            }
            budget -= decoded;
            let (range, _) = p.range(&v, &self.config);
            if prev_end.is_none_or(|end| range.start.abs_diff(end) > self.config.merge_gap) {
                groups += 1;
            }
            prev_end = Some(range.end);
            bytes += range.end - range.start;
            batch.push(p);
            let full = bytes >= self.config.max_get || groups >= MAX_GROUPS;
            if full || rest.peek().is_none() {
                if current.load().id != v.id {
                    out.stopped = Some("the archive changed in the store");
                    break;
                }
                let permit = in_flight.clone().acquire_many_owned(1).await.expect("open");
                self.yield_to_demand().await;
                out.pieces += self.start_replay(&v, &batch, permit);
                batch.clear();
                (bytes, groups, prev_end) = (0, 0, None);
            }
        }
        // Wait for the last batches, so the caller knows when replay is done.
        let _ = in_flight.acquire_many(IN_FLIGHT as u32).await;
        out
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
            .any(|(_, speculative)| !speculative)
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
        self.start(v, &[], &new, Some(permit));
        new.len() as u64
    }
}

/// A file replay can fetch as pieces: not empty, and not a foreign entry
/// whose blocks are served only after a whole verify pass.
fn fetchable(v: &Version, entry: u32, config: &FetchConfig) -> bool {
    let e = v.entry(entry);
    e.kind == EntryKind::File && e.size > 0 && !Layout::of(e, config).needs_pass(e)
}
