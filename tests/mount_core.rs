//! The filesystem core and fetcher without a kernel: a real archive in a
//! local store, operations called directly, results compared with the source;
//! GET counting for merged fetches, in-flight de-duplication, neighbour
//! fetches, read-ahead, a tiny cache, a corrupt frame, and a second key
//! over the disk cache fetching its changed files, not the cached ones between.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;

use cachemount::archive::EntryKind;
use cachemount::cache::version::{open_version, Refresh};
use cachemount::cache::Current;
use cachemount::cache::{FetchConfig, Fetcher, Stats};
use cachemount::fs::{FsCore, FsError, Tree, ROOT_INO, STATS_XATTR};
use cachemount::paths::{Anchors, PathSpec};
use cachemount::progress::Progress;
use cachemount::store::layout;
use cachemount::store::local::LocalStore;
use common::local::{fixture, Fixture};
use common::tree::{feature_tree, small_files_tree, Rng};

async fn core(fx: &Fixture, cache: u64, config: FetchConfig) -> Arc<FsCore<LocalStore>> {
    let stats = Arc::new(Stats::default());
    let fetcher = Fetcher::new(fx.store.clone(), cache, stats.clone(), config);
    core_over(fx, &fx.blob, stats, fetcher).await
}

/// The core of the archive `blob` (its `cache` tree) read through `fetcher`.
async fn core_over(
    fx: &Fixture,
    blob: &str,
    stats: Arc<Stats>,
    fetcher: Arc<Fetcher<LocalStore>>,
) -> Arc<FsCore<LocalStore>> {
    let version = open_version(&*fx.store, blob, None, None, Refresh::Never, Some(&stats))
        .await
        .unwrap();
    let tree = Tree::build(&version.index, b"_0/cache").unwrap();
    Arc::new(FsCore::new(tree, Current::new(version), fetcher))
}

