//! The mount through the fault-injecting proxy (tests/common/proxy.rs) in
//! front of the real S3 server: transient faults are invisible to a full walk
//! (every byte compared); a permanent stall fails reads with EIO within the
//! configured bound while metadata and `umount` keep working; a daemon killed
//! mid-read gives the reader an error, not a hang, and `umount` recovers.

mod common;
use common::mount as mount_support;

use std::fs;
use std::io::Read;
use std::time::{Duration, Instant};

use common::proxy::{Fault, Proxy, Rule};
use common::saved::Saved;
use common::tree::{assert_same_tree, feature_tree, small_files_tree, Rng};
use mount_support::{bounded, fuse_available, is_mounted, run_bounded, Mount};

/// A cache saved directly (not through the proxy) under key `k`; None
/// (skip) without FUSE or S3.
fn saved(test: &str, big: usize) -> Option<Saved> {
    if !fuse_available(test) {
        return None;
    }
    Saved::on_s3(test, |src| {
        feature_tree(src, 21);
        small_files_tree(&src.join("deps"), 22, 300);
        fs::write(src.join("big.bin"), Rng::new(23).noise(big)).unwrap();
    })
}

fn mount_through(saved: &Saved, proxy: &Proxy) -> Mount {
    Mount::new(&saved.sb, &["--endpoint-url", &proxy.url(), "--key", "k"])
}

/// A full walk of a mount made and read through `rule` compares equal.
fn walk_survives(test: &str, rule: Rule, seed: u64) {
    let Some(saved) = saved(test, 12 << 20) else {
        return;
    };
    let proxy = Proxy::with_seed(&saved.s3.endpoint, seed);
    proxy.set(rule);
    let started = Instant::now();
    let mount = mount_through(&saved, &proxy);
    let (expected, actual) = (saved.expected.clone(), mount.path().to_path_buf());
    bounded(
        Duration::from_secs(120),
        "the walk of the mount",
        move || assert_same_tree(&expected, &actual),
    );
    eprintln!(
        "{test}: mount + walk took {:.2} s; proxy saw {} requests ({} ranged GETs), injected {} faults",
        started.elapsed().as_secs_f64(),
        proxy.requests(),
        proxy.ranged_gets(),
        proxy.faults()
    );
    assert!(proxy.faults() >= 1, "{test}: no fault was injected");
    let stats = mount.stats(&saved.sb);
    assert_eq!(
        stats.get("read_errors").copied().unwrap_or(0),
        0,
        "{stats:?}"
    );
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn mount_walk_survives_200ms_latency() {
    walk_survives(
        "mount_walk_survives_200ms_latency",
        Rule::new(Fault::Latency(Duration::from_millis(200))),
        1,
    );
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn mount_walk_survives_bodies_cut_on_10_percent_of_gets() {
    walk_survives(
        "mount_walk_survives_bodies_cut_on_10_percent_of_gets",
        Rule::new(Fault::Cut).probability(0.1),
        14,
    );
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn mount_walk_survives_slowdown_on_20_percent_of_gets() {
    walk_survives(
        "mount_walk_survives_slowdown_on_20_percent_of_gets",
        Rule::new(Fault::SlowDown).probability(0.2),
        3,
    );
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn mount_walk_survives_truncated_bodies() {
    walk_survives(
        "mount_walk_survives_truncated_bodies",
        Rule::new(Fault::Truncate).probability(0.1),
        14,
    );
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn permanent_stall_gives_eio_in_bounded_time_and_metadata_still_answers() {
    let test = "permanent_stall_gives_eio_in_bounded_time_and_metadata_still_answers";
    let Some(mut saved) = saved(test, 4 << 20) else {
        return;
    };
    saved.sb.short_retries();
    let proxy = Proxy::with_seed(&saved.s3.endpoint, 5);
    let mount = mount_through(&saved, &proxy);
    proxy.set(Rule::new(Fault::Stall));
    let big = mount.path().join("big.bin");
    let started = Instant::now();
    let err = bounded(
        Duration::from_secs(60),
        "a read under a permanent stall",
        move || {
            let mut buf = vec![0u8; 1 << 20];
            fs::File::open(&big)
                .and_then(|mut f| f.read(&mut buf))
                .unwrap_err()
        },
    );
    let took = started.elapsed();
    eprintln!(
        "{test}: the read failed after {:.2} s: {err}",
        took.as_secs_f64()
    );
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    // Metadata comes from memory: it still answers.
    let root = mount.path().to_path_buf();
    let names = bounded(
        Duration::from_secs(10),
        "readdir during the stall",
        move || fs::read_dir(&root).unwrap().count(),
    );
    assert!(names > 3);
    assert!(
        mount.log_text().contains("big.bin"),
        "the log names the file: {}",
        mount.log_text()
    );
    let p = mount.path().display().to_string();
    let out = run_bounded(saved.sb.command(&["umount", &p]), Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(mount.path()));
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn daemon_killed_mid_read_gives_an_error_and_umount_recovers() {
    let test = "daemon_killed_mid_read_gives_an_error_and_umount_recovers";
    let Some(saved) = saved(test, 24 << 20) else {
        return;
    };
    let proxy = Proxy::with_seed(&saved.s3.endpoint, 6);
    let mount = mount_through(&saved, &proxy);
    proxy.set(Rule::new(Fault::Latency(Duration::from_millis(300))));
    let big = mount.path().join("big.bin");
    let size = fs::metadata(&big).unwrap().len();
    // The reader counts the bytes it got; the daemon is killed once some,
    // not all, have arrived: mid-read, confirmed.
    let got = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = got.clone();
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        use std::io::Read;
        let mut f = fs::File::open(&big)?;
        let mut buf = vec![0u8; 128 << 10];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(counter.load(std::sync::atomic::Ordering::SeqCst));
            }
            counter.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the reader got no byte"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    unsafe { libc::kill(mount.pid as libc::pid_t, libc::SIGKILL) };
    let at_kill = got.load(std::sync::atomic::Ordering::SeqCst);
    assert!(at_kill < size, "the read had finished before the kill");
    let result = bounded(
        Duration::from_secs(30),
        "the reader after the daemon died",
        move || reader.join().unwrap(),
    );
    assert!(
        result.is_err(),
        "the read should fail once the daemon is gone, got {result:?}"
    );
    assert!(got.load(std::sync::atomic::Ordering::SeqCst) < size);
    let p = mount.path().display().to_string();
    let out = run_bounded(saved.sb.command(&["umount", &p]), Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(mount.path()));
    fs::create_dir_all(mount.path().join("usable-again")).unwrap();
}
