//! [`S3Store`]: the object store on S3 or any S3-compatible server (aws-sdk-s3).
//!
//! This file owns the client (built from the AWS configuration chain and a
//! [`RetryPolicy`]), the mapping of SDK errors onto [`StoreError`] — by HTTP
//! status where servers disagree on error codes (a 412 may come with an empty
//! body) — and the [`ObjectStore`] impl: HEAD, single PUTs, the lifetime
//! refresh by server-side self-copy, paginated listing, deletes. The handle
//! counts the bytes each request sends, copies and receives ([`TransferCounts`]).
//! The other jobs have a file each:
//! - `retry.rs`: the retry policy (attempts, timeouts, backoff). Network faults
//!   are handled in two layers: the SDK's standard retry mode (exponential
//!   backoff with full jitter) retries whole requests that fail before a body
//!   flows — 5xx, 503 SlowDown, throttling, connection errors, attempts that
//!   time out waiting for a response;
//! - `read.rs`: the second layer, ETag-pinned range GETs (`If-Match`, plus
//!   `versionId` when the bucket has versions) whose body is resumed with a
//!   GET of the remaining sub-range when it breaks, ends early or stalls,
//!   pinned to the version the first bytes came from;
//! - `multipart.rs`: the one multipart runner and what uses it: uploads of large
//!   archives with bounded concurrency, compositions ([`ObjectStore::compose`]:
//!   `UploadPartCopy` ranges of the base, then the local tail) and the refresh
//!   of objects above CopyObject's 5 GiB limit.

use std::error::Error as StdError;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use aws_config::environment::EnvironmentVariableCredentialsProvider;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::ProvideCredentials;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::MetadataDirective;
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::{
    Composition, ListedObject, NameTooLong, ObjectMeta, ObjectStore, ObjectVersion, Pieces,
    PutSource, RefreshOutcome, StoreError, StoreResult, TransferCounters, TransferCounts,
};

/// Sets on a request that rewrites an object (CopyObject with `REPLACE`,
/// CreateMultipartUpload) the attributes of `head` that the rewrite would
/// otherwise drop: user metadata, content headers, storage class, encryption.
/// A macro because the two requests' builders share no trait.
macro_rules! with_attributes_of {
    ($request:expr, $head:expr) => {{
        let head: &HeadObjectOutput = $head;
        $request
            .set_metadata(head.metadata().cloned())
            .set_content_type(head.content_type().map(str::to_string))
            .set_content_encoding(head.content_encoding().map(str::to_string))
            .set_content_disposition(head.content_disposition().map(str::to_string))
            .set_cache_control(head.cache_control().map(str::to_string))
            .set_storage_class(head.storage_class().cloned())
            .set_server_side_encryption(head.server_side_encryption().cloned())
            .set_ssekms_key_id(head.ssekms_key_id().map(str::to_string))
    }};
}

mod multipart;
mod read;
mod retry;

pub use read::parse_content_range;
pub use retry::RetryPolicy;

/// S3's longest object key, in bytes of UTF-8 (the prefix included).
const MAX_OBJECT_KEY_LEN: usize = 1024;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// CopyObject refuses sources larger than this; bigger objects are copied in parts.
const COPY_OBJECT_MAX: u64 = 5 * GIB;

/// Sizes and concurrency of the multipart paths. The defaults suit archives of
/// hundreds of MiB to tens of GiB; tests shrink them to exercise the paths cheaply.
#[derive(Debug, Clone)]
pub struct S3Tuning {
    /// Files at least this large are uploaded as multipart.
    pub multipart_threshold: u64,
    /// Smallest multipart part (raised for huge files to stay within 10 000 parts).
    pub min_part_size: u64,
    /// Parts in flight at once, for uploads and part copies.
    pub concurrency: usize,
    /// Objects larger than this are refreshed with a multipart copy.
    pub copy_object_max: u64,
    /// Range size of one `UploadPartCopy` (S3 allows at most 5 GiB).
    pub copy_part_size: u64,
    /// `max-keys` for listing; `None` leaves the server's default (1000 on AWS).
    pub list_page_size: Option<i32>,
}

impl Default for S3Tuning {
    fn default() -> Self {
        S3Tuning {
            multipart_threshold: 64 * MIB,
            min_part_size: 16 * MIB,
            concurrency: 4,
            copy_object_max: COPY_OBJECT_MAX,
            copy_part_size: GIB,
            list_page_size: None,
        }
    }
}

