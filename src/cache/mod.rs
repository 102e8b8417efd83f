//! Reading an archive lazily: the archive opened in a store and pinned to
//! one version ([`version`]), the block cache ([`blocks`]), the fetcher that
//! fills it from the store ([`fetch`], with its block plan, in-flight table,
//! prefetching, profile replay, stream decoding and the hand-off to the
//! kernel's page cache beside it), the verification state of entries that
//! have one checksum for many blocks ([`verify`]) and the counters
//! ([`stats`]), and the disk cache shared by every mount on the host
//! ([`disk`]), which the fetcher consults before its block cache and fills
//! with every whole entry it verified.
//!
//! The shape follows mountpoint-s3: reads ask the fetcher for byte ranges of
//! an entry; the fetcher serves blocks from the cache, fetches the misses with
//! as few range GETs as it can (merging, neighbour files, read-ahead), verifies
//! them and caches them. Nothing here knows about FUSE.

pub mod blocks;
mod config;
pub mod disk;
mod error;
pub mod fetch;
mod handoff;
mod inflight;
mod plan;
mod prefetch;
pub mod replay;
pub mod stats;
mod stream;
pub mod verify;
pub mod version;

pub use blocks::{BlockCache, BlockKey, Origin};
pub use config::FetchConfig;
pub use error::FetchError;
pub use fetch::Fetcher;
pub use stats::Stats;
pub use version::{Current, Version};
