//! The read-only filesystem a mount serves: the inode table ([`tree`]), the
//! operations over it and the fetcher ([`core`], testable without a kernel),
//! and the thin fuser adapter ([`fuse`]).

pub mod core;
pub mod fuse;
pub mod reopen;
pub mod tree;

pub use self::core::{Attr, FsCore, FsError, Invalidations, Mapped, STATS_XATTR};
pub use self::fuse::FuseFs;
pub use self::reopen::Reopener;
pub use self::tree::{Tree, ROOT_INO};