/// A bucket (and key prefix inside it) on S3 or an S3-compatible server.
#[derive(Debug, Clone)]
pub struct S3Store {
    /// For writes (PUT, parts, copies): long attempt timeout.
    client: Client,
    /// For reads (GET, HEAD, list): short attempt timeout.
    read_client: Client,
    bucket: String,
    /// Empty, or ending in `/`.
    prefix: String,
    /// Where requests go, for error messages.
    endpoint: String,
    /// Boxed: keeps the store small to move around (it is in an enum with the local one).
    tuning: Arc<S3Tuning>,
    /// What the clients were built with; the read resumption follows it too.
    retry: Arc<RetryPolicy>,
    /// Shared by the clones of this handle.
    counters: Arc<TransferCounters>,
}

impl S3Store {
    /// Builds a client from the standard AWS configuration chain (environment,
    /// profile, instance role; `AWS_ENDPOINT_URL` included), overridden by
    /// `endpoint_url` and `region` when given. Without any configured region it
    /// uses us-east-1 (S3-compatible servers mostly ignore it). An explicit
    /// endpoint implies path-style addressing, which S3-compatible servers need.
    /// Retries and timeouts follow `retry`.
    pub async fn new(
        bucket: &str,
        prefix: &str,
        endpoint_url: Option<String>,
        region: Option<String>,
        retry: RetryPolicy,
    ) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = region {
            loader = loader.region(Region::new(region));
        }
        if let Some(endpoint_url) = endpoint_url {
            loader = loader.endpoint_url(endpoint_url);
        }
        // The default chain's first link is the environment, and the one that
        // answers wins: when the environment has credentials, the chain's
        // other links (profiles, SSO, web identity, container and instance
        // roles) would never be asked. Building them is most of what loading
        // the configuration costs, on the path of every mount's start-up.
        let env = EnvironmentVariableCredentialsProvider::new();
        if env.provide_credentials().await.is_ok() {
            loader = loader.credentials_provider(env);
        }
        let sdk = loader.load().await;
        // Integrity is checked end to end by the archive's own checksums; the SDK's
        // default extra checksums (aws-chunked uploads) break several S3-compatible servers.
        let mut config = aws_sdk_s3::config::Builder::from(&sdk)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_partition(retry::retry_partition());
        let region = sdk
            .region()
            .cloned()
            .unwrap_or_else(|| Region::new("us-east-1"));
        config = config.region(region.clone());
        let endpoint = match sdk.endpoint_url() {
            Some(url) => {
                config = config.force_path_style(true);
                // A plain-HTTP endpoint (an S3 server on the host or the
                // network) needs no TLS: the default client would load the
                // system's CA bundle at the first request, on the path of
                // every mount's start-up.
                if url.starts_with("http://") {
                    config =
                        config.http_client(aws_smithy_http_client::Builder::new().build_http());
                }
                url.to_string()
            }
            None => format!("AWS S3 ({region})"),
        };
        let prefix = prefix.trim_matches('/');
        let (client, read_client) = retry.clients(&config.build());
        S3Store {
            client,
            read_client,
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            endpoint,
            tuning: Arc::default(),
            retry: Arc::new(retry),
            counters: Arc::default(),
        }
    }

    /// Replaces the multipart and listing parameters.
    pub fn with_tuning(mut self, tuning: S3Tuning) -> Self {
        self.tuning = Arc::new(tuning);
        self
    }

    /// The parameters in use.
    pub fn tuning(&self) -> &S3Tuning {
        &self.tuning
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{}{key}", self.bucket, self.prefix)
    }

    /// Maps an SDK error on `key` onto the store's error kinds.
    fn map_err<E>(
        &self,
        key: &str,
        err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        if let Some(raw) = err.raw_response() {
            let status = raw.status().as_u16();
            let code = err.code().unwrap_or_default();
            return match status {
                // By status: some servers send a 412 with an empty body, no code.
                412 => StoreError::PreconditionFailed(self.location(key)),
                404 if code == "NoSuchBucket" => StoreError::NoSuchBucket(self.bucket.clone()),
                404 => StoreError::NotFound(self.location(key)),
                403 if matches!(
                    code,
                    "InvalidAccessKeyId"
                        | "SignatureDoesNotMatch"
                        | "ExpiredToken"
                        | "InvalidToken"
                        | "TokenRefreshRequired"
                ) =>
                {
                    StoreError::Credentials(format!("{} rejected them: {code}", self.endpoint))
                }
                403 => StoreError::AccessDenied(self.location(key)),
                _ => StoreError::other(
                    self.location(key),
                    format!(
                        "HTTP {status} from {}: {}",
                        self.endpoint,
                        error_chain(&err)
                    ),
                ),
            };
        }
        if let Some(message) = credentials_error(&err) {
            return StoreError::Credentials(message);
        }
        match &err {
            SdkError::TimeoutError(_) => StoreError::Unreachable {
                endpoint: self.endpoint.clone(),
                message: "request timed out".into(),
            },
            SdkError::DispatchFailure(failure) if failure.is_io() || failure.is_timeout() => {
                StoreError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    message: error_chain(&err),
                }
            }
            _ => StoreError::other(self.location(key), error_chain(&err)),
        }
    }

    async fn head_raw(&self, key: &str) -> StoreResult<HeadObjectOutput> {
        let result = self
            .read_client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.map_err(key, e));
        match result {
            // A HEAD's 404 has no body, so it cannot say "no such bucket"; ask
            // the bucket once on this (rare) path so the user learns which it is.
            Err(StoreError::NotFound(location)) => Err(self
                .bucket_missing()
                .await
                .unwrap_or(StoreError::NotFound(location))),
            other => other,
        }
    }

    /// `NoSuchBucket` when HeadBucket says 404; None when it exists or cannot tell.
    async fn bucket_missing(&self) -> Option<StoreError> {
        let err = self
            .read_client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .err()?;
        let status = err.raw_response().map(|r| r.status().as_u16());
        (status == Some(404)).then(|| StoreError::NoSuchBucket(self.bucket.clone()))
    }

    fn etag_of(&self, key: &str, etag: Option<&str>) -> StoreResult<String> {
        etag.map(normalize_etag)
            .ok_or_else(|| StoreError::other(self.location(key), "the server sent no ETag"))
    }

    /// The metadata of what a PUT just wrote. Another writer may have replaced it
    /// since (last writer wins); then our version is gone and "now" is as good a
    /// modification time as any.
    async fn meta_after_put(
        &self,
        key: &str,
        size: u64,
        version: ObjectVersion,
    ) -> StoreResult<ObjectMeta> {
        let head = self
            .read_client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .if_match(quote_etag(&version.etag))
            .send()
            .await;
        let last_modified = match head {
            Ok(out) => out
                .last_modified()
                .and_then(to_system_time)
                .unwrap_or_else(SystemTime::now),
            Err(e) => match self.map_err(key, e) {
                StoreError::PreconditionFailed(_) | StoreError::NotFound(_) => SystemTime::now(),
                other => return Err(other),
            },
        };
        Ok(ObjectMeta {
            size,
            version,
            last_modified,
        })
    }

    async fn put_single(&self, key: &str, body: ByteStream, size: u64) -> StoreResult<ObjectMeta> {
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .content_length(size as i64)
            .body(body)
            .send()
            .await
            .map_err(|e| self.map_err(key, e))?;
        self.counters.uploaded(size);
        let version = ObjectVersion {
            etag: self.etag_of(key, out.e_tag())?,
            version_id: out.version_id().map(str::to_string),
        };
        self.meta_after_put(key, size, version).await
    }
}

