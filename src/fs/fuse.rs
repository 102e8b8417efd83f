//! The thin fuser adapter: each FUSE request becomes one call on [`FsCore`],
//! each [`FsError`] one errno ([`errno`], the only place that mapping lives),
//! and each operation one counter.
//!
//! Metadata is answered on the FUSE worker thread from memory, and so are
//! reads the block cache holds. Reads that must wait (and readlinks that need
//! data) are handed to the tokio runtime and replied to from there, so a FUSE
//! thread never waits on the network. Every mutating
//! request gets `EROFS` (the kernel mostly refuses them first: the mount is `ro`).
//!
//! Per-file round trips are cut where the kernel allows: `open`/`opendir`
//! answer `ENOSYS` when the kernel supports no-open (it then stops sending
//! them, and keeps the page cache and caches directory listings: immutable
//! content), `flush` answers `ENOSYS` once, readdirplus replaces lookups.
//! Opens are answered while files handed to the page cache are unopened
//! (see [`super::handed`]): their first open is all the mount sees of them.
//!
//! With `--passthrough`, a disk cache and a kernel that offers FUSE
//! passthrough, `open` is answered instead (no-open is all or nothing): a file whose whole content
//! is in the disk cache, and at least [`PASSTHROUGH_MIN`] bytes, is opened
//! in passthrough mode on the cache file, so the kernel reads it with no
//! round trip per read; smaller ones are read from the cache file through
//! FUSE (one read serves them). While any handle of a file is open, new
//! opens read it the same way (the kernel refuses a mix). Where registering a backing file fails (the
//! kernel asks for CAP_SYS_ADMIN) that is logged once and every open is
//! answered plainly.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use parking_lot::Mutex;

use super::core::{Attr, FsCore, FsError, Invalidations, KernelCache};
use crate::archive::{EntryKind, Timestamp};
use crate::cache::stats::Op;
use crate::store::ObjectStore;

/// Entry and attribute timeout: the content never changes under a mount
/// (a changed archive is handled by explicit invalidation).
const TTL: Duration = Duration::from_secs(24 * 3600);
/// Kernel read-ahead asked for at init (the kernel may lower it). Larger reads
/// per request mean fewer round trips on sequential reads. How large one read
/// request may be is fuser's to ask: it sends `max_pages` for its 16 MiB
/// `max_write`, which the kernel caps at `fs.fuse.max_pages_limit` (256 pages,
/// 1 MiB, on Linux 6.18 by default), so sequential reads arrive as 1 MiB
/// requests, a frame's worth each.
pub const KERNEL_READAHEAD: u32 = 1 << 20;

/// The kernel's caches of one FUSE session, as the core changes them.
pub struct KernelNotifier(pub fuser::Notifier);

impl KernelCache for KernelNotifier {
    /// Sends a remap's invalidations (best effort: the kernel answers ENOENT
    /// for what it does not cache).
    fn invalidate(&self, inval: Invalidations) {
        for &ino in &inval.data {
            if let Err(e) = self.0.inval_inode(INodeNo(ino), 0, 0) {
                tracing::debug!("inval_inode {ino}: {e}");
            }
        }
        for &ino in &inval.attrs {
            if let Err(e) = self.0.inval_inode(INodeNo(ino), -1, 0) {
                tracing::debug!("inval_inode {ino} (attributes): {e}");
            }
        }
        for (parent, name) in &inval.entries {
            if let Err(e) = self
                .0
                .inval_entry(INodeNo(*parent), OsStr::from_bytes(name))
            {
                tracing::debug!(
                    "inval_entry {parent}/{}: {e}",
                    String::from_utf8_lossy(name)
                );
            }
        }
    }

    fn store(&self, ino: u64, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.store(INodeNo(ino), offset, data)
    }
}

/// The one place where core errors become errnos.
pub fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::NotSymlink => Errno::EINVAL,
        FsError::NoXattr => Errno::NO_XATTR,
        FsError::Range => Errno::ERANGE,
        FsError::ReadOnly => Errno::EROFS,
        FsError::Stale => Errno::ESTALE,
        FsError::Changed(_) | FsError::Io(_) => Errno::EIO,
    }
}

