//! Counters of one mount daemon: store requests and bytes, block cache hits
//! and misses, read-ahead hits, verification, 412s, and FUSE operations by kind.
//!
//! Plain relaxed atomics: they are read for `cachemount stats` and the
//! benchmark, never used to make decisions, so no ordering is needed.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// The FUSE operations counted by [`Stats::op`], in the order they are
/// printed (`op_<name>` lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lookup,
    Getattr,
    Readdir,
    Readdirplus,
    Readlink,
    Open,
    Opendir,
    Read,
    Flush,
    Release,
    Statfs,
    Getxattr,
    Listxattr,
    Access,
    /// Any request that would change the tree (answered `EROFS`).
    Write,
}

impl Op {
    pub const ALL: [Op; 15] = [
        Op::Lookup,
        Op::Getattr,
        Op::Readdir,
        Op::Readdirplus,
        Op::Readlink,
        Op::Open,
        Op::Opendir,
        Op::Read,
        Op::Flush,
        Op::Release,
        Op::Statfs,
        Op::Getxattr,
        Op::Listxattr,
        Op::Access,
        Op::Write,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Readdir => "readdir",
            Op::Readdirplus => "readdirplus",
            Op::Readlink => "readlink",
            Op::Open => "open",
            Op::Opendir => "opendir",
            Op::Read => "read",
            Op::Flush => "flush",
            Op::Release => "release",
            Op::Statfs => "statfs",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Access => "access",
            Op::Write => "write",
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    /// GET requests sent to the store (range GETs, including the mount's own).
    pub requests: AtomicU64,
    /// Bytes received from those requests.
    pub bytes_fetched: AtomicU64,
    /// Block reads served from the block cache.
    pub hits: AtomicU64,
    /// Block reads that had to wait for a fetch (or joined one in flight).
    pub misses: AtomicU64,
    /// First reads of blocks that read-ahead or a neighbour fetch brought in.
    pub readahead_hits: AtomicU64,
    /// First reads of blocks that the profile replay brought in.
    pub replay_hits: AtomicU64,
    /// Blocks fetched speculatively (read-ahead, small neighbours, replay).
    pub prefetched_blocks: AtomicU64,
    /// Entries of the access profile this mount replays (those the archive holds).
    pub profile_entries: AtomicU64,
    /// Blocks the profile replay asked for that were not cached yet.
    pub replay_blocks: AtomicU64,
    /// Compressed bytes of those blocks (what the replay's GETs carried).
    pub replay_bytes: AtomicU64,
    /// Files, and bytes, replay handed to the kernel's page cache (the
    /// build then reads them with no FUSE read at all).
    pub kernel_files: AtomicU64,
    pub kernel_bytes: AtomicU64,
    /// Files in the mounted archive, and distinct files read from it.
    pub files_archived: AtomicU64,
    pub files_read: AtomicU64,
    /// 1 when the mount records its reads: `files_read` counts only then.
    pub recording: AtomicU64,
    /// The daemon's pid and how many mountpoints it serves (so `umount` can
    /// wait for a daemon whose last mountpoint it took down).
    pub daemon_pid: AtomicU64,
    pub mountpoints: AtomicU64,
    /// Reads that failed because the object changed under the mount (412).
    pub precondition_failed: AtomicU64,
    /// Reads that failed for any reason (returned EIO).
    pub read_errors: AtomicU64,
    /// Blocks whose checksum or decoding failed.
    pub corrupt_blocks: AtomicU64,
    /// Whole-entry verify passes of single-stream entries (each decodes its
    /// entry once, whole, before the entry's first byte is served).
    pub verify_passes: AtomicU64,
    /// Blocks of a verified single-stream entry decoded again (after they
    /// were evicted) and checked against the sums of its verify pass.
    pub redecoded_blocks: AtomicU64,
    /// Times the mount reopened its object after a 412 (HEAD, tail, index).
    pub reopens: AtomicU64,
    /// Total time spent reopening, in milliseconds.
    pub reopen_ms: AtomicU64,
    /// The longest single reopen, in milliseconds.
    pub reopen_max_ms: AtomicU64,
    /// Reads that got a 412 (or found a reopen under way) and waited for it.
    pub reopen_waits: AtomicU64,
    /// Reopens refused because the object kept changing (reads got EIO).
    pub reopen_refused: AtomicU64,
    /// Cached blocks of old versions dropped on a reopen.
    pub invalidated_blocks: AtomicU64,
    /// Files whose content changed in a reopen (kernel caches invalidated).
    pub changed_files: AtomicU64,
    /// Open handles that became stale (their file's content changed): ESTALE.
    pub stale_handles: AtomicU64,
    ops: [AtomicU64; Op::ALL.len()],
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a first read of a block fetched for `origin`'s sake (nothing
    /// for a demand fetch).
    pub fn prefetch_hit(&self, origin: super::Origin) {
        match origin {
            super::Origin::Demand => {}
            super::Origin::ReadAhead => Stats::inc(&self.readahead_hits),
            super::Origin::Replay => Stats::inc(&self.replay_hits),
        }
    }

    pub fn max(counter: &AtomicU64, n: u64) {
        counter.fetch_max(n, Ordering::Relaxed);
    }

    /// Counts one FUSE operation.
    pub fn op(&self, op: Op) {
        self.ops[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `name value` lines, stable names, for `cachemount stats` and scripts.
    /// The figures of the block cache come from it.
    pub fn render(&self, cache: &super::BlockCache) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let rows: [(&str, u64); 33] = [
            ("requests", get(&self.requests)),
            ("bytes_fetched", get(&self.bytes_fetched)),
            ("cache_hits", get(&self.hits)),
            ("cache_misses", get(&self.misses)),
            ("readahead_hits", get(&self.readahead_hits)),
            ("prefetched_blocks", get(&self.prefetched_blocks)),
            ("prefetch_unread_bytes", cache.unread_prefetched_bytes()),
            ("profile_entries", get(&self.profile_entries)),
            ("replay_blocks", get(&self.replay_blocks)),
            ("replay_bytes", get(&self.replay_bytes)),
            ("replay_hits", get(&self.replay_hits)),
            ("kernel_files", get(&self.kernel_files)),
            ("kernel_bytes", get(&self.kernel_bytes)),
            ("files_archived", get(&self.files_archived)),
            ("files_read", get(&self.files_read)),
            ("recording", get(&self.recording)),
            ("daemon_pid", get(&self.daemon_pid)),
            ("mountpoints", get(&self.mountpoints)),
            ("cache_bytes", cache.bytes()),
            ("cache_capacity", cache.capacity()),
            ("precondition_failed", get(&self.precondition_failed)),
            ("read_errors", get(&self.read_errors)),
            ("corrupt_blocks", get(&self.corrupt_blocks)),
            ("verify_passes", get(&self.verify_passes)),
            ("redecoded_blocks", get(&self.redecoded_blocks)),
            ("reopens", get(&self.reopens)),
            ("reopen_ms", get(&self.reopen_ms)),
            ("reopen_max_ms", get(&self.reopen_max_ms)),
            ("reopen_waits", get(&self.reopen_waits)),
            ("reopen_refused", get(&self.reopen_refused)),
            ("invalidated_blocks", get(&self.invalidated_blocks)),
            ("changed_files", get(&self.changed_files)),
            ("stale_handles", get(&self.stale_handles)),
        ];
        for (name, value) in rows {
            let _ = writeln!(out, "{name} {value}");
        }
        for (op, c) in Op::ALL.iter().zip(&self.ops) {
            let _ = writeln!(out, "op_{} {}", op.name(), get(c));
        }
        out
    }
}

/// Parses [`Stats::render`] output back into pairs (for tests and the benchmark).
pub fn parse(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}
