//! The inode table of one mountpoint: the subtree of the archive index under
//! one saved path (`_0/node_modules`), as numbered nodes with parents and
//! sorted children, built once at mount time so that every metadata operation
//! is answered from memory.
//!
//! Inode numbers are the node's position in index order (root = 1), so they
//! are stable for a path across mounts of the same archive. Directories that
//! the archive implies but does not list (foreign zips often have no
//! directory entries) are synthesised with mode 0755 and the root's owner and
//! mtime.

use crate::paths::names;
use std::collections::HashMap;

use crate::archive::{ArchiveIndex, EntryKind, Timestamp};

pub const ROOT_INO: u64 = 1;

/// Archive paths (slices of the index's names) to inodes, while building.
type PathMap<'a> = HashMap<&'a [u8], u64, foldhash::fast::RandomState>;

/// One file, directory or symlink of the mount.
#[derive(Debug, Clone)]
pub struct Node {
    /// The last path component (empty for the root), in the tree's name
    /// arena: [`Tree::name`].
    name: NameSpan,
    pub parent: u64,
    pub kind: EntryKind,
    /// Index of the archive entry; None for a synthesised directory.
    pub entry: Option<u32>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub size: u64,
    pub nlink: u32,
    /// Children sorted by name (directories only).
    pub children: Vec<u64>,
}

/// Where a node's name lies in [`Tree::names`]: one arena for the whole
/// tree, not an allocation per node (58k of them, freed again at unmount).
#[derive(Debug, Clone, Copy, Default)]
struct NameSpan {
    start: usize,
    len: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{0} is not a directory in the cache, so it cannot be mounted")]
    NotADirectory(String),
}

#[derive(Debug)]
pub struct Tree {
    /// By inode number - 1; `None` for an inode whose path is gone (after a
    /// remap onto a new archive version: inode numbers stay stable by path).
    nodes: Vec<Option<Node>>,
    live: usize,
    /// Every node's name, end to end.
    names: Vec<u8>,
}

/// What changed when a tree was mapped onto a new archive version.
#[derive(Debug, Default)]
pub struct RemapReport {
    /// Inodes kept (same path, same kind) whose content changed: their
    /// kernel page cache and attributes must be invalidated.
    pub changed: Vec<u64>,
    /// Inodes kept whose content is the same but whose attributes changed.
    pub attrs_changed: Vec<u64>,
    /// Directories whose listing changed.
    pub dirs_changed: Vec<u64>,
    /// (parent inode, name) of paths gone from the new version (or whose
    /// kind changed: they get a new inode).
    pub gone: Vec<(u64, Box<[u8]>)>,
    /// Paths new in this version.
    pub added: usize,
}

/// How a build recognises a path it has seen before: a duplicate name (the
/// first one wins), or a file where a later entry implies a directory (that
/// entry is skipped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// The index is in name order, as every archive's is unless crafted: a
    /// duplicate follows its twin, a file comes before the paths below it,
    /// and only directories go into the path map. Hashing every file's path
    /// took 5 of 13 ms of building a 58k-entry tree.
    Sorted,
    /// Any order: every path goes into the map.
    Hashed,
}

impl Tree {
    /// The subtree of `index` under the archive name `root` (`_0/node_modules`;
    /// empty for the whole archive).
    pub fn build(index: &ArchiveIndex, root: &[u8]) -> Result<Tree, TreeError> {
        match Self::build_with(index, root, Seen::Sorted)? {
            Some(tree) => Ok(tree),
            None => Ok(Self::build_with(index, root, Seen::Hashed)?
                .expect("a hashed build takes any order")),
        }
    }

