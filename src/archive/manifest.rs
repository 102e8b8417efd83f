//! Buildkite cache v2's namespace manifest (`.buildkite/cache-manifest.json`):
//! `{"version":2,"mappings":{"_0":"."}}`. Each saved path is stored under a
//! namespace `_i/` whose anchor (`.` the working dir, `~` home, `/` the root)
//! is re-resolved on the machine that restores, so a cache saved in one
//! checkout restores into another.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::FormatError;

pub const MANIFEST_VERSION: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Anchor {
    /// `.`: the working directory.
    Cwd,
    /// `~`: the home directory.
    Home,
    /// `/`: the filesystem root.
    Root,
}

impl Anchor {
    pub fn symbol(self) -> &'static str {
        match self {
            Anchor::Cwd => ".",
            Anchor::Home => "~",
            Anchor::Root => "/",
        }
    }

    pub fn from_symbol(s: &str) -> Option<Anchor> {
        match s {
            "." => Some(Anchor::Cwd),
            "~" => Some(Anchor::Home),
            "/" => Some(Anchor::Root),
            _ => None,
        }
    }

    /// The directory this anchor stands for here.
    pub fn resolve(self, cwd: &Path, home: &Path) -> PathBuf {
        match self {
            Anchor::Cwd => cwd.to_path_buf(),
            Anchor::Home => home.to_path_buf(),
            Anchor::Root => PathBuf::from("/"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// Namespace (`_0`, `_1`, …) → anchor symbol.
    pub mappings: BTreeMap<String, String>,
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            version: MANIFEST_VERSION,
            mappings: BTreeMap::new(),
        }
    }
}

impl Manifest {
    /// The namespace for `anchor`, adding one if this manifest has none yet.
    pub fn namespace_for(&mut self, anchor: Anchor) -> String {
        if let Some((ns, _)) = self
            .mappings
            .iter()
            .find(|(_, a)| a.as_str() == anchor.symbol())
        {
            return ns.clone();
        }
        let ns = format!("_{}", self.mappings.len());
        self.mappings
            .insert(ns.clone(), anchor.symbol().to_string());
        ns
    }

    pub fn anchor_of(&self, namespace: &str) -> Option<Anchor> {
        self.mappings
            .get(namespace)
            .and_then(|a| Anchor::from_symbol(a))
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|_| FormatError::Invalid("manifest is not valid JSON"))?;
        if m.version != MANIFEST_VERSION {
            return Err(FormatError::Unsupported(format!(
                "cache manifest version {}",
                m.version
            )));
        }
        if let Some((ns, a)) = m
            .mappings
            .iter()
            .find(|(_, a)| Anchor::from_symbol(a).is_none())
        {
            return Err(FormatError::Unsupported(format!(
                "anchor {a:?} of namespace {ns}"
            )));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildkite_manifest_parses() {
        let m = Manifest::parse(br#"{"version":2,"mappings":{"_0":"~","_1":"."}}"#).unwrap();
        assert_eq!(m.anchor_of("_0"), Some(Anchor::Home));
        assert_eq!(m.anchor_of("_1"), Some(Anchor::Cwd));
        assert!(Manifest::parse(br#"{"version":3,"mappings":{}}"#).is_err());
    }

    #[test]
    fn namespaces_are_reused_per_anchor() {
        let mut m = Manifest::default();
        assert_eq!(m.namespace_for(Anchor::Cwd), "_0");
        assert_eq!(m.namespace_for(Anchor::Home), "_1");
        assert_eq!(m.namespace_for(Anchor::Cwd), "_0");
    }
}
