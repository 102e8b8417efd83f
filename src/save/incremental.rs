//! Saving writable mounts incrementally (DESIGN §2: an archive composed from
//! an old one's bytes). The files a build did not touch are still the base
//! archive's entries: a zip entry is position independent, so the new
//! archive is the base's bytes up to its index, copied inside the store,
//! followed by the changed and new files, a new index and a new central
//! directory. Entries the new archive does not list (deleted, changed, or
//! rewritten directories) stay behind as unreferenced bytes.
//!
//! Which files are untouched is told by the overlay, not by reading them: a
//! file whose path is not in the upper dir is the lower layer's, which is the
//! base archive's entry (the walk's metadata is checked against it too).

use std::path::PathBuf;

use crate::archive::{ArchiveIndex, DataOffset, Entry, EntryKind, Manifest};
use crate::cache::Stats;
use crate::mount::daemon::open_version_pinned;
use crate::mount::overlay;
use crate::paths::{Anchors, PathSpec};
use crate::store::{ObjectStore, ObjectVersion};
use crate::tree::walk::{SourceEntry, SourceKind};

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
    /// The saved paths that are writable mounts of this archive.
    layers: Vec<Layer>,
}

/// A saved path mounted writable over the base.
struct Layer {
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
    specs: &[PathSpec],
    anchors: &Anchors,
    manifest: &Manifest,
) -> Option<Base> {
    let mut base: Option<overlay::WritableMount> = None;
    let mut layers = Vec::new();
    for spec in specs {
        let root = spec.local_path(anchors);
        let Some(mount) = overlay::find(&root).filter(|m| m.is_mounted()) else {
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
    let version =
        match open_version_pinned(store, &mount.object, Some(&digest), &Stats::default()).await {
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

    fn entry(&self, name: &[u8]) -> Option<&Entry> {
        let i = self
            .index
            .entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()?;
        Some(&self.index.entries[i])
    }

    /// Decides, for each entry of the walk, whether it is a base file to
    /// reuse. `None` when reusing would leave more than half of the new
    /// archive unreferenced: saving everything compacts it.
    pub fn plan(&self, entries: &[SourceEntry], manifest: &Manifest) -> Option<Plan<'_>> {
        let mut reuse = Vec::with_capacity(entries.len());
        let mut unchanged =
            entries.len() == self.index.entries.len() && *manifest == self.index.manifest;
        let (mut reused_files, mut reused_bytes) = (0, 0);
        for e in entries {
            let old = self.entry(&e.meta.name);
            let same = old.is_some_and(|old| same_metadata(e, old));
            let reused = match (old, &e.kind) {
                (Some(old), SourceKind::File { .. }) if same && !self.changed(e) => Some(old),
                _ => None,
            };
            if let Some(old) = reused {
                reused_files += 1;
                reused_bytes += old.compressed_size;
            }
            unchanged &= same && (reused.is_some() || !matches!(e.kind, SourceKind::File { .. }));
            reuse.push(reused);
        }
        let len = self.reusable_len();
        if !unchanged && reused_bytes < len / 2 {
            tracing::info!(
                "{} of the {} bytes of the mounted cache are still used: saving everything, which compacts the archive",
                reused_bytes,
                len
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

    /// Whether the overlay's upper dir has anything at `e`'s path (a file
    /// written, replaced or with changed metadata is there whole).
    fn changed(&self, e: &SourceEntry) -> bool {
        let layer = self.layers.iter().find(|l| {
            e.meta.name.starts_with(&l.name)
                && matches!(e.meta.name.get(l.name.len()), None | Some(b'/'))
        });
        let Some(layer) = layer else {
            return true;
        };
        let Ok(rel) = e.path.strip_prefix(&layer.root) else {
            return true;
        };
        // Not found in the upper dir: the lower layer's file, untouched.
        !matches!(
            std::fs::symlink_metadata(layer.upper.join(rel)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound
        )
    }
}

/// Whether the walk found `e` as the base archive has `old`: same kind,
/// size, symlink target and metadata.
fn same_metadata(e: &SourceEntry, old: &Entry) -> bool {
    let kind_matches = match (&e.kind, old.kind) {
        (SourceKind::Dir, EntryKind::Dir) => true,
        (SourceKind::File { size }, EntryKind::File) => *size == old.size,
        (SourceKind::Symlink { target }, EntryKind::Symlink) => {
            old.link_target.as_deref() == Some(target.as_slice())
        }
        _ => false,
    };
    let mut xattrs = e.meta.xattrs.clone();
    let mut old_xattrs = old.xattrs.clone();
    xattrs.sort();
    old_xattrs.sort();
    kind_matches
        && e.meta.mode & 0o7777 == old.mode
        && e.meta.uid == old.uid
        && e.meta.gid == old.gid
        && e.meta.mtime == old.mtime
        && xattrs == old_xattrs
}
