//! The save → restore round trip against a real S3 server (SeaweedFS):
//! multipart upload, key pointer, fallback (newest wins), identical content
//! uploaded once, concurrent saves of one key.

mod common;

use std::fs;

use common::cli::Sandbox;
use common::s3::TestS3;
use common::tree::{assert_same_tree, feature_tree, Rng};

fn s3_sandbox(test: &str) -> Option<(Sandbox, TestS3)> {
    let s3 = TestS3::from_env(test)?;
    Some((s3.sandbox(), s3))
}

#[test]
fn round_trip_through_s3_with_a_multipart_archive() {
    let Some((sb, _)) = s3_sandbox("round_trip_through_s3_with_a_multipart_archive") else {
        return;
    };
    let src = sb.work().join("cache");
    feature_tree(&src, 3);
    // Incompressible and larger than the multipart threshold (64 MiB).
    fs::write(src.join("blob.bin"), Rng::new(4).noise(70 << 20)).unwrap();
    sb.ok(&["save", "--key", "big", "cache"]);
    let expected = sb.dir.path().join("expected");
    fs::rename(&src, &expected).unwrap();
    sb.ok(&["restore", "--key", "big"]);
    assert_same_tree(&expected, &src);
}

#[test]
fn s3_dedup_fallback_and_concurrent_saves() {
    let Some((sb, _)) = s3_sandbox("s3_dedup_fallback_and_concurrent_saves") else {
        return;
    };
    let d = sb.work().join("d");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("v"), b"one").unwrap();
    assert!(sb
        .ok(&["save", "--key", "lock-1", "d"])
        .contains("(uploaded)"));
    assert!(sb
        .ok(&["save", "--key", "lock-1-again", "d"])
        .contains("not uploaded"));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    fs::write(d.join("v"), b"two").unwrap();
    sb.ok(&["save", "--key", "lock-2", "d"]);

    // Concurrent saves of one key: both succeed, the key is readable afterwards.
    let children: Vec<_> = (0..4)
        .map(|_| {
            sb.command(&["save", "--key", "shared", "d"])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    fs::remove_dir_all(&d).unwrap();
    sb.ok(&["restore", "--key", "shared"]);
    assert_eq!(fs::read(d.join("v")).unwrap(), b"two");

    fs::remove_dir_all(&d).unwrap();
    let out = sb.ok(&["restore", "--key", "lock-9", "--fallback", "lock-"]);
    assert!(out.contains("fallback"), "{out}");
    assert_eq!(fs::read(d.join("v")).unwrap(), b"two");
    let keys = sb.ok(&["keys", "--prefix", "lock-"]);
    assert_eq!(keys.lines().count(), 4, "{keys}");
}

#[test]
fn missing_bucket_and_missing_credentials_are_named() {
    let Some((mut sb, s3)) = s3_sandbox("missing_bucket_and_missing_credentials_are_named") else {
        return;
    };
    fs::create_dir(sb.work().join("d")).unwrap();
    sb.store = "s3://no-such-bucket-cachemount/x".into();
    let (_, err) = sb.fails(&["restore", "--key", "k"]);
    assert!(err.contains("no-such-bucket-cachemount"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cachemount"))
        .current_dir(sb.work())
        .env("HOME", sb.home())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args([
            "--store",
            &s3.url().to_string(),
            "--endpoint-url",
            &s3.endpoint,
            "save",
            "--key",
            "k",
            "d",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("credentials"), "{err}");
}

#[test]
fn corrupt_blob_is_downloaded_twice_then_named_and_the_target_kept() {
    use cachemount::store::{ObjectStore, PutSource};
    let Some((sb, s3)) =
        s3_sandbox("corrupt_blob_is_downloaded_twice_then_named_and_the_target_kept")
    else {
        return;
    };
    let deps = sb.work().join("deps");
    fs::create_dir(&deps).unwrap();
    fs::write(deps.join("big.js"), Rng::new(8).text(3 << 20)).unwrap();
    sb.ok(&["save", "--key", "k", "deps"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = s3.store().await;
        let blobs = store.list("blobs/").await.unwrap();
        let blob = &blobs[0].key;
        let meta = store.head(blob).await.unwrap();
        let mut bytes = store
            .get_range(blob, 0..meta.size, None)
            .await
            .unwrap()
            .to_vec();
        bytes[4096] ^= 0xff; // inside big.js's first frame
        store
            .put(blob, PutSource::Bytes(bytes.into()))
            .await
            .unwrap();
    });
    fs::write(deps.join("previous"), b"kept").unwrap();
    let (_, err) = sb.fails(&["restore", "--key", "k"]);
    assert!(err.contains("downloading once more"), "{err}");
    assert!(err.contains("_0/deps/big.js"), "{err}");
    assert_eq!(fs::read(deps.join("previous")).unwrap(), b"kept");
}
