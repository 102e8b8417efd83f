//! Saving writable mounts incrementally (DESIGN §2: an archive composed from
//! an old one's bytes). The files a build did not touch are still the base
//! archive's entries: a zip entry is position independent, so the new
//! archive is the base's bytes up to its index, copied inside the store,
//! followed by the changed and new files, a new index and a new central
//! directory. Entries the new archive does not list (deleted, changed, or
//! rewritten directories) stay behind as unreferenced bytes.
//!
//! The saved tree is not walked through the mount: it is the base's index
//! with the overlay's upper dir applied (what overlayfs itself shows), so
//! only what the build changed is read. A path in the upper dir is a changed
//! file or directory, a whiteout a deletion, an opaque directory one whose
//! old content is gone; everything else is the lower layer's, which is the
//! base archive's. Directories and symlinks whose metadata is unchanged are
//! reused too.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::archive::{ArchiveIndex, DataOffset, Entry, EntryKind, Manifest};
use crate::cache::version::{open_version, Refresh};
use crate::mount::overlay::{Overlays, WritableMount};
use crate::paths::names;
use crate::paths::{Anchors, PathSpec};
use crate::store::{ObjectStore, ObjectVersion};
use crate::tree::walk::{entry_of, SourceEntry, SourceKind, WalkError};

use super::Reuse;

/// The archive under a save's writable mounts, opened.
pub struct Base {
    /// Its key in the store and its name (a content-addressed blob).
    pub key: String,
    pub digest: String,
    /// The version read: the copied bytes must come from it.
    pub version: ObjectVersion,
    pub size: u64,
    pub index: ArchiveIndex,
    /// The key the mounts found it under (its access profile is the
    /// fallback of the saved key's).
    pub mounted_key: Option<String>,
    /// The saved paths that are writable mounts of this archive.
    layers: Vec<Layer>,
}

/// A saved path mounted writable over the base.
pub struct Layer {
    /// Its archive name (`_0/node_modules`).
    name: Vec<u8>,
    /// Where it is mounted (the merged view the walk read).
    root: PathBuf,
    /// The overlay's upper dir: everything changed at `root`.
    upper: PathBuf,
}

/// How an incremental save writes its archive.
pub struct Plan<'a> {
    pub reuse: Reuse<'a>,
    /// Files reused, and their compressed bytes.
    pub reused_files: usize,
    pub reused_bytes: u64,
    /// The saved tree is exactly the base's: only the key pointer is written.
    pub unchanged: bool,
}

/// The archive that the writable mounts among `specs` show, if they show
/// one this save can build on: a cachemount blob in this same store, mounted
/// under the archive name the save gives the path. Anything else is saved
/// whole, which is always correct, only slower (the reason is logged).
pub async fn find_base<S: ObjectStore>(
    store: &S,
    overlays: &Overlays,
    specs: &[PathSpec],
    anchors: &Anchors,
    manifest: &Manifest,
) -> Option<Base> {
    let mut base: Option<WritableMount> = None;
    let mut layers = Vec::new();
    for spec in specs {
        let root = spec.local_path(anchors);
        let Some(mount) = overlays.find(&root).filter(|m| m.is_mounted()) else {
            continue;
        };
        let name = spec.existing_archive_name(manifest)?;
        let why_not = if mount.name != name {
            Some("it is mounted as another path of its cache")
        } else if mount.digest.is_none() {
            Some("it was mounted from a URL, not a key")
        } else if mount.store != store.describe() {
            Some("it was mounted from another store")
        } else if base.as_ref().is_some_and(|b| b.digest != mount.digest) {
            Some("another saved path is mounted from another cache")
        } else {
            None
        };
        if let Some(why) = why_not {
            tracing::info!("saving {} whole: {why}", root.display());
            continue;
        }
        layers.push(Layer {
            name,
            root,
            upper: mount.upper.clone(),
        });
        base.get_or_insert(mount);
    }
    let mount = base?;
    let digest = mount.digest.clone()?;
    let version = match open_version(
        store,
        &mount.object,
        Some(&digest),
        None,
        Refresh::Never,
        None,
    )
    .await
    {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("cannot reuse the mounted cache, saving everything: {e:#}");
            return None;
        }
    };
    let crate::cache::Version {
        pin, size, index, ..
    } = version;
    if index
        .entries
        .iter()
        .any(|e| !matches!(e.offset, DataOffset::Data(_)))
    {
        tracing::info!("the mounted cache is not a cachemount archive: saving everything");
        return None;
    }
    Some(Base {
        mounted_key: mount.key,
        key: mount.object,
        digest,
        version: pin,
        size,
        index,
        layers,
    })
}

