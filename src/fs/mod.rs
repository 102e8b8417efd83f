//! The read-only filesystem a mount serves: the inode table ([`inodes`]), the
//! operations over it and the fetcher ([`core`], testable without a kernel),
//! and the thin fuser adapter ([`fuse`]).

pub mod core;
pub mod fuse;
pub mod inodes;
pub mod reopen;

pub use self::core::{Attr, FsCore, FsError, Invalidations, Mapped, STATS_XATTR, USAGE_XATTR};
pub use self::fuse::FuseFs;
pub use self::inodes::{Tree, ROOT_INO};
pub use self::reopen::Reopener;