/// Smallest file opened in passthrough mode: below it, registering and
/// releasing a backing file costs about what the one FUSE read it saves
/// does (see the open-cost figure of `scripts/bench-local-cache.sh`).
pub const PASSTHROUGH_MIN: u64 = 64 << 10;

/// Open flags of a passthrough open: the kernel refuses any beyond its
/// passthrough mask (FOPEN_KEEP_CACHE included: the page cache is the
/// backing file's).
const PASSTHROUGH_FLAGS: FopenFlags = FopenFlags::empty();

pub struct FuseFs<S> {
    core: Arc<FsCore<S>>,
    runtime: tokio::runtime::Handle,
    /// The kernel supports no-open: answer open with ENOSYS.
    no_open: AtomicBool,
    /// The kernel supports no-opendir: answer opendir with ENOSYS (even
    /// under passthrough, which needs only files' opens).
    no_opendir: AtomicBool,
    /// Passthrough asked for (and a disk cache to pass through to).
    want_passthrough: bool,
    /// Passthrough works: the kernel offered it and backing files register.
    passthrough: AtomicBool,
    /// How the open handles of each inode read it, while passthrough is on.
    opened: Mutex<HashMap<u64, Opened>>,
}

/// How the open handles of one inode read it. The kernel refuses (EIO) to
/// mix passthrough and cached opens of one inode, and wants one backing
/// file for all of its passthrough opens: so while any handle is open, a
/// new open reads the way the first one does, even if the file has been
/// filed in the disk cache since.
enum Opened {
    /// Passthrough on this backing file, by this many handles.
    Passthrough(BackingId, u32),
    /// Through FUSE reads (and the page cache), by this many handles.
    Cached(u32),
}

impl Opened {
    fn handles(&mut self) -> &mut u32 {
        match self {
            Opened::Passthrough(_, n) | Opened::Cached(n) => n,
        }
    }
}

/// Implements `Filesystem` methods that would change the tree as one line
/// each: count the request and answer `EROFS`.
macro_rules! read_only {
    ($(fn $name:ident($($arg:ident: $ty:ty),* $(,)?; reply: $reply:ty);)*) => {
        $(
            fn $name(&self, _req: &Request, $(_: $ty,)* reply: $reply) {
                self.count(Op::Write);
                reply.error(Errno::EROFS);
            }
        )*
    };
}

impl<S: ObjectStore> FuseFs<S> {
    pub fn new(core: Arc<FsCore<S>>, runtime: tokio::runtime::Handle) -> Self {
        let want_passthrough = core.fetcher().has_disk();
        FuseFs {
            core,
            runtime,
            no_open: AtomicBool::new(false),
            no_opendir: AtomicBool::new(false),
            want_passthrough,
            passthrough: AtomicBool::new(false),
            opened: Mutex::new(HashMap::new()),
        }
    }

    /// Turns passthrough off (the default; `--passthrough` keeps it): files in the disk cache
    /// are then read from it through FUSE.
    pub fn without_passthrough(mut self) -> Self {
        self.want_passthrough = false;
        self
    }

    /// Answers an open while passthrough is on: in passthrough mode if
    /// the whole content of `ino` is in the disk cache and no handle of it
    /// is open through FUSE reads; else the way its open handles read.
    fn open_tracked(&self, ino: u64, fh: u64, reply: ReplyOpen) {
        let mut opened = self.opened.lock();
        match opened.get_mut(&ino) {
            Some(Opened::Passthrough(id, n)) => {
                *n += 1;
                return reply.opened_passthrough(FileHandle(fh), PASSTHROUGH_FLAGS, id);
            }
            Some(Opened::Cached(n)) => {
                *n += 1;
                return reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
            None => {}
        }
        let file = self
            .core
            .passthrough_file(ino)
            .filter(|f| f.metadata().is_ok_and(|m| m.len() >= PASSTHROUGH_MIN));
        if let Some(file) = file {
            match reply.open_backing(&file) {
                Ok(id) => {
                    reply.opened_passthrough(FileHandle(fh), PASSTHROUGH_FLAGS, &id);
                    opened.insert(ino, Opened::Passthrough(id, 1));
                    return;
                }
                Err(e) => {
                    if self.passthrough.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                        "FUSE passthrough is not available ({e}: registering a backing file needs CAP_SYS_ADMIN); files in the disk cache are read from it through FUSE"
                        );
                    }
                }
            }
        }
        opened.insert(ino, Opened::Cached(1));
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn count(&self, op: Op) {
        self.core.fetcher().stats().op(op);
    }
}

