//! What a cache's builds use of it (`cachemount report`): files and bytes
//! read against those archived, the largest directories no recorded build
//! read, and the excludes that would shrink the cache most. Computed from an
//! archive index and a set of names read — a key's profile, or a live
//! mount's recorder (the daemon answers it through an xattr, as JSON).
//!
//! Named `usage` so it is not confused with `cli/report.rs`, which renders
//! every command's result; this module owns the figures.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::archive::{ArchiveIndex, EntryKind, Manifest};
use crate::paths::names;

/// Unread directories listed.
pub const TOP_UNREAD: usize = 10;
/// An unread directory is suggested as an exclude from this share of the
/// archived bytes on (smaller ones are not worth a line in a build script).
const EXCLUDE_MIN_SHARE: f64 = 0.01;

/// A directory none of the recorded builds read a file of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadDir {
    /// As the user names it (`node_modules/@mui`, `~/.npm/_cacache`).
    pub path: String,
    pub files: u64,
    pub bytes: u64,
}

/// The figures of one report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub files_read: u64,
    pub files_archived: u64,
    pub bytes_read: u64,
    pub bytes_archived: u64,
    /// Largest first, at most [`TOP_UNREAD`]; none is inside another.
    pub unread_dirs: Vec<UnreadDir>,
    /// Paths worth leaving out of the cache (`save` them no more).
    pub suggested_excludes: Vec<String>,
}

#[derive(Default, Clone, Copy)]
struct Tally {
    files: u64,
    bytes: u64,
    read: u64,
}

/// The usage of `index` by builds that read the entries named in `read`
/// (names the archive does not hold count for nothing). Bytes are file sizes.
pub fn usage<'a>(index: &ArchiveIndex, read: impl IntoIterator<Item = &'a [u8]>) -> Usage {
    let read: HashSet<&[u8]> = read.into_iter().collect();
    let mut dirs: HashMap<&[u8], Tally> = HashMap::new();
    let mut total = Tally::default();
    for e in index.entries.iter().filter(|e| e.kind == EntryKind::File) {
        let was_read = read.contains(e.name.as_slice());
        let add = |t: &mut Tally| {
            t.files += 1;
            t.bytes += e.size;
            t.read += u64::from(was_read);
        };
        add(&mut total);
        for dir in names::ancestors(&e.name) {
            add(dirs.entry(dir).or_default());
        }
    }
    let mut unread: Vec<(&[u8], Tally)> = dirs
        .iter()
        .filter(|(dir, t)| {
            // Below a namespace, unread, and the largest such: its parent was
            // read from, or is the namespace itself.
            let (_, rest) = names::split_namespace(dir);
            let parent = names::ancestors(dir).last();
            t.read == 0
                && rest.is_some()
                && parent.is_none_or(|p| {
                    names::split_namespace(p).1.is_none() || dirs.get(p).is_some_and(|t| t.read > 0)
                })
        })
        .map(|(d, t)| (*d, *t))
        .collect();
    unread.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(a.0.cmp(b.0)));
    unread.truncate(TOP_UNREAD);
    let unread_dirs: Vec<UnreadDir> = unread
        .iter()
        .map(|(d, t)| UnreadDir {
            path: user_path(&index.manifest, d),
            files: t.files,
            bytes: t.bytes,
        })
        .collect();
    let suggested_excludes = unread_dirs
        .iter()
        .filter(|d| d.bytes as f64 >= EXCLUDE_MIN_SHARE * total.bytes as f64 && d.bytes > 0)
        .map(|d| d.path.clone())
        .collect();
    Usage {
        files_read: total.read,
        files_archived: total.files,
        bytes_read: index
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File && read.contains(e.name.as_slice()))
            .map(|e| e.size)
            .sum(),
        bytes_archived: total.bytes,
        unread_dirs,
        suggested_excludes,
    }
}

/// An archive name as the user names the path: relative to the working dir,
/// under `~/`, or absolute (a namespace the manifest does not map: as is).
fn user_path(manifest: &Manifest, name: &[u8]) -> String {
    let (ns, rest) = names::split_namespace(name);
    let rest = String::from_utf8_lossy(rest.unwrap_or_default());
    let anchor = manifest
        .mappings
        .get(&*String::from_utf8_lossy(ns))
        .map(String::as_str);
    match anchor {
        Some(".") => rest.into_owned(),
        Some("~") => format!("~/{rest}"),
        Some("/") => format!("/{rest}"),
        _ => String::from_utf8_lossy(name).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Entry;

    fn index(files: &[(&str, u64)]) -> ArchiveIndex {
        let mut entries: Vec<Entry> = files
            .iter()
            .map(|(n, size)| Entry {
                size: *size,
                ..Entry::new(EntryKind::File, n.as_bytes())
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let mut manifest = Manifest::default();
        manifest.mappings.insert("_0".into(), ".".into());
        manifest.mappings.insert("_1".into(), "~".into());
        ArchiveIndex { manifest, entries }
    }

    #[test]
    fn figures_against_a_known_read_set() {
        let idx = index(&[
            ("_0/node_modules/a/index.js", 100),
            ("_0/node_modules/a/lib/x.js", 50),
            ("_0/node_modules/@mui/core/a.js", 4000),
            ("_0/node_modules/@mui/core/b.js", 3000),
            ("_0/node_modules/@mui/icons/c.js", 2000),
            ("_0/node_modules/b/big.bin", 90_000),
            ("_1/.npm/_cacache/x", 10),
        ]);
        let read: Vec<&[u8]> = vec![b"_0/node_modules/a/index.js", b"_0/not/archived"];
        let u = usage(&idx, read);
        assert_eq!((u.files_read, u.files_archived), (1, 7));
        assert_eq!((u.bytes_read, u.bytes_archived), (100, 99_160));
        let dirs: Vec<(&str, u64, u64)> = u
            .unread_dirs
            .iter()
            .map(|d| (d.path.as_str(), d.files, d.bytes))
            .collect();
        assert_eq!(
            dirs,
            [
                ("node_modules/b", 1, 90_000),
                ("node_modules/@mui", 3, 9000),
                ("node_modules/a/lib", 1, 50),
                ("~/.npm", 1, 10),
            ]
        );
        assert_eq!(
            u.suggested_excludes,
            ["node_modules/b", "node_modules/@mui"]
        );
    }

    #[test]
    fn a_cache_read_whole_has_nothing_to_exclude() {
        let idx = index(&[("_0/a/x", 1), ("_0/b/y", 2)]);
        let u = usage(&idx, [&b"_0/a/x"[..], b"_0/b/y"]);
        assert_eq!(u.files_read, 2);
        assert!(u.unread_dirs.is_empty() && u.suggested_excludes.is_empty());
    }
}
