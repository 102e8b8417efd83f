//! Mapping the paths a user names (`node_modules`, `~/.npm`, `/opt/tool`) to
//! archive names under Buildkite's namespaces and back, and planning where
//! an archive's names go ([`targets`]).
//!
//! A path under the home directory is stored relative to `~`, any other
//! absolute path relative to `/`, and a relative path relative to `.` (the
//! working directory), so a cache restores into another checkout or home.

use std::path::{Component, Path, PathBuf};

use crate::archive::{Anchor, Manifest};

pub mod targets;

pub use targets::{local_path_of, plan_targets, saved_roots, PlanError, Target};

/// A path as the user gave it, resolved to an anchor and a relative path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathSpec {
    /// What the user typed, for messages and the key pointer.
    pub given: String,
    pub anchor: Anchor,
    /// Relative to the anchor, normalised, no `..`; empty for the anchor itself.
    pub relative: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} is empty")]
    Empty(String),
    #[error("path {0:?} is not valid: {1}")]
    Invalid(String, &'static str),
}

/// The machine-specific directories anchors resolve to.
#[derive(Debug, Clone)]
pub struct Anchors {
    pub cwd: PathBuf,
    pub home: PathBuf,
}

impl Anchors {
    pub fn from_env() -> std::io::Result<Self> {
        let cwd = std::env::current_dir()?;
        let home = dirs::home_dir().unwrap_or_else(|| PathBuf::from("/"));
        Ok(Anchors { cwd, home })
    }

    pub fn resolve(&self, anchor: Anchor) -> PathBuf {
        anchor.resolve(&self.cwd, &self.home)
    }
}

impl PathSpec {
    pub fn parse(given: &str, anchors: &Anchors) -> Result<Self, PathError> {
        if given.is_empty() {
            return Err(PathError::Empty(given.to_string()));
        }
        let (anchor, rest) = if given == "~" {
            (Anchor::Home, PathBuf::new())
        } else if let Some(rest) = given.strip_prefix("~/") {
            (Anchor::Home, PathBuf::from(rest))
        } else if given.starts_with('/') {
            (Anchor::Root, PathBuf::from(given))
        } else {
            (Anchor::Cwd, PathBuf::from(given))
        };
        let relative = normalise(&rest).ok_or(PathError::Invalid(
            given.to_string(),
            "it leads above its base",
        ));
        // A relative path that climbs out of the working dir (`../x`) is taken as absolute.
        let (anchor, relative) = match (anchor, relative) {
            (_, Ok(rel)) if anchor == Anchor::Root => (Anchor::Root, rel),
            (_, Ok(rel)) => (anchor, rel),
            (_, Err(e)) => {
                let base = anchors.resolve(anchor).join(&rest);
                let abs = normalise(&base).ok_or(e)?;
                (Anchor::Root, abs)
            }
        };
        // An absolute path under home is stored relative to `~`, as Buildkite does.
        let (anchor, relative) = match anchor {
            Anchor::Root => {
                let abs = Path::new("/").join(&relative);
                match abs.strip_prefix(&anchors.home) {
                    Ok(rel) if anchors.home != Path::new("/") => (Anchor::Home, rel.to_path_buf()),
                    _ => (Anchor::Root, relative),
                }
            }
            other => (other, relative),
        };
        Ok(PathSpec {
            given: given.to_string(),
            anchor,
            relative,
        })
    }

    /// Where this path is on this machine.
    pub fn local_path(&self, anchors: &Anchors) -> PathBuf {
        anchors.resolve(self.anchor).join(&self.relative)
    }

    /// The archive name of this path (`_0/node_modules`), adding the namespace
    /// to `manifest` when needed.
    pub fn archive_name(&self, manifest: &mut Manifest) -> Vec<u8> {
        let ns = manifest.namespace_for(self.anchor);
        join_name(ns.as_bytes(), &self.relative)
    }

    /// The archive name if `manifest` already has this path's namespace.
    pub fn existing_archive_name(&self, manifest: &Manifest) -> Option<Vec<u8>> {
        let (ns, _) = manifest
            .mappings
            .iter()
            .find(|(_, a)| Anchor::from_symbol(a) == Some(self.anchor))?;
        Some(join_name(ns.as_bytes(), &self.relative))
    }
}

