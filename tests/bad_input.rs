//! Bad input gets a clear error, a non-zero exit and nothing half-written.
//! Every failure checks the README's promise: exit 1 (3 for a cache miss, 2
//! for a malformed command line) and one `error:` line naming the problem —
//! matched on the words that are not in the echoed argument.

mod common;

use std::fs;
use std::io::Write;

use cachemount::archive::{Entry, EntryKind};
use cachemount::tree::extract::{check_safe, ExtractError, Planned};
use common::cli::{local_blobs, Sandbox};
use common::proxy::{Fault, Proxy, Rule};
use common::s3::TestS3;
use common::tree::small_files_tree;
use zip::write::SimpleFileOptions;

#[test]
fn missing_key_without_fallback_hit_is_a_cache_miss() {
    let sb = Sandbox::new();
    sb.fails_with(
        &["restore", "--key", "nope", "--fallback", "nothing-"],
        3,
        r#"error: no cache for key "nope" and none under the fallback prefixes ["nothing-"]"#,
    );
}

#[test]
fn unknown_store_scheme_names_the_accepted_forms() {
    let sb = Sandbox::new();
    fs::create_dir(sb.work().join("d")).unwrap();
    sb.fails_with(
        &["--store", "gs://bucket/x", "save", "--key", "k", "d"],
        1,
        r#"error: unsupported store URL "gs://bucket/x": use s3://bucket/prefix, file:///absolute/dir, or a directory path"#,
    );
    assert!(local_blobs(&sb.dir.path().join("store")).is_empty());
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
            "CACHEMOUNT_CACHE_SIZE",
            "2X",
            "unknown size suffix",
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
    let line = sb.fails_with(
        &["save", "--key", "k", "does-not-exist"],
        1,
        r#"error: cannot save path "does-not-exist": cannot read "#,
    );
    assert!(
        line.ends_with("No such file or directory (os error 2)"),
        "{line}"
    );
    assert!(local_blobs(&sb.dir.path().join("store")).is_empty());
    let keys = sb.ok(&["keys"]);
    assert_eq!(
        keys.lines().count(),
        1,
        "no key was written, only the header: {keys}"
    );
}

#[test]
fn empty_key_is_refused() {
    let sb = Sandbox::new();
    fs::create_dir(sb.work().join("d")).unwrap();
    sb.fails_with(
        &["save", "--key", "", "d"],
        1,
        "error: the cache key is empty: give --key a value",
    );
    assert!(local_blobs(&sb.dir.path().join("store")).is_empty());
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
    sb.fails_with(&["restore", "--key", "k"], 1, expect);
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
    let expect: std::collections::HashMap<&str, &str> = [
        (
            "dotdot",
            r#"refusing archive entry "_0/deps/../../escaped": "#,
        ),
        (
            "absolute",
            "refusing archive entry \"/tmp/cachemount-escaped-absolute\"",
        ),
        ("through-symlink", "entry below a symlink"),
        ("repeated", "appears twice"),
    ]
    .into();
    for (name, build) in cases {
        let sb = Sandbox::new();
        let archive = sb.dir.path().join(format!("{name}.zip"));
        crafted_zip(&archive, build);
        let out = sb.run(&["restore", &format!("file://{}", archive.display())]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: restore should refuse: {err}"
        );
        common::cli::error_line(&err, expect[name]);
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
fn an_unreachable_endpoint_fails_clearly_and_quickly() {
    let mut unreachable = Sandbox::new();
    unreachable.store = "s3://bucket/prefix".into();
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "x"),
        ("AWS_SECRET_ACCESS_KEY", "y"),
        ("AWS_REGION", "us-east-1"),
    ] {
        unreachable.env.push((k.into(), v.into()));
    }
    let started = std::time::Instant::now();
    unreachable.fails_with(
        &[
            "--endpoint-url",
            "http://127.0.0.1:9",
            "restore",
            "--key",
            "k",
        ],
        1,
        "error: cannot reach the store at http://127.0.0.1:9: ",
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

/// A sandbox on the S3 test server's bucket, endpoint given in the environment.
fn on_s3(test: &str) -> Option<(Sandbox, TestS3)> {
    let s3 = TestS3::from_env(test)?;
    let mut sb = s3.sandbox();
    sb.env.push(("AWS_REGION".into(), "us-east-1".into()));
    Some((sb, s3))
}

#[test]
fn missing_or_rejected_credentials_fail_naming_the_credential_chain() {
    let test = "missing_or_rejected_credentials_fail_naming_the_credential_chain";
    let Some((mut sb, s3)) = on_s3(test) else {
        return;
    };
    let hint = "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run on a host with an instance role)";
    // None at all: the chain finds nothing (no environment, no ~/.aws, no IMDS).
    sb.unset = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ]
    .map(String::from)
    .to_vec();
    // IMDS answers, refusing (as on a CI host that blocks it): the S3 server
    // stands in, quick and local, for the metadata service.
    sb.env.push((
        "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
        s3.endpoint.clone(),
    ));
    let (code, err) = sb.fails(&["keys"]);
    assert_eq!(code, 1, "{err}");
    common::cli::error_line(&err, "error: no usable AWS credentials: ");
    assert!(err.contains(hint), "{err}");
    // The error alone: not also the credential chain's warning per provider.
    assert!(!err.contains("WARN"), "{err}");
    // Keys the server rejects.
    sb.env.push(("AWS_ACCESS_KEY_ID".into(), "test".into()));
    sb.env
        .push(("AWS_SECRET_ACCESS_KEY".into(), "not-the-secret".into()));
    let line = sb.fails_with(&["keys"], 1, "error: no usable AWS credentials: ");
    assert!(
        line.contains(&format!("{} rejected them", s3.endpoint)) && line.ends_with(hint),
        "{line}"
    );
}

#[test]
fn a_missing_bucket_is_named() {
    let test = "a_missing_bucket_is_named";
    let Some((mut sb, _s3)) = on_s3(test) else {
        return;
    };
    sb.store = "s3://cachemount-no-such-bucket/p".into();
    sb.fails_with(
        &["keys"],
        1,
        r#"error: bucket "cachemount-no-such-bucket" does not exist (create it, or check --store and --endpoint-url)"#,
    );
}

#[test]
fn a_403_is_reported_as_access_denied() {
    let test = "a_403_is_reported_as_access_denied";
    let Some((mut sb, s3)) = on_s3(test) else {
        return;
    };
    fs::create_dir(sb.work().join("d")).unwrap();
    fs::write(sb.work().join("d/f"), b"x").unwrap();
    let proxy = Proxy::start(&s3.endpoint);
    proxy.set(Rule::new(Fault::AccessDenied).on(common::proxy::Requests::All));
    sb.env.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
    sb.env.push(("AWS_ENDPOINT_URL".into(), proxy.url()));
    let line = sb.fails_with(
        &["save", "--key", "k", "d"],
        1,
        &format!(": access denied to s3://{}/{}/", s3.bucket, s3.prefix),
    );
    assert!(
        line.ends_with("check the credentials' permissions on the bucket"),
        "{line}"
    );
    assert!(proxy.faults() >= 1);
}

// --- check_safe: every branch, on plans a crafted archive could produce ---

fn planned<'a>(entry: &'a Entry, relative: &str) -> Planned<'a> {
    Planned {
        entry,
        relative: std::path::PathBuf::from(relative),
        cached: None,
    }
}

