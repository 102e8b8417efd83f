//! The mount's inode table: `Tree::build` over an index (decoded from bytes,
//! or a structured list of entries) for every path the archive holds (as
//! restore plans them), the whole archive and one more name; then the 412
//! path's remap onto an edited next version (and back), with the same
//! `unchanged_entries`/`same_attrs` the reopen uses, and onto an empty index
//! (the core's fallback, which must never fail).
//!
//! Checked on every tree: each node is reached once from the root, its parent
//! is the node listing it, children are sorted and unique and found by
//! `lookup`, names are plain components, a node's path is its entry's name,
//! nlink counts subdirectories. On a remap: the same paths as a fresh build,
//! inodes kept exactly for the paths kept with their kind, new inodes never
//! reuse old numbers, and the report lists exactly what changed and what is gone.
#![no_main]

#[path = "common.rs"]
mod common;
#[path = "gen.rs"]
mod gen;

use std::collections::{BTreeMap, HashSet};

use cachemount::archive::{ArchiveIndex, EntryKind};
use cachemount::archive::limits::IndexBound;
use cachemount::fs::reopen::{same_attrs, unchanged_entries};
use cachemount::fs::inodes::{Tree, TreeError, ROOT_INO};
use cachemount::paths::saved_roots;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// Path below the root → (inode, kind, entry index).
type Paths = BTreeMap<Vec<u8>, (u64, EntryKind, Option<u32>)>;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn run(u: &mut Unstructured) -> Result<()> {
    let old = if u.ratio(1, 4)? {
        let len = u.int_in_range(0..=u.len())?;
        match ArchiveIndex::decode(u.bytes(len)?, IndexBound::MAX) {
            Ok(index) => index,
            Err(_) => return Ok(()),
        }
    } else {
        gen::index(u)?
    };
    let new = gen::edited(&old, u)?;
    let mut roots = saved_roots(&old);
    roots.push(Vec::new());
    roots.push(gen::name(u)?);
    for root in &roots {
        let Some((tree, paths)) = built(&old, root) else {
            continue;
        };
        let empty = tree
            .remap(&ArchiveIndex::default(), b"", |_, _| false, |_, _| false)
            .expect("an empty index maps");
        assert_eq!(check(&empty.0, &ArchiveIndex::default(), b"").len(), 1);
        if let Some((t2, p2)) = remapped(&tree, &paths, &old, &new, root) {
            remapped(&t2, &p2, &new, &old, root);
        }
    }
    Ok(())
}

/// `Tree::build`, checked; None when the root is not a directory.
fn built(index: &ArchiveIndex, root: &[u8]) -> Option<(Tree, Paths)> {
    match Tree::build(index, root) {
        Ok(tree) => {
            let paths = check(&tree, index, root);
            Some((tree, paths))
        }
        Err(TreeError::NotADirectory(_)) => {
            assert!(
                index
                    .entries
                    .iter()
                    .any(|e| e.name == root && e.kind != EntryKind::Dir),
                "NotADirectory without a non-directory entry at the root"
            );
            None
        }
    }
}

