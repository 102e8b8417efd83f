//! The daemon's memory stays bounded whatever the read pattern: 8 concurrent
//! readers stream 2 GiB through a 64 MiB block cache, and the daemon's peak
//! RSS (VmHWM from /proc) stays under the documented bound — an assertion on
//! memory, not on time.

mod common;
use common::mount as mount_support;

use std::fs;
use std::io::Read;
use std::time::Duration;

use common::cli::Sandbox;
use common::tree::Rng;
use mount_support::{bounded, fuse_available, Mount};

const FILES: usize = 8;
const FILE_SIZE: usize = 128 << 20;
const CACHE: u64 = 64 << 20;
/// The documented bound (README, "Memory"): the block cache, plus the global
/// read-ahead budget (256 MiB, at most half the cache), plus the index, plus
/// 128 MiB for the runtime, buffers of GETs in flight and the allocator.
const READAHEAD_BUDGET: u64 = CACHE / 2;
const SLACK: u64 = 128 << 20;

fn peak_rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn eight_readers_streaming_2gib_through_a_64mib_cache_stay_bounded() {
    let test = "eight_readers_streaming_2gib_through_a_64mib_cache_stay_bounded";
    if !fuse_available(test) {
        return;
    }
    let sb = Sandbox::new();
    let src = sb.work().join("big");
    fs::create_dir(&src).unwrap();
    let mut rng = Rng::new(31);
    for i in 0..FILES {
        fs::write(src.join(format!("f{i}")), rng.noise(FILE_SIZE)).unwrap();
    }
    sb.ok(&["save", "-q", "--key", "mem", "big"]);
    let expected = sb.dir.path().join("expected");
    fs::rename(&src, &expected).unwrap();
    // The disk cache stays off: this is about the memory bound, and the
    // second pass must go through the block cache again.
    let mount = Mount::new(
        &sb,
        &[
            "--cache-size",
            &CACHE.to_string(),
            "--no-disk-cache",
            "--key",
            "mem",
        ],
    );
    let index_estimate = 1 << 20;
    // Two passes over every file (2 GiB in all), each file's page cache
    // dropped in between so the second pass goes through the daemon again —
    // which the daemon's byte count then proves.
    let mut fetched = Vec::new();
    for pass in 0..2 {
        let readers: Vec<_> = (0..FILES)
            .map(|i| {
                let path = mount.path().join(format!("f{i}"));
                let want = expected.join(format!("f{i}"));
                std::thread::spawn(move || {
                    let mut got = Vec::with_capacity(FILE_SIZE);
                    fs::File::open(&path)
                        .unwrap()
                        .read_to_end(&mut got)
                        .unwrap();
                    assert!(got == fs::read(&want).unwrap(), "f{i} differs");
                })
            })
            .collect();
        bounded(Duration::from_secs(240), "8 readers", move || {
            for r in readers {
                r.join().unwrap();
            }
        });
        fetched.push(mount.stats(&sb)["bytes_fetched"]);
        if pass == 0 {
            for i in 0..FILES {
                use std::os::fd::AsRawFd;
                let f = fs::File::open(mount.path().join(format!("f{i}"))).unwrap();
                let r =
                    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                assert_eq!(r, 0, "posix_fadvise(DONTNEED) on f{i}");
            }
        }
    }
    // Each pass fetched all it read but what the 64 MiB cache could keep.
    let total = (FILES * FILE_SIZE) as u64;
    assert!(fetched[0] >= total, "first pass fetched {fetched:?}");
    assert!(
        fetched[1] - fetched[0] >= total - CACHE,
        "the second pass did not reach the daemon: bytes fetched {fetched:?}"
    );
    let peak = peak_rss(mount.pid);
    let bound = CACHE + READAHEAD_BUDGET + index_estimate + SLACK;
    eprintln!(
        "{test}: daemon peak RSS {} MiB (bound {} MiB)",
        peak >> 20,
        bound >> 20
    );
    assert!(
        peak <= bound,
        "peak RSS {} MiB exceeds {} MiB",
        peak >> 20,
        bound >> 20
    );
}
