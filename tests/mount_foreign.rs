//! Mounting a Buildkite-style archive written by another tool (the `zip`
//! crate): manifest `.buildkite/cache-manifest.json`, entries `_0/…` as single
//! zstd frames (method 93) and deflate, no index — read from the central
//! directory, large single-stream entries decoded sequentially, backward
//! seeks included.
//!
//! No unverified byte is served (DESIGN §7): a foreign entry whose data is
//! damaged while its CRC-32 is intact fails with EIO on every read, its first
//! byte included, with one log line naming it; a large good one is verified
//! by one pass, and its blocks evicted from a small cache are decoded again
//! and checked without a second pass; a reopen after the object changed
//! verifies the new version's bytes again.

mod common;
use common::mount as mount_support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cachemount::store::{ObjectStore, PutSource};
use common::cli::Sandbox;
use common::s3::TestS3;
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
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
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

/// How a member's bytes in the zip are made wrong while its CRC-32 field stays
/// that of its content.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Damage {
    None,
    /// A byte of the stored (compressed) data flipped, 200 bytes before its
    /// end: what comes before it decodes cleanly.
    Flip,
    /// The CRC-32 fields (local header and central directory) of other
    /// content: the data decodes cleanly to bytes the CRC does not match.
    OtherCrc,
}

struct Case {
    name: &'static str,
    method: CompressionMethod,
    data: Vec<u8>,
    damage: Damage,
}

/// Writes the zip of `cases`, then damages the members that ask for it.
fn write_damaged_zip(path: &Path, cases: &[Case]) {
    let members: Vec<Member> = cases
        .iter()
        .map(|c| Member {
            name: c.name,
            method: c.method,
            data: c.data.clone(),
        })
        .collect();
    write_buildkite_zip(path, &members);
    let mut bytes = fs::read(path).unwrap();
    let mut archive = zip::ZipArchive::new(fs::File::open(path).unwrap()).unwrap();
    for c in cases {
        let f = archive.by_name(c.name).unwrap();
        match c.damage {
            Damage::None => {}
            Damage::Flip => {
                let at = (f.data_start() + f.compressed_size() - 200) as usize;
                bytes[at] ^= 0x5a;
            }
            Damage::OtherCrc => {
                let other = crc32fast::hash(b"other content").to_le_bytes();
                for at in [f.header_start() + 14, f.central_header_start() + 16] {
                    bytes[at as usize..at as usize + 4].copy_from_slice(&other);
                }
            }
        }
    }
    fs::write(path, bytes).unwrap();
}

/// Stored, deflate and single-stream zstd members, each damaged and good,
/// large enough to be verified by a pass (more than one block; the
/// compressed ones beyond what is fetched whole), plus a damaged deflate
/// member small enough to be fetched and checked whole.
fn damage_cases() -> Vec<Case> {
    let mut rng = Rng::new(47);
    let case = |name, method, data, damage| Case {
        name,
        method,
        data,
        damage,
    };
    let text = |rng: &mut Rng, n| [rng.text(n), rng.noise(64 << 10)].concat();
    vec![
        case(
            "_0/cache/bad/stored.bin",
            CompressionMethod::Stored,
            rng.noise(3 << 20),
            Damage::Flip,
        ),
        case(
            "_0/cache/bad/deflate.bin",
            CompressionMethod::Deflated,
            text(&mut rng, 20 << 20),
            Damage::Flip,
        ),
        case(
            "_0/cache/bad/zstd.bin",
            CompressionMethod::Zstd,
            text(&mut rng, 20 << 20),
            Damage::Flip,
        ),
        case(
            "_0/cache/bad/other-crc.bin",
            CompressionMethod::Deflated,
            text(&mut rng, 18 << 20),
            Damage::OtherCrc,
        ),
        case(
            "_0/cache/bad/small.bin",
            CompressionMethod::Deflated,
            text(&mut rng, 2 << 20),
            Damage::OtherCrc,
        ),
        case(
            "_0/cache/good/stored.bin",
            CompressionMethod::Stored,
            rng.noise(3 << 20),
            Damage::None,
        ),
        case(
            "_0/cache/good/deflate.bin",
            CompressionMethod::Deflated,
            text(&mut rng, 20 << 20),
            Damage::None,
        ),
        case(
            "_0/cache/good/zstd.bin",
            CompressionMethod::Zstd,
            text(&mut rng, 20 << 20),
            Damage::None,
        ),
        case(
            "_0/cache/good/small.bin",
            CompressionMethod::Deflated,
            text(&mut rng, 2 << 20),
            Damage::None,
        ),
    ]
}