impl Base {
    /// Where the base's entries end: its index entry follows them, so this
    /// is how many of its bytes the new archive starts with.
    pub fn reusable_len(&self) -> u64 {
        self.index
            .entries
            .iter()
            .map(|e| match e.offset {
                DataOffset::Data(d) => d + e.compressed_size,
                DataOffset::LocalHeader(_) => 0,
            })
            .max()
            .unwrap_or(0)
    }

    /// The writable mount saved as `name` from `root`, if it is one of this base's.
    pub fn layer(&self, root: &Path, name: &[u8]) -> Option<&Layer> {
        self.layers
            .iter()
            .find(|l| l.root == root && l.name == name)
    }

    /// The saved tree of `layer` as the merged view shows it, in name order:
    /// each entry with the base's entry it is, or `None` when it must be read
    /// (from the upper dir). Special files found are added to `special`.
    pub fn merged(
        &self,
        layer: &Layer,
        special: &mut Vec<PathBuf>,
    ) -> Result<Vec<(SourceEntry, Option<&Entry>)>, WalkError> {
        let mut tree: BTreeMap<Vec<u8>, Slot<'_>> = self
            .index
            .entries
            .iter()
            .filter(|e| names::within(&e.name, &layer.name))
            .map(|e| (e.name.clone(), Slot::Old(e)))
            .collect();
        apply_upper(&layer.upper, layer.name.clone(), true, &mut tree, special)?;
        Ok(tree
            .into_values()
            .map(|slot| match slot {
                Slot::Old(e) => (source_of(e, layer), Some(e)),
                Slot::New(s) => (s, None),
            })
            .collect())
    }

    /// What an incremental save of `reuse` (the base's entry of each entry
    /// of the saved tree, if any) writes. `None` when reusing would leave
    /// more than half of the new archive unreferenced: saving everything
    /// compacts it.
    pub fn plan<'a>(&self, reuse: Vec<Option<&'a Entry>>, manifest: &Manifest) -> Option<Plan<'a>> {
        let unchanged = reuse.len() == self.index.entries.len()
            && *manifest == self.index.manifest
            && reuse.iter().all(Option::is_some);
        let files = reuse.iter().flatten().filter(|e| e.kind == EntryKind::File);
        let reused_files = files.clone().count();
        let reused_bytes: u64 = files.map(|e| e.compressed_size).sum();
        let len = self.reusable_len();
        if !unchanged && reused_bytes < len / 2 {
            tracing::info!(
                "{reused_bytes} of the {len} bytes of the mounted cache are still used: saving everything, which compacts the archive"
            );
            return None;
        }
        Some(Plan {
            reuse: Reuse {
                len,
                entries: reuse,
            },
            reused_files,
            reused_bytes,
            unchanged,
        })
    }
}

/// One path of a merged tree: the base's entry, or one found in the upper dir.
enum Slot<'a> {
    Old(&'a Entry),
    New(SourceEntry),
}

/// Removes `name` and everything below it.
fn remove_subtree(tree: &mut BTreeMap<Vec<u8>, Slot<'_>>, name: &[u8]) {
    tree.remove(name);
    let mut below = name.to_vec();
    below.push(b'/');
    let mut end = name.to_vec();
    end.push(b'0'); // sorts right after '/'
    let doomed: Vec<Vec<u8>> = tree
        .range::<[u8], _>((Bound::Included(&below[..]), Bound::Excluded(&end[..])))
        .map(|(k, _)| k.clone())
        .collect();
    for k in doomed {
        tree.remove(&k);
    }
}

fn child_name(parent: &[u8], child: &OsStr) -> Vec<u8> {
    let mut name = parent.to_vec();
    name.push(b'/');
    name.extend_from_slice(child.as_bytes());
    name
}

