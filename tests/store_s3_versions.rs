//! versionId pinning (issue 4) against the real S3 server, in a versioned
//! bucket of its own: a read pinned to a version id keeps reading that
//! version after the object is overwritten (no 412 for that reason), and
//! once the pinned version is deleted the read fails as PreconditionFailed
//! — which sends a mount down the ETag path (reopen).

mod common;

use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
use bytes::Bytes;
use cachemount::store::s3::{RetryPolicy, S3Store};
use cachemount::store::{ObjectStore, PutSource, StoreError};
use common::s3::TestS3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_version_id_survives_overwrite_and_its_deletion_is_a_precondition_failure() {
    let test = "pinned_version_id_survives_overwrite_and_its_deletion_is_a_precondition_failure";
    let Some(s3) = TestS3::from_env(test) else {
        return;
    };
    let client = s3.sdk().await;
    let bucket = format!(
        "cm-versioned-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    client.create_bucket().bucket(&bucket).send().await.unwrap();
    let versioned = client
        .put_bucket_versioning()
        .bucket(&bucket)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await;
    let store = S3Store::new(
        &bucket,
        "p",
        Some(s3.endpoint.clone()),
        None,
        RetryPolicy::default(),
    )
    .await;
    let first = Bytes::from(vec![1u8; 100_000]);
    let second = Bytes::from(vec![2u8; 100_000]);
    store
        .put("obj", PutSource::Bytes(first.clone()))
        .await
        .unwrap();
    let v1 = store.head("obj").await.unwrap();
    if versioned.is_err() || v1.version.version_id.is_none() {
        common::skip::missing(
            test,
            common::skip::Need::Versioning,
            &format!("the server does not version buckets ({versioned:?})"),
        );
        return;
    }
    store
        .put("obj", PutSource::Bytes(second.clone()))
        .await
        .unwrap();
    let v2 = store.head("obj").await.unwrap();
    assert_ne!(v1.version.version_id, v2.version.version_id);
    // Pinned to version 1: still version 1's bytes.
    let got = store
        .get_range("obj", 10..5000, Some(&v1.version))
        .await
        .unwrap();
    assert!(got[..] == first[10..5000]);
    let got = store
        .get_range("obj", 10..5000, Some(&v2.version))
        .await
        .unwrap();
    assert!(got[..] == second[10..5000]);
    // Version 1 deleted: the pinned read is a precondition failure (reopen).
    client
        .delete_object()
        .bucket(&bucket)
        .key("p/obj")
        .version_id(v1.version.version_id.clone().unwrap())
        .send()
        .await
        .unwrap();
    let e = store
        .get_range("obj", 10..5000, Some(&v1.version))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::PreconditionFailed(_)), "{e:?}");
    // Clean up (best effort).
    if let Ok(list) = client.list_object_versions().bucket(&bucket).send().await {
        for v in list.versions() {
            let _ = client
                .delete_object()
                .bucket(&bucket)
                .key(v.key().unwrap_or_default())
                .set_version_id(v.version_id().map(str::to_string))
                .send()
                .await;
        }
        for m in list.delete_markers() {
            let _ = client
                .delete_object()
                .bucket(&bucket)
                .key(m.key().unwrap_or_default())
                .set_version_id(m.version_id().map(str::to_string))
                .send()
                .await;
        }
    }
    let _ = client.delete_bucket().bucket(&bucket).send().await;
}
