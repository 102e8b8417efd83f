//! The recorder of one mount daemon: which archive entries the build read,
//! in first-access order, each with the coarse range read. One small hash
//! lookup per read; a name is copied once per entry, at its first read.
//! Bounded: past [`MAX_ENTRIES`] entries nothing new is recorded.
//!
//! Entries are keyed by (version id, entry index), the numbers a read has at
//! hand; names make them survive a reopen (a new version numbers entries
//! anew), so an entry read under two versions is one entry in the profile.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::format::{granules, MAX_ENTRIES};
use crate::cache::Version;

/// One entry read, as the recorder keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub name: Box<[u8]>,
    /// Bytes read, `start..end`, widened to cover every read of the entry.
    pub start: u64,
    pub end: u64,
}

impl Read {
    /// The range in profile granules.
    pub fn granules(&self) -> (u32, u32) {
        granules(self.start, self.end)
    }
}

#[derive(Default)]
struct Inner {
    /// (version id, entry) → position in `reads`.
    at: HashMap<(u64, u32), usize>,
    /// Name → position, to join an entry read again after a reopen.
    by_name: HashMap<Box<[u8]>, usize>,
    reads: Vec<Read>,
}

#[derive(Default)]
pub struct Recorder {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recorder({} entries)", self.inner.lock().reads.len())
    }
}

impl Recorder {
    /// Records a read of `offset..offset+len` of `entry` in version `v`;
    /// whether it is the first read of that entry.
    pub fn record(&self, v: &Version, entry: u32, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len.max(1));
        let mut inner = self.inner.lock();
        if let Some(&i) = inner.at.get(&(v.id, entry)) {
            let r = &mut inner.reads[i];
            r.start = r.start.min(offset);
            r.end = r.end.max(end);
            return false;
        }
        let name: &[u8] = &v.entry(entry).name;
        let mut first = false;
        let i = match inner.by_name.get(name) {
            Some(&i) => i,
            None if inner.reads.len() >= MAX_ENTRIES => return false,
            None => {
                let i = inner.reads.len();
                inner.reads.push(Read {
                    name: name.into(),
                    start: offset,
                    end,
                });
                inner.by_name.insert(name.into(), i);
                first = true;
                i
            }
        };
        inner.at.insert((v.id, entry), i);
        let r = &mut inner.reads[i];
        r.start = r.start.min(offset);
        r.end = r.end.max(end);
        first
    }

    /// Whether `entry` of version `v` has been read.
    pub fn has(&self, v: &Version, entry: u32) -> bool {
        self.inner.lock().at.contains_key(&(v.id, entry))
    }

    /// Entries read so far.
    pub fn len(&self) -> usize {
        self.inner.lock().reads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What was read, in first-access order.
    pub fn reads(&self) -> Vec<Read> {
        self.inner.lock().reads.clone()
    }

    /// The names read so far (for a live mount's usage report).
    pub fn names(&self) -> Vec<Box<[u8]>> {
        self.inner
            .lock()
            .reads
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }
}