/// Applies the upper dir `dir` (named `name` in the archive) to `tree` the
/// way overlayfs merges it over the lower layer.
fn apply_upper(
    dir: &Path,
    name: Vec<u8>,
    is_root: bool,
    tree: &mut BTreeMap<Vec<u8>, Slot<'_>>,
    special: &mut Vec<PathBuf>,
) -> Result<(), WalkError> {
    let unreadable = |source| WalkError::Unreadable {
        path: dir.to_path_buf(),
        source,
    };
    if !is_root && is_opaque(dir) {
        remove_subtree(tree, &name);
    }
    let mut children = std::fs::read_dir(dir)
        .map_err(unreadable)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    children.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for child in children {
        let path = dir.join(&child);
        let md = std::fs::symlink_metadata(&path).map_err(|source| WalkError::Unreadable {
            path: path.clone(),
            source,
        })?;
        let bytes = child.as_bytes();
        // fuse-overlayfs marks deletions with `.wh.NAME` files where it cannot make devices.
        if bytes == b".wh..wh..opq" {
            continue;
        }
        if let Some(deleted) = bytes.strip_prefix(b".wh.") {
            remove_subtree(tree, &child_name(&name, OsStr::from_bytes(deleted)));
            continue;
        }
        let cname = child_name(&name, &child);
        if md.file_type().is_char_device() && md.rdev() == 0 {
            remove_subtree(tree, &cname); // a whiteout
            continue;
        }
        if md.is_dir() {
            if !matches!(tree.get(&cname), Some(Slot::Old(e)) if e.kind == EntryKind::Dir)
                && !matches!(tree.get(&cname), Some(Slot::New(_)))
            {
                remove_subtree(tree, &cname);
            }
            apply_upper(&path, cname, false, tree, special)?;
        } else {
            let old = match tree.get(&cname) {
                Some(Slot::Old(e)) => Some(*e),
                _ => None,
            };
            remove_subtree(tree, &cname);
            match upper_entry(&path, cname.clone())? {
                None => special.push(path),
                Some(e) => {
                    let slot = match old {
                        Some(old)
                            if !matches!(e.kind, SourceKind::File { .. })
                                && same_metadata(&e, old) =>
                        {
                            Slot::Old(old)
                        }
                        _ => Slot::New(e),
                    };
                    tree.insert(cname, slot);
                }
            }
        }
    }
    // The directory itself, with the upper dir's metadata (which overlayfs shows).
    if let Some(e) = upper_entry(dir, name.clone())? {
        let slot = match tree.get(&name) {
            Some(Slot::Old(old)) if same_metadata(&e, old) => Slot::Old(old),
            _ => Slot::New(e),
        };
        tree.insert(name, slot);
    }
    Ok(())
}

/// The entry for a path of the upper dir, without the xattrs the overlay
/// keeps there for itself (fuse-overlayfs's `user.fuseoverlayfs.*`, kernel
/// overlayfs's `user.overlay.*` when mounted with `userxattr`).
fn upper_entry(path: &Path, name: Vec<u8>) -> Result<Option<SourceEntry>, WalkError> {
    let mut entry = entry_of(path, name)?;
    if let Some(e) = &mut entry {
        e.meta.xattrs.retain(|(k, _)| {
            !k.starts_with(b"user.fuseoverlayfs.") && !k.starts_with(b"user.overlay.")
        });
    }
    Ok(entry)
}

/// An upper directory that hides the lower one's content (it replaced a
/// deleted directory of the same name).
fn is_opaque(dir: &Path) -> bool {
    let marked = |attr: &str| matches!(xattr::get(dir, attr), Ok(Some(v)) if v == b"y");
    marked("trusted.overlay.opaque")
        || marked("user.fuseoverlayfs.opaque")
        || dir.join(".wh..wh..opq").exists()
}

/// The walk's view of a base entry: where it is in the merged view.
fn source_of(e: &Entry, layer: &Layer) -> SourceEntry {
    let rel = e.name[layer.name.len()..].strip_prefix(b"/").unwrap_or(&[]);
    SourceEntry {
        path: layer.root.join(OsStr::from_bytes(rel)),
        kind: match e.kind {
            EntryKind::Dir => SourceKind::Dir,
            EntryKind::File => SourceKind::File {
                size: e.size,
                id: None,
            },
            EntryKind::Symlink => SourceKind::Symlink {
                target: e.link_target.clone().unwrap_or_default(),
            },
        },
        meta: crate::archive::writer::EntryMeta {
            name: e.name.clone(),
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            xattrs: e.xattrs.clone(),
        },
    }
}

/// Whether the walk found `e` as the base archive has `old`: same kind,
/// size, symlink target and metadata.
fn same_metadata(e: &SourceEntry, old: &Entry) -> bool {
    let kind_matches = match (&e.kind, old.kind) {
        (SourceKind::Dir, EntryKind::Dir) => true,
        (SourceKind::File { size, .. }, EntryKind::File) => *size == old.size,
        (SourceKind::Symlink { target }, EntryKind::Symlink) => {
            old.link_target.as_deref() == Some(target.as_slice())
        }
        _ => false,
    };
    // Both lists are sorted: the walk sorts them, and the index keeps the walk's.
    kind_matches
        && e.meta.mode & 0o7777 == old.mode
        && e.meta.uid == old.uid
        && e.meta.gid == old.gid
        && e.meta.mtime == old.mtime
        && e.meta.xattrs == old.xattrs
}
