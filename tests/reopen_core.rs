//! The 412 path without a kernel: a mount core over a local store whose
//! object is replaced under it. Unchanged files keep their inode and keep
//! reading (open handles included, at the new version's offsets); changed
//! files give ESTALE on old handles and the new content on a new open;
//! removed paths vanish, new ones appear; a content-addressed blob rewritten
//! with the same bytes costs the readers nothing; an object that keeps
//! changing ends in an error within the bound.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cachemount::cache::version::{open_version, Refresh};
use cachemount::cache::Current;
use cachemount::cache::{FetchConfig, Fetcher, Stats};
use cachemount::fs::{FsCore, FsError, Tree, ROOT_INO};
use cachemount::mount::daemon::reopener;
use cachemount::paths::{Anchors, PathSpec};
use cachemount::progress::Progress;
use cachemount::store::layout;
use cachemount::store::local::LocalStore;
use common::tree::Rng;

fn random(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).noise(len)
}

/// Saves `build`'s tree under `key` in `store`; returns the blob's path and digest.
async fn save(
    dir: &Path,
    store: &LocalStore,
    key: &str,
    build: impl FnOnce(&Path),
) -> (std::path::PathBuf, String) {
    let work = dir.join(format!("work-{key}"));
    build(&work.join("cache"));
    let anchors = Anchors {
        cwd: work.clone(),
        home: dir.join("home"),
    };
    let spec = PathSpec::parse("cache", &anchors).unwrap();
    cachemount::save::save(
        store,
        key,
        &[spec],
        &anchors,
        Default::default(),
        Progress::new("", true),
    )
    .await
    .unwrap();
    let resolved = layout::resolve(store, key, &[]).await.unwrap();
    (
        store.root().join(resolved.pointer.blob_key()),
        resolved.pointer.digest.clone(),
    )
}

fn v1(p: &Path) {
    fs::create_dir_all(p.join("dir")).unwrap();
    fs::write(p.join("same.bin"), random(1, 5 << 20)).unwrap();
    fs::write(p.join("changed.bin"), random(2, 3 << 20)).unwrap();
    fs::write(p.join("gone.txt"), b"gone").unwrap();
    fs::write(p.join("dir/keep.txt"), b"keep").unwrap();
}

fn v2(p: &Path) {
    fs::create_dir_all(p.join("dir")).unwrap();
    // Sorts first: every later entry moves in the archive.
    fs::write(p.join("a-first.bin"), random(9, 1 << 20)).unwrap();
    fs::write(p.join("same.bin"), random(1, 5 << 20)).unwrap();
    fs::write(p.join("changed.bin"), random(3, 3 << 20)).unwrap();
    fs::write(p.join("dir/keep.txt"), b"keep").unwrap();
    fs::write(p.join("dir/new.txt"), b"new").unwrap();
}

/// Replaces `target` by a copy of `from` (rename: readers of the old file see a new ETag).
fn replace(from: &Path, target: &Path) {
    let tmp = target.with_extension("tmp");
    fs::copy(from, &tmp).unwrap();
    fs::rename(&tmp, target).unwrap();
}

async fn core_of(
    store: &Arc<LocalStore>,
    key: &str,
    digest: Option<&str>,
    bound: Option<(usize, Duration)>,
) -> (Arc<FsCore<LocalStore>>, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    let version = open_version(&**store, key, digest, None, Refresh::Never, Some(&stats))
        .await
        .unwrap();
    let tree = Tree::build(&version.index, b"_0/cache").unwrap();
    let fetcher = Fetcher::new(
        store.clone(),
        256 << 20,
        stats.clone(),
        FetchConfig::default(),
    );
    let current = Current::new(version);
    let mut r = reopener(
        store.clone(),
        current,
        digest.map(str::to_string),
        &fetcher,
        stats.clone(),
    );
    if let Some((limit, window)) = bound {
        r = r.with_limit(limit, window);
    }
    let core = FsCore::with_reopen(tree, b"_0/cache", r, fetcher, digest.is_none());
    (core, stats)
}

fn ino(core: &FsCore<LocalStore>, rel: &str) -> Result<u64, FsError> {
    let mut ino = ROOT_INO;
    for c in rel.split('/') {
        ino = core.lookup(ino, c.as_bytes())?.ino;
    }
    Ok(ino)
}

fn get(stats: &Stats, name: &str) -> u64 {
    cachemount::cache::stats::parse(&stats.render(&cachemount::cache::BlockCache::new(0)))
        .into_iter()
        .find(|(k, _)| k == name)
        .unwrap()
        .1
}

