//! The order a full save writes entries in (DESIGN §3): sorted paths, except
//! that the files of the key's access profile come first, contiguous and in
//! profile order, so the next mount's replay is one or two large GETs. The
//! rest keeps sorted order. A zip allows any entry order, and readers (the
//! index, restore, Buildkite's agent, the `zip` crate) never rely on it.
//! Incremental saves keep their own rule (old bytes first, changes after).

use std::collections::HashMap;

use crate::profile::Profile;
use crate::tree::walk::{SourceEntry, SourceKind};

/// Moves the files `profile` names to the front, in profile order; returns
/// how many moved. Names the tree does not hold are ignored.
pub fn profile_first(entries: &mut [SourceEntry], profile: &Profile) -> usize {
    let rank: HashMap<&[u8], usize> = profile
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (&*e.name, i))
        .collect();
    let place = |e: &SourceEntry| match e.kind {
        SourceKind::File { .. } => rank.get(e.meta.name.as_slice()).copied(),
        _ => None,
    };
    let moved = entries.iter().filter(|e| place(e).is_some()).count();
    if moved > 0 {
        // Stable: everything the profile does not name keeps its sorted order.
        entries.sort_by_cached_key(|e| place(e).unwrap_or(usize::MAX));
    }
    moved
}