    /// [`Tree::build`]; None when `seen` is [`Seen::Sorted`] and the
    /// entries under `root` are not in name order.
    fn build_with(
        index: &ArchiveIndex,
        root: &[u8],
        seen: Seen,
    ) -> Result<Option<Tree>, TreeError> {
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let root_entry = index
            .entries
            .binary_search_by(|e| e.name.as_slice().cmp(root))
            .ok();
        let mut root_node = Node {
            name: NameSpan::default(),
            parent: ROOT_INO,
            kind: EntryKind::Dir,
            entry: None,
            mode: 0o755,
            uid: euid,
            gid: egid,
            mtime: Timestamp::default(),
            size: 0,
            nlink: 2,
            children: Vec::new(),
        };
        if let Some(i) = root_entry.filter(|_| !root.is_empty()) {
            let e = &index.entries[i];
            if e.kind != EntryKind::Dir {
                return Err(TreeError::NotADirectory(
                    String::from_utf8_lossy(root).into_owned(),
                ));
            }
            root_node.entry = Some(i as u32);
            root_node.mode = e.mode;
            root_node.uid = e.uid;
            root_node.gid = e.gid;
            root_node.mtime = e.mtime;
        } else {
            // No root entry: take the newest mtime below it, for a stable answer.
            root_node.mtime = index
                .entries
                .iter()
                .filter(|e| names::strip_within(&e.name, root).is_some())
                .map(|e| e.mtime)
                .max_by_key(|t| (t.secs, t.nanos))
                .unwrap_or_default();
        }
        let synth = (root_node.uid, root_node.gid, root_node.mtime);
        // Sized once: regrowing a table of 50k nodes copies it several times
        // over, into memory that must fault in each time.
        let mut nodes = Vec::with_capacity(index.entries.len() + 1);
        nodes.push(Some(root_node));
        let mut tree = Tree {
            nodes,
            live: 1,
            names: Vec::new(),
        };
        // The parent of the previous entry: entries are in path order, so a
        // directory's files follow each other and share it without a lookup.
        let mut last_parent: Option<(&[u8], u64)> = None;
        // Keyed by slices of the index's own names: no copy of any path; a
        // fast hash (the keys are the archive's own, hashed once each).
        let mut by_path: PathMap = HashMap::with_capacity_and_hasher(
            match seen {
                Seen::Sorted => 1024,
                Seen::Hashed => index.entries.len() + 1,
            },
            Default::default(),
        );
        by_path.insert(b"", ROOT_INO);
        let mut previous: Option<&[u8]> = None;
        for (i, e) in index.entries.iter().enumerate() {
            let Some(rel) = names::strip_within(&e.name, root) else {
                continue;
            };
            if rel.is_empty() {
                continue;
            }
            if seen == Seen::Sorted {
                match previous.map(|p| rel.cmp(p)) {
                    Some(std::cmp::Ordering::Less) => return Ok(None),
                    Some(std::cmp::Ordering::Equal) => continue,
                    _ => previous = Some(rel),
                }
            }
            if rel
                .split(|b| *b == b'/')
                .any(|c| c.is_empty() || c == b"." || c == b"..")
            {
                tracing::warn!(
                    "skipping archive entry {:?}: not a plain relative path",
                    String::from_utf8_lossy(&e.name)
                );
                continue;
            }
            let (parent_path, name) = split_last(rel);
            let parent = match last_parent {
                Some((path, ino)) if path == parent_path => Some(ino),
                _ => {
                    let ino = tree.ensure_dir(&mut by_path, parent_path, synth, |path| {
                        seen == Seen::Sorted && is_listed_non_dir(index, root, path)
                    });
                    if let Some(ino) = ino {
                        last_parent = Some((parent_path, ino));
                    }
                    ino
                }
            };
            let Some(parent) = parent else {
                tracing::warn!(
                    "skipping archive entry {:?}: its parent is not a directory",
                    String::from_utf8_lossy(&e.name)
                );
                continue;
            };
            // A path seen before (a duplicate name) keeps its first node.
            if e.kind == EntryKind::Dir || seen == Seen::Hashed {
                let std::collections::hash_map::Entry::Vacant(slot) = by_path.entry(rel) else {
                    continue;
                };
                slot.insert(tree.nodes.len() as u64 + 1);
            }
            let name = tree.intern(name);
            tree.push(Node {
                name,
                parent,
                kind: e.kind,
                entry: Some(i as u32),
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                mtime: e.mtime,
                size: if e.kind == EntryKind::Dir { 0 } else { e.size },
                nlink: if e.kind == EntryKind::Dir { 2 } else { 1 },
                children: Vec::new(),
            });
        }
        tree.finish();
        Ok(Some(tree))
    }

