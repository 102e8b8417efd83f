//! Structured inputs for the targets that need more than a byte string
//! (included with `#[path]` like common.rs): archive indexes, Buildkite
//! manifests, the machine's anchors and user-typed paths, read from the fuzz
//! input with `arbitrary`'s `Unstructured`. Names are built mostly from a few
//! components that collide often (`_0`, `a`, `.`, `..`, the empty one), so
//! nesting, duplicates, implied directories, namespace roots and names that
//! climb all occur within a few bytes of input.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use cachemount::archive::{
    ArchiveIndex, Compression, DataOffset, Entry, EntryKind, Manifest, Timestamp,
};
use cachemount::paths::Anchors;
use libfuzzer_sys::arbitrary::{Result, Unstructured};

const NAMESPACES: &[&str] = &["_0", "_1", "_2"];
const COMPONENTS: &[&[u8]] = &[
    b"a",
    b"b",
    b"node_modules",
    b".npm",
    b"",
    b".",
    b"..",
    b"a b",
    b"\xff",
];
const DIRS: &[&str] = &["home", "ci", "work", "repo", "a", "x y"];
const PATH_PARTS: &[&str] = &["~", ".", "..", "", "a", "b", "home", "ci", "work", "repo"];

/// An archive name: a namespace (usually) and up to five more components.
pub fn name(u: &mut Unstructured) -> Result<Vec<u8>> {
    let mut out = if u.ratio(7, 8)? {
        u.choose(NAMESPACES)?.as_bytes().to_vec()
    } else {
        component(u)?
    };
    for _ in 0..u.int_in_range(0..=5)? {
        out.push(b'/');
        out.extend(component(u)?);
    }
    Ok(out)
}

fn component(u: &mut Unstructured) -> Result<Vec<u8>> {
    if u.ratio(1, 8)? {
        let len = u.int_in_range(0..=8)?;
        Ok(u.bytes(len)?.to_vec())
    } else {
        Ok(u.choose(COMPONENTS)?.to_vec())
    }
}

/// One entry; values come from small ranges so that two entries often hold
/// the same content or attributes. `foreign`: as read from a central
/// directory (local header offsets, no content hash).
pub fn entry(u: &mut Unstructured, foreign: bool) -> Result<Entry> {
    let name = name(u)?;
    let kind = *u.choose(&[EntryKind::File, EntryKind::Dir, EntryKind::Symlink])?;
    let size = if kind == EntryKind::Dir {
        0
    } else {
        u.int_in_range(0..=3)?
    };
    Ok(Entry {
        name,
        kind,
        mode: u.int_in_range(0..=0o7777)?,
        uid: u.int_in_range(0..=2)?,
        gid: u.int_in_range(0..=2)?,
        mtime: Timestamp {
            secs: u.int_in_range(0..=2)?,
            nanos: 0,
        },
        size,
        link_target: (kind == EntryKind::Symlink).then(|| b"target".to_vec()),
        xattrs: Vec::new(),
        offset: if foreign {
            DataOffset::LocalHeader(0)
        } else {
            DataOffset::Data(0)
        },
        compressed_size: size,
        compression: Compression::Stored,
        crc32: u.int_in_range(0..=2)?,
        frame_size: 0,
        frames: Vec::new(),
        content_hash: (!foreign)
            .then(|| u.int_in_range(0..=2).map(|h| [h; 32]))
            .transpose()?,
    })
}

/// A manifest mapping some of the namespaces (sometimes an odd one) to anchors.
pub fn manifest(u: &mut Unstructured) -> Result<Manifest> {
    let mut mappings = BTreeMap::new();
    for ns in NAMESPACES {
        if u.ratio(2, 3)? {
            mappings.insert(ns.to_string(), anchor_symbol(u)?);
        }
    }
    if u.ratio(1, 8)? {
        let len = u.int_in_range(0..=4)?;
        let ns = String::from_utf8_lossy(u.bytes(len)?).into_owned();
        mappings.insert(ns, anchor_symbol(u)?);
    }
    Ok(Manifest {
        mappings,
        ..Manifest::default()
    })
}

fn anchor_symbol(u: &mut Unstructured) -> Result<String> {
    Ok(u.choose(&[".", "~", "/"])?.to_string())
}

/// An index of up to 48 entries, sorted by name as the index promises
/// (except sometimes: a decoded index is not checked for order).
pub fn index(u: &mut Unstructured) -> Result<ArchiveIndex> {
    let foreign = u.arbitrary::<bool>()?;
    let manifest = manifest(u)?;
    let mut entries = Vec::new();
    for _ in 0..u.int_in_range(0..=48)? {
        entries.push(entry(u, foreign)?);
    }
    if u.ratio(7, 8)? {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Ok(ArchiveIndex { manifest, entries })
}

/// `old` as the next version of its object could hold it: entries dropped,
/// changed in content, attributes or kind, and new ones added.
pub fn edited(old: &ArchiveIndex, u: &mut Unstructured) -> Result<ArchiveIndex> {
    let foreign = old
        .entries
        .iter()
        .any(|e| matches!(e.offset, DataOffset::LocalHeader(_)));
    let mut entries = Vec::new();
    for e in &old.entries {
        let mut e = e.clone();
        match u.int_in_range(0..=5)? {
            1 => continue,
            2 => {
                e.crc32 ^= 1;
                e.content_hash = e.content_hash.map(|h| [h[0] ^ 1; 32]);
            }
            3 => e.mode ^= 0o100,
            4 => {
                e.kind = *u.choose(&[EntryKind::File, EntryKind::Dir, EntryKind::Symlink])?;
                if e.kind == EntryKind::Dir {
                    e.size = 0;
                }
            }
            _ => {}
        }
        entries.push(e);
    }
    for _ in 0..u.int_in_range(0..=4)? {
        entries.push(entry(u, foreign)?);
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(ArchiveIndex {
        manifest: old.manifest.clone(),
        entries,
    })
}

/// The working and home directories: absolute and clean (as the process's
/// cwd and a sane `$HOME` are), with home sometimes `/`, the working dir
/// itself, or one of its ancestors.
pub fn anchors(u: &mut Unstructured) -> Result<Anchors> {
    let cwd = dir(u)?;
    let home = match u.int_in_range(0..=4)? {
        0 => PathBuf::from("/"),
        1 => cwd.clone(),
        2 => cwd.parent().unwrap_or(&cwd).to_path_buf(),
        _ => dir(u)?,
    };
    Ok(Anchors { cwd, home })
}

fn dir(u: &mut Unstructured) -> Result<PathBuf> {
    let mut p = PathBuf::from("/");
    for _ in 0..u.int_in_range(0..=3)? {
        p.push(u.choose(DIRS)?);
    }
    Ok(p)
}

/// A path as a user might type it: `~`, `.`, `..`, empty components and
/// plain names joined by `/`, sometimes absolute, sometimes raw text.
pub fn path_string(u: &mut Unstructured) -> Result<String> {
    if u.ratio(1, 8)? {
        let len = u.int_in_range(0..=16)?;
        return Ok(String::from_utf8_lossy(u.bytes(len)?).into_owned());
    }
    let mut s = String::new();
    if u.ratio(1, 3)? {
        s.push('/');
    }
    for i in 0..u.int_in_range(1..=5)? {
        if i > 0 {
            s.push('/');
        }
        s.push_str(u.choose(PATH_PARTS)?);
    }
    Ok(s)
}