/// How many of `cases` are verified by a whole pass: stored ones of more
/// than one block (1 MiB), compressed ones larger than what is fetched whole
/// (16 MiB).
fn passes_of<'a>(cases: impl IntoIterator<Item = &'a Case>) -> u64 {
    let pass = |c: &Case| match c.method {
        CompressionMethod::Stored => c.data.len() > 1 << 20,
        _ => c.data.len() > 16 << 20,
    };
    cases.into_iter().filter(|c| pass(c)).count() as u64
}

fn assert_eio<T: std::fmt::Debug>(r: std::io::Result<T>, what: &str) {
    match r {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
        Ok(v) => panic!("{what}: a damaged entry was served: {v:?}"),
    }
}

/// Every read of a damaged entry fails with EIO, first byte included.
fn assert_unreadable(path: &Path) {
    let what = path.display();
    let f = fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    assert_eio(
        f.read_at(&mut [0u8; 1], 0),
        &format!("first byte of {what}"),
    );
    assert_eio(
        f.read_at(&mut vec![0u8; 100_000], len / 2),
        &format!("middle of {what}"),
    );
    assert_eio(fs::read(path).map(|b| b.len()), &format!("all of {what}"));
}

/// The lines of the daemon's log that report `name` as failing with EIO,
/// once the log has one (it is written asynchronously).
fn eio_lines(m: &Mount, name: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<String> = m
            .log_text()
            .lines()
            .filter(|l| l.contains(name) && l.contains("EIO"))
            .map(str::to_string)
            .collect();
        if !lines.is_empty() || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Puts the file at `from` as object `key` under the test's prefix; its
/// `s3://` URL.
fn upload(s3: &TestS3, key: &str, from: &Path) -> String {
    runtime().block_on(async {
        let store = s3.store().await;
        store
            .put(key, PutSource::File(from.to_path_buf()))
            .await
            .unwrap();
    });
    format!("s3://{}/{}/{key}", s3.bucket, s3.prefix)
}

/// Where a test's zip is mounted from.
enum Place {
    Local,
    SeaweedFs(TestS3),
}

/// Writes the zip with `write`, puts it where `place` says; the sandbox to
/// mount from and the URL.
fn place_zip(place: &Place, file: &str, write: impl FnOnce(&Path)) -> (Sandbox, String) {
    let sb = match place {
        Place::Local => Sandbox::new(),
        Place::SeaweedFs(s3) => s3.sandbox(),
    };
    let zip_path = sb.dir.path().join(file);
    write(&zip_path);
    let url = match place {
        Place::Local => format!("file://{}", zip_path.display()),
        Place::SeaweedFs(s3) => upload(s3, &format!("raw/{file}"), &zip_path),
    };
    (sb, url)
}

fn damaged_entries_fail_with_eio(place: Place) {
    let cases = damage_cases();
    let (sb, url) = place_zip(&place, "damaged.zip", |p| write_damaged_zip(p, &cases));
    let m = Mount::new(&sb, &[&url, "cache", "--cache-size", "8M"]);
    let root = m.path().to_path_buf();
    let (bad, good): (Vec<&Case>, Vec<&Case>) =
        cases.iter().partition(|c| c.damage != Damage::None);
    let on_disk = |c: &Case| root.join(c.name.strip_prefix("_0/cache/").unwrap());
    let bad_paths: Vec<PathBuf> = bad.iter().map(|c| on_disk(c)).collect();
    bounded(Duration::from_secs(120), "reading damaged entries", {
        let paths = bad_paths.clone();
        move || paths.iter().for_each(|p| assert_unreadable(p))
    });
    for c in &bad {
        let lines = eio_lines(&m, c.name);
        assert_eq!(lines.len(), 1, "one log line names {}: {lines:?}", c.name);
    }
    let before: BTreeMap<String, u64> = m.stats(&sb);
    // Each damaged pass entry was decoded twice (the one re-fetch), no more.
    assert_eq!(
        before["verify_passes"],
        2 * passes_of(bad.iter().copied()),
        "{before:?}"
    );
    assert_eq!(before["corrupt_blocks"], bad.len() as u64, "{before:?}");
    // Reading them again fails at once: no request, no pass, no log line.
    bounded(Duration::from_secs(60), "reading damaged entries again", {
        let paths = bad_paths.clone();
        move || paths.iter().for_each(|p| assert_unreadable(p))
    });
    let after = m.stats(&sb);
    for counter in ["requests", "verify_passes", "corrupt_blocks"] {
        assert_eq!(after[counter], before[counter], "{counter}: {after:?}");
    }
    for c in &bad {
        assert_eq!(eio_lines(&m, c.name).len(), 1, "{}", c.name);
    }
    // The undamaged entries of the same archive read right.
    let good_paths: Vec<(PathBuf, Vec<u8>)> =
        good.iter().map(|c| (on_disk(c), c.data.clone())).collect();
    bounded(
        Duration::from_secs(120),
        "reading good entries",
        move || {
            for (p, want) in &good_paths {
                let got = fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(got == *want, "{} differs", p.display());
            }
        },
    );
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn damaged_foreign_entries_fail_with_eio_on_every_read() {
    if !fuse_available("damaged_foreign_entries_fail_with_eio_on_every_read") {
        return;
    }
    damaged_entries_fail_with_eio(Place::Local);
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn damaged_foreign_entries_fail_with_eio_on_every_read_s3() {
    let test = "damaged_foreign_entries_fail_with_eio_on_every_read_s3";
    if !fuse_available(test) {
        return;
    }
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    damaged_entries_fail_with_eio(Place::SeaweedFs(s3));
}

/// Drops the file's pages from the kernel's cache, so the next read of it
/// goes through the daemon again.
fn drop_page_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path).unwrap();
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_large_foreign_entry_is_verified_once_and_rechecked_after_eviction() {
    let test = "a_large_foreign_entry_is_verified_once_and_rechecked_after_eviction";
    if !fuse_available(test) {
        return;
    }
    let mut rng = Rng::new(53);
    // Both several times the cache: their early blocks are evicted by the pass itself.
    let deflate = [rng.text(30 << 20), rng.noise(4 << 20), rng.text(14 << 20)].concat();
    let stored = rng.noise(24 << 20);
    let members = vec![
        Member {
            name: "_0/cache/big.deflate",
            method: CompressionMethod::Deflated,
            data: deflate.clone(),
        },
        Member {
            name: "_0/cache/big.stored",
            method: CompressionMethod::Stored,
            data: stored.clone(),
        },
    ];
    let (sb, url) = place_zip(&Place::Local, "big.zip", |p| {
        write_buildkite_zip(p, &members)
    });
    let m = Mount::new(&sb, &[&url, "cache", "--cache-size", "8M"]);
    let root = m.path().to_path_buf();
    let stats = |m: &Mount| m.stats(&sb);
    // Concurrent first readers of the deflate entry share one pass.
    let readers: Vec<_> = (0..4u64)
        .map(|i| {
            let (p, want) = (root.join("big.deflate"), deflate.clone());
            std::thread::spawn(move || {
                let at = i * (10 << 20);
                let mut buf = vec![0u8; 64 << 10];
                fs::File::open(&p)
                    .unwrap()
                    .read_exact_at(&mut buf, at)
                    .unwrap();
                assert!(
                    buf[..] == want[at as usize..at as usize + buf.len()],
                    "at {at}"
                );
            })
        })
        .collect();
    bounded(
        Duration::from_secs(120),
        "concurrent first reads",
        move || readers.into_iter().for_each(|r| r.join().unwrap()),
    );
    let s = stats(&m);
    assert_eq!(s["verify_passes"], 1, "{s:?}");
    let mut redecoded = s["redecoded_blocks"];
    for (name, want) in [("big.deflate", deflate), ("big.stored", stored)] {
        let (p2, want2) = (root.join(name), want);
        bounded(
            Duration::from_secs(120),
            "reading a large entry",
            move || {
                // Whole, then (its pages dropped) backwards in pieces: blocks
                // evicted from the 8 MiB cache are decoded again.
                let got = fs::read(&p2).unwrap();
                assert!(got == want2, "{} differs", p2.display());
                drop_page_cache(&p2);
                let f = fs::File::open(&p2).unwrap();
                let mut rng = Rng::new(9);
                for _ in 0..4 {
                    let at = rng.below(want2.len() as u64 - 200_000);
                    let mut buf = vec![0u8; 200_000];
                    f.read_exact_at(&mut buf, at).unwrap();
                    assert!(
                        buf[..] == want2[at as usize..at as usize + buf.len()],
                        "{} at {at}",
                        p2.display()
                    );
                }
            },
        );
        let s = stats(&m);
        assert!(
            s["redecoded_blocks"] > redecoded,
            "{name}: no block decoded again: {s:?}"
        );
        redecoded = s["redecoded_blocks"];
    }
    let s = stats(&m);
    assert_eq!(
        s["verify_passes"], 2,
        "one pass per entry, none again: {s:?}"
    );
    assert_eq!(s["corrupt_blocks"] + s["read_errors"], 0, "{s:?}");
}

/// The object under a raw-URL mount is overwritten with a damaged copy whose
/// CRC fields still match: the reopen drops the old version's verification
/// with its blocks, so the new bytes are verified again — and fail — instead
/// of being served under the old version's verdict.
#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_reopen_verifies_the_new_version_again() {
    let test = "a_reopen_verifies_the_new_version_again";
    if !fuse_available(test) {
        return;
    }
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    let mut rng = Rng::new(59);
    let data = rng.noise(12 << 20);
    let case = |damage| Case {
        name: "_0/cache/data.bin",
        method: CompressionMethod::Stored,
        data: data.clone(),
        damage,
    };
    let (sb, url) = place_zip(&Place::SeaweedFs(s3.clone()), "object.zip", |p| {
        write_damaged_zip(p, &[case(Damage::None)])
    });
    let m = Mount::new(&sb, &[&url, "cache", "--cache-size", "4M"]);
    let p = m.path().join("data.bin");
    let got = bounded(Duration::from_secs(60), "reading version 1", {
        let p = p.clone();
        move || fs::read(p).unwrap()
    });
    assert!(got == data, "version 1 differs");
    let damaged = sb.dir.path().join("damaged.zip");
    write_damaged_zip(&damaged, &[case(Damage::Flip)]);
    upload(&s3, "raw/object.zip", &damaged);
    drop_page_cache(&p);
    // Block 0 was evicted by the reads after it: its fetch meets the 412.
    bounded(Duration::from_secs(60), "reading version 2", move || {
        assert_unreadable(&p)
    });
    let s = m.stats(&sb);
    assert_eq!(s["reopens"], 1, "{s:?}");
    assert_eq!(
        s["verify_passes"], 3,
        "one pass of version 1, two of version 2: {s:?}"
    );
    assert_eq!(eio_lines(&m, "_0/cache/data.bin").len(), 1);
}
