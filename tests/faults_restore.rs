//! `restore` through the fault-injecting proxy (tests/common/proxy.rs) in front
//! of the real S3 server: transient faults are invisible (right bytes, exit 0),
//! a permanent stall fails within the configured bound with a clear error, and
//! an object overwritten mid-download is never restored as a mix of versions.
//!
//! Caches are saved directly to the server; only the restore goes through the
//! proxy. Each test prints its run time and the proxy's counters.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachemount::store::{ObjectStore, PutSource};
use common::cli::{local_blobs, Sandbox};
use common::proxy::{Fault, Proxy, Rule};
use common::s3::TestS3;
use common::saved::Saved;
use common::tree::{assert_same_tree, feature_tree, Rng};

/// A cache saved (directly, not through the proxy) under key `k`: a feature
/// tree and 40 MiB of noise, so the download takes several range GETs.
fn saved(test: &str) -> Option<Saved> {
    Saved::on_s3(test, |src| {
        feature_tree(src, 11);
        fs::write(src.join("noise.bin"), Rng::new(12).noise(40 << 20)).unwrap();
    })
}

/// Restores key `k` through `proxy`, timed.
fn restore_through(saved: &Saved, proxy: &Proxy) -> (std::process::Output, Duration) {
    let started = Instant::now();
    let out = saved.sb.run(&[
        "restore",
        "-q",
        "--endpoint-url",
        &proxy.url(),
        "--key",
        "k",
    ]);
    (out, started.elapsed())
}

fn report(test: &str, proxy: &Proxy, took: Duration) {
    eprintln!(
        "{test}: restore took {:.2} s; proxy saw {} requests ({} ranged GETs), injected {} faults",
        took.as_secs_f64(),
        proxy.requests(),
        proxy.ranged_gets(),
        proxy.faults()
    );
}

/// A restore under `rule` (RNG `seed`) succeeds with the right bytes, after at least one fault.
fn restore_survives(test: &str, rule: Rule, seed: u64) {
    let Some(saved) = saved(test) else { return };
    let proxy = Proxy::with_seed(&saved.s3.endpoint, seed);
    proxy.set(rule);
    let (out, took) = restore_through(&saved, &proxy);
    report(test, &proxy, took);
    assert!(
        out.status.success(),
        "{test}: restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(proxy.faults() >= 1, "{test}: no fault was injected");
    assert_same_tree(&saved.expected, &saved.sb.work().join("cache"));
    assert!(took < Duration::from_secs(60), "{test}: took {took:?}");
}

// Seeds: the proxy's RNG fires on the 2nd and 3rd ranged GET (seed 14, p = 0.1)
// and on the 1st and 4th (seed 3, p = 0.2), so every run injects faults.

#[test]
fn restore_survives_200ms_latency() {
    restore_survives(
        "restore_survives_200ms_latency",
        Rule::new(Fault::Latency(Duration::from_millis(200))),
        1,
    );
}

#[test]
fn restore_survives_bodies_cut_on_10_percent_of_gets() {
    restore_survives(
        "restore_survives_bodies_cut_on_10_percent_of_gets",
        Rule::new(Fault::Cut).probability(0.1),
        14,
    );
}

#[test]
fn restore_survives_slowdown_on_20_percent_of_gets() {
    restore_survives(
        "restore_survives_slowdown_on_20_percent_of_gets",
        Rule::new(Fault::SlowDown).probability(0.2),
        3,
    );
}

#[test]
fn restore_survives_truncated_bodies_on_10_percent_of_gets() {
    restore_survives(
        "restore_survives_truncated_bodies_on_10_percent_of_gets",
        Rule::new(Fault::Truncate).probability(0.1),
        14,
    );
}

#[test]
fn restore_survives_500s_and_bodies_stalled_mid_transfer() {
    let test = "restore_survives_500s_and_bodies_stalled_mid_transfer";
    let Some(mut saved) = saved(test) else { return };
    // The body-stall timeout, shortened so the test takes seconds.
    saved
        .sb
        .env
        .push(("CACHEMOUNT_S3_STALL_TIMEOUT".into(), "1".into()));
    let proxy = Proxy::with_seed(&saved.s3.endpoint, 14);
    proxy.set(Rule::new(Fault::StallMidBody).probability(0.1));
    proxy.add(Rule::new(Fault::Status500).every(4));
    let (out, took) = restore_through(&saved, &proxy);
    report(test, &proxy, took);
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(proxy.faults() >= 2);
    assert_same_tree(&saved.expected, &saved.sb.work().join("cache"));
}

#[test]
fn restore_under_a_permanent_stall_fails_in_bounded_time() {
    let test = "restore_under_a_permanent_stall_fails_in_bounded_time";
    let Some(mut saved) = saved(test) else { return };
    // Small bounds (defaults: 20 s per attempt, 5 attempts, 120 s per read).
    saved.sb.short_retries();
    // A previous restore's result, which a failed restore must leave alone.
    let previous = saved.sb.work().join("cache");
    fs::create_dir(&previous).unwrap();
    fs::write(previous.join("old"), b"previous").unwrap();
    let proxy = Proxy::start(&saved.s3.endpoint);
    // The key pointer is read; every GET of the archive stalls.
    proxy.set(Rule::new(Fault::Stall).after(1));
    let (out, took) = restore_through(&saved, &proxy);
    report(test, &proxy, took);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{test}: stderr: {stderr}");
    assert!(!out.status.success(), "restore succeeded under a stall");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        stderr.contains("timed out") || stderr.contains("deadline"),
        "unclear error: {stderr}"
    );
    assert!(
        stderr.contains(&proxy.url()),
        "the error names no endpoint: {stderr}"
    );
    assert_eq!(fs::read(previous.join("old")).unwrap(), b"previous");
}

