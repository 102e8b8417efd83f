//! cachemount: mount CI caches from S3 (or a local directory) lazily instead of
//! downloading and unpacking them.
//!
//! The crate is cut along the architecture:
//! - [`archive`]: the seekable zip + zstd format (Buildkite cache v2
//!   compatible): records, index, seek table, writer, reader, limits.
//! - [`store`]: where archives live — one [`store::ObjectStore`] trait, a local
//!   directory and S3 behind it, and the blob/key layout on top.
//! - [`cache`]: an archive opened in a store and pinned to one version, the
//!   block cache and the fetcher that fills it, verification, counters.
//! - [`fs`]: the filesystem core (generic over the store), the inode tree, the
//!   412 reopen, and the thin fuser adapter.
//! - [`mount`]: the mount lifecycle — pre-flight checks, the daemon, writable
//!   overlays, `umount`, private state files.
//! - [`tree`]: walking local trees to save and extracting archives safely.
//! - [`paths`]: user paths ↔ namespaced archive names.
//! - [`profile`]: access profiles — what builds read, recorded, merged,
//!   stored beside the key, and reported.
//! - [`save`] and [`restore`]: the two whole-archive operations.
//! - [`progress`]: the progress bar of long transfers.
//! - [`allocator`]: the binary's allocator (mimalloc; large zeroed blocks
//!   mapped fresh).
//! - [`buffers`]: pools of reused large buffers (decoded frames, replies,
//!   GET bodies).
//! - [`cli`]: the command-line front end, where flags and environment are read.

pub mod allocator;
pub mod archive;
pub mod buffers;
pub mod cache;
pub mod cli;
pub mod fs;
pub mod mount;
pub mod paths;
pub mod profile;
pub mod progress;
pub mod restore;
pub mod save;
pub mod store;
pub mod tree;
