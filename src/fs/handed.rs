//! Files handed to the kernel's page cache: replay pushes a profile entry's
//! bytes into the kernel ([`FsCore::hand_to_kernel`], driven by
//! [`crate::mount::warm`]), so the build reads it with no FUSE round trip.
//! Its reads then never reach the mount, and the mount must still learn what
//! the build read (the profile would fade entries read every time) and
//! count the prefetch's hits: so while such files are unopened, opens are
//! answered rather than turned off with no-open, and the first open of a
//! handed file records the range handed as read.
//!
//! The decision to turn opens off is the kernel's for the whole connection
//! and for good (one `ENOSYS` answer): so it waits until it is known that
//! nothing was or will be handed over (no profile), or until every handed
//! file has been opened.
//!
//! Only a content-addressed mount hands files over: its content never
//! changes, so pages in the kernel can never be of another version. A remap
//! forgets what was handed (its entries are numbered anew).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};

use parking_lot::Mutex;

use super::core::{FsCore, Mapped};
use crate::archive::EntryKind;
use crate::cache::Stats;
use crate::store::ObjectStore;

/// The page size the kernel's page cache is filled in: a pushed range
/// starts on a page, and ends on one or at the end of the file (a page
/// filled only partly is not used by the kernel).
const PAGE: u64 = 4096;
/// Most bytes handed over of one file (larger files read fast through FUSE
/// anyway, in 1 MiB requests).
pub const MAX_HANDED: u64 = 16 << 20;
/// Bytes sent in one store notification.
const STORE_CHUNK: usize = 1 << 20;

/// Whether opens must be answered (not turned off with no-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Opens {
    /// Turn them off: nothing is handed over.
    Unneeded = 0,
    /// A profile may come: keep answering until that is known.
    Undecided = 1,
    /// Files are handed over: answer until each has been opened once.
    Needed = 2,
    /// As `Needed`, and nothing more will be handed over.
    NeededUntilOpened = 3,
}

#[derive(Default)]
pub struct Handed {
    opens: AtomicU8,
    /// Inode → (entry, range handed), until its first open.
    files: Mutex<HashMap<u64, (u32, Range<u64>)>>,
}

impl Handed {
    fn opens(&self) -> Opens {
        match self.opens.load(Ordering::Relaxed) {
            1 => Opens::Undecided,
            2 => Opens::Needed,
            3 => Opens::NeededUntilOpened,
            _ => Opens::Unneeded,
        }
    }

    fn set(&self, opens: Opens) {
        self.opens.store(opens as u8, Ordering::Relaxed);
    }

    pub(super) fn forget(&self) {
        self.files.lock().clear();
    }
}

/// What [`FsCore::hand_to_kernel`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandOver {
    /// This many bytes are in the kernel's page cache now.
    Done(u64),
    /// Not all of its bytes are cached yet (replay has not fetched them).
    NotCached,
    /// Nothing to hand over: not a file of this mountpoint, empty, or a
    /// mount whose content may change.
    Skipped,
}

impl<S: ObjectStore> FsCore<S> {
    /// A profile is being loaded: answer opens until it is known whether
    /// files will be handed over ([`FsCore::handing_over`], [`FsCore::handed_all`]).
    pub fn await_profile(&self) {
        self.handed.set(Opens::Undecided);
    }

    /// Files will be handed over: answer opens.
    pub fn handing_over(&self) {
        self.handed.set(Opens::Needed);
    }

    /// Nothing more will be handed over: opens may be turned off once
    /// every handed file has been opened (at once if none was).
    pub fn handed_all(&self) {
        self.handed.set(Opens::NeededUntilOpened);
    }

    /// Whether an open must be answered rather than turned off for good.
    pub fn sees_opens(&self) -> bool {
        match self.handed.opens() {
            Opens::Unneeded => false,
            Opens::Undecided | Opens::Needed => true,
            Opens::NeededUntilOpened => {
                if self.handed.files.lock().is_empty() {
                    self.handed.set(Opens::Unneeded);
                    false
                } else {
                    true
                }
            }
        }
    }

    /// Pushes the bytes `range(size)` of archive entry `name` (clamped to
    /// pages and the file, at most [`MAX_HANDED`]) into the kernel's page
    /// cache, if the mount holds them now; fetches nothing. A file the build
    /// has read already is skipped (the kernel has it). The kernel must know
    /// the file's inode already (its directory listed), or it ignores the
    /// data. An error is the kernel's (the mount is gone).
    pub fn hand_to_kernel(
        &self,
        name: &[u8],
        range: impl FnOnce(u64) -> Range<u64>,
    ) -> std::io::Result<HandOver> {
        let Some(kernel) = self.kernel().filter(|_| !self.tracks_handles()) else {
            return Ok(HandOver::Skipped);
        };
        let m = self.mapped();
        let Some((ino, entry)) = self.file_of(&m, name) else {
            return Ok(HandOver::Skipped);
        };
        let v = &m.version;
        if self.was_read(v, entry) {
            return Ok(HandOver::Skipped);
        }
        let size = v.entry(entry).size;
        let range = range(size);
        let start = range.start.min(size) / PAGE * PAGE;
        let end = range
            .end
            .min(size)
            .min(start + MAX_HANDED)
            .next_multiple_of(PAGE)
            .min(size);
        if start >= end {
            return Ok(HandOver::Skipped);
        }
        let Some(data) = self
            .fetcher()
            .peek_cached(v, entry, start, (end - start) as u32)
        else {
            return Ok(HandOver::NotCached);
        };
        // Known before the kernel has it: an open from now on is recorded.
        self.handed.files.lock().insert(ino, (entry, start..end));
        let mut offset = start;
        for chunk in data.chunks(STORE_CHUNK) {
            if let Err(e) = kernel.store(ino, offset, chunk) {
                self.handed.files.lock().remove(&ino);
                return Err(e);
            }
            offset += chunk.len() as u64;
        }
        let stats = self.fetcher().stats();
        Stats::inc(&stats.kernel_files);
        Stats::add(&stats.kernel_bytes, data.len() as u64);
        Ok(HandOver::Done(data.len() as u64))
    }

    /// The inode and entry of file `name` (an archive name) in this mountpoint.
    fn file_of(&self, m: &Mapped, name: &[u8]) -> Option<(u64, u32)> {
        let ino = m.tree.resolve(self.relative(name)?)?;
        let n = m.tree.get(ino)?;
        (n.kind == EntryKind::File).then_some(())?;
        Some((ino, n.entry?))
    }

    /// The directory holding archive name `name`, as a path under this
    /// mountpoint, if the tree has that directory. A profile's names are
    /// untrusted (`..`, a path elsewhere): only the tree's own directories
    /// are listed.
    pub fn dir_of<'a>(&self, name: &'a [u8]) -> Option<&'a [u8]> {
        let rel = self.relative(name)?;
        let dir = rel
            .iter()
            .rposition(|&b| b == b'/')
            .map_or(&rel[..0], |at| &rel[..at]);
        let m = self.mapped();
        let ino = m.tree.resolve(dir)?;
        (m.tree.get(ino)?.kind == EntryKind::Dir).then_some(dir)
    }

    /// `ino` was opened: if it was handed to the kernel, the build reads
    /// the range handed from there, so that is recorded and counted now.
    pub(super) fn opened_handed(&self, ino: u64, m: &Mapped) {
        let Some((entry, range)) = self.handed.files.lock().remove(&ino) else {
            return;
        };
        let len = range.end - range.start;
        self.fetcher()
            .count_kernel_read(&m.version, entry, range.start, len as u32);
        self.note_read(&m.version, entry, range.start, len as usize);
    }
}
