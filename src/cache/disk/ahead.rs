//! Telling a walk of the archive in order from scattered reads, so the
//! disk cache can open and read the next small files before the walk asks.
//!
//! The disk cache files entries under their content hashes, so files that
//! sit side by side in a tree are scattered over the cache's directories.
//! A tree walk (`find | xargs cat`, `tar`, a compiler reading a package)
//! would then wait on one random disk read after another: each entry's
//! directory block, inode and data. Native trees are laid out in the order
//! they were written, which is why they walk faster. Reading the next
//! entries on a few threads at once turns those waits into parallel I/O
//! that the page cache then serves. A scattered reader (a 10% sample)
//! gets none of it, so it does not pay for files it never reads.

/// Entries warmed ahead of a walk.
pub const WINDOW: u32 = 128;
/// A first read this many entries or fewer past the last one continues a
/// walk (directory entries lie between the files of two directories).
const GAP: u32 = 4;
/// First reads in a row that make a walk (a 10% sample of a tree has
/// eight gaps of at most `GAP` in a row about once in 5,000 reads).
const RUN: u32 = 8;

/// The first reads of one version's entries, in the order they came.
#[derive(Debug, Default)]
pub struct Walk {
    version: u64,
    last: u32,
    run: u32,
    /// Entries before this one were warmed (or are behind the walk).
    warmed: u32,
}

impl Walk {
    /// A first read of `entry` of version `version`, out of `entries`:
    /// the range of entries to warm now, if it continues a walk that is
    /// less than half a window from the end of what was warmed.
    pub fn first_read(&mut self, version: u64, entry: u32, entries: u32) -> Option<(u32, u32)> {
        let continues = self.version == version && entry > self.last && entry - self.last <= GAP;
        if self.version != version {
            *self = Walk {
                version,
                ..Walk::default()
            };
        }
        if continues {
            self.run += 1;
        } else {
            // A new walk (or none): what was warmed for an old one is no
            // reason to skip what this one reads.
            self.run = 0;
            self.warmed = 0;
        }
        self.last = entry;
        if self.run < RUN {
            return None;
        }
        let from = self.warmed.max(entry + 1);
        if from > entry.saturating_add(WINDOW / 2) {
            return None;
        }
        let to = entry.saturating_add(1 + WINDOW).min(entries);
        self.warmed = to;
        (from < to).then_some((from, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// First reads of `first..=first + RUN`: the walk is known at the last.
    fn start_walk(w: &mut Walk, version: u64, first: u32, entries: u32) -> Option<(u32, u32)> {
        for e in first..first + RUN {
            assert_eq!(w.first_read(version, e, entries), None, "{e}");
        }
        w.first_read(version, first + RUN, entries)
    }

    #[test]
    fn a_walk_warms_a_window_ahead_and_again_half_a_window_from_its_end() {
        let mut w = Walk::default();
        let at = 10 + RUN;
        assert_eq!(
            start_walk(&mut w, 1, 10, 1000),
            Some((at + 1, at + 1 + WINDOW))
        );
        // Inside the first half of the window: nothing new.
        let mid = at + 1 + WINDOW / 2;
        for e in at + 1..mid {
            assert_eq!(w.first_read(1, e, 1000), None, "{e}");
        }
        assert_eq!(
            w.first_read(1, mid, 1000),
            Some((at + 1 + WINDOW, mid + 1 + WINDOW))
        );
    }

    #[test]
    fn scattered_reads_warm_nothing_and_the_window_stops_at_the_last_entry() {
        let mut w = Walk::default();
        // Gaps over GAP, and runs shorter than RUN, are no walk.
        let mut e = 5;
        for i in 0..100 {
            e += if i % RUN == 0 { GAP + 1 } else { 1 };
            assert_eq!(w.first_read(1, e, 10_000), None, "{e}");
        }
        // Backwards is not a walk either.
        for e in (100..200).rev() {
            assert_eq!(w.first_read(1, e, 10_000), None, "{e}");
        }
        let first = 97 - RUN;
        assert_eq!(start_walk(&mut w, 1, first, 100), Some((98, 100)));
        assert_eq!(w.first_read(1, 98, 100), None);
    }

    #[test]
    fn a_walk_over_what_an_earlier_walk_warmed_warms_it_again() {
        let mut w = Walk::default();
        for e in 0..500 {
            w.first_read(1, e, 1000);
        }
        let at = 10 + RUN;
        assert_eq!(
            start_walk(&mut w, 1, 10, 1000),
            Some((at + 1, at + 1 + WINDOW))
        );
    }

    #[test]
    fn a_new_version_starts_a_new_walk() {
        let mut w = Walk::default();
        assert!(start_walk(&mut w, 1, 0, 1000).is_some());
        let next = RUN + 1;
        assert_eq!(w.first_read(2, next, 1000), None);
        let at = next + RUN;
        assert_eq!(
            start_walk(&mut w, 2, next, 1000),
            Some((at + 1, at + 1 + WINDOW))
        );
    }
}
