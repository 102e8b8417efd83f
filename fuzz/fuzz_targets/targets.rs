//! Restore and mount planning: which archive names go where
//! (`restore::saved_roots`, `restore::plan_targets`) for entries with fuzzed
//! names, a fuzzed manifest and fuzzed anchors, without PATHs (the archive
//! decides) and with them. Planning must never panic, and whatever it
//! accepts is safe (DESIGN §7): no target is `/` or the home directory, no
//! two targets overlap, every target lies strictly below its `trusted`
//! directory through plain components only, and that directory is the
//! user's (an anchor, an anchor's parent, or the parent of a PATH given).
//! Also: every entry with a plain name lies within a saved root, so nothing
//! the archive holds is left out silently.
#![no_main]

#[path = "common.rs"]
mod common;
#[path = "gen.rs"]
mod gen;

use std::path::{Component, Path, PathBuf};

use cachemount::archive::{DataOffset, EntryKind};
use cachemount::paths::{names, plan_targets, saved_roots, Anchors, PathSpec, Target};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn run(u: &mut Unstructured) -> Result<()> {
    let index = gen::index(u)?;
    let anchors = gen::anchors(u)?;
    let mut specs = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        if let Ok(spec) = PathSpec::parse(&gen::path_string(u)?, &anchors) {
            specs.push(spec);
        }
    }
    let roots = saved_roots(&index);
    let foreign = index
        .entries
        .iter()
        .any(|e| matches!(e.offset, DataOffset::LocalHeader(_)));
    for e in &index.entries {
        // A foreign namespace's own directory entry names no path; a name
        // that is not plain (`a//b`, `a/./b`) is never extracted anyway.
        let plain = e
            .name
            .split(|b| *b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..");
        if !plain || (foreign && e.kind == EntryKind::Dir && !e.name.contains(&b'/')) {
            continue;
        }
        assert!(
            roots.iter().any(|r| names::within(&e.name, r)),
            "entry {:?} is within no saved root of {:?} (foreign: {foreign}, entries {:?})",
            String::from_utf8_lossy(&e.name),
            lossy(&roots),
            lossy(
                &index
                    .entries
                    .iter()
                    .map(|e| e.name.clone())
                    .collect::<Vec<_>>()
            ),
        );
    }
    for specs in [&[][..], &specs[..]] {
        if let Ok(targets) = plan_targets(&index, specs, &anchors) {
            check(&targets, specs, &anchors);
        }
    }
    Ok(())
}

fn lossy(names: &[Vec<u8>]) -> Vec<String> {
    names
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

fn check(targets: &[Target], specs: &[PathSpec], anchors: &Anchors) {
    let mut users: Vec<PathBuf> = [&anchors.cwd, &anchors.home, Path::new("/")]
        .into_iter()
        .flat_map(|a| [a.to_path_buf(), a.parent().unwrap_or(a).to_path_buf()])
        .collect();
    users.extend(
        specs
            .iter()
            .filter_map(|s| Some(s.local_path(anchors).parent()?.to_path_buf())),
    );
    for t in targets {
        assert_ne!(t.local, Path::new("/"), "a target is the root: {t:?}");
        assert_ne!(t.local, anchors.home, "a target is home: {t:?}");
        let below = t
            .local
            .strip_prefix(&t.trusted)
            .unwrap_or_else(|_| panic!("{t:?} is not below its trusted dir"));
        assert!(
            below.components().next().is_some()
                && below
                    .components()
                    .all(|c| matches!(c, Component::Normal(_))),
            "{t:?} is not strictly below its trusted dir"
        );
        assert!(
            users.contains(&t.trusted),
            "{t:?}: trusted dir not the user's ({users:?})"
        );
    }
    for (i, a) in targets.iter().enumerate() {
        for b in &targets[i + 1..] {
            assert!(
                !a.local.starts_with(&b.local) && !b.local.starts_with(&a.local),
                "targets overlap: {a:?} and {b:?}"
            );
        }
    }
}