fn time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(u64::from(t.nanos))
    }
}

fn file_type(kind: EntryKind) -> FileType {
    match kind {
        EntryKind::File => FileType::RegularFile,
        EntryKind::Dir => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
    }
}

fn fuse_attr(a: &Attr) -> FileAttr {
    let mtime = time(a.mtime);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind: file_type(a.kind),
        perm: a.perm as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// Replies with an xattr value or list, honouring the size protocol.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(errno(&FsError::Range));
    } else {
        reply.data(value);
    }
}

impl<S: ObjectStore> Filesystem for FuseFs<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
        let wanted = [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_NO_OPEN_SUPPORT,
            InitFlags::FUSE_NO_OPENDIR_SUPPORT,
        ];
        for flag in wanted {
            if caps.contains(flag) {
                let _ = config.add_capabilities(flag);
            }
        }
        if self.want_passthrough {
            if caps.contains(InitFlags::FUSE_PASSTHROUGH)
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                // Depth 1: the cache files must be on a plain file system,
                // and overlayfs (`--writable`) may still stack on this mount.
                && config.set_max_stack_depth(1).is_ok()
            {
                self.passthrough.store(true, Ordering::Relaxed);
            } else {
                tracing::warn!("the kernel offers no FUSE passthrough (Linux 6.9 or later has it); files in the disk cache are read from it through FUSE");
            }
        }
        // Passthrough needs open answered, and no-open is all or nothing.
        self.no_open.store(
            caps.contains(InitFlags::FUSE_NO_OPEN_SUPPORT)
                && !self.passthrough.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.no_opendir.store(
            caps.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT),
            Ordering::Relaxed,
        );
        let _ = config
            .set_max_readahead(KERNEL_READAHEAD)
            .or_else(|max| config.set_max_readahead(max));
        let _ = config.set_max_background(64);
        tracing::debug!("FUSE init: kernel capabilities {caps:?}");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.count(Op::Lookup);
        match self.core.lookup(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry(&TTL, &fuse_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.count(Op::Getattr);
        match self.core.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &fuse_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.count(Op::Readlink);
        match self.core.readlink_cached(ino.0) {
            Ok(Some(target)) => reply.data(&target),
            Ok(None) => {
                let core = self.core.clone();
                self.runtime.spawn(async move {
                    match core.readlink(ino.0).await {
                        Ok(t) => reply.data(&t),
                        Err(e) => reply.error(errno(&e)),
                    }
                });
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.count(Op::Open);
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        match self.core.open(ino.0, write) {
            Err(e) => reply.error(errno(&e)),
            // The kernel then stops sending open and release, and keeps the
            // page cache (content that never changes: no handles needed);
            // unless opens account for files handed to the page cache.
            Ok(0) if self.no_open.load(Ordering::Relaxed) && !self.core.sees_opens() => {
                reply.error(Errno::ENOSYS)
            }
            Ok(fh) if self.passthrough.load(Ordering::Relaxed) => {
                self.open_tracked(ino.0, fh, reply)
            }
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.count(Op::Opendir);
        match self.core.getattr(ino.0) {
            Err(e) => reply.error(errno(&e)),
            Ok(_) if self.no_opendir.load(Ordering::Relaxed) => reply.error(Errno::ENOSYS),
            Ok(_) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.count(Op::Read);
        // Cache hits are answered here; anything that must wait goes to the runtime.
        let _runtime = self.runtime.enter();
        match self.core.read_cached(ino.0, fh.0, offset, size) {
            Some(Ok(data)) => return reply.data(&data),
            Some(Err(e)) => return reply.error(errno(&e)),
            None => {}
        }
        let core = self.core.clone();
        self.runtime.spawn(async move {
            match core.read_fh(ino.0, fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Release);
        self.core.release(ino.0, fh.0);
        let mut opened = self.opened.lock();
        if let Some(handles) = opened.get_mut(&ino.0).map(Opened::handles) {
            *handles -= 1;
            if *handles == 0 {
                opened.remove(&ino.0);
            }
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.count(Op::Flush);
        // Nothing to flush; ENOSYS makes the kernel stop sending flush at all.
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.count(Op::Readdir);
        let res = self.core.readdir(ino.0, offset, |e| {
            reply.add(
                INodeNo(e.ino),
                e.offset,
                file_type(e.kind),
                OsStr::from_bytes(e.name),
            )
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.count(Op::Readdirplus);
        let res = self.core.readdir(ino.0, offset, |e| {
            reply.add(
                INodeNo(e.ino),
                e.offset,
                OsStr::from_bytes(e.name),
                &TTL,
                &fuse_attr(&e.attr),
                Generation(0),
            )
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.count(Op::Statfs);
        let s = self.core.statfs();
        reply.statfs(
            s.blocks,
            0,
            0,
            s.files,
            0,
            s.block_size,
            s.name_max,
            s.block_size,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.count(Op::Getxattr);
        match self.core.getxattr(ino.0, name.as_bytes()) {
            Ok(v) => reply_xattr(reply, size, &v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.count(Op::Listxattr);
        match self.core.listxattr(ino.0) {
            Ok(v) => reply_xattr(reply, size, &v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.count(Op::Access);
        match self.core.access(ino.0, mask.bits()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    // Everything that would change the tree: `EROFS` (and counted as `write`).
    read_only! {
        fn setattr(
            ino: INodeNo, mode: Option<u32>, uid: Option<u32>, gid: Option<u32>,
            size: Option<u64>, atime: Option<TimeOrNow>, mtime: Option<TimeOrNow>,
            ctime: Option<SystemTime>, fh: Option<FileHandle>, crtime: Option<SystemTime>,
            chgtime: Option<SystemTime>, bkuptime: Option<SystemTime>,
            flags: Option<fuser::BsdFileFlags>; reply: ReplyAttr
        );
        fn mknod(parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32; reply: ReplyEntry);
        fn mkdir(parent: INodeNo, name: &OsStr, mode: u32, umask: u32; reply: ReplyEntry);
        fn unlink(parent: INodeNo, name: &OsStr; reply: ReplyEmpty);
        fn rmdir(parent: INodeNo, name: &OsStr; reply: ReplyEmpty);
        fn symlink(parent: INodeNo, link_name: &OsStr, target: &Path; reply: ReplyEntry);
        fn rename(
            parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr,
            flags: fuser::RenameFlags; reply: ReplyEmpty
        );
        fn link(ino: INodeNo, newparent: INodeNo, newname: &OsStr; reply: ReplyEntry);
        fn write(
            ino: INodeNo, fh: FileHandle, offset: u64, data: &[u8], write_flags: WriteFlags,
            flags: OpenFlags, lock_owner: Option<LockOwner>; reply: ReplyWrite
        );
        fn create(parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32; reply: ReplyCreate);
        fn setxattr(
            ino: INodeNo, name: &OsStr, value: &[u8], flags: i32, position: u32; reply: ReplyEmpty
        );
        fn removexattr(ino: INodeNo, name: &OsStr; reply: ReplyEmpty);
        fn fallocate(
            ino: INodeNo, fh: FileHandle, offset: u64, length: u64, mode: i32; reply: ReplyEmpty
        );
    }
}
