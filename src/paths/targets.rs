//! Which local paths an archive's names go to (DESIGN §7: targets are
//! exactly what was saved): planning the targets of a restore or a mount
//! from the archive's names or the PATHs the user gave, checking them
//! together (never home or `/` itself, never one inside another), and
//! opening their parents without following a symlink below the trusted
//! directory.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::{names, Anchors, PathSpec};
use crate::archive::{ArchiveIndex, DataOffset, EntryKind, Manifest};
use crate::tree::beneath::{self, BeneathError};

/// One saved path to restore or mount: archive name → local path.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: Vec<u8>,
    pub local: PathBuf,
    /// The ancestor of `local` up to which symlinks are the user's own (a
    /// PATH the user gave, or the anchor: the working dir, home, `/`). Below
    /// it, the directories come from the archive's names, so no symlink there
    /// is followed (DESIGN §7).
    pub trusted: PathBuf,
}

impl Target {
    /// Opens the directory that holds `local` without following a symlink
    /// below [`Target::trusted`], making missing directories on the way.
    pub fn open_parent(&self) -> Result<OwnedFd, BeneathError> {
        let parent = self.local.parent().unwrap_or(Path::new("/"));
        let base = beneath::open_trusted_dir(&self.trusted)?;
        let below = parent.strip_prefix(&self.trusted).unwrap_or(Path::new(""));
        beneath::open_dir_beneath(base.as_fd(), below, true, &self.trusted)
    }

    /// For a mount: the parents exist and hold no symlink below
    /// [`Target::trusted`], and the target itself is not a symlink (a mount
    /// there would land wherever it points).
    pub fn check_mountable(&self) -> anyhow::Result<()> {
        let parent = self
            .open_parent()
            .with_context(|| format!("cannot mount at {}", self.local.display()))?;
        let st = rustix::fs::statat(
            &parent,
            self.file_name(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        );
        if st.is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK) {
            bail!(
                "cannot mount at {}: it is a symlink (cachemount never mounts through one); remove it",
                self.local.display()
            );
        }
        Ok(())
    }

    /// The target's own name in its parent directory.
    pub fn file_name(&self) -> &OsStr {
        self.local.file_name().unwrap_or(OsStr::new("root"))
    }
}

/// Why the paths a cache declares cannot be restored or mounted.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("refusing to restore into {0} itself: the cache holds the whole {1}, and restoring it would replace everything in it; name the PATHs inside it to restore instead (for example `cachemount restore … ~/.cache/pip`)")]
    WholeAnchor(PathBuf, &'static str),
    #[error("refusing this cache: its paths {0} and {1} overlap (a crafted archive, or two namespaces mapped to one place), so one would write into the other")]
    Overlap(PathBuf, PathBuf),
}

