//! Zips cachemount did not write — Buildkite-style ones made with the `zip`
//! crate (stored, deflate, single-frame zstd, zip64) — restore correctly.

mod common;

use std::fs;
use std::path::Path;

use common::cli::Sandbox;
use common::tree::Rng;
use common::zips;
use zip::CompressionMethod;

/// A Buildkite-style zip of `files`.
fn buildkite_zip(path: &Path, files: &[(String, Vec<u8>, CompressionMethod)], with_manifest: bool) {
    zips::buildkite_zip(path, with_manifest, |zip| {
        for (name, content, method) in files {
            zips::add_file(zip, name, content, *method);
        }
    });
}

#[test]
fn stored_deflate_and_zstd_entries_restore() {
    let sb = Sandbox::new();
    let mut rng = Rng::new(11);
    let files = vec![
        (
            "_0/deps/stored.txt".to_string(),
            rng.text(5000),
            CompressionMethod::Stored,
        ),
        (
            "_0/deps/deflated.js".to_string(),
            rng.text(300_000),
            CompressionMethod::Deflated,
        ),
        (
            "_0/deps/sub/zstd.bin".to_string(),
            [rng.text(3 << 20), rng.noise(100_000)].concat(),
            CompressionMethod::Zstd,
        ),
        (
            "_0/deps/empty".to_string(),
            Vec::new(),
            CompressionMethod::Deflated,
        ),
    ];
    let archive = sb.dir.path().join("buildkite.zip");
    buildkite_zip(&archive, &files, true);
    let url = format!("file://{}", archive.display());
    sb.ok(&["restore", &url]);
    for (name, content, _) in &files {
        let local = sb.work().join(name.strip_prefix("_0/").unwrap());
        assert_eq!(&fs::read(&local).unwrap(), content, "{name}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&local).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }
}

#[test]
fn zip64_archive_with_more_than_65535_entries_restores() {
    let sb = Sandbox::new();
    let files: Vec<_> = (0..70_000)
        .map(|i| {
            (
                format!("_0/many/d{}/f{i}", i % 100),
                format!("{i}\n").into_bytes(),
                CompressionMethod::Stored,
            )
        })
        .collect();
    let archive = sb.dir.path().join("many.zip");
    buildkite_zip(&archive, &files, true);
    sb.ok(&["restore", &format!("file://{}", archive.display())]);
    for i in [0usize, 65_535, 65_536, 69_999] {
        let (name, content, _) = &files[i];
        assert_eq!(
            &fs::read(sb.work().join(name.strip_prefix("_0/").unwrap())).unwrap(),
            content
        );
    }
    let count: usize = fs::read_dir(sb.work().join("many"))
        .unwrap()
        .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(count, 70_000);
}

#[test]
fn plain_zip_without_manifest_extracts_into_the_one_path_given() {
    let sb = Sandbox::new();
    let files = vec![(
        "a/b.txt".to_string(),
        b"plain".to_vec(),
        CompressionMethod::Deflated,
    )];
    let archive = sb.dir.path().join("plain.zip");
    buildkite_zip(&archive, &files, false);
    let url = format!("file://{}", archive.display());
    let (_, err) = sb.fails(&["restore", &url]);
    assert!(err.contains("give exactly one PATH"), "{err}");
    sb.ok(&["restore", &url, "out"]);
    assert_eq!(fs::read(sb.work().join("out/a/b.txt")).unwrap(), b"plain");
}
