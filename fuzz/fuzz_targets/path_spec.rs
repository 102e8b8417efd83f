//! The PATHs a user gives (`paths::PathSpec::parse`) with fuzzed anchors (the
//! working and home directories). Never panics; what parses keeps what was
//! typed, is relative to its anchor through plain components only (never
//! climbing above it), resolves to an absolute local path below the
//! anchor that is lexically the path typed (`~` expanded, relative paths
//! taken from the working dir), is under `~` whenever home holds it, and
//! names an archive entry Tree::build accepts (plain components after the
//! namespace).
#![no_main]

#[path = "common.rs"]
mod common;
#[path = "gen.rs"]
mod gen;

use std::path::{Component, Path, PathBuf};

use cachemount::archive::{Anchor, Manifest};
use cachemount::paths::PathSpec;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn run(u: &mut Unstructured) -> Result<()> {
    let anchors = gen::anchors(u)?;
    let given = if u.ratio(1, 2)? {
        gen::path_string(u)?
    } else {
        let len = u.len();
        String::from_utf8_lossy(u.bytes(len)?).into_owned()
    };
    let Ok(spec) = PathSpec::parse(&given, &anchors) else {
        return Ok(());
    };
    assert_eq!(spec.given, given);
    assert!(
        spec.relative
            .components()
            .all(|c| matches!(c, Component::Normal(_))),
        "{spec:?}: not plain components"
    );
    let local = spec.local_path(&anchors);
    let base = anchors.resolve(spec.anchor);
    assert!(
        local.is_absolute() && local.starts_with(&base),
        "{spec:?} → {local:?}"
    );
    let typed = if given == "~" {
        anchors.home.display().to_string()
    } else if let Some(rest) = given.strip_prefix("~/") {
        format!("{}/{rest}", anchors.home.display())
    } else if given.starts_with('/') {
        given.clone()
    } else {
        format!("{}/{given}", anchors.cwd.display())
    };
    assert_eq!(
        lexical(Path::new(&typed)),
        lexical(&local),
        "{given:?} (typed {typed:?}) resolved to {local:?}"
    );
    if spec.anchor == Anchor::Root && anchors.home != Path::new("/") {
        assert!(!local.starts_with(&anchors.home), "{spec:?} is under home");
    }
    let name = spec.archive_name(&mut Manifest::default());
    if let Some(i) = name.iter().position(|b| *b == b'/') {
        assert!(
            name[i + 1..]
                .split(|b| *b == b'/')
                .all(|c| !c.is_empty() && c != b"." && c != b".."),
            "archive name {:?}",
            String::from_utf8_lossy(&name)
        );
    }
    Ok(())
}

/// `path` with `.` dropped and `..` applied; None if it climbs above `/`.
fn lexical(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            // The guard pops; only a failed pop (above `/`) ends the walk.
            Component::ParentDir if !out.pop() => return None,
            _ => {}
        }
    }
    Some(out)
}