/// Which archive names go where. With `specs`, those paths; otherwise the
/// paths the archive holds at their anchors (see [`saved_roots`]). A zip
/// without a Buildkite manifest extracts whole into the one path given.
/// The targets are checked together: none is the home directory or `/`
/// itself, and none lies inside another.
pub fn plan_targets(
    index: &ArchiveIndex,
    specs: &[PathSpec],
    anchors: &Anchors,
) -> anyhow::Result<Vec<Target>> {
    let has = |name: &[u8]| index.entries.iter().any(|e| names::within(&e.name, name));
    let user_target = |name: Vec<u8>, spec: &PathSpec| {
        let local = spec.local_path(anchors);
        let trusted = local.parent().unwrap_or(Path::new("/")).to_path_buf();
        Target {
            name,
            local,
            trusted,
        }
    };
    let targets = if index.manifest.mappings.is_empty() {
        let [spec] = specs else {
            bail!("this zip has no Buildkite cache manifest, so it does not say where its files belong: give exactly one PATH to extract it into");
        };
        vec![user_target(Vec::new(), spec)]
    } else if !specs.is_empty() {
        specs
            .iter()
            .map(|spec| {
                let name = spec
                    .existing_archive_name(&index.manifest)
                    .filter(|n| has(n));
                let Some(name) = name else {
                    bail!(
                        "path {:?} is not in this cache (it holds: {})",
                        spec.given,
                        describe_roots(index, anchors)
                    );
                };
                Ok(user_target(name, spec))
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        saved_roots(index)
            .into_iter()
            .map(|name| target_of(&index.manifest, name, anchors))
            .collect::<anyhow::Result<_>>()?
    };
    check_targets(&targets, anchors)?;
    Ok(targets)
}

/// Refuses a set of targets that would replace home or `/` whole, or where
/// one target lies inside another (checked lexically here; symlinks below
/// the trusted dirs are refused when the parents are opened).
fn check_targets(targets: &[Target], anchors: &Anchors) -> Result<(), PlanError> {
    for t in targets {
        if t.local == Path::new("/") {
            return Err(PlanError::WholeAnchor(t.local.clone(), "root file system"));
        }
        if t.local == anchors.home {
            return Err(PlanError::WholeAnchor(t.local.clone(), "home directory"));
        }
    }
    let mut locals: Vec<&Path> = targets.iter().map(|t| t.local.as_path()).collect();
    locals.sort();
    for pair in locals.windows(2) {
        if pair[1].starts_with(pair[0]) {
            return Err(PlanError::Overlap(
                pair[0].to_path_buf(),
                pair[1].to_path_buf(),
            ));
        }
    }
    Ok(())
}

/// The paths an archive holds, as archive names. A cachemount archive has an
/// entry for every saved path, so those are its entries without an ancestor
/// entry. A foreign zip (Buildkite's among them) may have no directory
/// entries at all, so there a namespace's path is the deepest one that holds
/// all its entries — per first component, so that a namespace holding
/// `vendor/bundle/…` and `node_modules/…` never becomes the whole working
/// dir. (A directory entry for the namespace itself carries only the
/// anchor's metadata and names no path.)
pub fn saved_roots(index: &ArchiveIndex) -> Vec<Vec<u8>> {
    let foreign = index
        .entries
        .iter()
        .any(|e| matches!(e.offset, DataOffset::LocalHeader(_)));
    if foreign {
        deepest_common_roots(index)
    } else {
        top_level_entries(index)
    }
}

fn top_level_entries(index: &ArchiveIndex) -> Vec<Vec<u8>> {
    use std::collections::HashSet;
    let names: HashSet<&[u8]> = index.entries.iter().map(|e| e.name.as_slice()).collect();
    index
        .entries
        .iter()
        .filter(|e| !names::ancestors(&e.name).any(|a| names.contains(a)))
        .map(|e| e.name.clone())
        .collect()
}

fn deepest_common_roots(index: &ArchiveIndex) -> Vec<Vec<u8>> {
    use std::collections::BTreeMap;
    /// (namespace, first component) → the components all its entries share.
    type Groups<'a> = BTreeMap<(&'a [u8], &'a [u8]), Vec<&'a [u8]>>;
    let mut groups = Groups::new();
    for e in &index.entries {
        let (ns, rest) = names::split_namespace(&e.name);
        let Some(rest) = rest else {
            if e.kind != EntryKind::Dir {
                // The namespace is itself a file: its root is the namespace,
                // whatever other names (`_0//x`) share its empty component.
                groups.insert((ns, b""), Vec::new());
            }
            continue;
        };
        let parts: Vec<&[u8]> = rest.split(|b| *b == b'/').collect();
        match groups.entry((ns, parts[0])) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(parts);
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                let common = o.get_mut();
                let shared = common
                    .iter()
                    .zip(&parts)
                    .take_while(|(a, b)| a == b)
                    .count();
                common.truncate(shared);
            }
        }
    }
    groups
        .into_iter()
        .map(|((ns, _), common)| {
            let mut name = ns.to_vec();
            for part in common.iter().filter(|p| !p.is_empty()) {
                name.push(b'/');
                name.extend_from_slice(part);
            }
            name
        })
        .collect()
}

fn describe_roots(index: &ArchiveIndex, anchors: &Anchors) -> String {
    saved_roots(index)
        .into_iter()
        .map(|r| {
            let shown = String::from_utf8_lossy(&r).into_owned();
            target_of(&index.manifest, r, anchors).map_or(shown, |t| t.local.display().to_string())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where archive name `_i/rel` belongs on this machine.
pub fn local_path_of(
    manifest: &Manifest,
    name: &[u8],
    anchors: &Anchors,
) -> anyhow::Result<PathBuf> {
    Ok(target_of(manifest, name.to_vec(), anchors)?.local)
}

fn target_of(manifest: &Manifest, name: Vec<u8>, anchors: &Anchors) -> anyhow::Result<Target> {
    let (ns, rel) = names::split_namespace(&name);
    let ns = std::str::from_utf8(ns).unwrap_or_default();
    let Some(anchor) = manifest.anchor_of(ns) else {
        bail!(
            "refusing archive entry {:?}: it is in no namespace of the cache manifest, so it has no place to go",
            String::from_utf8_lossy(&name)
        );
    };
    let rel = Path::new(OsStr::from_bytes(rel.unwrap_or_default()));
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        bail!(
            "refusing archive entry {:?}: it would land outside its base",
            String::from_utf8_lossy(&name)
        );
    }
    let base = anchors.resolve(anchor);
    let local = base.join(rel);
    // The anchor itself (a saved `.`) is held by its parent, which is the user's.
    let trusted = if rel.as_os_str().is_empty() {
        base.parent().unwrap_or(Path::new("/")).to_path_buf()
    } else {
        base
    };
    Ok(Target {
        name,
        local,
        trusted,
    })
}
