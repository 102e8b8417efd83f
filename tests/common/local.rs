//! Test support: a cache saved under key `k` in a local store (no server),
//! its source kept — the starting point of the tests of the filesystem core
//! and the fetcher without a kernel.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use cachemount::paths::{Anchors, PathSpec};
use cachemount::progress::Progress;
use cachemount::store::layout;
use cachemount::store::local::LocalStore;

pub struct Fixture {
    pub _dir: tempfile::TempDir,
    pub src: std::path::PathBuf,
    pub store: Arc<LocalStore>,
    pub blob: String,
}

/// Saves the tree `build` fills as `cache` under key `k`.
pub async fn fixture(build: impl FnOnce(&Path)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let src = work.join("cache");
    build(&src);
    let anchors = Anchors {
        cwd: work.clone(),
        home: dir.path().join("home"),
    };
    let store = LocalStore::new(dir.path().join("store"));
    let spec = PathSpec::parse("cache", &anchors).unwrap();
    cachemount::save::save(
        &store,
        "k",
        &[spec],
        &anchors,
        Default::default(),
        Progress::new("", true),
    )
    .await
    .unwrap();
    let resolved = layout::resolve(&store, "k", &[]).await.unwrap();
    Fixture {
        _dir: dir,
        src,
        store: Arc::new(store),
        blob: resolved.pointer.blob_key(),
    }
}
