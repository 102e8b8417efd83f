//! The mount's lifecycle and its refusals, on real FUSE: read-only (EROFS),
//! `umount` ends the daemon, a SIGKILLed daemon's stale mount is cleaned by
//! `umount`, two mounts at once, SIGTERM, and every bad input named in the
//! issue (each a clear error, non-zero exit, nothing left mounted).

mod common;
use common::mount as mount_support;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::cli::{local_blobs, Sandbox};
use common::tree::{assert_same_tree, feature_tree, Rng};
use mount_support::{bounded, fuse_available, is_mounted, mount_fails, run_bounded, Mount};

/// A sandbox with `cache/` saved under `key`, then moved to `expected/`.
fn saved(key: &str, seed: u64) -> Sandbox {
    let sb = Sandbox::new();
    let src = sb.work().join("cache");
    feature_tree(&src, seed);
    sb.ok(&["save", "--key", key, "cache"]);
    fs::rename(&src, sb.dir.path().join("expected")).unwrap();
    sb
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn mount_is_read_only_and_umount_ends_the_daemon() {
    if !fuse_available("mount_is_read_only_and_umount_ends_the_daemon") {
        return;
    }
    let sb = saved("ro", 1);
    let before: Vec<_> = local_blobs(Path::new(&sb.store))
        .iter()
        .map(|p| fs::read(p).unwrap())
        .collect();
    let m = Mount::new(&sb, &["--key", "ro"]);
    let root = m.path().to_path_buf();
    assert!(m.stdout.contains("mounted ro at"), "{}", m.stdout);
    let r = root.clone();
    bounded(Duration::from_secs(60), "mutations", move || {
        assert_eq!(
            errno_of(fs::write(r.join("new-file"), b"x")),
            Some(libc::EROFS)
        );
        assert_eq!(
            errno_of(
                fs::OpenOptions::new()
                    .append(true)
                    .open(r.join("one-frame.js"))
            ),
            Some(libc::EROFS)
        );
        assert_eq!(
            errno_of(fs::create_dir(r.join("new-dir"))),
            Some(libc::EROFS)
        );
        assert_eq!(
            errno_of(fs::remove_file(r.join("script.sh"))),
            Some(libc::EROFS)
        );
        assert_eq!(
            errno_of(fs::remove_dir_all(r.join("empty-dir"))),
            Some(libc::EROFS)
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            errno_of(fs::set_permissions(
                r.join("script.sh"),
                fs::Permissions::from_mode(0o600)
            )),
            Some(libc::EROFS)
        );
        assert_eq!(
            errno_of(fs::rename(r.join("script.sh"), r.join("moved.sh"))),
            Some(libc::EROFS)
        );
        assert_eq!(
            errno_of(xattr::set(r.join("script.sh"), "user.x", b"1")),
            Some(libc::EROFS)
        );
    });
    // The hidden counters are not part of the tree.
    assert!(!xattr::list(&root)
        .unwrap()
        .any(|n| n.to_string_lossy().contains("cachemount")));
    let after: Vec<_> = local_blobs(Path::new(&sb.store))
        .iter()
        .map(|p| fs::read(p).unwrap())
        .collect();
    assert_eq!(before, after, "the store changed");

    let out = sb.ok(&["umount", &root.display().to_string()]);
    assert!(out.contains("unmounted"), "{out}");
    assert!(!is_mounted(&root));
    assert!(
        m.wait_daemon_gone(Duration::from_secs(10)),
        "the daemon did not exit after umount"
    );
    // umount of something not mounted is an error.
    let (_, err) = sb.fails(&["umount", &root.display().to_string()]);
    assert!(err.contains("not mounted"), "{err}");
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn killed_daemon_leaves_a_stale_mount_that_umount_cleans() {
    if !fuse_available("killed_daemon_leaves_a_stale_mount_that_umount_cleans") {
        return;
    }
    let sb = saved("kill", 2);
    let m = Mount::new(&sb, &["--key", "kill"]);
    let root = m.path().to_path_buf();
    unsafe { libc::kill(m.pid as libc::pid_t, libc::SIGKILL) };
    assert!(m.wait_daemon_gone(Duration::from_secs(10)));
    let r = root.clone();
    // statfs always reaches the (dead) daemon; stat may come from the attribute cache.
    let e = bounded(
        Duration::from_secs(20),
        "statfs of a stale mount",
        move || {
            let c = std::ffi::CString::new(r.as_os_str().as_encoded_bytes()).unwrap();
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
            (rc != 0)
                .then(|| std::io::Error::last_os_error().raw_os_error())
                .flatten()
        },
    );
    // ENOTCONN, or ECONNABORTED when the kernel aborted requests in flight.
    assert!(
        matches!(e, Some(libc::ENOTCONN | libc::ECONNABORTED)),
        "{e:?}"
    );
    // Mounting again over it says what to do.
    let (_, err) = mount_fails(&sb, &["--key", "kill"]);
    assert!(err.contains("stale") && err.contains("umount"), "{err}");
    sb.ok(&["umount", &root.display().to_string()]);
    assert!(!is_mounted(&root));
    assert!(fs::metadata(&root).unwrap().is_dir());
    // And it mounts again.
    let m2 = Mount::new(&sb, &["--key", "kill"]);
    let expected = sb.dir.path().join("expected");
    let p = m2.path().to_path_buf();
    bounded(Duration::from_secs(60), "compare", move || {
        assert_same_tree(&expected, &p)
    });
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn two_mounts_of_different_keys_at_once_and_sigterm() {
    if !fuse_available("two_mounts_of_different_keys_at_once_and_sigterm") {
        return;
    }
    let sb = Sandbox::new();
    for (key, dir, seed) in [("one", "a", 3), ("two", "b", 4)] {
        let src = sb.work().join(dir);
        feature_tree(&src, seed);
        fs::write(src.join("which"), key).unwrap();
        sb.ok(&["save", "--key", key, dir]);
        fs::rename(&src, sb.dir.path().join(format!("expected-{dir}"))).unwrap();
    }
    let m1 = Mount::new(&sb, &["--key", "one"]);
    let m2 = Mount::new(&sb, &["--key", "two"]);
    assert_ne!(m1.pid, m2.pid);
    let (a, b) = (m1.path().to_path_buf(), m2.path().to_path_buf());
    let (ea, eb) = (
        sb.dir.path().join("expected-a"),
        sb.dir.path().join("expected-b"),
    );
    bounded(Duration::from_secs(60), "two mounts", move || {
        assert_eq!(fs::read(a.join("which")).unwrap(), b"one");
        assert_eq!(fs::read(b.join("which")).unwrap(), b"two");
        assert_same_tree(&ea, &a);
        assert_same_tree(&eb, &b);
    });
    // SIGTERM unmounts and exits.
    unsafe { libc::kill(m1.pid as libc::pid_t, libc::SIGTERM) };
    assert!(
        m1.wait_daemon_gone(Duration::from_secs(10)),
        "SIGTERM did not stop the daemon"
    );
    assert!(!is_mounted(m1.path()));
    assert!(is_mounted(m2.path()));
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn one_daemon_serves_several_paths() {
    if !fuse_available("one_daemon_serves_several_paths") {
        return;
    }
    let sb = Sandbox::new();
    for d in ["x", "y"] {
        feature_tree(&sb.work().join(d), 5);
    }
    sb.ok(&["save", "--key", "multi", "x", "y"]);
    for d in ["x", "y"] {
        fs::rename(sb.work().join(d), sb.dir.path().join(format!("exp-{d}"))).unwrap();
    }
    let m = Mount::new(&sb, &["--key", "multi", "x", "y"]);
    assert_eq!(m.paths.len(), 2, "{}", m.stdout);
    for d in ["x", "y"] {
        let (e, a) = (sb.dir.path().join(format!("exp-{d}")), sb.work().join(d));
        bounded(Duration::from_secs(60), "compare", move || {
            assert_same_tree(&e, &a)
        });
    }
    sb.ok(&["umount", &m.paths[0].display().to_string()]);
    assert!(
        m.daemon_alive(),
        "the daemon must keep serving its other path"
    );
    sb.ok(&["umount", &m.paths[1].display().to_string()]);
    assert!(m.wait_daemon_gone(Duration::from_secs(10)));
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn bad_inputs_fail_clearly_and_mount_nothing() {
    if !fuse_available("bad_inputs_fail_clearly_and_mount_nothing") {
        return;
    }
    let sb = saved("good", 6);
    let target = sb.work().join("cache");
    let check_nothing_mounted = || assert!(!is_mounted(&target), "something was left mounted");

    let (code, err) = mount_fails(&sb, &["--key", "no-such-key"]);
    assert_eq!(code, 3, "a cache miss exits 3: {err}");
    assert!(err.contains("no-such-key"), "{err}");
    check_nothing_mounted();

    let (_, err) = mount_fails(&sb, &["ftp://nowhere/x.zip", "cache"]);
    assert!(
        err.to_lowercase().contains("url") || err.contains("ftp"),
        "{err}"
    );
    check_nothing_mounted();

    let (_, err) = mount_fails(&sb, &["file:///nonexistent/archive.zip", "cache"]);
    assert!(err.contains("archive.zip"), "{err}");

    let mut cmd = sb.command(&[
        "--store",
        "s3://test-bucket/x",
        "--endpoint-url",
        "http://127.0.0.1:1",
        "mount",
        "--key",
        "k",
        "cache",
    ]);
    cmd.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1");
    let out = run_bounded(cmd, Duration::from_secs(120));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("127.0.0.1:1") || err.to_lowercase().contains("reach"),
        "{err}"
    );
    check_nothing_mounted();

    // No /dev/fuse: names the package and the module.
    let mut cmd = sb.command(&["mount", "--key", "good"]);
    cmd.env("CACHEMOUNT_DEV_FUSE", "/nonexistent/fuse");
    let out = run_bounded(cmd, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("fuse3") && err.contains("modprobe"),
        "{err}"
    );
    check_nothing_mounted();

    // A non-empty target needs --force.
    fs::create_dir_all(&target).unwrap();
    fs::write(target.join("local-file"), b"mine").unwrap();
    let (_, err) = mount_fails(&sb, &["--key", "good"]);
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    check_nothing_mounted();
    {
        let m = Mount::new(&sb, &["--force", "--key", "good"]);
        assert!(!m.path().join("local-file").exists());
        // Already mounted: a clear error.
        let (_, err) = mount_fails(&sb, &["--force", "--key", "good"]);
        assert!(err.contains("already"), "{err}");
    }
    assert_eq!(fs::read(target.join("local-file")).unwrap(), b"mine");
    fs::remove_dir_all(&target).unwrap();

    // A corrupt index: the mount refuses, naming the problem.
    let blob = local_blobs(Path::new(&sb.store)).pop().unwrap();
    let bytes = fs::read(&blob).unwrap();
    let comment_at = find(&bytes, b"cachemount:index:v1:").unwrap();
    let comment = String::from_utf8_lossy(&bytes[comment_at..]).into_owned();
    let fields: Vec<&str> = comment.split(':').collect();
    let (off, len): (usize, usize) = (fields[3].parse().unwrap(), fields[4].parse().unwrap());
    let mut bad = bytes.clone();
    bad[off + len / 2] ^= 0xff;
    fs::write(&blob, &bad).unwrap();
    let (_, err) = mount_fails(&sb, &["--key", "good"]);
    assert!(err.contains("index") || err.contains("corrupt"), "{err}");
    check_nothing_mounted();
    fs::write(&blob, &bytes).unwrap();
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn corrupt_frame_fails_only_that_read() {
    if !fuse_available("corrupt_frame_fails_only_that_read") {
        return;
    }
    let sb = saved("frames", 7);
    let blob = local_blobs(Path::new(&sb.store)).pop().unwrap();
    let index = cachemount::archive::open_file(&fs::File::open(&blob).unwrap()).unwrap();
    let e = index
        .entries
        .iter()
        .find(|e| e.name.ends_with(b"many-frames.bin"))
        .unwrap();
    let cachemount::archive::DataOffset::Data(off) = e.offset else {
        panic!("own archives have data offsets")
    };
    let (start, _) = e.frame_span(1);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[(off + start) as usize + e.frames[1].compressed_len as usize / 2] ^= 0x55;
    fs::write(&blob, &bytes).unwrap();

    let m = Mount::new(&sb, &["--key", "frames"]);
    let root = m.path().to_path_buf();
    let expected = sb.dir.path().join("expected");
    bounded(
        Duration::from_secs(60),
        "reads around a corrupt frame",
        move || {
            let f = fs::File::open(root.join("many-frames.bin")).unwrap();
            let mut buf = vec![0u8; 4096];
            use std::os::unix::fs::FileExt;
            // Frame 0 is fine, frame 1 is not.
            f.read_exact_at(&mut buf, 0).unwrap();
            assert_eq!(
                f.read_exact_at(&mut buf, (1 << 20) + 10)
                    .err()
                    .and_then(|e| e.raw_os_error()),
                Some(libc::EIO)
            );
            // Everything else still reads right.
            assert_eq!(
                fs::read(root.join("one-frame.js")).unwrap(),
                fs::read(expected.join("one-frame.js")).unwrap()
            );
            f.read_exact_at(&mut buf, 3 << 20).unwrap();
        },
    );
    assert!(m.daemon_alive());
    let log = m.log_text();
    assert!(
        log.contains("many-frames.bin") && log.contains("corrupt"),
        "the log does not name the file: {log}"
    );
    assert!(
        log.contains("fetching it once more"),
        "a corrupt frame is fetched again before it fails: {log}"
    );
    let stats = m.stats(&sb);
    assert!(stats["corrupt_blocks"] >= 1, "{stats:?}");
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn stats_reports_counters() {
    if !fuse_available("stats_reports_counters") {
        return;
    }
    let sb = Sandbox::new();
    let src = sb.work().join("cache");
    fs::create_dir_all(&src).unwrap();
    let data = Rng::new(8).text(12 << 20);
    fs::File::create(src.join("seq.txt"))
        .unwrap()
        .write_all(&data)
        .unwrap();
    sb.ok(&["save", "--key", "s", "cache"]);
    fs::remove_dir_all(&src).unwrap();
    let m = Mount::new(&sb, &["--key", "s"]);
    let p = m.path().join("seq.txt");
    let got = bounded(Duration::from_secs(60), "sequential read", move || {
        fs::read(p).unwrap()
    });
    assert!(got == data);
    let s = m.stats(&sb);
    for k in [
        "requests",
        "bytes_fetched",
        "cache_hits",
        "cache_misses",
        "readahead_hits",
        "cache_bytes",
    ] {
        assert!(s.contains_key(k), "missing {k}: {s:?}");
    }
    assert!(
        s["readahead_hits"] > 0,
        "a sequential read should hit read-ahead: {s:?}"
    );
    assert!(
        s["requests"] < 12,
        "sequential read should merge GETs: {s:?}"
    );
    let (_, err) = sb.fails(&["stats", &sb.work().display().to_string()]);
    assert!(err.contains("not the root of a cachemount mount"), "{err}");
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn object_replaced_under_the_mount_is_reopened_and_read_from_the_new_version() {
    if !fuse_available("object_replaced_under_the_mount_is_reopened_and_read_from_the_new_version")
    {
        return;
    }
    let sb = saved("v1", 9);
    let raw = sb.dir.path().join("raw.zip");
    fs::copy(local_blobs(Path::new(&sb.store)).pop().unwrap(), &raw).unwrap();
    let url = format!("file://{}", raw.display());
    let m = Mount::new(&sb, &[&url, "cache"]);
    let root = m.path().to_path_buf();
    let r = root.clone();
    bounded(
        Duration::from_secs(30),
        "read before the change",
        move || fs::read(r.join("one-frame.js")).unwrap(),
    );
    // Another archive replaces the object (a new file renamed over it: new ETag).
    let other = saved("v2", 10);
    let tmp = sb.dir.path().join("raw.zip.tmp");
    fs::copy(local_blobs(Path::new(&other.store)).pop().unwrap(), &tmp).unwrap();
    fs::rename(&tmp, &raw).unwrap();
    let r = root.clone();
    let got = bounded(
        Duration::from_secs(30),
        "read after the change",
        move || fs::read(r.join("many-frames.bin")).unwrap(),
    );
    let expected = fs::read(other.dir.path().join("expected/many-frames.bin")).unwrap();
    assert!(got == expected, "a new open reads the new version");
    assert!(m.daemon_alive());
    let log = m.log_text();
    assert!(log.contains("changed") && log.contains("reopened"), "{log}");
    let s = m.stats(&sb);
    assert!(s["precondition_failed"] >= 1, "{s:?}");
    assert_eq!(s["reopens"], 1, "{s:?}");
    assert_eq!(s["read_errors"], 0, "{s:?}");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}