/// `tree` (over `old`) remapped onto `new`, checked against a fresh build.
fn remapped(
    tree: &Tree,
    old_paths: &Paths,
    old: &ArchiveIndex,
    new: &ArchiveIndex,
    root: &[u8],
) -> Option<(Tree, Paths)> {
    let same = unchanged_entries(old, new);
    let unchanged = |a: u32, b: u32| same[a as usize] == Some(b);
    let attrs = |a: u32, b: u32| same_attrs(&old.entries[a as usize], &new.entries[b as usize]);
    let (t2, report, fresh_paths) =
        match (tree.remap(new, root, unchanged, attrs), built(new, root)) {
            (Err(_), None) => return None,
            (Ok((t2, report)), Some((_, fresh_paths))) => (t2, report, fresh_paths),
            (r, f) => panic!("remap ok: {}, fresh build ok: {}", r.is_ok(), f.is_some()),
        };
    let p2 = check(&t2, new, root);
    let shape = |p: &Paths| -> Vec<(Vec<u8>, EntryKind, Option<u32>)> {
        p.iter().map(|(k, v)| (k.clone(), v.1, v.2)).collect()
    };
    assert_eq!(
        shape(&p2),
        shape(&fresh_paths),
        "remap differs from a fresh build"
    );
    let old_max = old_paths.values().map(|v| v.0).max().unwrap_or(ROOT_INO);
    let old_inos: HashSet<u64> = old_paths.values().map(|v| v.0).collect();
    let mut added = 0;
    for (path, &(ino, kind, entry)) in &p2 {
        match old_paths.get(path) {
            Some(&(o, k, oe)) if k == kind => {
                assert_eq!(ino, o, "a kept path changed its inode");
                if let (Some(a), Some(b), false) = (oe, entry, kind == EntryKind::Dir) {
                    let changed = !unchanged(a, b);
                    assert_eq!(report.changed.contains(&ino), changed);
                    assert_eq!(
                        report.attrs_changed.contains(&ino),
                        !changed && !attrs(a, b)
                    );
                }
            }
            _ => {
                added += 1;
                assert!(
                    ino > old_max && !old_inos.contains(&ino),
                    "inode {ino} reused"
                );
            }
        }
    }
    assert_eq!(report.added, added);
    let mut gone: Vec<(u64, Box<[u8]>)> = old_paths
        .iter()
        .filter(|(p, v)| !p.is_empty() && p2.get(*p).is_none_or(|n| n.1 != v.1))
        .map(|(_, v)| {
            let n = tree.get(v.0).expect("a live old inode");
            (n.parent, n.name.clone())
        })
        .collect();
    gone.sort();
    assert_eq!(report.gone, gone);
    Some((t2, p2))
}

/// The tree's invariants; returns its paths.
fn check(tree: &Tree, index: &ArchiveIndex, root: &[u8]) -> Paths {
    let mut paths = Paths::new();
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![(ROOT_INO, Vec::new())];
    while let Some((ino, path)) = stack.pop() {
        assert!(seen.insert(ino), "inode {ino} reached twice");
        let n = tree.get(ino).expect("a listed inode is live");
        match n.entry {
            Some(i) => {
                let e = &index.entries[i as usize];
                assert_eq!(e.kind, n.kind);
                let mut name = root.to_vec();
                if !root.is_empty() && !path.is_empty() {
                    name.push(b'/');
                }
                name.extend_from_slice(&path);
                assert_eq!(e.name, name, "a node's path is not its entry's name");
                if n.kind != EntryKind::Dir {
                    assert_eq!(n.size, e.size);
                }
            }
            None => assert_eq!(n.kind, EntryKind::Dir, "only directories are synthesised"),
        }
        total += n.size;
        if n.kind == EntryKind::Dir {
            let dirs = n
                .children
                .iter()
                .filter(|c| tree.get(**c).is_some_and(|c| c.kind == EntryKind::Dir))
                .count();
            assert_eq!(n.nlink as usize, 2 + dirs);
        } else {
            assert!(
                n.children.is_empty(),
                "the {:?} {:?} (inode {ino}, entry {:?}) has children {:?}; index {:?}",
                n.kind,
                String::from_utf8_lossy(&path),
                n.entry,
                n.children,
                index
                    .entries
                    .iter()
                    .map(|e| (String::from_utf8_lossy(&e.name), e.kind))
                    .collect::<Vec<_>>()
            );
        }
        let mut prev: Option<&[u8]> = None;
        for &c in &n.children {
            let child = tree.get(c).expect("a child is live");
            let name = &child.name[..];
            assert_eq!(child.parent, ino);
            assert!(
                !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/'),
                "not a plain name: {name:?}"
            );
            assert!(
                prev.is_none_or(|p| p < name),
                "children unsorted or repeated"
            );
            prev = Some(name);
            assert_eq!(tree.lookup(ino, name), Some(c));
            let mut p = path.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(name);
            stack.push((c, p));
        }
        paths.insert(path, (ino, n.kind, n.entry));
    }
    assert_eq!(seen.len(), tree.len(), "nodes unreachable from the root");
    assert_eq!(tree.total_size(), total);
    paths
}