/// A key pointer records where its blob's index lies, so that opening the
/// blob fetches the index alongside the tail; a hint that names other bytes
/// costs one more GET and opens the same index (it is checked by digest).
#[tokio::test]
async fn the_key_pointers_index_hint_opens_with_the_tail_and_a_wrong_one_is_only_slower() {
    // Enough files that the central directory fills the tail, so the index
    // needs a GET of its own.
    let fx = fixture(|src| {
        for i in 0..7000 {
            let dir = src.join(format!("pkg-{:03}", i / 50));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join(format!("file-{i}.js")), format!("module {i}\n")).unwrap();
        }
    })
    .await;
    let pointer = layout::resolve(&*fx.store, "k", &[]).await.unwrap().pointer;
    let hint = pointer.index_hint().expect("a hint outside the tail");
    let open = |hint| async {
        let stats = Stats::default();
        let v = open_version(
            &*fx.store,
            &fx.blob,
            Some(&pointer.digest),
            hint,
            Refresh::Never,
            Some(&stats),
        )
        .await
        .unwrap();
        (
            v.index,
            stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    let (plain, plain_gets) = open(None).await;
    let (hinted, hinted_gets) = open(Some(hint.clone())).await;
    let (wrong, wrong_gets) = open(Some(0..hint.end - hint.start)).await;
    // A hint that spans the tail too answers nothing: only a request for
    // exactly its range, the index's, is served from unpinned bytes.
    let (spanning, spanning_gets) = open(Some(hint.start..pointer.size)).await;
    assert_eq!(plain.entries.len(), 7000 + 1 + 140);
    assert_eq!(
        (plain_gets, hinted_gets, wrong_gets, spanning_gets),
        (2, 2, 3, 3)
    );
    assert!(hinted == plain && wrong == plain && spanning == plain);
}

fn ino_of(core: &FsCore<LocalStore>, rel: &str) -> u64 {
    let mut ino = ROOT_INO;
    for c in rel.split('/') {
        ino = core.lookup(ino, c.as_bytes()).unwrap().ino;
    }
    ino
}

fn requests(core: &FsCore<LocalStore>) -> u64 {
    core.fetcher()
        .stats()
        .requests
        .load(std::sync::atomic::Ordering::Relaxed)
}

async fn read_all(core: &FsCore<LocalStore>, ino: u64, chunk: u32) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = core.read(ino, out.len() as u64, chunk).await.unwrap();
        if b.is_empty() {
            return out;
        }
        out.extend_from_slice(&b);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn core_answers_like_the_source_tree() {
    let fx = fixture(|p| feature_tree(p, 1)).await;
    let core = core(&fx, 64 << 20, FetchConfig::default()).await;
    // readdir: . and .., then sorted children, with attributes.
    let mut names = Vec::new();
    core.readdir(ROOT_INO, 0, |e| {
        names.push(String::from_utf8_lossy(e.name).into_owned());
        false
    })
    .unwrap();
    let mut expected: Vec<String> = fs::read_dir(&fx.src)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    expected.sort();
    assert_eq!(names[..2], [".", ".."]);
    assert_eq!(names[2..], expected[..]);
    // Resuming at a cookie.
    let mut resumed = Vec::new();
    core.readdir(ROOT_INO, 3, |e| {
        resumed.push(String::from_utf8_lossy(e.name).into_owned());
        true
    })
    .unwrap();
    assert_eq!(resumed, [names[3].clone()]);

    use std::os::unix::fs::MetadataExt;
    for rel in [
        "one-frame.js",
        "many-frames.bin",
        "nested/deeper/deepest/leaf.txt",
        "private/secret",
        "empty-file",
        "script.sh",
    ] {
        let ino = ino_of(&core, rel);
        let a = core.getattr(ino).unwrap();
        let md = fs::symlink_metadata(fx.src.join(rel)).unwrap();
        assert_eq!(
            (a.size, a.perm, a.mtime.secs, i64::from(a.mtime.nanos)),
            (md.len(), md.mode() & 0o7777, md.mtime(), md.mtime_nsec()),
            "{rel}"
        );
        assert_eq!(
            read_all(&core, ino, 128 << 10).await,
            fs::read(fx.src.join(rel)).unwrap(),
            "{rel}"
        );
    }
    let link = ino_of(&core, "nested/rel-link");
    assert_eq!(core.getattr(link).unwrap().kind, EntryKind::Symlink);
    assert_eq!(
        &core.readlink(link).await.unwrap()[..],
        b"deeper/deepest/leaf.txt"
    );
    assert_eq!(core.lookup(ROOT_INO, b"missing"), Err(FsError::NotFound));
    assert_eq!(
        core.read(ino_of(&core, "nested"), 0, 10).await,
        Err(FsError::IsDir)
    );
    assert_eq!(
        core.open(ino_of(&core, "script.sh"), true),
        Err(FsError::ReadOnly)
    );
    assert_eq!(core.access(ROOT_INO, libc::W_OK), Err(FsError::ReadOnly));
    // Reads past the end are empty; a range inside a frame is exact.
    let big = ino_of(&core, "many-frames.bin");
    let size = core.getattr(big).unwrap().size;
    assert!(core.read(big, size, 100).await.unwrap().is_empty());
    let source = fs::read(fx.src.join("many-frames.bin")).unwrap();
    let mid = core.read(big, (1 << 20) - 7, 20).await.unwrap();
    assert_eq!(&mid[..], &source[(1 << 20) - 7..(1 << 20) + 13]);
    // Counters on the root's hidden xattr; not listed.
    let stats = String::from_utf8(core.getxattr(ROOT_INO, STATS_XATTR).unwrap()).unwrap();
    assert!(stats.contains("requests "), "{stats}");
    assert!(core.listxattr(ROOT_INO).unwrap().is_empty());
    if common::tree::supports_xattrs(&fx.src) {
        let js = ino_of(&core, "one-frame.js");
        assert_eq!(
            core.getxattr(js, b"user.origin").unwrap(),
            b"registry.npmjs.org"
        );
        assert_eq!(core.listxattr(js).unwrap(), b"user.origin\0");
        assert_eq!(core.getxattr(js, b"user.none"), Err(FsError::NoXattr));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_fetch_once_and_neighbours_come_together() {
    let fx = fixture(|p| {
        small_files_tree(p, 2, 200);
        fs::write(p.join("big.bin"), Rng::new(3).text(6 << 20)).unwrap();
    })
    .await;
    let core = core(&fx, 64 << 20, FetchConfig::default()).await;
    let big = ino_of(&core, "big.bin");
    let before = requests(&core);
    let reads: Vec<_> = (0..16)
        .map(|_| {
            let core = core.clone();
            tokio::spawn(async move { core.read(big, (2 << 20) + 5, 4096).await.unwrap() })
        })
        .collect();
    for r in reads {
        r.await.unwrap();
    }
    // One GET for the block; read-ahead may add one more for the next block,
    // depending on timing. Without sharing it would be 16.
    assert!(
        requests(&core) - before <= 2,
        "16 concurrent readers of one block must share one GET"
    );

    // Reading one small file brings its directory's neighbours in the same GET.
    let dir = "pkg-0003/lib/sub-1";
    let mut files = Vec::new();
    core.readdir(ino_of(&core, dir), 2, |e| {
        files.push(String::from_utf8_lossy(e.name).into_owned());
        false
    })
    .unwrap();
    assert!(files.len() >= 3);
    let before = requests(&core);
    for f in &files {
        let rel = format!("{dir}/{f}");
        assert_eq!(
            read_all(&core, ino_of(&core, &rel), 1 << 20).await,
            fs::read(fx.src.join(&rel)).unwrap()
        );
    }
    // One GET brings the directory; the walk may already fetch what follows.
    // (How many reads waited depends on timing: a read of a neighbour whose
    // block is still being decoded waits for that decode, not for a GET.)
    assert!(
        requests(&core) - before <= 2,
        "a directory of small files should cost one GET (plus the walk's next batch)"
    );
    assert!(
        core.fetcher()
            .stats()
            .readahead_hits
            .load(std::sync::atomic::Ordering::Relaxed)
            >= files.len() as u64 - 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sequential_reads_merge_and_read_ahead_within_a_tiny_cache() {
    let fx = fixture(|p| {
        fs::create_dir_all(p).unwrap();
        fs::write(p.join("seq.bin"), Rng::new(4).text(40 << 20)).unwrap();
    })
    .await;
    let source = fs::read(fx.src.join("seq.bin")).unwrap();
    // Cache of 4 blocks against a 40-block file.
    let core = core(&fx, 4 << 20, FetchConfig::default()).await;
    let ino = ino_of(&core, "seq.bin");
    assert!(read_all(&core, ino, 128 << 10).await == source);
    let s = core.fetcher().stats();
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        get(&s.readahead_hits) > 20,
        "read-ahead should serve most blocks: {}",
        core.fetcher().render_stats()
    );
    assert!(core.fetcher().cache().bytes() <= 4 << 20);
    // Random reads still right after all that eviction.
    let mut rng = Rng::new(9);
    for _ in 0..50 {
        let off = rng.below(source.len() as u64);
        let b = core.read(ino, off, 70_000).await.unwrap();
        assert!(b[..] == source[off as usize..(off as usize + 70_000).min(source.len())]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_drops_the_frames_it_passed_and_rereads_them_right() {
    let fx = fixture(|p| {
        fs::create_dir_all(p).unwrap();
        fs::write(p.join("seq.bin"), Rng::new(5).text(40 << 20)).unwrap();
    })
    .await;
    let source = fs::read(fx.src.join("seq.bin")).unwrap();
    // A cache that could hold the whole file: what leaves it was dropped behind.
    let core = core(&fx, 256 << 20, FetchConfig::default()).await;
    let ino = ino_of(&core, "seq.bin");
    assert!(read_all(&core, ino, 1 << 20).await == source);
    let cached = core.fetcher().cache().bytes();
    assert!(
        cached <= 12 << 20,
        "a sequential reader's passed frames leave the cache (read-ahead and the last few stay): {cached} bytes cached"
    );
    // Read again (as after the kernel dropped its pages): fetched again, right.
    assert!(read_all(&core, ino, 1 << 20).await == source);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_frame_fails_that_read_only() {
    let fx = fixture(|p| feature_tree(p, 5)).await;
    let core_ok = core(&fx, 64 << 20, FetchConfig::default()).await;
    let big = ino_of(&core_ok, "many-frames.bin");
    let blob_path = fx.store.root().join(&fx.blob);
    let index = cachemount::archive::open_file(&fs::File::open(&blob_path).unwrap()).unwrap();
    let e = index
        .entries
        .iter()
        .find(|e| e.name.ends_with(b"many-frames.bin"))
        .unwrap();
    let cachemount::archive::DataOffset::Data(off) = e.offset else {
        unreachable!()
    };
    let (start, _) = e.frame_span(2);
    let mut bytes = fs::read(&blob_path).unwrap();
    bytes[(off + start + 100) as usize] ^= 1;
    let before = fs::metadata(&blob_path).unwrap();
    fs::write(&blob_path, &bytes).unwrap();
    // Same inode and size: make sure the rewrite shows in the version (mtime)
    // even on a file system with coarse timestamps.
    let later = filetime::FileTime::from_unix_time(
        filetime::FileTime::from_last_modification_time(&before).unix_seconds() + 10,
        0,
    );
    filetime::set_file_mtime(&blob_path, later).unwrap();
    // A fresh core pinned to the corrupted object.
    let core = core(&fx, 64 << 20, FetchConfig::default()).await;
    let err = core.read(big, (2 << 20) + 1, 10).await.unwrap_err();
    assert!(
        matches!(err, FsError::Io(ref m) if m.to_string().contains("many-frames.bin")),
        "{err:?}"
    );
    let source = fs::read(fx.src.join("many-frames.bin")).unwrap();
    assert_eq!(&core.read(big, 0, 10).await.unwrap()[..], &source[..10]);
    assert_eq!(
        &core.read(big, 3 << 20, 10).await.unwrap()[..],
        &source[3 << 20..(3 << 20) + 10]
    );
    // The old core's pin no longer matches: its reads fail instead of mixing versions.
    let stale = core_ok.read(big, 4 << 20, 10).await;
    assert!(
        matches!(stale, Err(FsError::Changed(_))),
        "a read pinned to the old version must fail with Changed, got {stale:?}"
    );
}

/// Reads a whole file as the FUSE adapter does (no-open mode): answered from
/// the caches where they can, else fetched.
async fn read_all_as_fuse(core: &FsCore<LocalStore>, ino: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let offset = out.len() as u64;
        let b = match core.read_cached(ino, 0, offset, 1 << 20) {
            Some(got) => got.unwrap(),
            None => core.read(ino, offset, 1 << 20).await.unwrap(),
        };
        if b.is_empty() {
            return out;
        }
        out.extend_from_slice(&b);
    }
}

/// A core over the fixture's archive saved as `key`, with the host's disk
/// cache at `disk_dir`.
async fn core_with_disk(fx: &Fixture, key: &str, disk_dir: &Path) -> Arc<FsCore<LocalStore>> {
    use cachemount::cache::disk::{DiskCache, DiskOptions, MountDisk};
    use cachemount::store::ObjectStore;
    let resolved = layout::resolve(&*fx.store, key, &[]).await.unwrap();
    let disk = DiskCache::open(&DiskOptions {
        dir: disk_dir.to_path_buf(),
        max_bytes: 1 << 30,
    })
    .unwrap();
    let disk = MountDisk::new(Arc::new(disk), fx.store.describe());
    let stats = Arc::new(Stats::default());
    let fetcher = Fetcher::with_disk(
        fx.store.clone(),
        64 << 20,
        stats.clone(),
        FetchConfig::default(),
        Some(disk),
    );
    core_over(fx, &resolved.pointer.blob_key(), stats, fetcher).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_key_fetches_its_changed_files_not_the_cached_ones_between_them() {
    // 60 files of 3,000 random bytes in one directory; key A is read whole
    // into the disk cache, then key B changes every third file. Between two
    // changed files lie two cached ones (6 KB): fetching through them would
    // download bytes the disk already holds.
    let fx = fixture(|p| {
        let mut rng = Rng::new(11);
        fs::create_dir_all(p.join("pkg")).unwrap();
        for i in 0..60 {
            fs::write(p.join(format!("pkg/f{i:02}.js")), rng.noise(3000)).unwrap();
        }
    })
    .await;
    let disk_dir = fx._dir.path().join("disk");
    let files: Vec<String> = (0..60).map(|i| format!("pkg/f{i:02}.js")).collect();
    let a = core_with_disk(&fx, "k", &disk_dir).await;
    for f in &files {
        read_all_as_fuse(&a, ino_of(&a, f)).await;
    }
    drop(a);
    let mut rng = Rng::new(12);
    for f in files.iter().step_by(3) {
        fs::write(fx.src.join(f), rng.noise(3000)).unwrap();
    }
    let anchors = Anchors {
        cwd: fx.src.parent().unwrap().to_path_buf(),
        home: fx._dir.path().join("home"),
    };
    cachemount::save::save(
        &*fx.store,
        "k2",
        &[PathSpec::parse("cache", &anchors).unwrap()],
        &anchors,
        Default::default(),
        Progress::new("", true),
    )
    .await
    .unwrap();
    let b = core_with_disk(&fx, "k2", &disk_dir).await;
    let blob = layout::resolve(&*fx.store, "k2", &[]).await.unwrap();
    let blob = fx.store.root().join(blob.pointer.blob_key());
    let index = cachemount::archive::open_file(&fs::File::open(blob).unwrap()).unwrap();
    let changed: u64 = files
        .iter()
        .step_by(3)
        .map(|f| {
            let name = format!("_0/cache/{f}");
            let e = index.entries.iter().find(|e| e.name == name.as_bytes());
            e.unwrap().compressed_size
        })
        .sum();
    let fetched = || {
        b.fetcher()
            .stats()
            .bytes_fetched
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let opened = fetched();
    for f in &files {
        assert_eq!(
            read_all_as_fuse(&b, ino_of(&b, f)).await,
            fs::read(fx.src.join(f)).unwrap(),
            "{f}"
        );
    }
    let fetched = fetched() - opened;
    assert!(
        fetched as f64 <= 1.2 * changed as f64,
        "key B fetched {fetched} bytes for {changed} bytes of changed files"
    );
}
