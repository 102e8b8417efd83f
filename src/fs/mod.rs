//! The read-only filesystem a mount serves: the inode table ([`inodes`]), the
//! operations over it and the fetcher ([`core`], testable without a kernel),
//! the files handed to the kernel's page cache ([`handed`]) and the thin
//! fuser adapter ([`fuse`]).

pub mod core;
pub mod fuse;
pub mod handed;
pub mod inodes;
pub mod reopen;

pub use self::core::{
    Attr, FsCore, FsError, Invalidations, KernelCache, Mapped, STATS_XATTR, USAGE_XATTR,
};
pub use self::fuse::FuseFs;
pub use self::handed::HandOver;
pub use self::inodes::{Tree, ROOT_INO};
pub use self::reopen::Reopener;