/// Archive names (`_0/node_modules/a.js`): byte strings of `/`-separated
/// components, the first being the namespace.
pub mod names {
    /// Whether `name` is `dir` or lies below it (every name is within `""`).
    pub fn within(name: &[u8], dir: &[u8]) -> bool {
        strip_within(name, dir).is_some()
    }

    /// `name` relative to `dir` (empty for `dir` itself), or None when it is
    /// not within it.
    pub fn strip_within<'a>(name: &'a [u8], dir: &[u8]) -> Option<&'a [u8]> {
        if dir.is_empty() {
            return Some(name);
        }
        match name.strip_prefix(dir)? {
            [] => Some(&[]),
            [b'/', rest @ ..] => Some(rest),
            _ => None,
        }
    }

    /// The names of `name`'s ancestors, shortest first (`_0`, `_0/a` for `_0/a/b`).
    pub fn ancestors(name: &[u8]) -> impl Iterator<Item = &[u8]> {
        name.iter()
            .enumerate()
            .filter(|(_, b)| **b == b'/')
            .map(move |(i, _)| &name[..i])
    }

    /// The namespace (`_0`) and the rest (`a/b`), None for the namespace itself.
    pub fn split_namespace(name: &[u8]) -> (&[u8], Option<&[u8]>) {
        match name.iter().position(|b| *b == b'/') {
            Some(i) => (&name[..i], Some(&name[i + 1..])),
            None => (name, None),
        }
    }
}

fn join_name(ns: &[u8], relative: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut name = ns.to_vec();
    if !relative.as_os_str().is_empty() {
        name.push(b'/');
        name.extend_from_slice(relative.as_os_str().as_bytes());
    }
    name
}

/// Lexically normalises a path to relative components; None if `..` climbs
/// above the start.
fn normalise(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anchors() -> Anchors {
        Anchors {
            cwd: "/work/repo".into(),
            home: "/home/ci".into(),
        }
    }

    #[test]
    fn anchors_are_chosen_like_buildkite() {
        let a = anchors();
        let p = PathSpec::parse("node_modules", &a).unwrap();
        assert_eq!(
            (p.anchor, p.relative.to_str().unwrap()),
            (Anchor::Cwd, "node_modules")
        );
        let p = PathSpec::parse("~/.npm", &a).unwrap();
        assert_eq!(
            (p.anchor, p.relative.to_str().unwrap()),
            (Anchor::Home, ".npm")
        );
        let p = PathSpec::parse("/home/ci/.cargo/registry", &a).unwrap();
        assert_eq!(
            (p.anchor, p.relative.to_str().unwrap()),
            (Anchor::Home, ".cargo/registry")
        );
        let p = PathSpec::parse("/opt/tool/", &a).unwrap();
        assert_eq!(
            (p.anchor, p.relative.to_str().unwrap()),
            (Anchor::Root, "opt/tool")
        );
        let p = PathSpec::parse("../shared/x", &a).unwrap();
        assert_eq!(
            (p.anchor, p.relative.to_str().unwrap()),
            (Anchor::Root, "work/shared/x")
        );
        assert_eq!(p.local_path(&a), PathBuf::from("/work/shared/x"));
    }

    #[test]
    fn name_helpers() {
        assert!(names::within(b"_0/a/b", b"_0/a"));
        assert!(names::within(b"_0/a", b"_0/a"));
        assert!(!names::within(b"_0/ab", b"_0/a"));
        assert_eq!(names::strip_within(b"_0/a/b", b"_0/a"), Some(&b"b"[..]));
        assert_eq!(names::strip_within(b"_0/a/b", b""), Some(&b"_0/a/b"[..]));
        let anc: Vec<&[u8]> = names::ancestors(b"_0/a/b").collect();
        assert_eq!(anc, vec![&b"_0"[..], &b"_0/a"[..]]);
        assert_eq!(names::split_namespace(b"_1"), (&b"_1"[..], None));
        assert_eq!(
            names::split_namespace(b"_1/x/y"),
            (&b"_1"[..], Some(&b"x/y"[..]))
        );
    }

    #[test]
    fn names_use_namespaces() {
        let a = anchors();
        let mut m = Manifest::default();
        assert_eq!(
            PathSpec::parse("target", &a).unwrap().archive_name(&mut m),
            b"_0/target"
        );
        assert_eq!(
            PathSpec::parse("~", &a).unwrap().archive_name(&mut m),
            b"_1"
        );
    }
}