fn refusal(plan: &[Planned<'_>]) -> String {
    match check_safe(plan) {
        Err(ExtractError::Unsafe { name, reason }) => format!("{name}: {reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn check_safe_refuses_every_unsafe_plan_and_accepts_a_safe_one() {
    let file = Entry::new(EntryKind::File, "_0/deps/f");
    let dir = Entry::new(EntryKind::Dir, "_0/deps/d");
    let link = Entry::new(EntryKind::Symlink, "_0/deps/l");
    let target_link = Entry::new(EntryKind::Symlink, "_0/deps");
    let safe = [
        planned(&target_link, "x"),
        planned(&dir, "d"),
        planned(&file, "d/f"),
        planned(&link, "l"),
    ];
    // The target as a symlink with nothing below it is fine (a saved symlink).
    assert!(check_safe(&[planned(&target_link, "")]).is_ok());
    assert!(check_safe(&safe[1..]).is_ok());
    for (plan, expected) in [
        (
            vec![planned(&file, "/etc/passwd")],
            "_0/deps/f: absolute path",
        ),
        (
            vec![planned(&file, "d/../../x")],
            "_0/deps/f: path with '..', '.' or empty components",
        ),
        (
            vec![planned(&file, "d//x")],
            "_0/deps/f: path with '..', '.' or empty components",
        ),
        (
            vec![planned(&file, "./x")],
            "_0/deps/f: path with '..', '.' or empty components",
        ),
        (
            vec![planned(&file, "a\0b")],
            "_0/deps/f: path with a NUL byte",
        ),
        (
            vec![planned(&dir, "d"), planned(&file, "d")],
            "_0/deps/f: entry appears twice",
        ),
        (
            vec![planned(&link, "l"), planned(&file, "l/f")],
            "_0/deps/f: entry below a symlink",
        ),
        (
            vec![planned(&link, "a/l"), planned(&file, "a/l/b/f")],
            "_0/deps/f: entry below a symlink",
        ),
        // The target itself is a symlink and an entry lies below it.
        (
            vec![planned(&target_link, ""), planned(&file, "f")],
            "_0/deps/f: entry below a symlink",
        ),
    ] {
        assert_eq!(refusal(&plan), expected);
    }
}

#[test]
fn a_foreign_archive_whose_target_is_a_symlink_with_entries_below_is_refused() {
    let sb = Sandbox::new();
    let archive = sb.dir.path().join("target-link.zip");
    crafted_zip(&archive, |z| {
        z.add_symlink("_0/deps", "/tmp", SimpleFileOptions::default())
            .unwrap();
        z.start_file(
            "_0/deps/cachemount-escaped-target",
            SimpleFileOptions::default(),
        )
        .unwrap();
        z.write_all(b"evil").unwrap();
    });
    let out = sb.run(&["restore", &format!("file://{}", archive.display())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    common::cli::error_line(&err, "refus");
    assert!(!std::path::Path::new("/tmp/cachemount-escaped-target").exists());
    assert!(!sb.work().join("deps").exists(), "nothing half-written");
}
