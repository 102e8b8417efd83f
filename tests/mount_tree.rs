//! Real FUSE mounts of a saved tree, compared side by side with the source:
//! from the local store, from SeaweedFS, with a block cache far smaller than
//! the data read, and under 8 threads reading random ranges.

mod common;
use common::mount as mount_support;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::cli::Sandbox;
use common::s3::TestS3;
use common::tree::{assert_same_tree, feature_tree, small_files_tree, Rng};
use mount_support::{bounded, fuse_available, Mount};

/// A sandbox whose default store is local, plus the `--store` URL of this
/// test's S3 prefix when the SeaweedFS server is up.
fn sandbox_with_s3(test: &str) -> (Sandbox, Option<String>) {
    let mut sb = Sandbox::new();
    let s3 = TestS3::from_env(test).map(|s3| {
        sb.env
            .push(("AWS_ENDPOINT_URL".into(), s3.endpoint.clone()));
        s3.url().to_string()
    });
    (sb, s3)
}

fn compare(expected: PathBuf, actual: PathBuf, what: &str) {
    bounded(Duration::from_secs(240), what, move || {
        assert_same_tree(&expected, &actual)
    });
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn big_tree_mounts_identically_from_local_store_s3_and_a_tiny_cache() {
    let test = "big_tree_mounts_identically_from_local_store_s3_and_a_tiny_cache";
    if !fuse_available(test) {
        return;
    }
    let (sb, s3) = sandbox_with_s3(test);
    let src = sb.work().join("cache");
    feature_tree(&src, 11);
    small_files_tree(&src.join("node_modules"), 12, 20_000);
    let mut rng = Rng::new(13);
    let big: Vec<u8> = (0..40)
        .flat_map(|i| {
            if i % 4 == 3 {
                rng.noise(6 << 20)
            } else {
                rng.text(6 << 20)
            }
        })
        .collect();
    fs::write(src.join("big.bin"), &big).unwrap();
    drop(big);
    sb.ok(&["save", "--key", "big", "cache"]);
    if let Some(url) = &s3 {
        sb.ok(&["--store", url, "save", "--key", "big", "cache"]);
    }
    let expected = sb.dir.path().join("expected");
    fs::rename(&src, &expected).unwrap();

    {
        let m = Mount::new(&sb, &["--key", "big"]);
        assert_eq!(m.path(), src);
        compare(
            expected.clone(),
            src.clone(),
            "walking the local-store mount",
        );
        let stats = m.stats(&sb);
        assert!(
            stats["requests"] > 0 && stats["cache_hits"] > 0,
            "{stats:?}"
        );
        // A directory's small files come with one GET: far fewer GETs than files.
        assert!(
            stats["requests"] < 5_000,
            "too many GETs for 20k small files: {stats:?}"
        );
    }
    match &s3 {
        Some(url) => {
            let m = Mount::new(&sb, &["--store", url, "--key", "big"]);
            compare(expected.clone(), src.clone(), "walking the S3 mount");
            drop(m);
        }
        None => common::skip::missing(
            test,
            common::skip::Need::S3,
            "the S3 part: CACHEMOUNT_TEST_S3_ENDPOINT is not set",
        ),
    }
    // 16 MiB of cache against > 300 MB read: evictions everywhere, bytes still right.
    // The disk cache (filled by the first mount) stays off here, so every
    // read goes through the tiny block cache.
    let m = Mount::new(
        &sb,
        &["--cache-size", "16M", "--no-disk-cache", "--key", "big"],
    );
    compare(
        expected.clone(),
        src.clone(),
        "walking the tiny-cache mount",
    );
    let stats = m.stats(&sb);
    assert!(stats["cache_bytes"] <= 16 << 20, "{stats:?}");
    // Far more was fetched than the cache can hold: it evicted all along.
    assert!(stats["bytes_fetched"] > 6 * (16 << 20), "{stats:?}");
}

/// Files of the concurrency test: (relative path, content).
fn random_files(root: &Path, seed: u64) -> Vec<(PathBuf, Arc<Vec<u8>>)> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for i in 0..12 {
        let len = match i % 4 {
            0 => rng.below(4000) as usize,
            1 => 200_000 + rng.below(800_000) as usize,
            2 => (3 << 20) + rng.below(1 << 20) as usize,
            _ => (6 << 20) + rng.below(3 << 20) as usize,
        };
        let data = if i % 3 == 0 {
            rng.noise(len)
        } else {
            rng.text(len)
        };
        let rel = PathBuf::from(format!("d{}/f{i}.bin", i % 3));
        fs::create_dir_all(root.join(rel.parent().unwrap())).unwrap();
        fs::write(root.join(&rel), &data).unwrap();
        out.push((rel, Arc::new(data)));
    }
    out
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn eight_threads_read_random_ranges_right() {
    let test = "eight_threads_read_random_ranges_right";
    if !fuse_available(test) {
        return;
    }
    let (sb, s3) = sandbox_with_s3(test);
    let src = sb.work().join("data");
    let files = Arc::new(random_files(&src, 21));
    let mut args = Vec::new();
    if let Some(url) = &s3 {
        args = vec!["--store".to_string(), url.clone()];
    }
    let mut save: Vec<&str> = args.iter().map(String::as_str).collect();
    save.extend(["save", "--key", "rand", "data"]);
    sb.ok(&save);
    fs::rename(&src, sb.dir.path().join("moved")).unwrap();
    let mut mount_args: Vec<&str> = args.iter().map(String::as_str).collect();
    mount_args.extend(["--cache-size", "32M", "--key", "rand"]);
    let m = Mount::new(&sb, &mount_args);
    let root = m.path().to_path_buf();
    bounded(
        Duration::from_secs(240),
        "8 threads of random reads",
        move || {
            let threads: Vec<_> = (0..8u64)
                .map(|t| {
                    let files = files.clone();
                    let root = root.clone();
                    std::thread::spawn(move || {
                        let mut rng = Rng::new(100 + t);
                        for _ in 0..300 {
                            let (rel, data) = &files[rng.below(files.len() as u64) as usize];
                            let f = fs::File::open(root.join(rel)).unwrap();
                            let len = data.len() as u64;
                            let off = if len == 0 { 0 } else { rng.below(len) };
                            let want = 1 + rng.below(300_000) as usize;
                            let mut buf = vec![0u8; want];
                            let mut got = 0;
                            while got < want {
                                let n = f.read_at(&mut buf[got..], off + got as u64).unwrap();
                                if n == 0 {
                                    break;
                                }
                                got += n;
                            }
                            let end = (off as usize + want).min(data.len());
                            assert_eq!(got, end - off as usize, "{} at {off}", rel.display());
                            assert!(
                                buf[..got] == data[off as usize..end],
                                "{} differs at {off}+{got}",
                                rel.display()
                            );
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        },
    );
    let stats = m.stats(&sb);
    assert_eq!(stats["read_errors"], 0, "{stats:?}");
}
