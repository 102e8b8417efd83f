//! Tuning of the fetcher ([`FetchConfig`]). The library reads no environment:
//! the CLI fills this from its (hidden) options and their variables.

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
    /// How far ahead of a sequential reader, in time at the rate it has been
    /// reading, its window reaches (at most `readahead_max_blocks`): enough
    /// to cover a GET and its decoding, without a slow reader holding the
    /// global read-ahead budget with blocks it will read seconds later.
    pub readahead_horizon: std::time::Duration,
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

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            max_get: 8 << 20,
            merge_gap: 64 << 10,
            small_file: 256 << 10,
            neighbour_bytes: 4 << 20,
            neighbour_files: 1024,
            readahead_max_blocks: 32,
            readahead_horizon: std::time::Duration::from_millis(250),
            readahead_memory: 256 << 20,
            whole_max: 16 << 20,
            stream_chunk: 4 << 20,
            stream_ahead_blocks: 4,
        }
    }
}