    /// Sorts children by name and counts subdirectories into nlink: one sort
    /// per directory, O(n log n) in all, without copying names.
    fn finish(&mut self) {
        for i in 0..self.nodes.len() {
            let Some(node) = self.nodes[i].as_mut() else {
                continue;
            };
            let mut children = std::mem::take(&mut node.children);
            children.sort_unstable_by(|a, b| self.name_of(*a).cmp(self.name_of(*b)));
            let subdirs = children
                .iter()
                .filter(|c| self.node(**c).kind == EntryKind::Dir)
                .count() as u32;
            let node = self.nodes[i].as_mut().expect("still live");
            if node.kind == EntryKind::Dir {
                node.nlink = 2 + subdirs;
            }
            node.children = children;
        }
    }

    /// The name of `node`, a node of this tree.
    pub fn name(&self, node: &Node) -> &[u8] {
        &self.names[node.name.start..][..node.name.len as usize]
    }

    fn name_of(&self, ino: u64) -> &[u8] {
        self.name(self.node(ino))
    }

    /// `name` added to the arena.
    fn intern(&mut self, name: &[u8]) -> NameSpan {
        let span = NameSpan {
            start: self.names.len(),
            len: u32::try_from(name.len()).expect("a path component fits in u32"),
        };
        self.names.extend_from_slice(name);
        span
    }

    fn node(&self, ino: u64) -> &Node {
        self.nodes[(ino - 1) as usize]
            .as_ref()
            .expect("a live inode")
    }

    fn push(&mut self, node: Node) -> u64 {
        let parent = node.parent;
        self.nodes.push(Some(node));
        self.live += 1;
        let ino = self.nodes.len() as u64;
        self.nodes[(parent - 1) as usize]
            .as_mut()
            .expect("a live parent")
            .children
            .push(ino);
        ino
    }

