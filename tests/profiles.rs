//! Access profiles end to end (issue 13): a mount records what the build
//! read and writes the key's profile when it ends; the next mount replays
//! it; the profile merges and fades; a profile naming missing entries, a
//! corrupt one and an oversized one leave the mount working without
//! prefetch; read-only credentials cost one log line; `save` lays the
//! profile out first and the archive stays a zip every reader lists and
//! restores identically, and a compacting save of a writable mount uses
//! the profile of the key it was mounted from; demand reads are not starved by a large replay;
//! `report` gives the figures of a known read set.

mod common;
use common::mount as mount_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cachemount::profile::{Profile, ProfileEntry};
use common::cli::Sandbox;
use common::proxy::{Fault, Proxy, Requests, Rule};
use common::saved::Saved;
use common::tree::{assert_same_tree, Rng};
use mount_support::{bounded, fuse_available, run_bounded, Mount};

/// `cache/`: `dirs` directories of `per_dir` small text files, and one
/// 3 MiB file (three frames) in `big/`.
fn tree(root: &Path, dirs: usize, per_dir: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    for d in 0..dirs {
        let dir = root.join(format!("d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..per_dir {
            let len = 200 + rng.below(3000) as usize;
            fs::write(dir.join(format!("f{f:02}.js")), rng.text(len)).unwrap();
        }
    }
    fs::create_dir_all(root.join("big")).unwrap();
    fs::write(root.join("big/data.bin"), rng.text(3 << 20)).unwrap();
}

/// A local-store sandbox with `cache/` saved under key `k`.
fn saved_locally(seed: u64) -> Sandbox {
    let sb = Sandbox::new();
    tree(&sb.work().join("cache"), 8, 10, seed);
    sb.ok(&["save", "-q", "--key", "k", "cache"]);
    sb
}

fn profile_file(sb: &Sandbox, key: &str) -> PathBuf {
    Path::new(&sb.store).join("profiles").join(key)
}

fn read_profile(sb: &Sandbox, key: &str) -> Profile {
    Profile::parse(&fs::read(profile_file(sb, key)).unwrap()).unwrap()
}

fn names(p: &Profile) -> Vec<String> {
    p.entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect()
}

/// Reads each file (relative to the mount) whole, in order, checking it
/// against the saved tree at `expected`.
fn read_all(root: &Path, expected: &Path, files: &[&str]) {
    for f in files {
        assert_eq!(
            fs::read(root.join(f)).unwrap(),
            fs::read(expected.join(f)).unwrap(),
            "{f}"
        );
    }
}

/// `umount PATH` through the CLI; returns its stdout (with the summary).
fn umount(sb: &Sandbox, m: &Mount) -> String {
    let p = m.path().display().to_string();
    let out = sb.ok(&["umount", &p]);
    // umount waits for the daemon, which writes the profile as it ends.
    assert!(!m.daemon_alive(), "umount returned before the daemon ended");
    out
}

/// Waits (30 s at most) for the daemon's log to contain `line`; returns the log.
fn logged(m: &Mount, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = m.log_text();
        if log.contains(line) {
            return log;
        }
        assert!(Instant::now() < deadline, "no {line:?} within 30 s: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the daemon's log to say what it handed to the kernel.
fn handed_done(m: &Mount) -> String {
    logged(m, "to the kernel's page cache in")
}

/// Waits for the daemon's log to say the replay ended; returns the log.
fn replay_done(m: &Mount) -> String {
    logged(m, "replayed the access profile")
}

/// The saved tree, kept beside the mount (the mount hides `cache/`).
fn expected_copy(sb: &Sandbox) -> PathBuf {
    let expected = sb.dir.path().join("expected");
    if !expected.exists() {
        fs::rename(sb.work().join("cache"), &expected).unwrap();
        fs::create_dir(sb.work().join("cache")).unwrap();
    }
    expected
}

const BUILD: [&str; 4] = ["d03/f07.js", "big/data.bin", "d00/f01.js", "d06/f09.js"];

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_replay_fetches_nothing_the_disk_cache_holds_and_files_what_it_fetches() {
    let test = "a_replay_fetches_nothing_the_disk_cache_holds_and_files_what_it_fetches";
    if !fuse_available(test) {
        return;
    }
    let sb = saved_locally(9);
    let expected = expected_copy(&sb);
    // Run 1 records the build; its reads fill the disk cache.
    let m = Mount::new(&sb, &["--key", "k", "--force"]);
    let (root, exp) = (m.path().to_path_buf(), expected.clone());
    bounded(Duration::from_secs(60), "build 1", move || {
        read_all(&root, &exp, &BUILD)
    });
    umount(&sb, &m);
    // Run 2: every profile entry is on disk, so replay fetches nothing.
    let m = Mount::new(&sb, &["--key", "k", "--force"]);
    let log = replay_done(&m);
    assert!(log.contains("4 already in the disk cache"), "{log}");
    let s = m.stats(&sb);
    assert_eq!(s["replay_blocks"], 0, "{s:?}");
    umount(&sb, &m);
    // Run 3 with an empty disk cache replays from the store, and what it
    // fetched is in the disk cache when the build reads it.
    sb.ok(&["cache", "clear"]);
    let m = Mount::new(&sb, &["--key", "k", "--force"]);
    replay_done(&m);
    let before = m.stats(&sb);
    assert_eq!(before["replay_blocks"], 6, "{before:?}");
    assert!(
        before["disk_inserts"] >= 4,
        "replayed files are filed: {before:?}"
    );
    let (root, exp) = (m.path().to_path_buf(), expected.clone());
    bounded(Duration::from_secs(60), "build 3", move || {
        read_all(&root, &exp, &BUILD)
    });
    let after = m.stats(&sb);
    assert_eq!(
        after["requests"], before["requests"],
        "no GET for the build: {after:?}"
    );
    umount(&sb, &m);
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn replayed_files_are_read_from_the_kernels_page_cache_and_still_recorded() {
    if !fuse_available("replayed_files_are_read_from_the_kernels_page_cache_and_still_recorded") {
        return;
    }
    let sb = saved_locally(3);
    let expected = expected_copy(&sb);
    let m = Mount::new(&sb, &["--key", "k", "--no-disk-cache", "--force"]);
    let (root, exp) = (m.path().to_path_buf(), expected.clone());
    bounded(Duration::from_secs(60), "build 1", move || {
        read_all(&root, &exp, &BUILD)
    });
    umount(&sb, &m);

    // Run 2: replay fetches the profile's files and hands them to the kernel.
    let m = Mount::new(&sb, &["--key", "k", "--no-disk-cache", "--force"]);
    let log = handed_done(&m);
    assert!(log.contains("handed 4 profile files"), "{log}");
    let before = m.stats(&sb);
    assert_eq!(before["kernel_files"], 4, "{before:?}");
    let (root, exp) = (m.path().to_path_buf(), expected.clone());
    bounded(Duration::from_secs(60), "build 2", move || {
        read_all(&root, &exp, &BUILD[..3])
    });
    let after = m.stats(&sb);
    // Right bytes, and not one FUSE read or lookup: the kernel served them.
    assert_eq!(after["op_read"], before["op_read"], "{after:?}");
    assert_eq!(after["op_lookup"], before["op_lookup"], "{after:?}");
    assert_eq!(
        after["requests"], before["requests"],
        "no GET for the build"
    );
    assert!(after["replay_hits"] > before["replay_hits"], "{after:?}");
    // What the build read is still learnt: the summary, and the profile.
    let out = umount(&sb, &m);
    assert!(out.contains("read 3 of 81 files"), "{out}");
    let p = read_profile(&sb, "k");
    let seen: Vec<u8> = p.entries.iter().map(|e| e.seen).collect();
    assert_eq!(seen, [0b11, 0b11, 0b11, 0b10], "{p:?}");
    assert_eq!(
        (p.entries[1].start, p.entries[1].end),
        (0, 48),
        "big read whole"
    );
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_mount_records_its_reads_and_the_next_mount_replays_them() {
    if !fuse_available("a_mount_records_its_reads_and_the_next_mount_replays_them") {
        return;
    }
    let sb = saved_locally(1);
    let expected = expected_copy(&sb);
    // The disk cache stays off: run 2 must replay from the store, not from
    // the files run 1 left on disk.
    // Run 1: cold, recording.
    let m = Mount::new(&sb, &["--key", "k", "--no-disk-cache", "--force"]);
    let root = m.path().to_path_buf();
    let exp = expected.clone();
    bounded(Duration::from_secs(60), "build 1", move || {
        read_all(&root, &exp, &BUILD)
    });
    let out = umount(&sb, &m);
    assert!(
        out.contains("read 4 of 81 files (4.9%)") && out.contains("prefetch hits"),
        "{out}"
    );
    let p = read_profile(&sb, "k");
    assert_eq!(p.builds, 1);
    let want: Vec<String> = BUILD.iter().map(|f| format!("_0/cache/{f}")).collect();
    assert_eq!(names(&p), want, "first-access order");
    let big = &p.entries[1];
    assert_eq!((big.start, big.end), (0, 48), "the big file was read whole");

    // Run 2: replays, and every file of the build is already cached.
    let m = Mount::new(&sb, &["--key", "k", "--no-disk-cache", "--force"]);
    let log = replay_done(&m);
    assert!(
        log.contains("replayed the access profile: 4 entries (0 skipped"),
        "{log}"
    );
    let before = m.stats(&sb);
    assert_eq!(before["profile_entries"], 4);
    assert_eq!(
        before["replay_blocks"], 6,
        "three small files, three frames"
    );
    let root = m.path().to_path_buf();
    let exp = expected.clone();
    bounded(Duration::from_secs(60), "build 2", move || {
        read_all(&root, &exp, &BUILD[..3])
    });
    let after = m.stats(&sb);
    assert_eq!(after["cache_misses"], before["cache_misses"], "{after:?}");
    assert_eq!(
        after["requests"], before["requests"],
        "no GET for the build"
    );
    assert!(after["replay_hits"] >= 5, "{after:?}");
    assert!(
        after["prefetch_unread_bytes"] > 0,
        "d06/f09.js was not read"
    );
    umount(&sb, &m);

    // Merge and fade: build 2's reads first, the unread one after, one build older.
    let p = read_profile(&sb, "k");
    assert_eq!(p.builds, 2);
    let mut want2: Vec<String> = want[..3].to_vec();
    want2.push(want[3].clone());
    assert_eq!(names(&p), want2);
    let seen: Vec<u8> = p.entries.iter().map(|e| e.seen).collect();
    assert_eq!(seen, [0b11, 0b11, 0b11, 0b10]);

    // --no-prefetch replays nothing; --no-record writes nothing.
    let before_bytes = fs::read(profile_file(&sb, "k")).unwrap();
    let m = Mount::new(
        &sb,
        &[
            "--key",
            "k",
            "--force",
            "--no-prefetch",
            "--no-record",
            "--no-disk-cache",
        ],
    );
    let root = m.path().to_path_buf();
    let exp = expected.clone();
    bounded(Duration::from_secs(60), "build 3", move || {
        read_all(&root, &exp, &BUILD[..1])
    });
    let s = m.stats(&sb);
    assert_eq!((s["profile_entries"], s["replay_blocks"]), (0, 0));
    umount(&sb, &m);
    assert_eq!(fs::read(profile_file(&sb, "k")).unwrap(), before_bytes);
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_profile_naming_missing_entries_replays_the_rest() {
    if !fuse_available("a_profile_naming_missing_entries_replays_the_rest") {
        return;
    }
    let sb = saved_locally(2);
    let expected = expected_copy(&sb);
    let entry = |name: &str| ProfileEntry {
        name: name.as_bytes().into(),
        seen: 1,
        start: 0,
        end: 1,
    };
    let p = Profile {
        builds: 1,
        entries: vec![
            entry("_0/cache/gone.js"),
            entry("_0/cache/d01/f02.js"),
            entry("_0/cache/d01"),
            entry("_5/elsewhere"),
            entry("../../etc/passwd"),
        ],
    };
    fs::create_dir_all(profile_file(&sb, "k").parent().unwrap()).unwrap();
    fs::write(profile_file(&sb, "k"), p.encode()).unwrap();
    let m = Mount::new(&sb, &["--key", "k", "--force"]);
    let log = replay_done(&m);
    assert!(log.contains("1 entries (4 skipped"), "{log}");
    assert_eq!(m.stats(&sb)["profile_entries"], 1);
    let root = m.path().to_path_buf();
    bounded(Duration::from_secs(60), "reads", move || {
        read_all(&root, &expected, &["d01/f02.js", "d02/f00.js"])
    });
    umount(&sb, &m);
    // The profile now holds what this build read, then the old entries.
    let names = names(&read_profile(&sb, "k"));
    assert_eq!(&names[..2], ["_0/cache/d01/f02.js", "_0/cache/d02/f00.js"]);
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_corrupt_or_oversized_profile_is_logged_and_the_mount_goes_on_without_prefetch() {
    if !fuse_available(
        "a_corrupt_or_oversized_profile_is_logged_and_the_mount_goes_on_without_prefetch",
    ) {
        return;
    }
    let sb = saved_locally(3);
    let expected = expected_copy(&sb);
    let file = profile_file(&sb, "k");
    fs::create_dir_all(file.parent().unwrap()).unwrap();
    let mut corrupt = Profile::default().encode();
    corrupt.extend_from_slice(b"trailing garbage");
    let oversized = |f: &Path| {
        let f = fs::File::create(f).unwrap();
        f.set_len(cachemount::profile::format::MAX_PROFILE_LEN + 1)
            .unwrap();
    };
    for (what, message) in [
        ("corrupt", "checksum does not match"),
        ("oversized", "more than a profile may be"),
    ] {
        if what == "corrupt" {
            fs::write(&file, &corrupt).unwrap();
        } else {
            oversized(&file);
        }
        let m = Mount::new(&sb, &["--key", "k", "--force"]);
        let root = m.path().to_path_buf();
        let exp = expected.clone();
        bounded(Duration::from_secs(60), "reads", move || {
            read_all(&root, &exp, &["d04/f04.js"])
        });
        let log = m.log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("ignoring the access profile of key \"k\""))
            .collect();
        assert_eq!(lines.len(), 1, "{what}: {log}");
        assert!(lines[0].contains(message), "{what}: {}", lines[0]);
        assert_eq!(m.stats(&sb)["profile_entries"], 0, "{what}");
        umount(&sb, &m);
        // Replaced by what this build read.
        assert_eq!(names(&read_profile(&sb, "k")), ["_0/cache/d04/f04.js"]);
    }
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn read_only_credentials_cost_one_log_line() {
    if !fuse_available("read_only_credentials_cost_one_log_line") {
        return;
    }
    let Some(saved) = Saved::on_s3("read_only_credentials_cost_one_log_line", |d| {
        tree(d, 2, 3, 4)
    }) else {
        return;
    };
    // A stand-in for read-only credentials: every PUT of a profile is denied.
    let proxy = Proxy::start(&saved.s3.endpoint);
    proxy.set(Rule::new(Fault::AccessDenied).on(Requests::Matching("PUT", "/profiles/")));
    let sb = &saved.sb;
    fs::create_dir_all(sb.work().join("cache")).unwrap();
    let url = proxy.url();
    let m = Mount::new(sb, &["--endpoint-url", &url, "--key", "k"]);
    let root = m.path().to_path_buf();
    let exp = saved.expected.clone();
    bounded(Duration::from_secs(60), "reads", move || {
        read_all(&root, &exp, &["d01/f02.js"])
    });
    let p = m.path().display().to_string();
    let out = run_bounded(
        sb.command(&["--endpoint-url", &url, "umount", &p]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(m.wait_daemon_gone(Duration::from_secs(10)));
    assert_eq!(proxy.faults(), 1, "one PUT of the profile, denied");
    let log = m.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot write the access profile"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("access denied"), "{}", lines[0]);
}

/// The archive's saved files in the order of their bytes (local headers);
/// the manifest and the index are left out.
fn zip_order(archive: &Path) -> Vec<String> {
    let mut zip = zip::ZipArchive::new(fs::File::open(archive).unwrap()).unwrap();
    let mut files: Vec<(u64, String)> = (0..zip.len())
        .map(|i| {
            let f = zip.by_index(i).unwrap();
            (f.header_start(), f.name().to_string())
        })
        .filter(|(_, n)| n.starts_with('_') && !n.ends_with('/'))
        .collect();
    files.sort();
    files.into_iter().map(|(_, n)| n).collect()
}

/// Writes a profile of `key` whose entries are the files `order` of `cache/`.
fn write_profile(sb: &Sandbox, key: &str, order: &[&str]) {
    let p = Profile {
        builds: 1,
        entries: order
            .iter()
            .map(|f| ProfileEntry {
                name: format!("_0/cache/{f}").into_bytes().into(),
                seen: 1,
                start: 0,
                end: 1,
            })
            .collect(),
    };
    fs::create_dir_all(profile_file(sb, key).parent().unwrap()).unwrap();
    fs::write(profile_file(sb, key), p.encode()).unwrap();
}

#[test]
fn an_archive_saved_in_profile_order_restores_identically_and_zip_readers_list_it() {
    let sb = Sandbox::new();
    let src = sb.work().join("cache");
    tree(&src, 6, 8, 5);
    let order = ["d05/f07.js", "big/data.bin", "d00/f00.js", "d03/f04.js"];
    let (head, tail) = order.split_at(1);
    write_profile(&sb, "k", &[head, &["not/in/the/tree"], tail].concat());
    sb.ok(&["save", "-q", "--key", "k", "cache"]);
    let blobs = common::cli::local_blobs(Path::new(&sb.store));
    assert_eq!(blobs.len(), 1);
    let archive = &blobs[0];
    // The zip crate lists it; the profile's files come first, in its order.
    let listed = zip_order(archive);
    let first: Vec<String> = order.iter().map(|f| format!("_0/cache/{f}")).collect();
    assert_eq!(listed[..4], first[..], "{listed:?}");
    let rest = &listed[4..];
    let mut sorted = rest.to_vec();
    sorted.sort();
    assert_eq!(rest, sorted, "the rest in sorted order");
    // Python's zipfile lists it, in the same order (it cannot decompress
    // zstd entries before Python 3.14, so it only lists).
    let py = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile\n\
             z = zipfile.ZipFile(sys.argv[1])\n\
             for i in sorted(z.infolist(), key=lambda i: i.header_offset):\n\
             \x20   n = i.filename\n\
             \x20   if n.startswith('_') and not n.endswith('/'): print(n)",
        ])
        .arg(archive)
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let by_python: Vec<String> = String::from_utf8_lossy(&py.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(by_python, listed);
    // It restores to the same tree.
    let expected = sb.dir.path().join("expected");
    fs::rename(&src, &expected).unwrap();
    sb.ok(&["restore", "-q", "--key", "k"]);
    assert_same_tree(&expected, &src);
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_compacting_save_of_a_writable_mount_lays_out_by_the_profile_of_the_key_it_came_from() {
    let test =
        "a_compacting_save_of_a_writable_mount_lays_out_by_the_profile_of_the_key_it_came_from";
    if !fuse_available(test) {
        return;
    }
    let sb = Sandbox::new();
    tree(&sb.work().join("cache"), 6, 8, 11);
    sb.ok(&["save", "-q", "--key", "old", "cache"]);
    let order = ["d04/f02.js", "big/data.bin", "d01/f06.js"];
    write_profile(&sb, "old", &order);
    let store = PathBuf::from(&sb.store);
    let before = common::cli::local_blobs(&store);
    // Mounted from the fallback; the new key has no profile yet.
    let m = Mount::new(
        &sb,
        &[
            "--key",
            "new",
            "--fallback",
            "old",
            "--writable",
            "--no-record",
            "--force",
            "cache",
        ],
    );
    // Rewriting the 3 MiB file leaves under half the old bytes in use: the
    // save is a full one, which lays the archive out again.
    let big = m.path().join("big/data.bin");
    bounded(Duration::from_secs(60), "rewriting", move || {
        fs::write(&big, Rng::new(12).text(3 << 20)).unwrap()
    });
    let out = sb.run(&["-v", "save", "--key", "new", "cache"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("3 files of the access profile go first"),
        "{err}"
    );
    sb.ok(&["umount", "cache"]);
    let new: Vec<PathBuf> = common::cli::local_blobs(&store)
        .into_iter()
        .filter(|b| !before.contains(b))
        .collect();
    assert_eq!(new.len(), 1, "{new:?}");
    let listed = zip_order(&new[0]);
    let first: Vec<String> = order.iter().map(|f| format!("_0/cache/{f}")).collect();
    assert_eq!(listed[..3], first[..], "{listed:?}");
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_read_outside_the_profile_during_a_large_replay_is_not_queued_behind_it() {
    let test = "a_read_outside_the_profile_during_a_large_replay_is_not_queued_behind_it";
    if !fuse_available(test) {
        return;
    }
    // 32 files of 8 MiB (256 MiB to replay) and 40 small files, each in a
    // directory of its own (so every first read is a miss of its own).
    let Some(saved) = Saved::on_s3(test, |d| {
        let mut rng = Rng::new(6);
        fs::create_dir_all(d.join("large")).unwrap();
        for i in 0..32 {
            fs::write(d.join(format!("large/l{i:02}.bin")), rng.noise(8 << 20)).unwrap();
        }
        for i in 0..40 {
            let dir = d.join(format!("s{i:02}"));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("x.js"), rng.text(2000)).unwrap();
        }
    }) else {
        return;
    };
    let sb = &saved.sb;
    fs::create_dir_all(sb.work().join("cache")).unwrap();
    let large: Vec<String> = (0..32).map(|i| format!("large/l{i:02}.bin")).collect();
    // Reverse order: no walk in archive order to read ahead.
    let small: Vec<String> = (0..40).rev().map(|i| format!("s{i:02}/x.js")).collect();
    let (a, b) = small.split_at(20);
    let (a, b) = (a.to_vec(), b.to_vec());
    // The disk cache stays off, so each mount's reads and replay go to the store.
    // Record a build that reads the large files.
    let m = Mount::new(sb, &["--key", "k", "--no-disk-cache"]);
    let root = m.path().to_path_buf();
    let l = large.clone();
    bounded(Duration::from_secs(120), "recording build", move || {
        for f in &l {
            fs::read(root.join(f)).unwrap();
        }
    });
    umount(sb, &m);
    let timed = |root: PathBuf, files: Vec<String>| {
        bounded(Duration::from_secs(60), "timed reads", move || {
            let mut t: Vec<Duration> = files
                .iter()
                .map(|f| {
                    let start = Instant::now();
                    fs::read(root.join(f)).unwrap();
                    start.elapsed()
                })
                .collect();
            t.sort();
            t[t.len() / 2]
        })
    };
    // The timed mounts read through a proxy that holds every ranged GET for
    // 50 ms, as a real network does: a small read then costs one round
    // trip, a figure that CPU contention on two busy cores (the replay
    // decodes and the server serves 256 MiB meanwhile) moves by a few ms,
    // while a read queued behind the replay's GETs would wait for them.
    let proxy = Proxy::start(&saved.s3.endpoint);
    proxy.set(Rule::new(Fault::Latency(ROUND_TRIP)));
    let endpoint = proxy.url();
    let through_proxy = |more: &[&str]| {
        let mut args = vec!["--endpoint-url", &endpoint, "--key", "k"];
        args.extend(["--no-disk-cache", "--no-record"]);
        args.extend(more);
        Mount::new(sb, &args)
    };
    // Without prefetch.
    let m = through_proxy(&["--no-prefetch"]);
    let alone = timed(m.path().to_path_buf(), a);
    umount(sb, &m);
    // During replay: only the reads that ended before the replay did count.
    let m = through_proxy(&[]);
    let (root, log) = (m.path().to_path_buf(), m.log.clone());
    let mut during = bounded(Duration::from_secs(60), "reads during replay", move || {
        let mut t = Vec::new();
        for f in &b {
            let start = Instant::now();
            fs::read(root.join(f)).unwrap();
            let took = start.elapsed();
            let log = fs::read_to_string(&log).unwrap_or_default();
            if log.contains("replayed the access profile") {
                break;
            }
            t.push(took);
        }
        t
    });
    assert!(
        during.len() >= 5,
        "only {} reads ended before the replay did; make it larger",
        during.len()
    );
    during.sort();
    let during = during[during.len() / 2];
    let s = m.stats(sb);
    assert!(s["replay_blocks"] > 0, "{s:?}");
    umount(sb, &m);
    eprintln!("median read during replay {during:?}, alone {alone:?}");
    assert!(
        alone >= ROUND_TRIP,
        "a read without prefetch took {alone:?}, under the proxy's round trip: it did not miss"
    );
    assert!(
        during <= alone * 2,
        "a read during replay took {during:?} (median), more than 2x its {alone:?} without prefetch"
    );
}

/// The latency the proxy adds to each ranged GET in the replay test.
const ROUND_TRIP: Duration = Duration::from_millis(50);

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn report_gives_the_figures_of_a_known_read_set() {
    if !fuse_available("report_gives_the_figures_of_a_known_read_set") {
        return;
    }
    let sb = saved_locally(7);
    let expected = expected_copy(&sb);
    let m = Mount::new(&sb, &["--key", "k", "--force"]);
    // Every file of d00..d05, one of d06, none of d07 or big/.
    let mut files: Vec<String> = Vec::new();
    for d in 0..6 {
        for f in 0..10 {
            files.push(format!("d{d:02}/f{f:02}.js"));
        }
    }
    files.push("d06/f03.js".into());
    let root = m.path().to_path_buf();
    let exp = expected.clone();
    let f2 = files.clone();
    bounded(Duration::from_secs(60), "build", move || {
        let f: Vec<&str> = f2.iter().map(String::as_str).collect();
        read_all(&root, &exp, &f)
    });
    let bytes_read: u64 = files
        .iter()
        .map(|f| fs::metadata(expected.join(f)).unwrap().len())
        .sum();
    let size = |rel: &str| -> u64 {
        fs::read_dir(expected.join(rel))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let check = |json: &str| {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["files_read"], 61, "{v}");
        assert_eq!(v["files_archived"], 81, "{v}");
        assert_eq!(v["bytes_read"], bytes_read, "{v}");
        let dirs: Vec<(String, u64, u64)> = v["unread_dirs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["path"].as_str().unwrap().to_string(),
                    d["files"].as_u64().unwrap(),
                    d["bytes"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            dirs,
            [
                ("cache/big".to_string(), 1, 3 << 20),
                ("cache/d07".to_string(), 10, size("d07")),
            ]
        );
        assert_eq!(v["suggested_excludes"][0], "cache/big");
    };
    let p = m.path().display().to_string();
    check(&sb.ok(&["--json", "report", &p]));
    let human = sb.ok(&["report", &p]);
    assert!(human.contains("read 61 of 81 files"), "{human}");
    assert!(human.contains("cache/d07: 0 of 10 files"), "{human}");
    umount(&sb, &m);
    check(&sb.ok(&["--json", "report", "--key", "k"]));
    let human = sb.ok(&["report", "--key", "k"]);
    assert!(
        human.contains("the last build read 61 of 81 files"),
        "{human}"
    );
}
