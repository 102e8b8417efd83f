//! The disk cache shared by the mounts of a host (issue 12), through real
//! FUSE mounts of the real binary: daemons filling one cache dir at once
//! while another is killed mid-fill (every file of every mount read right
//! after); a damaged entry fetched again, never served; a full and a
//! read-only cache dir (the mount goes on, one log line); the bound held
//! across processes; files served from it with passthrough (no FUSE read);
//! a 412 reopen served from it with no GET for unchanged files; `cache
//! stats` and `cache clear`.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::cli::Sandbox;
use common::mount::{bounded, fuse_available, Mount};
use common::s3::TestS3;
use common::tree::{small_files_tree, Rng};

/// Every regular file below `root`, sorted, relative to it.
fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path().strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// Reads every file of `expected` below `mounted` and compares; `direct`
/// opens them `O_DIRECT`, so every read reaches the daemon (not the page cache).
fn assert_reads_right(expected: &Path, mounted: &Path, direct: bool) {
    for rel in files(expected) {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(mounted.join(&rel))
            .unwrap_or_else(|e| panic!("open {}: {e}", rel.display()));
        let mut got = Vec::new();
        f.read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("read {}: {e}", rel.display()));
        assert!(
            got == fs::read(expected.join(&rel)).unwrap(),
            "{} differs",
            rel.display()
        );
    }
}

/// A sandbox whose cache `cache` (small files and one multi-frame file,
/// seeded by `seed`) is saved under `key`; returns the expected tree.
fn saved(sb: &Sandbox, key: &str, seed: u64, small: usize) -> PathBuf {
    let src = sb.work().join("cache");
    small_files_tree(&src.join("deps"), seed, small);
    fs::write(src.join("big.bin"), Rng::new(seed).noise(3 << 20)).unwrap();
    sb.ok(&["save", "-q", "--key", key, "cache"]);
    let expected = sb.dir.path().join(format!("expected-{key}"));
    fs::rename(&src, &expected).unwrap();
    expected
}

/// A sandbox sharing `first`'s store and using `cache_dir` as disk cache.
fn sharing(first: &Sandbox, cache_dir: &Path) -> Sandbox {
    let mut sb = Sandbox::new();
    sb.store = first.store.clone();
    sb.env = first.env.clone();
    sb.env.push((
        "CACHEMOUNT_CACHE_DIR".into(),
        cache_dir.display().to_string(),
    ));
    sb
}