    /// This tree mapped onto a new version's `index` (same `root`): a path
    /// present in both with the same kind keeps its inode number; new paths
    /// get new numbers (never reused). `same_content(old_entry, new_entry)`
    /// tells whether an entry's content is unchanged.
    ///
    /// Linear: both trees are walked together, each directory's sorted
    /// children merged by name, so no path is ever built or hashed.
    pub fn remap(
        &self,
        index: &ArchiveIndex,
        root: &[u8],
        same_content: impl Fn(u32, u32) -> bool,
        same_attrs: impl Fn(u32, u32) -> bool,
    ) -> Result<(Tree, RemapReport), TreeError> {
        let fresh = Tree::build(index, root)?;
        let mut report = RemapReport::default();
        let mut next = self.nodes.len() as u64 + 1;
        // Fresh inode → final inode; which old inodes live on.
        let mut map = vec![0u64; fresh.nodes.len() + 1];
        let mut kept = vec![false; self.nodes.len() + 1];
        map[ROOT_INO as usize] = ROOT_INO;
        kept[ROOT_INO as usize] = true;
        // (fresh directory, the old node at its path with the same kind).
        let mut stack = vec![(ROOT_INO, Some(ROOT_INO))];
        while let Some((fdir, odir)) = stack.pop() {
            let old_children: &[u64] = odir.map_or(&[], |o| &self.node(o).children);
            let mut j = 0;
            for &fc in &fresh.node(fdir).children {
                let fnode = fresh.node(fc);
                let fname = fresh.name(fnode);
                while j < old_children.len() && self.name_of(old_children[j]) < fname {
                    j += 1;
                }
                let old = old_children.get(j).copied().filter(|&o| {
                    let n = self.node(o);
                    self.name(n) == fname && n.kind == fnode.kind
                });
                map[fc as usize] = match old {
                    Some(o) => {
                        kept[o as usize] = true;
                        o
                    }
                    None => {
                        report.added += 1;
                        next += 1;
                        next - 1
                    }
                };
                if fnode.kind == EntryKind::Dir {
                    stack.push((fc, old));
                }
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(n) = n.as_ref().filter(|_| !kept[i + 1]) {
                report.gone.push((n.parent, self.name(n).into()));
            }
        }
        let len = map
            .iter()
            .copied()
            .max()
            .unwrap_or(1)
            .max(self.nodes.len() as u64);
        let mut nodes: Vec<Option<Node>> = vec![None; len as usize];
        for (fi, fnode) in fresh.nodes.iter().enumerate() {
            let Some(fnode) = fnode else { continue };
            let ino = map[fi + 1];
            let mut n = fnode.clone();
            n.parent = map[fnode.parent as usize];
            n.children = fnode.children.iter().map(|c| map[*c as usize]).collect();
            let old = self
                .get(ino)
                .filter(|_| kept.get(ino as usize).copied().unwrap_or(false));
            if let Some(old) = old {
                match (old.entry, n.entry) {
                    (Some(a), Some(b)) if n.kind != EntryKind::Dir => {
                        if !same_content(a, b) {
                            report.changed.push(ino);
                        } else if !same_attrs(a, b) {
                            report.attrs_changed.push(ino);
                        }
                    }
                    _ => {}
                }
                if n.kind == EntryKind::Dir {
                    let same_names = old.children.len() == fnode.children.len()
                        && old
                            .children
                            .iter()
                            .zip(&fnode.children)
                            .all(|(a, b)| self.name_of(*a) == fresh.name_of(*b));
                    if !same_names || old.mode != n.mode || old.mtime != n.mtime {
                        report.dirs_changed.push(ino);
                    }
                }
            }
            nodes[(ino - 1) as usize] = Some(n);
        }
        let mut tree = Tree {
            live: fresh.live,
            nodes,
            names: fresh.names,
        };
        tree.finish();
        report.gone.sort();
        Ok((tree, report))
    }

    /// The inode of directory `path`, synthesising it and its missing
    /// ancestors (iteratively: a deep path must not recurse per component).
    /// None when one of them is not a directory: in the map, or a path that
    /// `not_dir` says holds something else.
    fn ensure_dir<'a>(
        &mut self,
        by_path: &mut PathMap<'a>,
        path: &'a [u8],
        synth: (u32, u32, Timestamp),
        not_dir: impl Fn(&[u8]) -> bool,
    ) -> Option<u64> {
        let mut missing = Vec::new();
        let mut cur = path;
        let mut ino = loop {
            if let Some(&ino) = by_path.get(cur) {
                break ino;
            }
            missing.push(cur);
            cur = split_last(cur).0;
        };
        if self.node(ino).kind != EntryKind::Dir || missing.iter().any(|p| not_dir(p)) {
            return None;
        }
        for p in missing.into_iter().rev() {
            let name = self.intern(split_last(p).1);
            ino = self.push(Node {
                name,
                parent: ino,
                kind: EntryKind::Dir,
                entry: None,
                mode: 0o755,
                uid: synth.0,
                gid: synth.1,
                mtime: synth.2,
                size: 0,
                nlink: 2,
                children: Vec::new(),
            });
            by_path.insert(p, ino);
        }
        Some(ino)
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(ino.checked_sub(1)? as usize)?.as_ref()
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let dir = self.get(parent)?;
        dir.children
            .binary_search_by(|c| self.name_of(*c).cmp(name))
            .ok()
            .map(|i| dir.children[i])
    }

