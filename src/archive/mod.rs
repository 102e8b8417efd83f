//! The archive format: a zip that is seekable (DESIGN §3).
//!
//! A cachemount archive is a valid zip in Buildkite cache v2 layout (a manifest
//! entry, each saved path under a namespace `_i/…`), whose files are sequences
//! of independent zstd frames plus a seek table, and whose last entry is an
//! index ([`index`]) that the EOCD comment points at. Foreign zips (Buildkite's,
//! or any zip with stored, deflate or zstd entries) are read from their central
//! directory alone.
//!
//! Both kinds end up as the same [`ArchiveIndex`]: a list of [`Entry`] values
//! that says, for every path, its metadata and where its bytes are.

pub mod arriving;
pub mod chunks;
pub mod decode;
pub mod index;
pub mod limits;
pub mod manifest;
pub mod reader;
pub mod seek_table;
pub mod writer;
pub mod zip;

pub use index::{ArchiveIndex, Compression, DataOffset, Entry, EntryKind, Frame, Timestamp};
pub use manifest::{Anchor, Manifest};
pub use reader::{open_archive, open_file, OpenError, OpenStep, Opener};
pub use writer::{ArchiveWriter, FinishedArchive, WriterOptions};

/// Name of the entry holding Buildkite's namespace manifest.
pub const MANIFEST_NAME: &str = ".buildkite/cache-manifest.json";
/// Name of the entry holding cachemount's index.
pub const INDEX_NAME: &str = ".cachemount/index";
/// Uncompressed size of one zstd frame of a file (the last one may be shorter).
/// 1 MiB: big enough that zstd keeps most of its ratio, small enough that a
/// random 4 KiB read decompresses little.
pub const DEFAULT_FRAME_SIZE: u32 = 1 << 20;

/// Why bytes read from a store are not a usable archive.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a zip archive: {0}")]
    NotZip(&'static str),
    #[error("archive is truncated ({0} ends early)")]
    Truncated(&'static str),
    #[error("archive is corrupt: {0}")]
    Invalid(&'static str),
    #[error("unsupported archive feature: {0}")]
    Unsupported(String),
    #[error(
        "archive index does not match its checksum (expected sha256 {expected}, got {actual})"
    )]
    IndexChecksum { expected: String, actual: String },
    #[error("corrupt data in {name}: {reason}")]
    CorruptEntry { name: String, reason: String },
    /// An entry declares a name, symlink target or xattrs beyond what the
    /// kernel takes ([`limits`]).
    #[error("archive entry {name} is refused: {reason} (a crafted or corrupt archive; save the cache again)")]
    EntryOverLimit { name: String, reason: String },
    /// The archive declares more than its own bytes could hold ([`limits`]).
    #[error("archive is refused: {0} (a crafted or corrupt archive; save the cache again)")]
    Implausible(String),
}