/// The entry files of a cache dir.
fn entries(cache_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(dirs) = fs::read_dir(cache_dir.join("v1")) else {
        return out;
    };
    for d in dirs.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        if name.len() == 2 && d.file_type().unwrap().is_dir() {
            out.extend(fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

fn cache_stats(sb: &Sandbox) -> std::collections::BTreeMap<String, String> {
    sb.ok(&["cache", "stats"])
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A tmpfs of `size` at `dir` (private), unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(dir: PathBuf, size: &str) -> Tmpfs {
        fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", dir.display());
        Tmpfs(dir)
    }

    fn remount_ro(&self) {
        let ok = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount ro");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_second_mount_reads_from_the_disk_cache_with_passthrough() {
    let test = "a_second_mount_reads_from_the_disk_cache_with_passthrough";
    if !fuse_available(test) {
        return;
    }
    bounded(Duration::from_secs(120), test, move || {
        let sb = Sandbox::new();
        let expected = saved(&sb, "k", 1, 300);
        {
            let m = Mount::new(&sb, &["--key", "k"]);
            assert_reads_right(&expected, m.path(), false);
            let s = m.stats(&sb);
            assert!(s["disk_inserts"] >= 301, "{s:?}");
        }
        let m = Mount::new(&sb, &["--passthrough", "--key", "k"]);
        let before = m.stats(&sb);
        assert_reads_right(&expected, m.path(), false);
        let s = m.stats(&sb);
        assert_eq!(
            s["requests"], before["requests"],
            "no GET after mount: {s:?}"
        );
        assert_eq!(s["disk_misses"], 0, "{s:?}");
        // big.bin (3 MiB) is opened on the cache file: no FUSE read of it.
        let reads = s["op_read"];
        let mut f = fs::File::open(m.path().join("big.bin")).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        drop(f);
        let s = m.stats(&sb);
        assert_eq!(
            s["op_read"], reads,
            "passthrough: the kernel reads the cache file"
        );
        drop(m);
        let cs = cache_stats(&sb);
        assert_eq!(cs["entries"], "301", "{cs:?}");
        assert!(cs["hits"].parse::<u64>().unwrap() >= 301, "{cs:?}");
        let out = sb.ok(&["cache", "clear"]);
        assert!(out.contains("removed 301 entries"), "{out}");
        assert!(entries(&sb.disk_cache()).is_empty());
        // Only entries go: the ledger and the dirs stay.
        assert!(sb.disk_cache().join("v1/ledger").exists());
    });
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn writable_mounts_read_cached_files_through_both_overlays() {
    let test = "writable_mounts_read_cached_files_through_both_overlays";
    if !fuse_available(test) {
        return;
    }
    bounded(Duration::from_secs(120), test, move || {
        let mut sb = Sandbox::new();
        let expected = saved(&sb, "k", 2, 50);
        {
            let m = Mount::new(&sb, &["--key", "k"]);
            assert_reads_right(&expected, m.path(), false);
        }
        for overlay in ["kernel", "fuse-overlayfs"] {
            sb.env.push(("CACHEMOUNT_OVERLAY".into(), overlay.into()));
            let m = Mount::new(&sb, &["--key", "k", "--writable", "--passthrough"]);
            assert_reads_right(&expected, m.path(), false);
            fs::write(m.path().join("big.bin"), b"changed").unwrap();
            assert_eq!(fs::read(m.path().join("big.bin")).unwrap(), b"changed");
            let s = m.stats(&sb);
            assert_eq!(s["disk_misses"], 0, "{overlay}: {s:?}");
            drop(m);
            sb.env.pop();
        }
    });
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn daemons_fill_one_cache_at_once_while_one_is_killed() {
    let test = "daemons_fill_one_cache_at_once_while_one_is_killed";
    if !fuse_available(test) {
        return;
    }
    bounded(Duration::from_secs(200), test, move || {
        let a = Sandbox::new();
        let shared = a.dir.path().join("shared-cache");
        let a = sharing(&a, &shared);
        let e1 = saved(&a, "k1", 3, 400);
        let b = sharing(&a, &shared);
        let e2 = saved(&b, "k2", 4, 400);
        let c = sharing(&a, &shared);
        let m1 = Mount::new(&a, &["--key", "k1"]);
        let m2 = Mount::new(&b, &["--key", "k2"]);
        let m3 = Mount::new(&c, &["--key", "k1"]);
        let (p3, x3) = (m3.path().to_path_buf(), e1.clone());
        // The third reads until it is killed (its reads then fail: fine).
        let reader = std::thread::spawn(move || {
            for rel in files(&x3) {
                let _ = fs::read(p3.join(rel));
            }
        });
        let (p1, p2) = (m1.path().to_path_buf(), m2.path().to_path_buf());
        let (x1, x2) = (e1.clone(), e2.clone());
        let t1 = std::thread::spawn(move || assert_reads_right(&x1, &p1, false));
        let t2 = std::thread::spawn(move || assert_reads_right(&x2, &p2, false));
        std::thread::sleep(Duration::from_millis(300));
        unsafe { libc::kill(m3.pid as i32, libc::SIGKILL) };
        t1.join().unwrap();
        t2.join().unwrap();
        let _ = reader.join();
        drop((m1, m2, m3));
        // Fresh daemons read every file right, from the cache where it has them.
        for (sb, key, expected) in [(&a, "k1", &e1), (&b, "k2", &e2)] {
            let m = Mount::new(sb, &["--key", key]);
            assert_reads_right(expected, m.path(), false);
            let s = m.stats(sb);
            assert_eq!(s["disk_damaged"], 0, "{s:?}");
            assert!(s["disk_hits"] > 0, "{s:?}");
        }
        // The killed daemon's temporary files were swept.
        let tmp: Vec<_> = fs::read_dir(shared.join("v1/tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "{tmp:?}");
    });
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_damaged_entry_is_fetched_again_never_served() {
    let test = "a_damaged_entry_is_fetched_again_never_served";
    if !fuse_available(test) {
        return;
    }
    bounded(Duration::from_secs(120), test, move || {
        let sb = Sandbox::new();
        let expected = saved(&sb, "k", 5, 40);
        {
            let m = Mount::new(&sb, &["--key", "k"]);
            assert_reads_right(&expected, m.path(), false);
        }
        let all = entries(&sb.disk_cache());
        assert_eq!(all.len(), 41);
        // Flip one byte in every entry, and cut one short.
        for p in &all {
            let mut bytes = fs::read(p).unwrap();
            bytes[0] ^= 0xff;
            fs::write(p, &bytes).unwrap();
        }
        let m = Mount::new(&sb, &["--key", "k"]);
        assert_reads_right(&expected, m.path(), false);
        let s = m.stats(&sb);
        assert_eq!(s["disk_damaged"], 41, "{s:?}");
        assert!(s["requests"] > 1, "fetched again: {s:?}");
        assert!(m.log_text().contains("is damaged"));
    });
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_full_cache_dir_degrades_to_memory_with_one_log_line() {
    let test = "a_full_cache_dir_degrades_to_memory_with_one_log_line";
    if !fuse_available(test) {
        return;
    }
    bounded(Duration::from_secs(120), test, move || {
        let sb0 = Sandbox::new();
        let dir = sb0.dir.path().join("small");
        let tmpfs = Tmpfs::new(dir.clone(), "4m");
        let sb = sharing(&sb0, &dir);
        let expected = saved(&sb, "k", 6, 300);
        let m = Mount::new(&sb, &["--key", "k"]);
        // Fill the file system behind the cache's back.
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}/filler", dir.display()))
            .stderr(std::process::Stdio::null())
            .status();
        assert_reads_right(&expected, m.path(), false);
        let log = m.log_text();
        assert_eq!(
            log.matches("cannot write to the disk cache").count(),
            1,
            "{log}"
        );
        drop(m);
        drop(tmpfs);
    });
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_read_only_cache_dir_serves_its_entries_and_fills_nothing() {
    let test = "a_read_only_cache_dir_serves_its_entries_and_fills_nothing";
    if !fuse_available(test) {
        return;
    }
    bounded(Duration::from_secs(120), test, move || {
        let sb0 = Sandbox::new();
        let dir = sb0.dir.path().join("ro");
        let tmpfs = Tmpfs::new(dir.clone(), "64m");
        let sb = sharing(&sb0, &dir);
        let expected = saved(&sb, "k", 7, 60);
        {
            let m = Mount::new(&sb, &["--key", "k"]);
            assert_reads_right(&expected, m.path(), false);
        }
        tmpfs.remount_ro();
        let m = Mount::new(&sb, &["--passthrough", "--key", "k"]);
        let before = m.stats(&sb);
        assert_reads_right(&expected, m.path(), false);
        let s = m.stats(&sb);
        assert_eq!(s["requests"], before["requests"], "{s:?}");
        assert!(m.log_text().contains("is read-only"), "{}", m.log_text());
        drop(m);
        // An empty read-only dir: no cache at all, the mount still works.
        let empty = sb0.dir.path().join("ro-empty");
        let t2 = Tmpfs::new(empty.clone(), "1m");
        t2.remount_ro();
        let sb2 = sharing(&sb, &empty);
        let m = Mount::new(&sb2, &["--key", "k"]);
        assert_reads_right(&expected, m.path(), false);
        assert!(
            m.log_text().contains("in-memory cache only"),
            "{}",
            m.log_text()
        );
        drop(m);
        drop((t2, tmpfs));
    });
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn the_bound_holds_across_processes() {
    let test = "the_bound_holds_across_processes";
    if !fuse_available(test) {
        return;
    }
    bounded(Duration::from_secs(150), test, move || {
        let sb0 = Sandbox::new();
        let shared = sb0.dir.path().join("shared-cache");
        let mut a = sharing(&sb0, &shared);
        a.env
            .push(("CACHEMOUNT_DISK_CACHE_SIZE".into(), "1M".into()));
        let e1 = saved(&a, "k1", 8, 500);
        let mut b = sharing(&a, &shared);
        b.env = a.env.clone();
        let e2 = saved(&b, "k2", 9, 500);
        let m1 = Mount::new(&a, &["--key", "k1"]);
        let m2 = Mount::new(&b, &["--key", "k2"]);
        let (p1, p2) = (m1.path().to_path_buf(), m2.path().to_path_buf());
        let (x1, x2) = (e1.clone(), e2.clone());
        let t1 = std::thread::spawn(move || assert_reads_right(&x1, &p1, false));
        let t2 = std::thread::spawn(move || assert_reads_right(&x2, &p2, false));
        t1.join().unwrap();
        t2.join().unwrap();
        let cs = cache_stats(&a);
        let bytes: u64 = cs["bytes"].parse().unwrap();
        assert!(bytes <= 1 << 20, "{cs:?}");
        assert!(cs["evicted"].parse::<u64>().unwrap() > 0, "{cs:?}");
        let on_disk: u64 = entries(&shared)
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert!(on_disk <= 1 << 20, "{on_disk}");
    });
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_412_reopen_is_served_from_the_disk_cache_seaweedfs() {
    let test = "a_412_reopen_is_served_from_the_disk_cache_seaweedfs";
    if !fuse_available(test) {
        return;
    }
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    bounded(Duration::from_secs(200), test, move || {
        let sb = s3.sandbox();
        let src = sb.work().join("cache");
        small_files_tree(&src.join("deps"), 10, 100);
        fs::write(src.join("unread.bin"), Rng::new(10).noise(2 << 20)).unwrap();
        sb.ok(&["save", "-q", "--key", "k", "cache"]);
        let expected = sb.dir.path().join("expected");
        fs::rename(&src, &expected).unwrap();
        let m = Mount::new(&sb, &["--key", "k"]);
        let root = m.path().to_path_buf();
        let deps = expected.join("deps");
        assert_reads_right(&deps, &root.join("deps"), false);
        // The blob's ETag changes: re-upload of its identical bytes.
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            use cachemount::store::{ObjectStore, PutSource};
            let store = s3.store().await;
            let blob = cachemount::store::layout::resolve(&store, "k", &[])
                .await
                .unwrap()
                .pointer
                .blob_key();
            let meta = store.head(&blob).await.unwrap();
            let bytes = store.get_range(&blob, 0..meta.size, None).await.unwrap();
            let tmp = tempfile::NamedTempFile::new().unwrap();
            fs::write(tmp.path(), &bytes).unwrap();
            let store = store.with_tuning(cachemount::store::s3::S3Tuning {
                multipart_threshold: 1 << 20,
                min_part_size: 5 << 20,
                ..Default::default()
            });
            store
                .put(&blob, PutSource::File(tmp.path().to_path_buf()))
                .await
                .unwrap();
        });
        // The unread file's GET gets the 412; the mount reopens.
        assert!(
            fs::read(root.join("unread.bin")).unwrap()
                == fs::read(expected.join("unread.bin")).unwrap()
        );
        let s = m.stats(&sb);
        assert!(s["reopens"] >= 1, "{s:?}");
        // Every unchanged file again, past the page cache: no GET at all.
        assert_reads_right(&deps, &root.join("deps"), true);
        let after = m.stats(&sb);
        assert_eq!(after["requests"], s["requests"], "{after:?}");
        assert!(after["disk_hits"] >= s["disk_hits"] + 100, "{after:?}");
        assert_eq!(after["read_errors"], 0, "{after:?}");
    });
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_file_filed_while_open_is_read_right_by_later_opens_under_passthrough() {
    let test = "a_file_filed_while_open_is_read_right_by_later_opens_under_passthrough";
    if !fuse_available(test) {
        return;
    }
    bounded(Duration::from_secs(120), test, move || {
        let sb = Sandbox::new();
        let expected = saved(&sb, "k", 5, 10);
        let want = fs::read(expected.join("big.bin")).unwrap();
        let m = Mount::new(&sb, &["--passthrough", "--key", "k"]);
        let big = m.path().join("big.bin");
        let read_whole = |f: &mut fs::File| {
            let mut got = Vec::new();
            f.read_to_end(&mut got).unwrap();
            assert!(got == want, "big.bin differs");
        };
        // The first handle reads big.bin through FUSE, which files it in
        // the disk cache; it stays open.
        let mut first = fs::File::open(&big).unwrap();
        read_whole(&mut first);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while m.stats(&sb)["disk_inserts"] == 0 {
            assert!(std::time::Instant::now() < deadline, "big.bin never filed");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Opens while it is open read the way it does (the kernel fails a
        // passthrough open of a file open for FUSE reads with EIO).
        let mut second =
            fs::File::open(&big).unwrap_or_else(|e| panic!("open beside an open handle: {e}"));
        read_whole(&mut second);
        let released = m.stats(&sb)["op_release"];
        drop((first, second));
        while m.stats(&sb)["op_release"] < released + 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "no release reached the daemon"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Once every handle is closed, the next open is passthrough: with
        // the page cache dropped, big.bin is read with no FUSE read.
        fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
        let reads = m.stats(&sb)["op_read"];
        let mut third = fs::File::open(&big).unwrap();
        read_whole(&mut third);
        let mut fourth = fs::File::open(&big).unwrap();
        read_whole(&mut fourth);
        drop((third, fourth));
        assert_eq!(
            m.stats(&sb)["op_read"],
            reads,
            "passthrough once the FUSE handles closed"
        );
    });
}
