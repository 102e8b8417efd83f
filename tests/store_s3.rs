//! S3-only behaviour against the real test server (`scripts/s3-server.sh start`):
//! multipart upload, the multipart-copy refresh, and how failures are reported.
//! The behaviour shared with the local store is in `store_behaviour.rs`.

mod common;

use std::time::{Duration, Instant, SystemTime};

use cachemount::store::s3::{RetryPolicy, S3Store, S3Tuning};
use cachemount::store::{AnyStore, ObjectStore, PutSource, RefreshOutcome, StoreError};
use common::s3::TestS3;

const MIB: usize = 1024 * 1024;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    // Not compressible or periodic in a way that hides misplaced parts.
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn large_files_go_up_as_multipart() {
    let Some(store) = common::s3::s3_store("large_files_go_up_as_multipart").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.zip");
    let data = pattern(70 * MIB, 1);
    std::fs::write(&path, &data).unwrap();

    let meta = store
        .put("blobs/sha256/big", PutSource::File(path))
        .await
        .unwrap();
    // 16 MiB parts: 4 full ones and a 6 MiB tail.
    assert!(
        meta.version.etag.ends_with("-5"),
        "not a 5-part multipart ETag: {}",
        meta.version.etag
    );
    assert_eq!(meta.size, data.len() as u64);
    let head = store.head("blobs/sha256/big").await.unwrap();
    assert_eq!(head.version, meta.version);
    let all = store
        .get_range("blobs/sha256/big", 0..meta.size, Some(&meta.version))
        .await
        .unwrap();
    assert!(
        all[..] == data[..],
        "multipart object differs from the file"
    );
    let boundary = (16 * MIB - 10) as u64..(16 * MIB + 10) as u64;
    let across = store
        .get_range("blobs/sha256/big", boundary.clone(), Some(&meta.version))
        .await
        .unwrap();
    assert_eq!(
        &across[..],
        &data[boundary.start as usize..boundary.end as usize]
    );
}

#[tokio::test]
async fn objects_above_the_copy_limit_refresh_by_multipart_copy() {
    let Some(s3) = TestS3::from_env("objects_above_the_copy_limit_refresh_by_multipart_copy")
    else {
        return;
    };
    // Shrunk limits so a 12 MiB object takes the >5 GiB path: parts of 5, 5 and 2 MiB.
    let tuning = S3Tuning {
        copy_object_max: 10 * MIB as u64,
        copy_part_size: 5 * MIB as u64,
        ..S3Tuning::default()
    };
    let store = s3.store().await.with_tuning(tuning);
    let data = pattern(12 * MIB, 2);
    let put = store
        .put("blob", PutSource::Bytes(data.clone().into()))
        .await
        .unwrap();

    let fresh = store
        .refresh("blob", SystemTime::now() - Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(fresh, RefreshOutcome::StillFresh);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let old = store
        .refresh("blob", SystemTime::now() + Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(old, RefreshOutcome::Refreshed);

    let after = store.head("blob").await.unwrap();
    assert!(after.last_modified > put.last_modified);
    assert_eq!(after.size, put.size);
    let all = store
        .get_range("blob", 0..after.size, Some(&after.version))
        .await
        .unwrap();
    assert!(all[..] == data[..], "refreshed object differs");
}

#[tokio::test]
async fn missing_bucket_is_reported_as_such() {
    let Some(s3) = TestS3::from_env("missing_bucket_is_reported_as_such") else {
        return;
    };
    // Unique, because some servers (SeaweedFS) create a bucket on the first PUT into it.
    let bucket = format!(
        "cachemount-missing-{:x}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let store = S3Store::new(
        &bucket,
        "p",
        Some(s3.endpoint.clone()),
        None,
        RetryPolicy::default(),
    )
    .await;
    let listed = store.list("").await;
    assert!(
        matches!(&listed, Err(StoreError::NoSuchBucket(b)) if *b == bucket),
        "{listed:?}"
    );
    let read = store.get_range("k", 0..1, None).await;
    assert!(
        matches!(&read, Err(StoreError::NoSuchBucket(_))),
        "{read:?}"
    );
}

#[tokio::test]
async fn dead_endpoint_is_unreachable_quickly() {
    // Needs no server: nothing listens on port 1.
    let store = S3Store::new(
        "bucket",
        "",
        Some("http://127.0.0.1:1".into()),
        Some("us-east-1".into()),
        RetryPolicy::default(),
    )
    .await;
    let started = Instant::now();
    let head = tokio::time::timeout(Duration::from_secs(60), store.head("k"))
        .await
        .expect("head hung");
    match head {
        Err(StoreError::Unreachable { endpoint, .. }) => {
            assert!(endpoint.contains("127.0.0.1:1"), "{endpoint}")
        }
        Err(StoreError::Credentials(_)) => common::skip::missing(
            "dead_endpoint_is_unreachable_quickly",
            common::skip::Need::S3,
            "no AWS credentials (scripts/s3-server.sh env sets them)",
        ),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn any_store_opens_s3_urls() {
    let Some(s3) = TestS3::from_env("any_store_opens_s3_urls") else {
        return;
    };
    let store = AnyStore::open(
        &s3.url(),
        Some(s3.endpoint.clone()),
        None,
        RetryPolicy::default(),
    )
    .await
    .unwrap();
    assert!(matches!(store, AnyStore::S3(_)));
    assert_eq!(
        store.describe(),
        format!("s3://{}/{}", s3.bucket, s3.prefix)
    );
    store
        .put("a/b", PutSource::Bytes("hi".into()))
        .await
        .unwrap();
    assert_eq!(
        store.get_range("a/b", 0..2, None).await.unwrap(),
        &b"hi"[..]
    );
    // The prefix is the store's own: keys come back relative to it.
    assert_eq!(store.list("a/").await.unwrap()[0].key, "a/b");
}

/// The scenario the 412 path exists for: on AWS (and moto) refreshing a multipart
/// object rewrites its `…-N` ETag into a plain MD5, so pinned readers get 412.
#[tokio::test]
async fn refresh_of_a_multipart_object_invalidates_pins_on_moto() {
    let Some(moto) =
        TestS3::moto_from_env("refresh_of_a_multipart_object_invalidates_pins_on_moto")
    else {
        return;
    };
    let tuning = S3Tuning {
        multipart_threshold: 10 * MIB as u64,
        min_part_size: 5 * MIB as u64,
        ..S3Tuning::default()
    };
    let store = moto.store().await.with_tuning(tuning);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archive.zip");
    std::fs::write(&path, pattern(12 * MIB, 3)).unwrap();
    let put = store.put("blob", PutSource::File(path)).await.unwrap();
    assert!(put.version.etag.ends_with("-3"), "{}", put.version.etag);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refreshed = store
        .refresh("blob", SystemTime::now() + Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(refreshed, RefreshOutcome::Refreshed);
    let after = store.head("blob").await.unwrap();
    assert_ne!(after.version, put.version);
    let stale = store.get_range("blob", 0..10, Some(&put.version)).await;
    assert!(
        matches!(stale, Err(StoreError::PreconditionFailed(_))),
        "{stale:?}"
    );
    store
        .get_range("blob", 0..10, Some(&after.version))
        .await
        .unwrap();
}
