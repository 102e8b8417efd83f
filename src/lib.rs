//! cachemount: mount CI caches from S3 (or a local directory) lazily instead of
//! downloading and unpacking them.
//!
//! The crate is cut along the architecture:
//! - [`archive`]: the seekable zip + zstd format (Buildkite cache v2 compatible).
//! - [`store`]: where archives live — one [`store::ObjectStore`] trait, a local
//!   directory and S3 behind it, and the blob/key layout on top.
//! - [`tree`]: walking local trees to save and extracting archives safely.
//! - [`save`] and [`restore`]: the two whole-archive operations.
//! - [`cli`]: the command-line front end.

pub mod archive;
pub mod cache;
pub mod cli;
pub mod fs;
pub mod mount;
pub mod paths;
pub mod progress;
pub mod restore;
pub mod save;
pub mod store;
pub mod tree;
