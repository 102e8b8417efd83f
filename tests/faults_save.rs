//! `save` through the fault-injecting proxy (tests/common/proxy.rs) in front
//! of the real S3 server, with faults on the upload path: a multipart part cut
//! mid-body, a CompleteMultipartUpload that fails, and a save killed between
//! its blob and its key pointer. The store layout's promise (README, "Layout
//! in a store"): a key pointer is written only after its blob is complete —
//! after each fault, no pointer names a missing or partial blob, and a later
//! save and restore give the right tree.

mod common;

use std::fs;
use std::time::Duration;

use common::cli::Sandbox;
use common::proxy::{Fault, Proxy, Rule, COMPLETE_MULTIPART, POINTER_PUTS, UPLOAD_PARTS};
use common::s3::TestS3;
use common::tree::{assert_same_tree, small_files_tree, Rng};

/// A tree whose archive is uploaded in parts: 70 MiB of noise (over the
/// 64 MiB multipart threshold: 16 MiB parts) and some small files.
fn big_tree(sb: &Sandbox) {
    let src = sb.work().join("cache");
    small_files_tree(&src, 3, 40);
    fs::write(src.join("noise.bin"), Rng::new(5).noise(70 << 20)).unwrap();
}

fn save_through(sb: &Sandbox, proxy: &Proxy) -> std::process::Output {
    sb.run(&[
        "save",
        "-q",
        "--endpoint-url",
        &proxy.url(),
        "--key",
        "k",
        "cache",
    ])
}

/// After a failed save: no pointer; then a save without faults works and
/// the cache restores (directly from the server) to the saved tree.
fn nothing_half_written_then_save_again(test: &str, sb: &Sandbox, s3: &TestS3) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let keys = rt.block_on(s3.pointers_name_whole_blobs());
    assert!(
        keys.is_empty(),
        "{test}: a failed save left pointers {keys:?}"
    );
    sb.ok(&["save", "-q", "--key", "k", "cache"]);
    assert_eq!(rt.block_on(s3.pointers_name_whole_blobs()), ["k"]);
    let expected = sb.dir.path().join("expected");
    fs::rename(sb.work().join("cache"), &expected).unwrap();
    sb.ok(&["restore", "-q", "--key", "k"]);
    assert_same_tree(&expected, &sb.work().join("cache"));
}

#[test]
fn a_multipart_part_cut_mid_upload_is_retried() {
    let test = "a_multipart_part_cut_mid_upload_is_retried";
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    let sb = s3.sandbox();
    big_tree(&sb);
    let proxy = Proxy::start(&s3.endpoint);
    proxy.set(Rule::new(Fault::CutRequest).on(UPLOAD_PARTS).first(1));
    let out = save_through(&sb, &proxy);
    assert!(
        out.status.success(),
        "{test}: a cut part should be retried: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(proxy.faults(), 1, "{test}: the part was not cut");
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(s3.pointers_name_whole_blobs()), ["k"]);
    let expected = sb.dir.path().join("expected");
    fs::rename(sb.work().join("cache"), &expected).unwrap();
    sb.ok(&["restore", "-q", "--key", "k"]);
    assert_same_tree(&expected, &sb.work().join("cache"));
}

#[test]
fn a_multipart_part_cut_on_every_attempt_fails_the_save_and_writes_no_pointer() {
    let test = "a_multipart_part_cut_on_every_attempt_fails_the_save_and_writes_no_pointer";
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    let mut sb = s3.sandbox();
    sb.short_retries();
    big_tree(&sb);
    let proxy = Proxy::start(&s3.endpoint);
    // Every attempt at the 2nd part and later is cut.
    proxy.set(Rule::new(Fault::CutRequest).on(UPLOAD_PARTS).after(1));
    let out = save_through(&sb, &proxy);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{test}: {stderr}");
    common::cli::error_line(&stderr, "error: ");
    assert!(
        proxy.faults() >= 2,
        "{test}: retried {} times",
        proxy.faults()
    );
    nothing_half_written_then_save_again(test, &sb, &s3);
}

#[test]
fn a_failed_complete_multipart_upload_fails_the_save_and_writes_no_pointer() {
    let test = "a_failed_complete_multipart_upload_fails_the_save_and_writes_no_pointer";
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    let mut sb = s3.sandbox();
    sb.short_retries();
    big_tree(&sb);
    let proxy = Proxy::start(&s3.endpoint);
    proxy.set(Rule::new(Fault::Status500).on(COMPLETE_MULTIPART));
    let out = save_through(&sb, &proxy);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{test}: {stderr}");
    common::cli::error_line(&stderr, "error: ");
    assert!(
        proxy.answered().iter().any(|a| a.request.method == "POST"
            && a.request.target.contains("uploadId=")
            && a.status == 500),
        "{test}: CompleteMultipartUpload was never refused"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(
        rt.block_on(s3.pending_uploads()),
        0,
        "{test}: the failed upload was not aborted"
    );
    nothing_half_written_then_save_again(test, &sb, &s3);
}

#[test]
fn a_save_killed_between_its_blob_and_its_pointer_leaves_no_pointer() {
    let test = "a_save_killed_between_its_blob_and_its_pointer_leaves_no_pointer";
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    let sb = s3.sandbox();
    let src = sb.work().join("cache");
    small_files_tree(&src, 4, 40);
    fs::write(src.join("noise.bin"), Rng::new(6).noise(3 << 20)).unwrap();
    let proxy = Proxy::start(&s3.endpoint);
    // The pointer's PUT never gets an answer: the save is then between its
    // blob (uploaded) and its pointer; kill it there.
    proxy.set(Rule::new(Fault::Stall).on(POINTER_PUTS));
    let mut child = sb
        .command(&[
            "save",
            "-q",
            "--endpoint-url",
            &proxy.url(),
            "--key",
            "k",
            "cache",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let reached = proxy.wait_faults(1, Duration::from_secs(120));
    let _ = child.kill();
    let _ = child.wait();
    assert!(reached, "{test}: the save never reached its pointer");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The blob is there, whole; no pointer names anything.
    let blobs = rt.block_on(async {
        use cachemount::store::ObjectStore;
        s3.store().await.list("blobs/").await.unwrap()
    });
    assert_eq!(blobs.len(), 1, "{test}: the blob was uploaded first");
    nothing_half_written_then_save_again(test, &sb, &s3);
}
