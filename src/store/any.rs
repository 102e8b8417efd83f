//! [`AnyStore`]: the store a `--store` URL selects, for the command line.
//!
//! Generic code (save, restore, the mount) stays generic over
//! [`ObjectStore`]; only the CLI, which learns the kind of store at run time,
//! holds an `AnyStore` and hands it down.

use std::ops::Range;
use std::time::SystemTime;

use bytes::Bytes;

use super::local::LocalStore;
use super::s3::{RetryPolicy, S3Store};
use super::{
    Composition, ListedObject, NameTooLong, ObjectMeta, ObjectStore, ObjectVersion, Pieces,
    PutSource, RefreshOutcome, StoreResult, StoreUrl, TransferCounts,
};

/// One of the store implementations, chosen by URL.
#[derive(Debug, Clone)]
pub enum AnyStore {
    Local(LocalStore),
    S3(S3Store),
}

impl AnyStore {
    /// Opens the store `url` names. `endpoint` (`--endpoint-url`), `region`
    /// and `retry` only matter for S3, where the first two override the AWS
    /// configuration chain.
    pub async fn open(
        url: &StoreUrl,
        endpoint: Option<String>,
        region: Option<String>,
        retry: RetryPolicy,
    ) -> StoreResult<Self> {
        Ok(match url {
            StoreUrl::Local { root } => AnyStore::Local(LocalStore::new(root.clone())),
            StoreUrl::S3 { bucket, prefix } => {
                AnyStore::S3(S3Store::new(bucket, prefix, endpoint, region, retry).await)
            }
        })
    }
}

impl ObjectStore for AnyStore {
    fn describe(&self) -> String {
        match self {
            AnyStore::Local(s) => s.describe(),
            AnyStore::S3(s) => s.describe(),
        }
    }

    fn check_name(&self, key: &str) -> Result<(), NameTooLong> {
        match self {
            AnyStore::Local(s) => s.check_name(key),
            AnyStore::S3(s) => s.check_name(key),
        }
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        match self {
            AnyStore::Local(s) => s.head(key).await,
            AnyStore::S3(s) => s.head(key).await,
        }
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        pin: Option<&ObjectVersion>,
    ) -> StoreResult<Bytes> {
        match self {
            AnyStore::Local(s) => s.get_range(key, range, pin).await,
            AnyStore::S3(s) => s.get_range(key, range, pin).await,
        }
    }

    async fn get_range_pieces(&self, key: &str, range: Range<u64>) -> StoreResult<Pieces> {
        match self {
            AnyStore::Local(s) => s.get_range_pieces(key, range).await,
            AnyStore::S3(s) => s.get_range_pieces(key, range).await,
        }
    }

    async fn get_tail(&self, key: &str, max_len: u64) -> StoreResult<(ObjectMeta, Bytes)> {
        match self {
            AnyStore::Local(s) => s.get_tail(key, max_len).await,
            AnyStore::S3(s) => s.get_tail(key, max_len).await,
        }
    }

    async fn put(&self, key: &str, source: PutSource) -> StoreResult<ObjectMeta> {
        match self {
            AnyStore::Local(s) => s.put(key, source).await,
            AnyStore::S3(s) => s.put(key, source).await,
        }
    }

    async fn refresh(&self, key: &str, older_than: SystemTime) -> StoreResult<RefreshOutcome> {
        match self {
            AnyStore::Local(s) => s.refresh(key, older_than).await,
            AnyStore::S3(s) => s.refresh(key, older_than).await,
        }
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ListedObject>> {
        match self {
            AnyStore::Local(s) => s.list(prefix).await,
            AnyStore::S3(s) => s.list(prefix).await,
        }
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        match self {
            AnyStore::Local(s) => s.delete(key).await,
            AnyStore::S3(s) => s.delete(key).await,
        }
    }

    async fn compose(&self, key: &str, composition: Composition) -> StoreResult<ObjectMeta> {
        match self {
            AnyStore::Local(s) => s.compose(key, composition).await,
            AnyStore::S3(s) => s.compose(key, composition).await,
        }
    }

    fn transfer_counts(&self) -> TransferCounts {
        match self {
            AnyStore::Local(s) => s.transfer_counts(),
            AnyStore::S3(s) => s.transfer_counts(),
        }
    }

    fn open_local(&self, key: &str) -> Option<StoreResult<(std::fs::File, ObjectMeta)>> {
        match self {
            AnyStore::Local(s) => s.open_local(key),
            AnyStore::S3(s) => s.open_local(key),
        }
    }
}
