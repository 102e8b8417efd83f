//! The 412 path through real FUSE mounts and real S3 servers (DESIGN §4 "On
//! 412"): the seed scenario (two mounts of one key; the object's ETag changes
//! under mount A while it streams a large file and walks small ones — by a
//! re-upload of identical bytes on SeaweedFS, by mount B's self-copy refresh
//! on moto, as on AWS): A sees every byte right and no error, and `stats`
//! shows the reopen; the same under a writable mount (overlayfs over the
//! reopening FUSE layer), whose writes survive the change. A raw-URL mount whose object is overwritten with other
//! content: unchanged files read through the change on the same handle,
//! changed files give ESTALE on old handles (never a block of the other
//! version) and the new content on a new open, removed paths vanish. An
//! object that keeps changing ends reads with EIO within the bound.

mod common;
use common::mount as mount_support;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachemount::store::s3::{S3Store, S3Tuning};
use cachemount::store::{ObjectStore, PutSource};
use common::cli::{local_blobs, Sandbox};
use common::s3::TestS3;
use common::tree::{set_mtime, small_files_tree, Rng};
use mount_support::{bounded, fuse_available, Mount};

const BIG: usize = 12 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The blob key of `key`'s cache in the store.
async fn blob_of(store: &S3Store, key: &str) -> String {
    cachemount::store::layout::resolve(store, key, &[])
        .await
        .unwrap()
        .pointer
        .blob_key()
}

async fn whole(store: &S3Store, key: &str) -> bytes::Bytes {
    let meta = store.head(key).await.unwrap();
    store.get_range(key, 0..meta.size, None).await.unwrap()
}

/// Uploads `bytes` to `key` as a multipart upload (parts of 5 MiB) when
/// `multipart`, else as one PUT: the same bytes get another ETag.
async fn upload(s3: &TestS3, key: &str, bytes: &[u8], multipart: bool) -> String {
    let tuning = S3Tuning {
        multipart_threshold: if multipart { 5 << 20 } else { u64::MAX },
        min_part_size: 5 << 20,
        ..S3Tuning::default()
    };
    let store = s3.store().await.with_tuning(tuning);
    let tmp = tempfile::NamedTempFile::new().unwrap();
    fs::write(tmp.path(), bytes).unwrap();
    store
        .put(key, PutSource::File(tmp.path().to_path_buf()))
        .await
        .unwrap()
        .version
        .etag
}

/// Reads `path` in `chunk`-sized reads with a pause between them, calling
/// `midway` once after `at` bytes.
fn slow_read(path: &Path, chunk: usize, at: usize, midway: &mut dyn FnMut()) -> Vec<u8> {
    let mut f = fs::File::open(path).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    let mut called = false;
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read of {} at {}: {e}", path.display(), out.len()));
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
        if !called && out.len() >= at {
            called = true;
            midway();
        }
    }
}

fn all_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

enum Change {
    /// Re-upload the identical bytes by the other method (SeaweedFS keeps the
    /// ETag on a self-copy, so this is how its ETag changes).
    Reupload,
    /// Mount B with a refresh interval of 0: its lifetime refresh
    /// (self-copy, REPLACE) rewrites the multipart object (moto, like AWS,
    /// gives it a new ETag).
    RefreshByMountB,
}

