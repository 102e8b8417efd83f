//! `restore` and the host's disk cache (issue 12): a key's large files that
//! a mount left in the disk cache are copied from it, checked, and only the
//! rest is downloaded — also for another key that shares them; small cached
//! files are downloaded all the same (a few GETs carry thousands of them,
//! faster than opening each in the cache); a damaged
//! entry is downloaded instead, never restored; `--no-disk-cache` downloads
//! everything. Without FUSE: a restore of one saved path downloads only
//! that path's entries.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::cli::Sandbox;
use common::mount::{bounded, fuse_available, Mount};
use common::s3::TestS3;
use common::tree::{assert_same_tree, observe, small_files_tree, Rng};

/// Size of `big.bin`, the file the tests' mounts read into the disk cache.
const BIG: usize = 4 << 20;

/// Saves a tree of 200 small files and one `BIG` file of noise under `key`
/// and returns the expected tree.
fn saved(sb: &Sandbox, key: &str, seed: u64) -> std::path::PathBuf {
    let src = sb.work().join("cache");
    small_files_tree(&src.join("deps"), seed, 200);
    fs::write(src.join("big.bin"), Rng::new(7).noise(BIG)).unwrap();
    sb.ok(&["save", "-q", "--key", key, "cache"]);
    let expected = sb.dir.path().join(format!("expected-{key}"));
    fs::rename(&src, &expected).unwrap();
    expected
}

/// Mounts `key`, reads `files` (paths below the mount) and unmounts: the
/// mount files what it read in the disk cache.
fn read_through_a_mount(sb: &Sandbox, key: &str, files: &[&str]) {
    let m = Mount::new(sb, &["--key", key]);
    let root = m.path().to_path_buf();
    let files: Vec<String> = files.iter().map(|f| f.to_string()).collect();
    bounded(
        Duration::from_secs(60),
        "reads through the mount",
        move || {
            for f in &files {
                fs::read(root.join(f)).unwrap();
            }
        },
    );
    let s = m.stats(sb);
    assert!(s["disk_inserts"] >= 1, "the mount filed nothing: {s:?}");
    sb.ok(&["umount", &m.path().display().to_string()]);
}

/// `restore --json` of `key` into a fresh `cache` (extra args first).
fn restore(sb: &Sandbox, key: &str, extra: &[&str]) -> serde_json::Value {
    let _ = fs::remove_dir_all(sb.work().join("cache"));
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["restore", "--key", key]);
    serde_json::from_str(&sb.ok(&args)).unwrap()
}

fn n(report: &serde_json::Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {report}"))
}

/// A sandbox on the test's S3 prefix, or None (a printed skip) without
/// FUSE or the S3 server.
fn fuse_and_s3(test: &str) -> Option<Sandbox> {
    if !fuse_available(test) {
        return None;
    }
    Some(TestS3::from_env(test)?.sandbox())
}