    /// The node at path `rel` (components separated by `/`) under the root.
    pub fn resolve(&self, rel: &[u8]) -> Option<u64> {
        rel.split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .try_fold(ROOT_INO, |dir, name| self.lookup(dir, name))
    }

    /// Number of nodes (files, directories, symlinks).
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Sum of the sizes of all files (for statfs).
    pub fn total_size(&self) -> u64 {
        self.nodes.iter().flatten().map(|n| n.size).sum()
    }
}

/// Whether the index lists an entry other than a directory at `rel` under
/// `root`: a sorted build keeps only directories in its path map, and asks
/// this before it synthesises one (rare: archives list their directories).
fn is_listed_non_dir(index: &ArchiveIndex, root: &[u8], rel: &[u8]) -> bool {
    let name = if root.is_empty() {
        rel.to_vec()
    } else {
        [root, b"/", rel].concat()
    };
    index
        .entries
        .binary_search_by(|e| e.name.as_slice().cmp(&name))
        .is_ok_and(|i| index.entries[i].kind != EntryKind::Dir)
}

fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Entry;

    fn entry(name: &str, kind: EntryKind) -> Entry {
        Entry {
            uid: 1,
            gid: 2,
            mtime: Timestamp { secs: 5, nanos: 6 },
            size: 3,
            compressed_size: 3,
            ..Entry::new(kind, name)
        }
    }

    #[test]
    fn builds_subtree_with_implied_dirs_and_stable_inodes() {
        let index = ArchiveIndex {
            entries: vec![
                entry("_0/a", EntryKind::Dir),
                entry("_0/a/b/c.txt", EntryKind::File),
                entry("_0/a/d.txt", EntryKind::File),
                entry("_0/a/e", EntryKind::Dir),
                entry("_0/other", EntryKind::File),
            ],
            ..ArchiveIndex::default()
        };
        let t = Tree::build(&index, b"_0/a").unwrap();
        assert_eq!(t.len(), 5); // root, b (synth), c.txt, d.txt, e
        let b = t.lookup(ROOT_INO, b"b").unwrap();
        assert_eq!(t.get(b).unwrap().entry, None);
        let c = t.lookup(b, b"c.txt").unwrap();
        assert_eq!(t.get(c).unwrap().size, 3);
        assert!(t.lookup(ROOT_INO, b"other").is_none());
        assert_eq!(t.get(ROOT_INO).unwrap().nlink, 4);
        let names: Vec<&[u8]> = t
            .get(ROOT_INO)
            .unwrap()
            .children
            .iter()
            .map(|c| t.name(t.get(*c).unwrap()))
            .collect();
        assert_eq!(names, vec![&b"b"[..], b"d.txt", b"e"]);
        let again = Tree::build(&index, b"_0/a").unwrap();
        assert_eq!(
            again.lookup(ROOT_INO, b"d.txt"),
            t.lookup(ROOT_INO, b"d.txt")
        );
        assert!(matches!(
            Tree::build(&index, b"_0/other"),
            Err(TreeError::NotADirectory(_))
        ));
    }

    /// Every path of the tree with its kind, depth first in name order.
    fn listing(t: &Tree) -> Vec<(String, EntryKind)> {
        let mut out = Vec::new();
        let mut stack = vec![(ROOT_INO, String::new())];
        while let Some((ino, path)) = stack.pop() {
            for &c in t.get(ino).unwrap().children.iter().rev() {
                let n = t.get(c).unwrap();
                let p = format!("{path}/{}", String::from_utf8_lossy(t.name(n)));
                out.push((p.clone(), n.kind));
                if n.kind == EntryKind::Dir {
                    stack.push((c, p));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn duplicates_and_files_below_files_resolve_alike_in_name_order_and_any_order() {
        let sorted = vec![
            entry("_0/d", EntryKind::Dir),
            entry("_0/d", EntryKind::File),
            entry("_0/d/z", EntryKind::File),
            entry("_0/s/t", EntryKind::File),
            entry("_0/x", EntryKind::File),
            entry("_0/x-1", EntryKind::File),
            entry("_0/x/y", EntryKind::File),
        ];
        let expected = vec![
            ("/d".to_string(), EntryKind::Dir),
            ("/d/z".to_string(), EntryKind::File),
            ("/s".to_string(), EntryKind::Dir),
            ("/s/t".to_string(), EntryKind::File),
            ("/x".to_string(), EntryKind::File),
            ("/x-1".to_string(), EntryKind::File),
        ];
        let index = ArchiveIndex {
            entries: sorted.clone(),
            ..ArchiveIndex::default()
        };
        // The sorted build (directories only in its path map) gives what
        // hashing every path gives.
        for seen in [Seen::Sorted, Seen::Hashed] {
            let t = Tree::build_with(&index, b"_0", seen).unwrap().unwrap();
            assert_eq!(listing(&t), expected, "{seen:?}");
            assert_eq!(t.len(), expected.len() + 1);
        }
        // Out of order (a crafted index): the sorted build gives up, and the
        // hashed one builds it, the first of two paths winning (here the
        // file `d`, so `d/z` has no directory to go in).
        let mut shuffled = sorted;
        shuffled.swap(0, 3);
        let index = ArchiveIndex {
            entries: shuffled,
            ..ArchiveIndex::default()
        };
        assert!(Tree::build_with(&index, b"_0", Seen::Sorted)
            .unwrap()
            .is_none());
        let t = Tree::build(&index, b"_0").unwrap();
        let mut first_wins = expected;
        first_wins.splice(0..2, [("/d".to_string(), EntryKind::File)]);
        assert_eq!(listing(&t), first_wins);
    }

    /// A million entries, built and remapped onto themselves, given the
    /// entry for each (name, kind); returns the seconds each took.
    fn build_and_remap(names: impl Iterator<Item = (String, EntryKind)>) -> (f64, f64) {
        let mut entries: Vec<Entry> = names.map(|(n, k)| entry(&n, k)).collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let index = ArchiveIndex {
            entries,
            ..ArchiveIndex::default()
        };
        let started = std::time::Instant::now();
        let tree = Tree::build(&index, b"_0").unwrap();
        let built = started.elapsed().as_secs_f64();
        assert!(tree.len() > index.entries.len() - 10, "{}", tree.len());
        let started = std::time::Instant::now();
        let (again, report) = tree.remap(&index, b"_0", |_, _| true, |_, _| true).unwrap();
        let remapped = started.elapsed().as_secs_f64();
        assert_eq!(
            (again.len(), report.added, report.gone.len()),
            (tree.len(), 0, 0)
        );
        (built, remapped)
    }

    /// Building and remapping are linear in the entries (n log n with the
    /// per-directory sorts): a million entries, flat (one directory) and deep
    /// (20,000 chains 50 directories deep), take seconds. A quadratic step
    /// would take hours, and nextest kills the test after 300 s; the bound
    /// asserted here is generous for a debug build on a loaded machine.
    #[test]
    fn a_million_entries_build_and_remap_in_seconds() {
        const N: usize = 1_000_000;
        let flat = (0..N).map(|i| (format!("_0/d/f{i:07}"), EntryKind::File));
        let (flat_build, flat_remap) = build_and_remap(flat);
        let deep = (0..N).map(|i| {
            let mut name = format!("_0/c{:05}", i / 50);
            for _ in 0..i % 50 {
                name.push_str("/d");
            }
            (name, EntryKind::Dir)
        });
        let (deep_build, deep_remap) = build_and_remap(deep);
        eprintln!(
            "1M entries: flat build {flat_build:.2} s, remap {flat_remap:.2} s; \
             deep build {deep_build:.2} s, remap {deep_remap:.2} s"
        );
        for t in [flat_build, flat_remap, deep_build, deep_remap] {
            assert!(t < 60.0, "{t:.1} s for a million entries is not linear");
        }
    }
}
