//! Mounting a Buildkite-style archive written by another tool (the `zip`
//! crate): manifest `.buildkite/cache-manifest.json`, entries `_0/…` as single
//! zstd frames (method 93) and deflate, no index — read from the central
//! directory, large single-stream entries decoded sequentially, backward
//! seeks included.

mod common;
#[path = "common/mount.rs"]
mod mount_support;

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::cli::Sandbox;
use common::tree::Rng;
use mount_support::{bounded, fuse_available, Mount};
use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

struct Member {
    name: &'static str,
    method: CompressionMethod,
    data: Vec<u8>,
}

fn members() -> Vec<Member> {
    let mut rng = Rng::new(31);
    vec![
        Member {
            name: "_0/node_modules/a/index.js",
            method: CompressionMethod::Zstd,
            data: rng.text(3000),
        },
        Member {
            name: "_0/node_modules/a/package.json",
            method: CompressionMethod::Deflated,
            data: rng.text(400),
        },
        Member {
            name: "_0/node_modules/b/lib/util.js",
            method: CompressionMethod::Zstd,
            data: rng.text(70_000),
        },
        Member {
            name: "_0/node_modules/b/stored.bin",
            method: CompressionMethod::Stored,
            data: rng.noise(2_500_000),
        },
        Member {
            name: "_0/node_modules/b/empty",
            method: CompressionMethod::Deflated,
            data: Vec::new(),
        },
        // Larger than the fetcher fetches whole: decoded as a stream.
        Member {
            name: "_0/node_modules/big/zstd.bin",
            method: CompressionMethod::Zstd,
            data: [rng.text(15 << 20), rng.noise(5 << 20)].concat(),
        },
        Member {
            name: "_0/node_modules/big/deflate.bin",
            method: CompressionMethod::Deflated,
            data: [rng.noise(2 << 20), rng.text(19 << 20)].concat(),
        },
        Member {
            name: "_0/node_modules/mid.bin",
            method: CompressionMethod::Deflated,
            data: rng.text(3 << 20),
        },
    ]
}

fn write_buildkite_zip(path: &std::path::Path, members: &[Member]) {
    let mut z = zip::ZipWriter::new(fs::File::create(path).unwrap());
    let opts = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .unix_permissions(0o644);
    z.start_file(".buildkite/cache-manifest.json", opts)
        .unwrap();
    z.write_all(br#"{"version":2,"mappings":{"_0":"."}}"#)
        .unwrap();
    for m in members {
        let o = SimpleFileOptions::default()
            .compression_method(m.method)
            .unix_permissions(0o640)
            .large_file(m.data.len() > 1 << 30);
        z.start_file(m.name, o).unwrap();
        z.write_all(&m.data).unwrap();
    }
    z.finish().unwrap();
}

#[test]
fn buildkite_style_archive_mounts_and_reads_right() {
    if !fuse_available("buildkite_style_archive_mounts_and_reads_right") {
        return;
    }
    let sb = Sandbox::new();
    let zip_path = sb.dir.path().join("buildkite.zip");
    let members = members();
    write_buildkite_zip(&zip_path, &members);
    let url = format!("file://{}", zip_path.display());
    let m = Mount::new(&sb, &[&url, "node_modules", "--cache-size", "8M"]);
    assert_eq!(m.path(), sb.work().join("node_modules"));
    let work = sb.work();
    bounded(
        Duration::from_secs(180),
        "reading the foreign mount",
        move || {
            use std::os::unix::fs::PermissionsExt;
            for mem in &members {
                let p = work.join(mem.name.strip_prefix("_0/").unwrap());
                let got = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(got == mem.data, "{} differs", mem.name);
                assert_eq!(
                    fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                    0o640,
                    "{}",
                    mem.name
                );
            }
            // Directories the zip only implies exist.
            assert!(fs::metadata(work.join("node_modules/b/lib"))
                .unwrap()
                .is_dir());
            let mut names: Vec<String> = fs::read_dir(work.join("node_modules/b"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            assert_eq!(names, ["empty", "lib", "stored.bin"]);
            // Backward seeks in single-stream entries, with a cache too small to keep them.
            for mem in members.iter().filter(|m| m.name.contains("big/")) {
                let f = fs::File::open(work.join(mem.name.strip_prefix("_0/").unwrap())).unwrap();
                let mut rng = Rng::new(5);
                for _ in 0..6 {
                    let off = rng.below(mem.data.len() as u64 - 100_000);
                    let mut buf = vec![0u8; 100_000];
                    f.read_exact_at(&mut buf, off).unwrap();
                    assert!(
                        buf[..] == mem.data[off as usize..off as usize + 100_000],
                        "{} at {off}",
                        mem.name
                    );
                }
            }
        },
    );
}
