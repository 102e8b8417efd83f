//! Bad input gets a clear error, a non-zero exit and nothing half-written.

mod common;

use std::fs;
use std::io::Write;

use common::cli::{local_blobs, Sandbox};
use common::tree::small_files_tree;
use zip::write::SimpleFileOptions;

#[test]
fn missing_key_without_fallback_hit_is_a_cache_miss() {
    let sb = Sandbox::new();
    let (code, err) = sb.fails(&["restore", "--key", "nope", "--fallback", "nothing-"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no cache for key \"nope\""), "{err}");
    assert!(err.contains("nothing-"), "{err}");
}

#[test]
fn unknown_store_scheme_names_the_accepted_forms() {
    let sb = Sandbox::new();
    fs::create_dir(sb.work().join("d")).unwrap();
    let (_, err) = sb.fails(&["--store", "gs://bucket/x", "save", "--key", "k", "d"]);
    assert!(err.contains("s3://bucket/prefix"), "{err}");
}

#[test]
fn a_malformed_tuning_variable_is_refused_naming_it() {
    for (var, value, expected, args) in [
        (
            "CACHEMOUNT_S3_ATTEMPTS",
            "0",
            "whole number of attempts from 1 to 100",
            &["keys"][..],
        ),
        (
            "CACHEMOUNT_S3_READ_TIMEOUT",
            "soon",
            "positive number of seconds",
            &["keys"][..],
        ),
        (
            "CACHEMOUNT_S3_STALL_TIMEOUT",
            "-1",
            "positive number of seconds",
            &["keys"][..],
        ),
        (
            "CACHEMOUNT_S3_READ_DEADLINE",
            "inf",
            "positive number of seconds",
            &["keys"][..],
        ),
        (
            "CACHEMOUNT_REFRESH_AFTER_SECS",
            "1d",
            "whole number of seconds",
            &["keys"][..],
        ),
        (
            "CACHEMOUNT_OVERLAY",
            "btrfs",
            "fuse-overlayfs or kernel",
            &["keys"][..],
        ),
        (
            "CACHEMOUNT_READ_AHEAD_KB",
            "1M",
            "whole number",
            &["mount", "--key", "k", "cache"][..],
        ),
        (
            "CACHEMOUNT_MAX_GET",
            "-5",
            "whole number",
            &["mount", "--key", "k", "cache"][..],
        ),
    ] {
        let mut sb = Sandbox::new();
        sb.env.push((var.into(), value.into()));
        let (code, err) = sb.fails(args);
        assert_eq!(code, 2, "{var}: {err}");
        assert!(
            err.contains(&format!("invalid value \"{value}\" for {var}")) && err.contains(expected),
            "{var}: {err}"
        );
    }
}

#[test]
fn unreadable_or_missing_path_fails_and_stores_nothing() {
    let sb = Sandbox::new();
    let (_, err) = sb.fails(&["save", "--key", "k", "does-not-exist"]);
    assert!(err.contains("does-not-exist"), "{err}");
    assert!(local_blobs(&sb.dir.path().join("store")).is_empty());
    assert!(!sb.ok(&["keys"]).contains('k'));
}

#[test]
fn empty_key_is_refused() {
    let sb = Sandbox::new();
    fs::create_dir(sb.work().join("d")).unwrap();
    let (_, err) = sb.fails(&["save", "--key", "", "d"]);
    assert!(err.contains("key"), "{err}");
}

/// Saves a tree, then damages the blob with `damage` and checks that restore
/// fails naming the problem and leaves the previous directory as it was.
fn damaged_blob_restore_fails(damage: impl Fn(&mut Vec<u8>), expect: &str) {
    let sb = Sandbox::new();
    let deps = sb.work().join("deps");
    small_files_tree(&deps, 9, 10);
    fs::write(deps.join("big.js"), common::tree::Rng::new(1).text(3 << 20)).unwrap();
    sb.ok(&["save", "--key", "k", "deps"]);
    let blob = &local_blobs(&sb.dir.path().join("store"))[0];
    let mut bytes = fs::read(blob).unwrap();
    damage(&mut bytes);
    fs::write(blob, bytes).unwrap();
    fs::write(deps.join("previous"), b"still here").unwrap();
    let (_, err) = sb.fails(&["restore", "--key", "k"]);
    assert!(err.contains(expect), "expected {expect:?} in: {err}");
    assert_eq!(fs::read(deps.join("previous")).unwrap(), b"still here");
    let leftovers = fs::read_dir(sb.work()).unwrap().count();
    assert_eq!(leftovers, 1, "temporary siblings left behind");
}