async fn read_all(core: &FsCore<LocalStore>, ino: u64, fh: u64) -> Result<Vec<u8>, FsError> {
    let mut out = Vec::new();
    loop {
        let b = core.read_fh(ino, fh, out.len() as u64, 128 << 10).await?;
        if b.is_empty() {
            return Ok(out);
        }
        out.extend_from_slice(&b);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_object_replaced_with_other_content_remaps_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(dir.path().join("store")));
    let (blob1, _) = save(dir.path(), &store, "v1", v1).await;
    let (blob2, _) = save(dir.path(), &store, "v2", v2).await;
    let raw = store.root().join("raw.zip");
    replace(&blob1, &raw);
    let (core, stats) = core_of(&store, "raw.zip", None, None).await;

    let same = ino(&core, "same.bin").unwrap();
    let changed = ino(&core, "changed.bin").unwrap();
    let keep = ino(&core, "dir/keep.txt").unwrap();
    let gone = ino(&core, "gone.txt").unwrap();
    let fh_same = core.open(same, false).unwrap();
    let fh_changed = core.open(changed, false).unwrap();
    assert!(fh_same != 0 && fh_changed != 0, "raw mounts track handles");
    let same_src = random(1, 5 << 20);
    // Half of same.bin and a bit of changed.bin before the change.
    let head = core.read_fh(same, fh_same, 0, 1 << 20).await.unwrap();
    assert_eq!(&head[..], &same_src[..1 << 20]);
    let c = core.read_fh(changed, fh_changed, 0, 4096).await.unwrap();
    assert_eq!(&c[..], &random(2, 3 << 20)[..4096]);

    replace(&blob2, &raw);

    // The same handle reads on, from the new version (at its new offsets).
    let mut rest = Vec::new();
    let mut off = 1u64 << 20;
    loop {
        let b = core.read_fh(same, fh_same, off, 256 << 10).await.unwrap();
        if b.is_empty() {
            break;
        }
        off += b.len() as u64;
        rest.extend_from_slice(&b);
    }
    assert!(
        rest == same_src[1 << 20..],
        "unchanged file read through the change"
    );
    assert_eq!(get(&stats, "reopens"), 1);
    // Inodes stay by path.
    assert_eq!(ino(&core, "same.bin").unwrap(), same);
    assert_eq!(ino(&core, "changed.bin").unwrap(), changed);
    assert_eq!(ino(&core, "dir/keep.txt").unwrap(), keep);
    // The old handle of the changed file is stale; a new open reads the new content.
    assert_eq!(
        core.read_fh(changed, fh_changed, 4096, 4096).await,
        Err(FsError::Stale)
    );
    assert_eq!(
        core.read_cached(changed, fh_changed, 0, 4096),
        Some(Err(FsError::Stale))
    );
    let fh_new = core.open(changed, false).unwrap();
    assert!(read_all(&core, changed, fh_new).await.unwrap() == random(3, 3 << 20));
    // Removed paths vanish, new ones appear with new inodes.
    assert_eq!(ino(&core, "gone.txt"), Err(FsError::NotFound));
    assert_eq!(core.getattr(gone), Err(FsError::NotFound));
    let new = ino(&core, "dir/new.txt").unwrap();
    assert!(new != gone && new > keep);
    assert_eq!(read_all(&core, new, 0).await.unwrap(), b"new");
    assert_eq!(read_all(&core, keep, 0).await.unwrap(), b"keep");
    let names: Vec<Vec<u8>> = {
        let mut v = Vec::new();
        core.readdir(ROOT_INO, 2, |e| {
            v.push(e.name.to_vec());
            false
        })
        .unwrap();
        v
    };
    assert_eq!(
        names,
        vec![
            b"a-first.bin".to_vec(),
            b"changed.bin".to_vec(),
            b"dir".to_vec(),
            b"same.bin".to_vec()
        ]
    );
    assert_eq!(get(&stats, "stale_handles"), 1);
    assert_eq!(get(&stats, "changed_files"), 1);
    assert!(get(&stats, "invalidated_blocks") > 0);
    assert!(get(&stats, "precondition_failed") >= 1);
    assert_eq!(get(&stats, "read_errors"), 0);
    core.release(same, fh_same);
    core.release(changed, fh_changed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn content_addressed_blob_rewritten_costs_readers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(dir.path().join("store")));
    let (blob, digest) = save(dir.path(), &store, "k", v1).await;
    let key = blob
        .strip_prefix(store.root())
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let (core, stats) = core_of(&store, &key, Some(&digest), None).await;
    let same = ino(&core, "same.bin").unwrap();
    assert_eq!(
        core.open(same, false).unwrap(),
        0,
        "key mounts need no handles"
    );
    let src = random(1, 5 << 20);
    // Many concurrent readers; the blob is rewritten (same bytes, new ETag)
    // once every reader has read something, and each reads on after it.
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let replaced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let (core, reads, replaced) = (core.clone(), reads.clone(), replaced.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let chunk = 64 << 10;
            let mut off = t * 4096;
            let mut after = 0;
            while after < 8 {
                let was_replaced = replaced.load(std::sync::atomic::Ordering::SeqCst);
                let b = core.read(same, off, chunk).await.unwrap();
                if b.is_empty() {
                    off = 0;
                    continue;
                }
                out.push((off, b.clone()));
                off += b.len() as u64;
                reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if was_replaced {
                    after += 1;
                }
                assert!(out.len() < 100_000, "the blob was never replaced");
                tokio::task::yield_now().await;
            }
            out
        }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while reads.load(std::sync::atomic::Ordering::SeqCst) < 16 {
        assert!(
            std::time::Instant::now() < deadline,
            "the readers read nothing"
        );
        tokio::task::yield_now().await;
    }
    replace(&blob.clone(), &blob);
    replaced.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tasks {
        for (off, b) in t.await.unwrap() {
            assert!(b[..] == src[off as usize..off as usize + b.len()]);
        }
    }
    // Reads after the change certainly hit it (nothing of this file is cached).
    let changed = ino(&core, "changed.bin").unwrap();
    assert!(read_all(&core, changed, 0).await.unwrap() == random(2, 3 << 20));
    assert!(read_all(&core, same, 0).await.unwrap() == src);
    assert_eq!(get(&stats, "reopens"), 1, "one reopen for all readers");
    assert_eq!(get(&stats, "read_errors"), 0);
    assert_eq!(get(&stats, "stale_handles"), 0);
    assert_eq!(get(&stats, "changed_files"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_object_that_keeps_changing_ends_in_an_error_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(dir.path().join("store")));
    let (blob1, _) = save(dir.path(), &store, "v1", v1).await;
    let raw = store.root().join("raw.zip");
    replace(&blob1, &raw);
    let (core, stats) = core_of(&store, "raw.zip", None, Some((2, Duration::from_secs(60)))).await;
    let same = ino(&core, "same.bin").unwrap();
    let started = std::time::Instant::now();
    let mut result = Ok(bytes::Bytes::new());
    for i in 0..4 {
        replace(&blob1, &raw);
        // Backwards, so that no read-ahead answers the next read from the cache.
        result = core.read(same, (4 - i as u64) << 20, 4096).await;
        if result.is_err() {
            break;
        }
    }
    assert!(
        matches!(&result, Err(e @ FsError::Changed(_)) if e.to_string().contains("keeps changing")),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(get(&stats, "reopens"), 2);
    assert_eq!(get(&stats, "reopen_refused"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bound_counts_only_the_reopens_within_its_window() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(dir.path().join("store")));
    let (blob1, _) = save(dir.path(), &store, "v1", v1).await;
    let raw = store.root().join("raw.zip");
    replace(&blob1, &raw);
    let window = Duration::from_secs(3);
    let (core, stats) = core_of(&store, "raw.zip", None, Some((2, window))).await;
    let same = ino(&core, "same.bin").unwrap();
    // Each replacement then a read (backwards: no read-ahead answers it) is one reopen.
    let change_and_read = |i: u64| {
        replace(&blob1, &raw);
        core.read(same, (4 - i) << 20, 4096)
    };
    let first = std::time::Instant::now();
    change_and_read(0).await.unwrap();
    change_and_read(1).await.unwrap();
    let refused = change_and_read(2).await;
    assert!(
        first.elapsed() < window,
        "the machine was too slow for the window"
    );
    assert!(
        matches!(&refused, Err(e @ FsError::Changed(_)) if e.to_string().contains("keeps changing")),
        "a third reopen within the window: {refused:?}"
    );
    // Once the window has passed the first two (the clock is the event here),
    // the object may be reopened again.
    let elapsed = first.elapsed();
    if elapsed <= window {
        tokio::time::sleep(window - elapsed + Duration::from_millis(200)).await;
    }
    let again = change_and_read(3).await;
    assert!(again.is_ok(), "reopening after the window: {again:?}");
    assert_eq!(get(&stats, "reopens"), 3);
    assert_eq!(get(&stats, "reopen_refused"), 1);
}