// --- an object overwritten mid-download ---

const BLOCK: usize = 64 << 10;

/// Three 8 MiB files of 64 KiB blocks tagged with `version` (the one
/// version-tagged generator, tests/common/tree.rs).
fn tagged_tree(root: &Path, version: char) {
    fs::create_dir_all(root).unwrap();
    for f in 0..3u64 {
        let name = format!("f{f}");
        let data = common::tree::tagged(
            &version.to_string(),
            &name,
            8 << 20,
            BLOCK,
            version as u64 * 10 + f,
        );
        fs::write(root.join(name), data).unwrap();
    }
}

/// The versions the blocks of the files under `root` say they came from.
fn versions_in(root: &Path) -> std::collections::BTreeSet<char> {
    let mut seen = std::collections::BTreeSet::new();
    for e in fs::read_dir(root).unwrap() {
        let data = fs::read(e.unwrap().path()).unwrap();
        for tag in common::tree::block_versions(&data, BLOCK) {
            assert!(tag == "A" || tag == "B", "untagged block: {tag:?}");
            seen.insert(tag.chars().next().unwrap());
        }
    }
    seen
}

/// Saves `tree` into `sb`'s local store and returns the archive's bytes.
fn archive_of(sb: &Sandbox, name: &str) -> Vec<u8> {
    let before = local_blobs(Path::new(&sb.store));
    sb.ok(&["save", "-q", "--key", name, name]);
    let blob = local_blobs(Path::new(&sb.store))
        .into_iter()
        .find(|b| !before.contains(b))
        .expect("no new blob");
    fs::read(blob).unwrap()
}

/// Two archives of the same path `cache` with different content (tagged 'A'
/// and 'B'), built in `sb`'s local store; the trees they hold are moved aside.
struct TwoVersions {
    archive_a: Arc<Vec<u8>>,
    archive_b: Arc<Vec<u8>>,
    expected_b: std::path::PathBuf,
}