/// The size of the local file `path` (an archive or a composition's tail).
async fn file_len(path: &Path) -> StoreResult<u64> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| StoreError::Io {
            context: format!("reading {}", path.display()),
            error: e,
        })?;
    Ok(meta.len())
}

/// ETags come quoted from most servers, unquoted from some (SeaweedFS's copy
/// results); versions compare unquoted.
pub fn normalize_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

pub fn quote_etag(etag: &str) -> String {
    format!("\"{etag}\"")
}

fn to_system_time(t: &DateTime) -> Option<SystemTime> {
    SystemTime::try_from(*t).ok()
}

/// An error and its causes as one line (`a: b: c`), without the SDK's Debug dumps.
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let message = e.to_string();
        // Wrappers often repeat their cause's message; say it once.
        if !out.contains(&message) {
            out.push_str(": ");
            out.push_str(&message);
        }
        cause = e.source();
    }
    out
}

/// Finds a credential-chain failure (no credentials anywhere) among the causes.
fn credentials_error(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(creds) = e.downcast_ref::<CredentialsError>() {
            return Some(error_chain(creds));
        }
        cause = e.source();
    }
    None
}

impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        match self.prefix.trim_end_matches('/') {
            "" => format!("s3://{}", self.bucket),
            prefix => format!("s3://{}/{prefix}", self.bucket),
        }
    }

    fn check_name(&self, key: &str) -> Result<(), NameTooLong> {
        let len = self.full_key(key).len();
        if len > MAX_OBJECT_KEY_LEN {
            return Err(NameTooLong {
                limit: "S3's object key limit",
                len,
                max: MAX_OBJECT_KEY_LEN,
            });
        }
        Ok(())
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let out = self.head_raw(key).await?;
        Ok(ObjectMeta {
            size: out.content_length().unwrap_or(0).max(0) as u64,
            version: ObjectVersion {
                etag: self.etag_of(key, out.e_tag())?,
                version_id: out.version_id().map(str::to_string),
            },
            last_modified: out
                .last_modified()
                .and_then(to_system_time)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        })
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        pin: Option<&ObjectVersion>,
    ) -> StoreResult<Bytes> {
        self.read_range(key, range, pin).await
    }

    async fn get_range_pieces(&self, key: &str, range: Range<u64>) -> StoreResult<Pieces> {
        self.read_range_pieces(key, range).await
    }

    async fn get_tail(&self, key: &str, max_len: u64) -> StoreResult<(ObjectMeta, Bytes)> {
        self.read_tail(key, max_len).await
    }

    async fn put(&self, key: &str, source: PutSource) -> StoreResult<ObjectMeta> {
        match source {
            PutSource::Bytes(bytes) => {
                let size = bytes.len() as u64;
                self.put_single(key, ByteStream::from(bytes), size).await
            }
            PutSource::File(path) => {
                let size = file_len(&path).await?;
                if size >= self.tuning.multipart_threshold {
                    return self.put_joined(key, Bytes::new(), &path, size).await;
                }
                let body = ByteStream::from_path(&path).await.map_err(|e| {
                    StoreError::other(
                        self.location(key),
                        format!("reading {}: {e}", path.display()),
                    )
                })?;
                self.put_single(key, body, size).await
            }
        }
    }

    async fn refresh(&self, key: &str, older_than: SystemTime) -> StoreResult<RefreshOutcome> {
        let head = self.head_raw(key).await?;
        let modified = head
            .last_modified()
            .and_then(to_system_time)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        if modified > older_than {
            return Ok(RefreshOutcome::StillFresh);
        }
        let size = head.content_length().unwrap_or(0).max(0) as u64;
        if size > self.tuning.copy_object_max {
            return self.refresh_multipart(key, &head, size).await;
        }
        // REPLACE is what makes a self-copy legal; it also drops the attributes, so copy them over.
        let copy = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .copy_source(multipart::copy_source(
                &self.bucket,
                &self.full_key(key),
                None,
            ))
            .metadata_directive(MetadataDirective::Replace)
            .copy_source_if_unmodified_since(DateTime::from(older_than));
        match with_attributes_of!(copy, &head).send().await {
            Ok(_) => {
                self.counters.copied(size);
                Ok(RefreshOutcome::Refreshed)
            }
            Err(e) => match self.map_err(key, e) {
                // Modified after `older_than` (by someone else, since our HEAD).
                StoreError::PreconditionFailed(_) => Ok(RefreshOutcome::StillFresh),
                other => Err(other),
            },
        }
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ListedObject>> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .read_client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(self.full_key(prefix))
                .set_max_keys(self.tuning.list_page_size)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.map_err(prefix, e))?;
            for object in page.contents() {
                let Some(key) = object.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                out.push(ListedObject {
                    key: key.to_string(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                    last_modified: object
                        .last_modified()
                        .and_then(to_system_time)
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn compose(&self, key: &str, composition: Composition) -> StoreResult<ObjectMeta> {
        self.compose_object(key, composition).await
    }

    fn transfer_counts(&self) -> TransferCounts {
        self.counters.snapshot()
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let deleted = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.map_err(key, e));
        match deleted {
            Ok(_) | Err(StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_compare_without_quotes() {
        assert_eq!(normalize_etag("\"abc-3\""), "abc-3");
        assert_eq!(normalize_etag("abc"), "abc");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
    }
}
