//! Test support: the real S3-compatible server that `scripts/s3-server.sh`
//! starts, as seen from a test.
//!
//! Tests that need S3 call [`s3_store`] (or [`TestS3::from_env`]). Each call gets
//! a prefix of its own, so tests running in parallel (or re-runs against the same
//! server) never see each other's objects. Without the server's endpoint a
//! test is skipped through tests/common/skip.rs — a failure in CI (`CI` set),
//! where `scripts/test` always starts both servers.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use cachemount::store::s3::{RetryPolicy, S3Store};
use cachemount::store::StoreUrl;

use crate::common::cli::Sandbox;
use crate::common::skip::Need;

/// Where one test's objects live on a running test server.
#[derive(Debug, Clone)]
pub struct TestS3 {
    pub endpoint: String,
    pub bucket: String,
    /// Unique to this test run, without a trailing `/`.
    pub prefix: String,
}

impl TestS3 {
    /// The SeaweedFS server (`scripts/s3-server.sh start`), or `None` to skip `test`.
    pub fn from_env(test: &str) -> Option<TestS3> {
        Self::from_vars(
            test,
            "CACHEMOUNT_TEST_S3_ENDPOINT",
            "CACHEMOUNT_TEST_S3_BUCKET",
            Need::S3,
        )
    }

    /// The moto server (`scripts/s3-server.sh start moto`), which rewrites ETags on
    /// refresh as AWS does. Required in CI, like SeaweedFS.
    pub fn moto_from_env(test: &str) -> Option<TestS3> {
        Self::from_vars(
            test,
            "CACHEMOUNT_TEST_MOTO_ENDPOINT",
            "CACHEMOUNT_TEST_MOTO_BUCKET",
            Need::Moto,
        )
    }

    fn from_vars(test: &str, endpoint_var: &str, bucket_var: &str, need: Need) -> Option<Self> {
        let Ok(endpoint) = std::env::var(endpoint_var) else {
            crate::common::skip::missing(test, need, &format!("{endpoint_var} is not set"));
            return None;
        };
        let bucket = std::env::var(bucket_var).unwrap_or_else(|_| "test-bucket".to_string());
        Some(TestS3 {
            endpoint,
            bucket,
            prefix: unique_prefix(test),
        })
    }

    /// A store on this test's prefix, with the default retry policy.
    pub async fn store(&self) -> S3Store {
        S3Store::new(
            &self.bucket,
            &self.prefix,
            Some(self.endpoint.clone()),
            None,
            RetryPolicy::default(),
        )
        .await
    }

    /// The `--store` URL of this test's prefix.
    pub fn url(&self) -> StoreUrl {
        StoreUrl::S3 {
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
        }
    }

    /// The one sandbox on an S3 prefix: a CLI sandbox whose store is this
    /// test's prefix, the server named by `AWS_ENDPOINT_URL` (a test that
    /// goes through a proxy passes `--endpoint-url`, which wins).
    pub fn sandbox(&self) -> Sandbox {
        let mut sb = Sandbox::new();
        sb.store = self.url().to_string();
        sb.env
            .push(("AWS_ENDPOINT_URL".into(), self.endpoint.clone()));
        sb
    }

    /// The one raw AWS SDK client on the test server (path-style), for what
    /// the store does not do: bucket versioning, listing multipart uploads.
    pub async fn sdk(&self) -> aws_sdk_s3::Client {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .load()
            .await;
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .force_path_style(true)
                .build(),
        )
    }

    /// Checks the store layout's promise on this prefix: every key pointer
    /// names a blob that exists whole (its size is the pointer's). Returns
    /// the keys found.
    pub async fn pointers_name_whole_blobs(&self) -> Vec<String> {
        use cachemount::store::{layout, ObjectStore};
        let store = self.store().await;
        let mut keys = Vec::new();
        for object in store.list("keys/").await.unwrap() {
            let escaped = object.key.strip_prefix("keys/").unwrap();
            let key = layout::unescape_key(escaped).unwrap();
            let pointer = layout::read_pointer(&store, &key).await.unwrap();
            let blob = pointer.blob_key();
            let meta = store
                .head(&blob)
                .await
                .unwrap_or_else(|e| panic!("key {key:?} names {blob}, which is missing: {e}"));
            assert_eq!(
                meta.size, pointer.size,
                "key {key:?} names {blob}, which is partial"
            );
            keys.push(key);
        }
        keys
    }

    /// Multipart uploads still open under this prefix.
    pub async fn pending_uploads(&self) -> usize {
        let listed = self
            .sdk()
            .await
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(format!("{}/", self.prefix))
            .send()
            .await
            .unwrap();
        listed.uploads().len()
    }
}

/// A store on a fresh prefix of the SeaweedFS test server, or `None` to skip `test`.
pub async fn s3_store(test: &str) -> Option<S3Store> {
    Some(TestS3::from_env(test)?.store().await)
}

fn unique_prefix(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "cachemount-test/{test}-{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
