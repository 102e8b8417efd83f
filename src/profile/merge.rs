//! Merging one build's reads into a key's profile, and fading what builds
//! stopped reading.
//!
//! The rule: the new profile lists this build's entries first, in the order
//! it first read them, then the older entries it did not read, in their old
//! order. Every entry's `seen` bitmap shifts by one build (bit 0 is this
//! build); an entry none of the last [`FADE_BUILDS`] builds read reaches 0
//! and is dropped. A range read again is widened to cover both builds'.
//! So replay follows the newest build's order, a file one build skipped is
//! still prefetched (after the rest), and a dependency removed from the
//! lockfile disappears from the profile after eight builds.

use std::collections::HashMap;

use super::format::{Profile, ProfileEntry, MAX_ENTRIES};
use super::record::Read;

/// Builds after which an entry nobody read any more is gone (the width of `seen`).
pub const FADE_BUILDS: u32 = u8::BITS;

/// `old` (if any) with this build's `reads` merged in.
pub fn merge(old: Option<&Profile>, reads: &[Read]) -> Profile {
    let old_entries: &[ProfileEntry] = old.map_or(&[], |p| &p.entries);
    let old_at: HashMap<&[u8], &ProfileEntry> = old_entries.iter().map(|e| (&*e.name, e)).collect();
    let mut entries = Vec::with_capacity((reads.len() + old_entries.len()).min(MAX_ENTRIES));
    let mut read_now = std::collections::HashSet::with_capacity(reads.len());
    for r in reads.iter().take(MAX_ENTRIES) {
        if !read_now.insert(&*r.name) {
            continue;
        }
        let (mut start, mut end) = r.granules();
        let mut seen = 1;
        if let Some(o) = old_at.get(&*r.name) {
            seen |= o.seen << 1;
            start = start.min(o.start);
            end = end.max(o.end);
        }
        entries.push(ProfileEntry {
            name: r.name.clone(),
            seen,
            start,
            end,
        });
    }
    for o in old_entries {
        if entries.len() >= MAX_ENTRIES {
            break;
        }
        let seen = o.seen << 1;
        if seen != 0 && !read_now.contains(&*o.name) {
            entries.push(ProfileEntry { seen, ..o.clone() });
        }
    }
    Profile {
        builds: old.map_or(0, |p| p.builds).saturating_add(1),
        entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(name: &str, start: u64, end: u64) -> Read {
        Read {
            name: name.as_bytes().into(),
            start,
            end,
        }
    }

    fn names(p: &Profile) -> Vec<String> {
        p.entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect()
    }

    #[test]
    fn the_first_build_is_its_reads_in_order() {
        let p = merge(None, &[read("b", 0, 10), read("a", 0, 1 << 20)]);
        assert_eq!(p.builds, 1);
        assert_eq!(names(&p), ["b", "a"]);
        assert_eq!(p.entries[1].end, 16);
        assert!(p.entries.iter().all(|e| e.seen == 1));
    }

    #[test]
    fn the_newest_build_goes_first_and_older_entries_follow() {
        let one = merge(None, &[read("a", 0, 1), read("b", 0, 1), read("c", 0, 1)]);
        let two = merge(Some(&one), &[read("c", 0, 1), read("d", 0, 1)]);
        assert_eq!(names(&two), ["c", "d", "a", "b"]);
        let seen: Vec<u8> = two.entries.iter().map(|e| e.seen).collect();
        assert_eq!(seen, [0b11, 0b01, 0b10, 0b10]);
        assert_eq!(two.builds, 2);
    }

    #[test]
    fn ranges_read_again_are_widened() {
        let one = merge(None, &[read("a", 0, 1)]);
        let two = merge(Some(&one), &[read("a", 5 << 20, 6 << 20)]);
        assert_eq!((two.entries[0].start, two.entries[0].end), (0, 96));
    }

    #[test]
    fn an_entry_no_build_reads_fades_out_after_eight_builds() {
        let mut p = merge(None, &[read("gone", 0, 1), read("kept", 0, 1)]);
        for build in 1..FADE_BUILDS {
            p = merge(Some(&p), &[read("kept", 0, 1)]);
            assert_eq!(names(&p), ["kept", "gone"], "after {build} more builds");
        }
        p = merge(Some(&p), &[read("kept", 0, 1)]);
        assert_eq!(names(&p), ["kept"]);
        assert_eq!(p.entries[0].seen, u8::MAX);
        // Read once more before fading: it is back, newest first.
        let q = merge(Some(&p), &[read("gone", 0, 1)]);
        assert_eq!(names(&q), ["gone", "kept"]);
    }

    #[test]
    fn a_name_read_twice_in_one_build_is_one_entry() {
        let p = merge(None, &[read("a", 0, 1), read("a", 0, 1)]);
        assert_eq!(names(&p), ["a"]);
    }
}