/// The entry files of a disk cache dir.
fn entries(cache_dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for d in fs::read_dir(cache_dir.join("v1")).unwrap().flatten() {
        if d.file_name().len() == 2 && d.file_type().unwrap().is_dir() {
            out.extend(fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_restore_copies_cached_files_and_downloads_only_the_rest() {
    let test = "a_restore_copies_cached_files_and_downloads_only_the_rest";
    let Some(sb) = fuse_and_s3(test) else {
        return;
    };
    let expected = saved(&sb, "a", 1);
    read_through_a_mount(&sb, "a", &["big.bin", "deps/pkg-0000/lib/sub-0/file-0.js"]);
    assert!(entries(&sb.disk_cache()).len() >= 2);
    let r = restore(&sb, "a", &[]);
    assert_same_tree(&expected, &sb.work().join("cache"));
    // big.bin only: the small file is downloaded with its neighbours.
    assert_eq!(n(&r, "disk_cache_files"), 1, "{r}");
    assert_eq!(n(&r, "disk_cache_bytes"), BIG as u64, "{r}");
    // The noise does not compress: had big.bin been downloaded, the
    // restore would have fetched more than BIG bytes.
    let downloaded = n(&r, "bytes_downloaded");
    assert!(
        downloaded < n(&r, "archive_size") - BIG as u64 / 2,
        "downloaded {downloaded} bytes: {r}"
    );
    // Another key holding the same big.bin (and other small files) takes
    // it from the disk cache too: entries are keyed by content.
    let expected_b = saved(&sb, "b", 2);
    let r = restore(&sb, "b", &[]);
    assert_same_tree(&expected_b, &sb.work().join("cache"));
    assert_eq!(n(&r, "disk_cache_files"), 1, "{r}");
    assert!(n(&r, "bytes_downloaded") < n(&r, "archive_size") - BIG as u64 / 2);
    // Turned off, it downloads everything.
    let r = restore(&sb, "a", &["--no-disk-cache"]);
    assert_same_tree(&expected, &sb.work().join("cache"));
    assert_eq!(n(&r, "disk_cache_files"), 0, "{r}");
    assert!(n(&r, "bytes_downloaded") > BIG as u64, "{r}");
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_damaged_disk_cache_entry_is_downloaded_never_restored() {
    let test = "a_damaged_disk_cache_entry_is_downloaded_never_restored";
    let Some(sb) = fuse_and_s3(test) else {
        return;
    };
    let expected = saved(&sb, "a", 3);
    read_through_a_mount(&sb, "a", &["big.bin", "deps/pkg-0000/lib/sub-0/file-0.js"]);
    // Read-ahead may file a few neighbours too.
    let all = entries(&sb.disk_cache());
    assert!(all.len() >= 2, "{all:?}");
    // Flip one byte of each: same size, same checksum attribute.
    for p in &all {
        let mut bytes = fs::read(p).unwrap();
        bytes[0] ^= 0xff;
        fs::write(p, &bytes).unwrap();
    }
    let r = restore(&sb, "a", &[]);
    assert_same_tree(&expected, &sb.work().join("cache"));
    assert_eq!(n(&r, "disk_cache_files"), 0, "{r}");
    assert!(n(&r, "bytes_downloaded") > BIG as u64, "{r}");
    // Only big.bin was checked (and found damaged): the small entries are
    // downloaded without being read.
    let stats = sb.ok(&["cache", "stats"]);
    assert!(stats.contains("damaged 1"), "{stats}");
}

#[test]
fn restoring_one_saved_path_downloads_only_its_entries() {
    let test = "restoring_one_saved_path_downloads_only_its_entries";
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    let sb = s3.sandbox();
    small_files_tree(&sb.work().join("small"), 4, 50);
    fs::create_dir_all(sb.work().join("large")).unwrap();
    fs::write(sb.work().join("large/noise.bin"), Rng::new(5).noise(BIG)).unwrap();
    sb.ok(&["save", "-q", "--key", "k", "small", "large"]);
    fs::rename(sb.work().join("small"), sb.dir.path().join("small")).unwrap();
    fs::remove_dir_all(sb.work().join("large")).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&sb.ok(&["--json", "restore", "--key", "k", "small"])).unwrap();
    assert_same_tree(&sb.dir.path().join("small"), &sb.work().join("small"));
    assert!(
        !sb.work().join("large").exists(),
        "only small was asked for"
    );
    let downloaded = n(&r, "bytes_downloaded");
    assert!(
        downloaded < BIG as u64 / 4,
        "downloaded {downloaded} bytes of a {} byte archive for its small path",
        n(&r, "archive_size")
    );
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_restore_of_more_cached_files_than_it_may_open_at_once_succeeds() {
    let test = "a_restore_of_more_cached_files_than_it_may_open_at_once_succeeds";
    let Some(sb) = fuse_and_s3(test) else {
        return;
    };
    // Files a restore takes from the cache: over 1 MiB of archive bytes.
    let src = sb.work().join("cache");
    for i in 0..70 {
        let dir = src.join(format!("lib-{}", i % 7));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join(format!("{i}.so")),
            Rng::new(i).noise((1 << 20) + 1024),
        )
        .unwrap();
    }
    sb.ok(&["save", "-q", "--key", "a", "cache"]);
    let expected = sb.dir.path().join("expected-a");
    fs::rename(&src, &expected).unwrap();
    let every: Vec<String> = observe(&expected)
        .into_iter()
        .filter(|(_, o)| o.kind == "file")
        .map(|(p, _)| {
            p.strip_prefix(&expected)
                .unwrap_or(&p)
                .display()
                .to_string()
        })
        .collect();
    let names: Vec<&str> = every.iter().map(String::as_str).collect();
    read_through_a_mount(&sb, "a", &names);
    // 70 cached files, at most 64 descriptors: the restore opens each
    // cached file only while it copies it.
    let mut cmd = sb.command(&["--json", "restore", "--key", "a"]);
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = common::cli::run_bounded(cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "restore failed: {stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_same_tree(&expected, &sb.work().join("cache"));
    assert_eq!(n(&r, "disk_cache_files"), 70, "{r}");
}