fn seed_scenario(test: &str, s3: TestS3, change: Change, writable: bool) {
    let mut sb = s3.sandbox();
    let src = sb.work().join("cache");
    small_files_tree(&src.join("deps"), 41, 200);
    fs::write(src.join("big.bin"), Rng::new(42).noise(BIG)).unwrap();
    sb.ok(&["save", "-q", "--key", "k", "cache"]);
    let expected = sb.dir.path().join("expected");
    fs::rename(&src, &expected).unwrap();
    let rt = runtime();
    let (blob, first_etag) = rt.block_on(async {
        let store = s3.store().await;
        let blob = blob_of(&store, "k").await;
        let bytes = whole(&store, &blob).await;
        // Start from a multipart object, as a big save to AWS would.
        let etag = upload(&s3, &blob, &bytes, true).await;
        (blob, etag)
    });
    assert!(first_etag.contains('-'), "multipart ETag: {first_etag}");
    // Mount A, with a small read-ahead so that its reads keep reaching the store.
    sb.env
        .push(("CACHEMOUNT_READAHEAD_BLOCKS".into(), "2".into()));
    let a = if writable {
        Mount::new(&sb, &["--key", "k", "--writable"])
    } else {
        Mount::new(&sb, &["--key", "k"])
    };
    sb.env.pop();
    let root = a.path().to_path_buf();
    if writable {
        fs::write(root.join("written-before"), b"before the change").unwrap();
    }
    let files = all_files(&expected);
    let (half_files, rest_files) = files.split_at(files.len() / 2);
    // A walks half of the small files and streams half of big.bin...
    for f in half_files {
        let rel = f.strip_prefix(&expected).unwrap();
        if rel == Path::new("big.bin") {
            continue;
        }
        assert!(fs::read(root.join(rel)).unwrap() == fs::read(f).unwrap());
    }
    let mut b_mount = None;
    let mut midway = || {
        let new_etag = match change {
            Change::Reupload => rt.block_on(async {
                let store = s3.store().await;
                let bytes = whole(&store, &blob).await;
                upload(&s3, &blob, &bytes, false).await
            }),
            Change::RefreshByMountB => {
                // Past the second of the upload (CopySourceIfUnmodifiedSince
                // has whole seconds).
                std::thread::sleep(Duration::from_millis(1500));
                // B: the same key in another working directory, refreshing always.
                let mut sb_b = Sandbox::new();
                sb_b.store = sb.store.clone();
                sb_b.env = sb.env.clone();
                sb_b.env
                    .push(("CACHEMOUNT_REFRESH_AFTER_SECS".into(), "0".into()));
                let b = Mount::new(&sb_b, &["--key", "k"]);
                // Both the blob and the key pointer get their lifetime
                // refreshed (the pointer's after readiness: wait for its line).
                let pointer = cachemount::store::layout::pointer_key("k").unwrap();
                let both_refreshed = |log: &str| {
                    let refreshed: Vec<&str> =
                        log.lines().filter(|l| l.contains("refreshed")).collect();
                    refreshed.iter().any(|l| l.contains(&blob))
                        && refreshed.iter().any(|l| l.contains(&pointer))
                };
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while !both_refreshed(&b.log_text()) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let log = b.log_text();
                assert!(
                    both_refreshed(&log),
                    "mount B refreshes blob and pointer: {log}"
                );
                b_mount = Some((b, sb_b));
                rt.block_on(async { s3.store().await.head(&blob).await.unwrap().version.etag })
            }
        };
        assert_ne!(new_etag, first_etag, "the change must change the ETag");
    };
    // ...the ETag changes in the middle of big.bin; A reads on.
    let big = slow_read(&root.join("big.bin"), 256 << 10, BIG / 2, &mut midway);
    assert!(
        big == fs::read(expected.join("big.bin")).unwrap(),
        "big.bin"
    );
    for f in rest_files {
        let rel = f.strip_prefix(&expected).unwrap();
        if rel == Path::new("big.bin") {
            continue;
        }
        assert!(
            fs::read(root.join(rel)).unwrap() == fs::read(f).unwrap(),
            "{}",
            rel.display()
        );
    }
    if writable {
        assert_eq!(
            fs::read(root.join("written-before")).unwrap(),
            b"before the change"
        );
        fs::write(root.join("written-after"), b"after").unwrap();
        assert_eq!(fs::read(root.join("written-after")).unwrap(), b"after");
    }
    let s = a.stats(&sb);
    assert!(s["reopens"] >= 1, "{test}: A reopened: {s:?}");
    assert!(s["precondition_failed"] >= 1, "{s:?}");
    assert_eq!(s["read_errors"], 0, "{s:?}");
    assert_eq!(s["stale_handles"], 0, "{s:?}");
    eprintln!(
        "{test}: reopens {} in {} ms (max {} ms), reads that waited {}, blocks invalidated {}",
        s["reopens"],
        s["reopen_ms"],
        s["reopen_max_ms"],
        s["reopen_waits"],
        s["invalidated_blocks"]
    );
    drop(b_mount);
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn seed_scenario_etag_changes_under_a_key_mount_seaweedfs() {
    let test = "seed_scenario_etag_changes_under_a_key_mount_seaweedfs";
    if !fuse_available(test) {
        return;
    }
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    bounded(Duration::from_secs(240), test, move || {
        seed_scenario(test, s3, Change::Reupload, false)
    });
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn seed_scenario_etag_changes_under_a_writable_mount_seaweedfs() {
    let test = "seed_scenario_etag_changes_under_a_writable_mount_seaweedfs";
    if !fuse_available(test) {
        return;
    }
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    bounded(Duration::from_secs(240), test, move || {
        seed_scenario(test, s3, Change::Reupload, true)
    });
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn seed_scenario_self_copy_refresh_by_another_mount_moto() {
    let test = "seed_scenario_self_copy_refresh_by_another_mount_moto";
    if !fuse_available(test) {
        return;
    }
    let Some(s3) = TestS3::moto_from_env(test) else {
        return;
    };
    bounded(Duration::from_secs(240), test, move || {
        seed_scenario(test, s3, Change::RefreshByMountB, false)
    });
}

/// A file whose every 4 KiB block starts with `<version> <name> <block>`.
fn tagged(version: &str, name: &str, len: usize, seed: u64) -> Vec<u8> {
    common::tree::tagged(version, name, len, 4096, seed)
}

/// The version tags in `data` read at file offset `at` (4 KiB aligned).
fn tags(data: &[u8], at: u64) -> Vec<String> {
    assert_eq!(at % 4096, 0);
    common::tree::block_versions(data, 4096)
}

fn raw_tree(root: &Path, version: &str) {
    fs::create_dir_all(root.join("dir")).unwrap();
    // Unchanged: same bytes and mtime in both versions.
    fs::write(root.join("keep.bin"), tagged("KK", "keep.bin", 6 << 20, 1)).unwrap();
    set_mtime(&root.join("keep.bin"), 1_700_000_000, 5);
    fs::write(root.join("dir/keep.txt"), b"kept").unwrap();
    set_mtime(&root.join("dir/keep.txt"), 1_700_000_000, 5);
    let (seed, tag) = if version == "v1" {
        (2, "V1")
    } else {
        (3, "V2")
    };
    fs::write(
        root.join("changed.bin"),
        tagged(tag, "changed.bin", 6 << 20, seed),
    )
    .unwrap();
    if version == "v1" {
        fs::write(root.join("gone.txt"), b"gone").unwrap();
    } else {
        fs::write(
            root.join("aa-new.bin"),
            tagged("NN", "aa-new.bin", 1 << 20, 4),
        )
        .unwrap();
        fs::write(root.join("dir/new.txt"), b"new").unwrap();
    }
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn raw_url_object_overwritten_with_other_content_mid_read() {
    let test = "raw_url_object_overwritten_with_other_content_mid_read";
    if !fuse_available(test) {
        return;
    }
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    bounded(Duration::from_secs(240), test, move || {
        let sb = s3.sandbox();
        let rt = runtime();
        let mut blobs = Vec::new();
        for v in ["v1", "v2"] {
            let src = sb.work().join("cache");
            raw_tree(&src, v);
            sb.ok(&["save", "-q", "--key", v, "cache"]);
            fs::remove_dir_all(&src).unwrap();
            blobs.push(rt.block_on(async {
                let store = s3.store().await;
                let b = blob_of(&store, v).await;
                whole(&store, &b).await
            }));
        }
        rt.block_on(upload(&s3, "raw/archive.zip", &blobs[0], false));
        let url = format!("s3://{}/{}/raw/archive.zip", s3.bucket, s3.prefix);
        let mut mb = Sandbox::new();
        mb.env = sb.env.clone();
        mb.env
            .push(("CACHEMOUNT_READAHEAD_BLOCKS".into(), "1".into()));
        let m = Mount::new(&mb, &[&url, "cache"]);
        let root = m.path().to_path_buf();
        let keep_src = tagged("KK", "keep.bin", 6 << 20, 1);
        let v2_changed = tagged("V2", "changed.bin", 6 << 20, 3);
        // Handles opened (and read from) on version 1.
        let mut keep = fs::File::open(root.join("keep.bin")).unwrap();
        let mut changed = fs::File::open(root.join("changed.bin")).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        keep.read_exact(&mut buf).unwrap();
        assert!(buf[..] == keep_src[..1 << 20]);
        changed.read_exact(&mut buf[..64 << 10]).unwrap();
        assert!(tags(&buf[..64 << 10], 0).iter().all(|t| t == "V1"));
        assert!(root.join("gone.txt").exists());

        rt.block_on(upload(&s3, "raw/archive.zip", &blobs[1], false));

        // The unchanged file reads on through the same handle (at new offsets).
        let mut rest = Vec::new();
        keep.read_to_end(&mut rest).unwrap();
        assert!(
            rest[..] == keep_src[1 << 20..],
            "keep.bin through the change"
        );
        // The changed file's old handle: version-1 blocks (from the kernel's
        // cache) or ESTALE — never a version-2 block.
        let mut stale = false;
        let mut at = 64u64 << 10;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            changed.seek(SeekFrom::Start(at)).unwrap();
            match changed.read(&mut buf[..128 << 10]) {
                Ok(0) => break,
                Ok(n) => {
                    let t = tags(&buf[..n], at);
                    assert!(
                        t.iter().all(|t| t == "V1"),
                        "old handle mixed versions at {at}: {t:?}"
                    );
                    at += n as u64;
                }
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}");
                    stale = true;
                    break;
                }
            }
        }
        assert!(stale, "the old handle of a changed file gets ESTALE");
        // A new open reads the new content, all of it version 2.
        let now = fs::read(root.join("changed.bin")).unwrap();
        assert!(now == v2_changed, "changed.bin after reopening it");
        // Removed paths vanish (the entry invalidation is asynchronous), new ones appear.
        let deadline = Instant::now() + Duration::from_secs(10);
        while root.join("gone.txt").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!root.join("gone.txt").exists(), "gone.txt vanished");
        assert_eq!(fs::read(root.join("dir/new.txt")).unwrap(), b"new");
        assert_eq!(fs::read(root.join("dir/keep.txt")).unwrap(), b"kept");
        assert!(
            fs::read(root.join("aa-new.bin")).unwrap() == tagged("NN", "aa-new.bin", 1 << 20, 4)
        );
        let mut names: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["aa-new.bin", "changed.bin", "dir", "keep.bin"]);
        let s = m.stats(&mb);
        assert_eq!(s["reopens"], 1, "{s:?}");
        assert!(s["stale_handles"] >= 1, "{s:?}");
        assert!(s["changed_files"] >= 1, "{s:?}");
    });
}