fn two_versions(sb: &Sandbox) -> TwoVersions {
    let cache = sb.work().join("cache");
    tagged_tree(&cache, 'A');
    let archive_a = Arc::new(archive_of(sb, "cache"));
    fs::remove_dir_all(&cache).unwrap();
    tagged_tree(&cache, 'B');
    let archive_b = Arc::new(archive_of(sb, "cache"));
    let expected_b = sb.dir.path().join("expected-b");
    fs::rename(&cache, &expected_b).unwrap();
    assert!(
        archive_a.len() > 3 * (8 << 20) - (1 << 20),
        "archive too small to span GETs"
    );
    TwoVersions {
        archive_a,
        archive_b,
        expected_b,
    }
}

/// Writes `bytes` to `key` on the real server (not through the proxy).
fn put_direct(s3: &TestS3, key: &str, bytes: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let body = PutSource::Bytes(bytes.to_vec().into());
        s3.store().await.put(key, body).await.unwrap();
    });
}

const RAW: &str = "raw/archive.zip";

fn restore_raw(sb: &Sandbox, s3: &TestS3, proxy: &Proxy) -> std::process::Output {
    let url = format!("s3://{}/{}/{RAW}", s3.bucket, s3.prefix);
    sb.run(&[
        "restore",
        "-q",
        "--endpoint-url",
        &proxy.url(),
        "--url",
        &url,
    ])
}

#[test]
fn an_object_overwritten_mid_download_is_never_restored_mixed() {
    let test = "an_object_overwritten_mid_download_is_never_restored_mixed";
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    let mut sb = Sandbox::new();
    let v = two_versions(&sb);
    put_direct(&s3, RAW, &v.archive_a);

    let proxy = Proxy::start(&s3.endpoint);
    // Before the 2nd ranged GET is forwarded: overwrite the object with
    // version B, directly on the server. Every 3rd GET's body is cut too.
    let (s3_hook, b) = (s3.clone(), v.archive_b.clone());
    proxy.change_on_nth_ranged_get(2, move || put_direct(&s3_hook, RAW, &b));
    proxy.set(Rule::new(Fault::Cut).every(3));

    sb.store = s3.url().to_string();
    let started = Instant::now();
    let out = restore_raw(&sb, &s3, &proxy);
    report(test, &proxy, started.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // One change is well within the bound: the restore follows it to B.
    assert!(out.status.success(), "restore failed: {stderr}");
    assert!(
        proxy.answered().iter().any(|a| a.status == 412),
        "the overwrite never reached the restore as a 412"
    );
    let cache = sb.work().join("cache");
    let versions = versions_in(&cache);
    assert_eq!(versions, ['B'].into(), "restored {versions:?}, not B alone");
    assert_same_tree(&v.expected_b, &cache);
    assert!(proxy.faults() >= 1);
}

#[test]
fn an_object_that_keeps_changing_fails_the_restore_after_6_downloads() {
    let test = "an_object_that_keeps_changing_fails_the_restore_after_6_downloads";
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    let mut sb = Sandbox::new();
    let v = two_versions(&sb);
    put_direct(&s3, RAW, &v.archive_a);
    let previous = sb.work().join("cache");
    fs::create_dir(&previous).unwrap();
    fs::write(previous.join("old"), b"previous").unwrap();

    // Before every ranged GET: overwrite the object with the other version,
    // a counter appended so that no two writes share an ETag (SeaweedFS's
    // is the MD5 of the bytes).
    let proxy = Proxy::start(&s3.endpoint);
    let (s3_hook, a, b) = (s3.clone(), v.archive_a.clone(), v.archive_b.clone());
    proxy.on_ranged_get(move |n| {
        let base = if n % 2 == 1 { &b } else { &a };
        put_direct(&s3_hook, RAW, &[&base[..], &n.to_le_bytes()].concat());
    });

    sb.store = s3.url().to_string();
    let out = restore_raw(&sb, &s3, &proxy);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("kept changing during the download (6 times); try again"),
        "{stderr}"
    );
    // Six downloads, each cut short by a 412.
    let precondition_failures = proxy.answered().iter().filter(|a| a.status == 412).count();
    assert!(precondition_failures >= 6, "{precondition_failures} 412s");
    assert_eq!(fs::read(previous.join("old")).unwrap(), b"previous");
    assert_eq!(fs::read_dir(&previous).unwrap().count(), 1);
}