#[test]
fn corrupt_frame_names_the_entry_and_keeps_the_previous_target() {
    // big.js is the first entry after the manifest: byte 4096 is inside its first frame.
    damaged_blob_restore_fails(|b| b[4096] ^= 0xff, "_0/deps/big.js");
}

#[test]
fn truncated_archive_is_refused() {
    damaged_blob_restore_fails(|b| b.truncate(b.len() / 2), "not a readable cache archive");
}

fn crafted_zip(path: &std::path::Path, build: impl FnOnce(&mut zip::ZipWriter<fs::File>)) {
    common::zips::buildkite_zip(path, true, build);
}

#[test]
fn entries_that_would_escape_the_target_are_refused() {
    type Build = Box<dyn FnOnce(&mut zip::ZipWriter<fs::File>)>;
    let cases: Vec<(&str, Build)> = vec![
        (
            "dotdot",
            Box::new(|z| {
                z.start_file("_0/deps/../../escaped", SimpleFileOptions::default())
                    .unwrap();
                z.write_all(b"evil").unwrap();
            }),
        ),
        (
            "absolute",
            Box::new(|z| {
                z.start_file(
                    "/tmp/cachemount-escaped-absolute",
                    SimpleFileOptions::default(),
                )
                .unwrap();
                z.write_all(b"evil").unwrap();
            }),
        ),
        (
            "through-symlink",
            Box::new(|z| {
                z.add_symlink("_0/deps/link", "/tmp", SimpleFileOptions::default())
                    .unwrap();
                z.start_file(
                    "_0/deps/link/cachemount-escaped-link",
                    SimpleFileOptions::default(),
                )
                .unwrap();
                z.write_all(b"evil").unwrap();
            }),
        ),
        (
            "repeated",
            Box::new(|z| {
                z.start_file("_0/deps/twice", SimpleFileOptions::default())
                    .unwrap();
                z.write_all(b"one").unwrap();
                z.start_file("_0/deps/twice/", SimpleFileOptions::default())
                    .unwrap();
            }),
        ),
    ];
    for (name, build) in cases {
        let sb = Sandbox::new();
        let archive = sb.dir.path().join(format!("{name}.zip"));
        crafted_zip(&archive, build);
        let out = sb.run(&["restore", &format!("file://{}", archive.display())]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: restore should refuse");
        assert!(err.contains("refus"), "{name}: {err}");
        assert!(!sb.dir.path().join("escaped").exists(), "{name}");
        assert!(
            !std::path::Path::new("/tmp/cachemount-escaped-absolute").exists(),
            "{name}"
        );
        assert!(
            !std::path::Path::new("/tmp/cachemount-escaped-link").exists(),
            "{name}"
        );
        assert!(
            !sb.work().join("deps").exists(),
            "{name}: nothing half-written"
        );
    }
}

#[test]
fn bad_s3_endpoint_and_credentials_fail_clearly() {
    let sb = Sandbox::new();
    fs::create_dir(sb.work().join("d")).unwrap();
    let mut unreachable = Sandbox::new();
    unreachable.store = "s3://bucket/prefix".into();
    unreachable
        .env
        .push(("AWS_ACCESS_KEY_ID".into(), "x".into()));
    unreachable
        .env
        .push(("AWS_SECRET_ACCESS_KEY".into(), "y".into()));
    fs::create_dir(unreachable.work().join("d")).unwrap();
    let started = std::time::Instant::now();
    let (_, err) = unreachable.fails(&[
        "--endpoint-url",
        "http://127.0.0.1:9",
        "restore",
        "--key",
        "k",
    ]);
    assert!(err.contains("127.0.0.1:9"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    drop(sb);
}
