//! Buildkite's cache manifest JSON.
#![no_main]

#[path = "common.rs"]
mod common;

use cachemount::archive::manifest::{Anchor, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut m) = Manifest::parse(data) {
        for ns in m.mappings.keys().cloned().collect::<Vec<_>>() {
            assert!(m.anchor_of(&ns).is_some());
        }
        for a in [Anchor::Cwd, Anchor::Home, Anchor::Root] {
            let ns = m.namespace_for(a);
            assert_eq!(m.anchor_of(&ns), Some(a));
        }
    }
});