/// Reads the whole file after dropping its kernel page cache.
fn read_uncached(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut f = fs::File::open(path)?;
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn an_object_that_changes_all_the_time_ends_reads_with_eio_within_the_bound() {
    let test = "an_object_that_changes_all_the_time_ends_reads_with_eio_within_the_bound";
    if !fuse_available(test) {
        return;
    }
    let sb = Sandbox::new();
    let src = sb.work().join("cache");
    raw_tree(&src, "v1");
    sb.ok(&["save", "-q", "--key", "v1", "cache"]);
    fs::remove_dir_all(&src).unwrap();
    raw_tree(&src, "v2");
    sb.ok(&["save", "-q", "--key", "v2", "cache"]);
    fs::remove_dir_all(&src).unwrap();
    let blobs: Vec<Vec<u8>> = local_blobs(Path::new(&sb.store))
        .iter()
        .map(|p| fs::read(p).unwrap())
        .collect();
    let raw = sb.dir.path().join("raw.zip");
    fs::write(&raw, &blobs[0]).unwrap();
    // A block cache smaller than the file, and no kernel page cache (below):
    // every read reaches the store.
    let m = Mount::new(
        &sb,
        &[
            &format!("file://{}", raw.display()),
            "cache",
            "--cache-size",
            "2M",
        ],
    );
    let root = m.path().to_path_buf();
    // Replace the object every few milliseconds, alternating the two archives.
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let stop = stop.clone();
        let raw = raw.clone();
        std::thread::spawn(move || {
            let tmp = raw.with_extension("tmp");
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                fs::write(&tmp, &blobs[i % 2]).unwrap();
                fs::rename(&tmp, &raw).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let started = Instant::now();
    let r = root.clone();
    // changed.bin differs between the two: every reopen drops its kernel pages.
    let errno = bounded(
        Duration::from_secs(60),
        "reads of a changing object",
        move || {
            // A handle that read version-1 bytes may end in ESTALE (its
            // content changed): right; open again until the bound gives EIO.
            let mut stale = 0;
            for _ in 0..500 {
                match read_uncached(&r.join("changed.bin")) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ESTALE) => stale += 1,
                    Err(e) => return (e.raw_os_error(), stale),
                }
            }
            (None, stale)
        },
    );
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    eprintln!(
        "{test}: EIO after {:?} ({} ESTALE before)",
        started.elapsed(),
        errno.1
    );
    assert_eq!(errno.0, Some(libc::EIO));
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(m.daemon_alive());
    // The bound is what ended the reads: five reopens within the window, then
    // refusals (a reopen that raced another change counts against the bound
    // too, as a failed one, so fewer than five may have completed).
    let log = m.log_text();
    let limit = cachemount::fs::reopen::DEFAULT_LIMIT;
    assert!(
        log.contains(&format!(
            "keeps changing in the store ({limit} reopens within 30 s)"
        )),
        "{log}"
    );
    let s = m.stats(&sb);
    assert!(s["reopen_refused"] >= 1, "refused past the bound: {s:?}");
    assert!(
        (1..=limit as u64).contains(&s["reopens"]),
        "between one and {limit} reopens: {s:?}"
    );
}
