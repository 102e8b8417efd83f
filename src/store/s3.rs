//! [`S3Store`]: the object store on S3 or any S3-compatible server (aws-sdk-s3).
//!
//! It owns the S3 specifics cachemount relies on: ETag-pinned range GETs
//! (`If-Match`, plus `versionId` when the bucket has versions), multipart upload
//! of large archives with bounded concurrency, the lifetime refresh by server-side
//! self-copy (multipart `UploadPartCopy` above CopyObject's 5 GiB limit), paginated
//! listing, and the mapping of SDK errors onto [`StoreError`] — by HTTP status
//! where servers disagree on error codes (a 412 may come with an empty body).
//! A composition ([`ObjectStore::compose`]) is a multipart upload whose first
//! parts are `UploadPartCopy` ranges of the base, pinned to its version, and
//! whose last parts are the local tail; the handle counts the bytes each
//! request sends, copies and receives ([`TransferCounts`]).
//!
//! Network faults are handled in two layers ([`RetryPolicy`]): the SDK's standard
//! retry mode (exponential backoff with full jitter) retries whole requests that
//! fail before a body flows — 5xx, 503 SlowDown, throttling, connection errors,
//! attempts that time out waiting for a response. A GET body that breaks, ends
//! early or stalls mid-transfer is beyond the SDK's reach; [`read_resuming`]
//! resumes it with a GET of the remaining sub-range, pinned to the version the
//! first bytes came from, so a read never mixes two versions.

use std::error::Error as StdError;
use std::future::Future;
use std::ops::Range;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::retry::{RetryPartition, TokenBucket};
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::primitives::{ByteStream, DateTime, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, MetadataDirective};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use futures::future::Either;
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::time::Instant;

use super::{
    Composition, ListedObject, ObjectMeta, ObjectStore, ObjectVersion, PutSource, RefreshOutcome,
    StoreError, StoreResult, TransferCounters, TransferCounts,
};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// S3 refuses more parts than this in one multipart upload.
const MAX_PARTS: u64 = 10_000;
/// CopyObject refuses sources larger than this; bigger objects are copied in parts.
const COPY_OBJECT_MAX: u64 = 5 * GIB;
/// S3 refuses a multipart part (uploaded or copied) smaller than this, except the last.
const PART_MIN: u64 = 5 * MIB;
/// S3 refuses a multipart part (uploaded or copied) larger than this.
const PART_MAX: u64 = 5 * GIB;

/// How requests and reads survive a flaky network or a struggling server.
///
/// The defaults suit CI: transient faults (a dropped connection, a burst of 503
/// SlowDown, a stalled transfer) cost seconds and are invisible to the caller;
/// a store that is down makes a read fail within about two minutes with an error
/// that says what happened (the mount turns it into `EIO` and a log line),
/// rather than hanging a build for the job's whole timeout.
///
/// [`S3Store::new`] starts from [`RetryPolicy::default`] overridden by the
/// environment ([`RetryPolicy::from_env`]); `with_tuning` replaces it.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per S3 request, the first included (SDK standard retry mode:
    /// 5xx, 503 SlowDown and other throttling, timeouts and connection errors are
    /// retried). 5 rather than the SDK's 3: at a 20 % SlowDown rate a request
    /// still fails once in ~3000 instead of once in ~125. `CACHEMOUNT_S3_ATTEMPTS`.
    pub max_attempts: u32,
    /// Backoff before the first retry; it doubles per retry up to `max_backoff`,
    /// and each wait is a uniformly random fraction of that (full jitter), so
    /// many readers hitting one throttled prefix spread out.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Establishing a TCP (+TLS) connection. Short: failing fast on a dead
    /// endpoint matters more than patience, and a refused connection is retried.
    pub connect_timeout: Duration,
    /// One attempt of a read request (GET, HEAD, list) until its response
    /// headers arrive. S3 answers in milliseconds to a few hundred; 20 s without
    /// headers is a dead connection or a wedged server, worth a new attempt.
    /// `CACHEMOUNT_S3_READ_TIMEOUT` (seconds).
    pub read_attempt_timeout: Duration,
    /// One attempt of a write (PutObject, a multipart part, a copy), body
    /// included: it must fit a whole part (16 MiB+) on a slow link.
    pub write_attempt_timeout: Duration,
    /// A GET body that delivers no byte for this long is abandoned and resumed
    /// from the bytes received. `CACHEMOUNT_S3_STALL_TIMEOUT` (seconds).
    pub body_stall_timeout: Duration,
    /// How often one read resumes a body that was cut, ended early or stalled,
    /// before failing.
    pub max_body_retries: u32,
    /// Ceiling on one read: no new request or resumption starts after it, and
    /// waiting for a response (the SDK's retries included) is cut off at it. A body
    /// that keeps flowing is never cut (the stall timeout bounds it instead), so a
    /// read that stops making progress fails at most `read_deadline +
    /// body_stall_timeout` after it started.
    /// `CACHEMOUNT_S3_READ_DEADLINE` (seconds).
    pub read_deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            read_attempt_timeout: Duration::from_secs(20),
            write_attempt_timeout: Duration::from_secs(120),
            body_stall_timeout: Duration::from_secs(10),
            max_body_retries: 5,
            read_deadline: Duration::from_secs(120),
        }
    }
}

/// Environment variables that override [`RetryPolicy`] fields.
pub const ENV_ATTEMPTS: &str = "CACHEMOUNT_S3_ATTEMPTS";
pub const ENV_READ_TIMEOUT: &str = "CACHEMOUNT_S3_READ_TIMEOUT";
pub const ENV_STALL_TIMEOUT: &str = "CACHEMOUNT_S3_STALL_TIMEOUT";
pub const ENV_READ_DEADLINE: &str = "CACHEMOUNT_S3_READ_DEADLINE";

impl RetryPolicy {
    /// The defaults, overridden by `CACHEMOUNT_S3_ATTEMPTS`,
    /// `CACHEMOUNT_S3_READ_TIMEOUT`, `CACHEMOUNT_S3_STALL_TIMEOUT` and
    /// `CACHEMOUNT_S3_READ_DEADLINE` (seconds, fractions allowed). A malformed
    /// value is ignored with a warning.
    pub fn from_env() -> Self {
        let (policy, problems) = Self::default().with_vars(|name| std::env::var(name).ok());
        for problem in problems {
            tracing::warn!("{problem}");
        }
        policy
    }

    /// `self` with the variables `get` returns applied; also the malformed ones.
    fn with_vars(mut self, get: impl Fn(&str) -> Option<String>) -> (Self, Vec<String>) {
        let mut problems = Vec::new();
        let mut seconds = |name: &str, field: &mut Duration| {
            let Some(value) = get(name) else { return };
            match value.trim().parse::<f64>() {
                Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => *field = Duration::from_secs_f64(s),
                _ => problems.push(format!(
                    "ignoring {name}={value:?}: expected a positive number of seconds"
                )),
            }
        };
        seconds(ENV_READ_TIMEOUT, &mut self.read_attempt_timeout);
        seconds(ENV_STALL_TIMEOUT, &mut self.body_stall_timeout);
        seconds(ENV_READ_DEADLINE, &mut self.read_deadline);
        if let Some(value) = get(ENV_ATTEMPTS) {
            match value.trim().parse::<u32>() {
                Ok(n) if (1..=100).contains(&n) => self.max_attempts = n,
                _ => problems.push(format!(
                    "ignoring {ENV_ATTEMPTS}={value:?}: expected a whole number from 1 to 100"
                )),
            }
        }
        (self, problems)
    }

    /// The wait before resuming a body for the `n`th time (from 1): exponential
    /// with full jitter, like the SDK's.
    fn resume_backoff(&self, n: u32) -> Duration {
        let cap = self
            .initial_backoff
            .saturating_mul(1 << n.saturating_sub(1).min(16))
            .min(self.max_backoff);
        cap.mul_f64(jitter())
    }
}

/// A number in [0, 1), different on each call (good enough for backoff jitter).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

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
    /// Retries and timeouts.
    pub retry: RetryPolicy,
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
            retry: RetryPolicy::default(),
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
    /// The configuration both clients derive from (endpoint, region, credentials,
    /// retry partition); kept to rebuild them when the policy changes.
    base: Arc<aws_sdk_s3::Config>,
    bucket: String,
    /// Empty, or ending in `/`.
    prefix: String,
    /// Where requests go, for error messages.
    endpoint: String,
    /// Boxed: keeps the store small to move around (it is in an enum with the local one).
    tuning: Arc<S3Tuning>,
    /// Shared by the clones of this handle.
    counters: Arc<TransferCounters>,
}

impl S3Store {
    /// Builds a client from the standard AWS configuration chain (environment,
    /// profile, instance role; `AWS_ENDPOINT_URL` included), overridden by
    /// `endpoint_url` and `region` when given. Without any configured region it
    /// uses us-east-1 (S3-compatible servers mostly ignore it). An explicit
    /// endpoint implies path-style addressing, which S3-compatible servers need.
    /// Retries and timeouts: [`RetryPolicy::from_env`].
    pub async fn new(
        bucket: &str,
        prefix: &str,
        endpoint_url: Option<String>,
        region: Option<String>,
    ) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = region {
            loader = loader.region(Region::new(region));
        }
        if let Some(endpoint_url) = endpoint_url {
            loader = loader.endpoint_url(endpoint_url);
        }
        let sdk = loader.load().await;
        // Integrity is checked end to end by the archive's own checksums; the SDK's
        // default extra checksums (aws-chunked uploads) break several S3-compatible servers.
        let mut config = aws_sdk_s3::config::Builder::from(&sdk)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_partition(retry_partition());
        let region = sdk
            .region()
            .cloned()
            .unwrap_or_else(|| Region::new("us-east-1"));
        config = config.region(region.clone());
        let endpoint = match sdk.endpoint_url() {
            Some(url) => {
                config = config.force_path_style(true);
                url.to_string()
            }
            None => format!("AWS S3 ({region})"),
        };
        let prefix = prefix.trim_matches('/');
        let base = Arc::new(config.build());
        let tuning = S3Tuning {
            retry: RetryPolicy::from_env(),
            ..S3Tuning::default()
        };
        let (client, read_client) = clients(&base, &tuning.retry);
        S3Store {
            client,
            read_client,
            base,
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            endpoint,
            tuning: Arc::new(tuning),
            counters: Arc::default(),
        }
    }

    /// Replaces the multipart, listing and retry parameters.
    pub fn with_tuning(mut self, tuning: S3Tuning) -> Self {
        if tuning.retry != self.tuning.retry {
            (self.client, self.read_client) = clients(&self.base, &tuning.retry);
        }
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
                _ => StoreError::Other {
                    key: self.location(key),
                    message: format!(
                        "HTTP {status} from {}: {}",
                        self.endpoint,
                        error_chain(&err)
                    ),
                },
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
            _ => StoreError::Other {
                key: self.location(key),
                message: error_chain(&err),
            },
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
        etag.map(normalize_etag).ok_or_else(|| StoreError::Other {
            key: self.location(key),
            message: "the server sent no ETag".into(),
        })
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

    async fn put_multipart(&self, key: &str, path: &Path, size: u64) -> StoreResult<ObjectMeta> {
        let full_key = self.full_key(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full_key)
            .send()
            .await
            .map_err(|e| self.map_err(key, e))?;
        let part_size = part_size(size, self.tuning.min_part_size);
        let version = self
            .run_multipart(key, created.upload_id(), |upload_id| {
                upload_ranges(size, part_size)
                    .map(|(number, range)| {
                        self.upload_part(key, upload_id, number, PartBody::file(path, range))
                    })
                    .collect()
            })
            .await?;
        self.meta_after_put(key, size, version).await
    }

    /// Runs the parts of a multipart upload (`make_parts(upload_id)`), at most
    /// `concurrency` at once, and completes it; on any failure the upload is
    /// aborted, so no orphaned parts are left to pay for.
    async fn run_multipart<'a, F, Fut>(
        &self,
        key: &str,
        upload_id: Option<&'a str>,
        make_parts: F,
    ) -> StoreResult<ObjectVersion>
    where
        F: FnOnce(&'a str) -> Vec<Fut>,
        Fut: std::future::Future<Output = StoreResult<CompletedPart>>,
    {
        let upload_id = upload_id.ok_or_else(|| StoreError::Other {
            key: self.location(key),
            message: "the server sent no upload id".into(),
        })?;
        let result = async {
            let parts = futures::stream::iter(make_parts(upload_id))
                .buffer_unordered(self.tuning.concurrency)
                .try_collect()
                .await?;
            self.complete(key, upload_id, parts).await
        }
        .await;
        if result.is_err() {
            self.abort(key, upload_id).await;
        }
        result
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        part: PartBody<'_>,
    ) -> StoreResult<CompletedPart> {
        let PartBody { head, path, range } = part;
        let len = head.len() as u64 + (range.end - range.start);
        let reading_failed = |e: &dyn std::fmt::Display| StoreError::Other {
            key: self.location(key),
            message: format!("reading part {number} from {}: {e}", path.display()),
        };
        let body = if head.is_empty() {
            // Streams the part from the file (and re-reads it on a retry): no part is held in memory.
            ByteStream::read_from()
                .path(path)
                .offset(range.start)
                .length(Length::Exact(range.end - range.start))
                .build()
                .await
                .map_err(|e| reading_failed(&e))?
        } else if range.is_empty() {
            ByteStream::from(head)
        } else {
            // Only the part joining a composition's downloaded prefix to its tail:
            // at most one part, in memory.
            let mut joined = BytesMut::with_capacity(len as usize);
            joined.extend_from_slice(&head);
            joined.resize(len as usize, 0);
            read_file_range(path, range.start, &mut joined[head.len()..])
                .await
                .map_err(|e| reading_failed(&e))?;
            ByteStream::from(joined.freeze())
        };
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .upload_id(upload_id)
            .part_number(number)
            .content_length(len as i64)
            .body(body)
            .send()
            .await
            .map_err(|e| self.map_err(key, e))?;
        self.counters.uploaded(len);
        Ok(CompletedPart::builder()
            .part_number(number)
            .e_tag(self.etag_of(key, out.e_tag())?)
            .build())
    }

    async fn complete(
        &self,
        key: &str,
        upload_id: &str,
        mut parts: Vec<CompletedPart>,
    ) -> StoreResult<ObjectVersion> {
        parts.sort_by_key(|p| p.part_number());
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.map_err(key, e))?;
        Ok(ObjectVersion {
            etag: self.etag_of(key, out.e_tag())?,
            version_id: out.version_id().map(str::to_string),
        })
    }

    /// Best effort: an upload left behind only costs storage until the bucket's
    /// abort-incomplete-multipart lifecycle rule (if any) removes it.
    async fn abort(&self, key: &str, upload_id: &str) {
        let aborted = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(e) = aborted {
            tracing::warn!(key = %self.location(key), error = %error_chain(&e), "aborting a multipart upload failed");
        }
    }

    /// One GET of `want`, pinned to `version` when given (the SDK retries it
    /// until a response starts). The body is left to the caller.
    async fn get_attempt(
        &self,
        key: &str,
        want: Range<u64>,
        version: Option<ObjectVersion>,
    ) -> StoreResult<Answer<Body>> {
        let request = self
            .read_client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .range(format!("bytes={}-{}", want.start, want.end - 1))
            .set_if_match(version.as_ref().map(|p| quote_etag(&p.etag)))
            .set_version_id(version.and_then(|p| p.version_id));
        let out = match request.send().await {
            Ok(out) => out,
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                let size = self.head(key).await?.size;
                return Err(StoreError::InvalidRange {
                    key: self.location(key),
                    range: want,
                    size,
                });
            }
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                return Err(match self.map_err(key, e) {
                    // Retryable statuses (500, 503 SlowDown, …) that stayed.
                    StoreError::Other { key, message }
                        if status.is_some_and(|s| s >= 500 || s == 429) =>
                    {
                        StoreError::Other {
                            key,
                            message: format!(
                                "{message} (after up to {} attempts)",
                                self.tuning.retry.max_attempts
                            ),
                        }
                    }
                    StoreError::Unreachable { endpoint, message } => StoreError::Unreachable {
                        endpoint,
                        message: format!(
                            "reading bytes {}-{} of {}: {message} (after up to {} attempts, \
                             each waiting up to {:?} for an answer)",
                            want.start,
                            want.end - 1,
                            self.location(key),
                            self.tuning.retry.max_attempts,
                            self.tuning.retry.read_attempt_timeout
                        ),
                    },
                    other => other,
                });
            }
        };
        let (start, total) = match out.content_range().and_then(parse_content_range) {
            Some((start, _, total)) => (start, total),
            // A 200: the whole object.
            None => (0, out.content_length().map(|l| l.max(0) as u64)),
        };
        Ok(Answer {
            version: out.e_tag().map(|etag| ObjectVersion {
                etag: normalize_etag(etag),
                version_id: out.version_id().map(str::to_string),
            }),
            start,
            total,
            body: {
                let counters = self.counters.clone();
                Box::pin(body_chunks(out.body).inspect(move |chunk| {
                    if let Ok(bytes) = chunk {
                        counters.downloaded(bytes.len() as u64);
                    }
                }))
            },
        })
    }

    /// One `UploadPartCopy` of `range` of `source` as part `number` of `key`'s
    /// upload. Errors are about the source (412: it is no longer the pinned
    /// version; 404: it is gone).
    async fn copy_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &CopySource<'_>,
        range: Range<u64>,
    ) -> StoreResult<CompletedPart> {
        let out = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .upload_id(upload_id)
            .part_number(number)
            .copy_source(&source.header)
            .copy_source_range(format!("bytes={}-{}", range.start, range.end - 1))
            .copy_source_if_match(&source.if_match)
            .send()
            .await
            .map_err(|e| match self.map_err(source.key, e) {
                // The pinned version id was deleted, as in get_range.
                StoreError::NotFound(location) if source.version_pinned => {
                    StoreError::PreconditionFailed(location)
                }
                other => other,
            })?;
        self.counters.copied(range.end - range.start);
        let part_etag = out.copy_part_result().and_then(|r| r.e_tag());
        Ok(CompletedPart::builder()
            .part_number(number)
            .e_tag(self.etag_of(key, part_etag)?)
            .build())
    }

    /// The size of `key`, if it is still `version`: a HEAD pinned like a read
    /// (`If-Match`, `versionId`), and the answer's ETag checked too, for
    /// servers that ignore `If-Match`.
    async fn size_if_version(&self, key: &str, version: &ObjectVersion) -> StoreResult<u64> {
        let out = self
            .read_client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .if_match(quote_etag(&version.etag))
            .set_version_id(version.version_id.clone())
            .send()
            .await
            .map_err(|e| match self.map_err(key, e) {
                StoreError::NotFound(location) if version.version_id.is_some() => {
                    StoreError::PreconditionFailed(location)
                }
                other => other,
            })?;
        if self.etag_of(key, out.e_tag())? != version.etag {
            return Err(StoreError::PreconditionFailed(self.location(key)));
        }
        Ok(out.content_length().unwrap_or(0).max(0) as u64)
    }

    /// [`ObjectStore::compose`]. The base is checked first (HEAD pinned to its
    /// version): a stale base or a prefix past its end fails before any upload
    /// starts — and on servers that ignore `CopySourceIfMatch` on
    /// `UploadPartCopy` (moto) or answer a range past the end with the whole
    /// object (moto again), that check is the only one, so a base replaced in the
    /// moment between it and the copies goes unnoticed there. AWS and SeaweedFS
    /// refuse such a copy with 412, which aborts the upload.
    async fn compose_object(&self, key: &str, c: Composition) -> StoreResult<ObjectMeta> {
        let base_size = self.size_if_version(&c.base_key, &c.base_version).await?;
        if c.prefix_len > base_size {
            return Err(StoreError::InvalidRange {
                key: self.location(&c.base_key),
                range: 0..c.prefix_len,
                size: base_size,
            });
        }
        let tail_len = tokio::fs::metadata(&c.tail)
            .await
            .map_err(|e| StoreError::Io {
                context: format!("reading {}", c.tail.display()),
                error: e,
            })?
            .len();
        if c.prefix_len < PART_MIN {
            // A copied part this small could only be the last one: send the prefix
            // with the tail instead (at most 5 MiB more on the wire).
            let prefix = if c.prefix_len == 0 {
                Bytes::new()
            } else {
                self.get_range(&c.base_key, 0..c.prefix_len, Some(&c.base_version))
                    .await?
            };
            return self.put_joined(key, prefix, &c.tail, tail_len).await;
        }

        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.map_err(key, e))?;
        let copies = copy_ranges(c.prefix_len, self.tuning.copy_part_size);
        let copy_parts = copies.len() as i32;
        let tail_part_size = part_size_within(
            tail_len,
            self.tuning.min_part_size,
            MAX_PARTS - copies.len() as u64,
        );
        let source = CopySource {
            key: &c.base_key,
            header: copy_source(
                &self.bucket,
                &self.full_key(&c.base_key),
                c.base_version.version_id.as_deref(),
            ),
            if_match: quote_etag(&c.base_version.etag),
            version_pinned: c.base_version.version_id.is_some(),
        };
        let version = self
            .run_multipart(key, created.upload_id(), |upload_id| {
                let copied = (1..).zip(copies).map(|(number, range)| {
                    Either::Left(self.copy_part(key, upload_id, number, &source, range))
                });
                let sent = upload_ranges(tail_len, tail_part_size).map(|(number, range)| {
                    Either::Right(self.upload_part(
                        key,
                        upload_id,
                        copy_parts + number,
                        PartBody::file(&c.tail, range),
                    ))
                });
                copied.chain(sent).collect()
            })
            .await?;
        self.meta_after_put(key, c.prefix_len + tail_len, version)
            .await
    }

    /// Uploads `prefix` followed by the file `tail` (`tail_len` bytes) as `key`,
    /// the way `put` would upload one file of that size.
    async fn put_joined(
        &self,
        key: &str,
        prefix: Bytes,
        tail: &Path,
        tail_len: u64,
    ) -> StoreResult<ObjectMeta> {
        let size = prefix.len() as u64 + tail_len;
        if size < self.tuning.multipart_threshold {
            let mut body = BytesMut::from(&prefix[..]);
            body.resize(size as usize, 0);
            read_file_range(tail, 0, &mut body[prefix.len()..])
                .await
                .map_err(|e| StoreError::Io {
                    context: format!("reading {}", tail.display()),
                    error: e,
                })?;
            return self
                .put_single(key, ByteStream::from(body.freeze()), size)
                .await;
        }
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.map_err(key, e))?;
        let part_size = part_size(size, self.tuning.min_part_size);
        let version = self
            .run_multipart(key, created.upload_id(), |upload_id| {
                upload_ranges(size, part_size)
                    .map(|(number, range)| {
                        let (head, tail_range) = split_joined(prefix.len() as u64, range);
                        let part = PartBody {
                            head: prefix.slice(head.start as usize..head.end as usize),
                            path: tail,
                            range: tail_range,
                        };
                        self.upload_part(key, upload_id, number, part)
                    })
                    .collect()
            })
            .await?;
        self.meta_after_put(key, size, version).await
    }

    /// Refreshes an object above CopyObject's limit by copying it onto itself in
    /// parts. Every part is pinned to the version the HEAD saw: if the object is
    /// rewritten meanwhile, it is fresh anyway.
    async fn refresh_multipart(
        &self,
        key: &str,
        head: &HeadObjectOutput,
        size: u64,
    ) -> StoreResult<RefreshOutcome> {
        let full_key = self.full_key(key);
        let etag = quote_etag(&self.etag_of(key, head.e_tag())?);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full_key)
            .set_metadata(head.metadata().cloned())
            .set_content_type(head.content_type().map(str::to_string))
            .set_content_encoding(head.content_encoding().map(str::to_string))
            .set_content_disposition(head.content_disposition().map(str::to_string))
            .set_cache_control(head.cache_control().map(str::to_string))
            .set_storage_class(head.storage_class().cloned())
            .set_server_side_encryption(head.server_side_encryption().cloned())
            .set_ssekms_key_id(head.ssekms_key_id().map(str::to_string))
            .send()
            .await
            .map_err(|e| self.map_err(key, e))?;
        let source = CopySource {
            key,
            header: copy_source(&self.bucket, &full_key, None),
            if_match: etag,
            version_pinned: false,
        };
        let result = self
            .run_multipart(key, created.upload_id(), |upload_id| {
                upload_ranges(size, self.tuning.copy_part_size)
                    .map(|(number, range)| self.copy_part(key, upload_id, number, &source, range))
                    .collect()
            })
            .await;
        match result {
            Ok(_) => Ok(RefreshOutcome::Refreshed),
            Err(StoreError::PreconditionFailed(_)) => Ok(RefreshOutcome::StillFresh),
            Err(e) => Err(e),
        }
    }
}

/// The write and read clients for `policy`, sharing `base`'s connection pool,
/// credentials and retry quota.
fn clients(base: &aws_sdk_s3::Config, policy: &RetryPolicy) -> (Client, Client) {
    let retry = RetryConfig::standard()
        .with_max_attempts(policy.max_attempts)
        .with_initial_backoff(policy.initial_backoff)
        .with_max_backoff(policy.max_backoff);
    let client = |attempt: Duration| {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(policy.connect_timeout)
            .operation_attempt_timeout(attempt)
            .build();
        Client::from_conf(
            base.to_builder()
                .retry_config(retry.clone())
                .timeout_config(timeouts)
                .build(),
        )
    };
    (
        client(policy.write_attempt_timeout),
        client(policy.read_attempt_timeout),
    )
}

/// The SDK stops retrying when its retry quota (a token bucket: a retry takes
/// tokens, a success gives them back) runs dry. The default bucket never refills
/// by time, so after one long outage a long-lived mount daemon would never retry
/// again; this one refills (a full bucket in under a minute) and is this
/// store's own.
fn retry_partition() -> RetryPartition {
    RetryPartition::custom("cachemount")
        .token_bucket(
            TokenBucket::builder()
                .capacity(500)
                .refill_rate(10.0)
                .build(),
        )
        .build()
}

/// One GET answer, as [`read_resuming`] sees it.
struct Answer<B> {
    /// The version that answered; `None` when the server sent no ETag.
    version: Option<ObjectVersion>,
    /// Offset in the object of the body's first byte.
    start: u64,
    /// The object's size, when the server said.
    total: Option<u64>,
    body: B,
}

/// A GET body as a stream of chunks; an error says why it broke.
type Body = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

fn body_chunks(body: ByteStream) -> Body {
    Box::pin(futures::stream::unfold(body, |mut body| async move {
        let next = body.next().await?;
        Some((next.map_err(|e| error_chain(&e)), body))
    }))
}

/// What is left of `range` once `received` of its bytes are in.
fn remaining_range(range: &Range<u64>, received: u64) -> Range<u64> {
    (range.start + received).min(range.end)..range.end
}

/// `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`) → (START, END incl., TOTAL).
pub fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (start, end) = span.trim().split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.parse().ok()?, end.parse().ok()?, total))
}

/// Where a read goes, for its messages.
struct ReadTarget<'a> {
    endpoint: &'a str,
    location: &'a str,
}

/// Reads `range` through `fetch` (one GET of a sub-range, pinned to a version
/// when given one), resuming a body that breaks, ends early or stalls with a
/// GET of the bytes still missing, pinned to the version the first bytes came
/// from. With no `pin`, a version change between attempts starts the read over,
/// so the result is always one version's bytes. Bounded by `policy`
/// (`max_body_retries`, `read_deadline`, `body_stall_timeout`); when it gives up
/// the error says what happened.
async fn read_resuming<F, Fut, B>(
    target: ReadTarget<'_>,
    range: Range<u64>,
    pin: Option<&ObjectVersion>,
    policy: &RetryPolicy,
    mut fetch: F,
) -> StoreResult<Bytes>
where
    F: FnMut(Range<u64>, Option<ObjectVersion>) -> Fut,
    Fut: Future<Output = StoreResult<Answer<B>>>,
    B: Stream<Item = Result<Bytes, String>> + Unpin,
{
    let len = range.end - range.start;
    let started = Instant::now();
    let deadline = started + policy.read_deadline;
    let mut buf = BytesMut::with_capacity(len as usize);
    // The version the bytes in `buf` are of: every resumption is pinned to it.
    let mut version = pin.cloned();
    let mut interruptions = 0u32;
    let mut last_problem: Option<String> = None;
    let span = |r: &Range<u64>| format!("bytes {}-{} of {}", r.start, r.end - 1, target.location);
    let unreachable = |message: String| StoreError::Unreachable {
        endpoint: target.endpoint.to_string(),
        message,
    };
    loop {
        let want = remaining_range(&range, buf.len() as u64);
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = match tokio::time::timeout(left, fetch(want.clone(), version.clone())).await {
            Ok(Ok(answer)) => Some(answer),
            // Unpinned, and the object changed since our first bytes: start over.
            Ok(Err(StoreError::PreconditionFailed(_))) if pin.is_none() && version.is_some() => {
                None
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(unreachable(format!(
                    "reading {}: no answer within the read deadline ({:?}){}",
                    span(&range),
                    policy.read_deadline,
                    last_problem
                        .map(|p| format!(" after {interruptions} interrupted transfers; last: {p}"))
                        .unwrap_or_default()
                )))
            }
        };
        let problem = match answer {
            None => {
                version = None;
                buf.clear();
                "the object changed between attempts".to_string()
            }
            Some(answer) => match &answer.version {
                // Defence against servers that ignore If-Match.
                Some(a) if version.as_ref().is_some_and(|v| v.etag != a.etag) => {
                    if pin.is_some() {
                        return Err(StoreError::PreconditionFailed(target.location.into()));
                    }
                    version = None;
                    buf.clear();
                    "the object changed between attempts".to_string()
                }
                answered => {
                    if version.is_none() {
                        version = answered.clone();
                    }
                    if let Some(total) = answer.total {
                        if range.end > total {
                            // S3 truncates a range that runs past the end instead of refusing it.
                            return Err(StoreError::InvalidRange {
                                key: target.location.into(),
                                range,
                                size: total,
                            });
                        }
                    }
                    if answer.start != want.start {
                        return Err(StoreError::Other {
                            key: target.location.into(),
                            message: format!(
                                "asked for bytes from {}, the server answered from {}",
                                want.start, answer.start
                            ),
                        });
                    }
                    match read_body(answer.body, &mut buf, len, policy.body_stall_timeout).await {
                        Ok(()) => return Ok(buf.freeze()),
                        Err(BodyError::TooLong) => {
                            return Err(StoreError::Other {
                                key: target.location.into(),
                                message: format!(
                                    "the server sent more than the {len} bytes asked for"
                                ),
                            })
                        }
                        Err(BodyError::Interrupted(problem)) => problem,
                    }
                }
            },
        };
        interruptions += 1;
        if interruptions > policy.max_body_retries {
            return Err(unreachable(format!(
                "reading {}: gave up after {interruptions} interrupted transfers in {:.1} s \
                 (got {} of {len} bytes); last: {problem}",
                span(&range),
                started.elapsed().as_secs_f64(),
                buf.len()
            )));
        }
        if version.is_none() {
            // Nothing to pin a resumption to: the next bytes could be another version's.
            buf.clear();
        }
        let delay = policy.resume_backoff(interruptions);
        tracing::info!(
            what = %span(&range),
            received = buf.len(),
            attempt = interruptions,
            %problem,
            "resuming an interrupted read in {delay:?}"
        );
        if Instant::now() + delay >= deadline {
            return Err(unreachable(format!(
                "reading {}: gave up at the read deadline ({:?}) after {interruptions} \
                 interrupted transfers (got {} of {len} bytes); last: {problem}",
                span(&range),
                policy.read_deadline,
                buf.len()
            )));
        }
        tokio::time::sleep(delay).await;
        last_problem = Some(problem);
    }
}

enum BodyError {
    /// Cut, ended early or stalled: worth resuming.
    Interrupted(String),
    /// More bytes than asked for: the server is confused; do not retry.
    TooLong,
}

/// Appends `body` to `buf` until it holds `len` bytes.
async fn read_body<B>(
    mut body: B,
    buf: &mut BytesMut,
    len: u64,
    stall: Duration,
) -> Result<(), BodyError>
where
    B: Stream<Item = Result<Bytes, String>> + Unpin,
{
    loop {
        match tokio::time::timeout(stall, body.next()).await {
            Err(_) => {
                return Err(BodyError::Interrupted(format!(
                    "the transfer stalled (no bytes for {stall:?})"
                )))
            }
            Ok(None) if buf.len() as u64 == len => return Ok(()),
            Ok(None) => {
                return Err(BodyError::Interrupted(format!(
                    "the body ended early ({} of {len} bytes)",
                    buf.len()
                )))
            }
            Ok(Some(Err(e))) => {
                return Err(BodyError::Interrupted(format!(
                    "the connection broke mid-body: {e}"
                )))
            }
            Ok(Some(Ok(chunk))) => {
                if buf.len() as u64 + chunk.len() as u64 > len {
                    return Err(BodyError::TooLong);
                }
                buf.extend_from_slice(&chunk);
                if buf.len() as u64 == len {
                    return Ok(());
                }
            }
        }
    }
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

/// Part size for `size` bytes: at least `min`, large enough for S3's part-count
/// limit, rounded to whole MiB.
fn part_size(size: u64, min: u64) -> u64 {
    part_size_within(size, min, MAX_PARTS)
}

/// [`part_size`] for `size` bytes in at most `parts` parts (what a composition's
/// copied parts leave of the limit).
fn part_size_within(size: u64, min: u64, parts: u64) -> u64 {
    let needed = size.div_ceil(parts.max(1)).div_ceil(MIB) * MIB;
    needed.max(min)
}

/// The ranges of a composition's prefix (`0..prefix_len`, at least
/// [`PART_MIN`]) to copy as parts: as few as `max_part` (the tuning's
/// `copy_part_size`) allows, of sizes differing by at most a byte, so that every
/// part is within S3's limits: at least 5 MiB and at most 5 GiB. They take at
/// most half of S3's part-count limit; the tail gets the rest.
fn copy_ranges(prefix_len: u64, max_part: u64) -> Vec<Range<u64>> {
    let max_part = max_part
        .max(prefix_len.div_ceil(MAX_PARTS / 2))
        .clamp(1, PART_MAX);
    let count = prefix_len
        .div_ceil(max_part)
        .min(prefix_len / PART_MIN)
        .max(1);
    let (even, longer) = (prefix_len / count, prefix_len % count);
    let mut start = 0;
    (0..count)
        .map(|i| {
            let len = even + u64::from(i < longer);
            start += len;
            start - len..start
        })
        .collect()
}

/// Where the part `range` of a prefix (`prefix_len` bytes, in memory) joined to a
/// tail file falls: (the range of the prefix, the range of the tail file).
fn split_joined(prefix_len: u64, range: Range<u64>) -> (Range<u64>, Range<u64>) {
    let in_prefix = range.start.min(prefix_len)..range.end.min(prefix_len);
    let in_tail = range.start.max(prefix_len) - prefix_len..range.end.max(prefix_len) - prefix_len;
    (in_prefix, in_tail)
}

/// Fills `buf` from `path` at `offset`.
async fn read_file_range(path: &Path, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    file.read_exact(buf).await?;
    Ok(())
}

/// The bytes of one uploaded part: `head` (in memory, usually empty) followed by
/// `range` of the file at `path`.
struct PartBody<'a> {
    head: Bytes,
    path: &'a Path,
    range: Range<u64>,
}

impl<'a> PartBody<'a> {
    /// `range` of the file at `path`.
    fn file(path: &'a Path, range: Range<u64>) -> Self {
        PartBody {
            head: Bytes::new(),
            path,
            range,
        }
    }
}

/// The object an `UploadPartCopy` reads, and how it is pinned.
struct CopySource<'a> {
    /// Its key (relative to the prefix), for errors.
    key: &'a str,
    /// `x-amz-copy-source`.
    header: String,
    /// `x-amz-copy-source-if-match`: the quoted ETag.
    if_match: String,
    /// The header names a version id: a 404 means that version was deleted.
    version_pinned: bool,
}

/// Numbered (from 1) consecutive ranges of `part` bytes covering `0..size`.
fn upload_ranges(size: u64, part: u64) -> impl Iterator<Item = (i32, Range<u64>)> {
    (0..size.div_ceil(part)).map(move |i| (i as i32 + 1, i * part..((i + 1) * part).min(size)))
}

/// `x-amz-copy-source`: bucket and URL-encoded key (keys hold `%` from key
/// escaping), and the version id when the copy is pinned to one.
fn copy_source(bucket: &str, key: &str, version_id: Option<&str>) -> String {
    let mut out = format!("{bucket}/");
    let encode = |out: &mut String, s: &str, keep: &[u8]| {
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || keep.contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    };
    encode(&mut out, key, b"-._~/");
    if let Some(id) = version_id {
        out.push_str("?versionId=");
        encode(&mut out, id, b"-._~");
    }
    out
}

impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        match self.prefix.trim_end_matches('/') {
            "" => format!("s3://{}", self.bucket),
            prefix => format!("s3://{}/{prefix}", self.bucket),
        }
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
        if range.start >= range.end {
            // HTTP cannot ask for zero bytes; answer from a HEAD, checking the pin the same way.
            let meta = self.head(key).await?;
            if pin.is_some_and(|p| p.etag != meta.version.etag) {
                return Err(StoreError::PreconditionFailed(self.location(key)));
            }
            if range.start > range.end || range.start > meta.size {
                return Err(StoreError::InvalidRange {
                    key: self.location(key),
                    range,
                    size: meta.size,
                });
            }
            return Ok(Bytes::new());
        }
        let location = self.location(key);
        let target = ReadTarget {
            endpoint: &self.endpoint,
            location: &location,
        };
        let got = read_resuming(target, range, pin, &self.tuning.retry, |want, version| {
            self.get_attempt(key, want, version)
        })
        .await;
        match got {
            // The pinned version id was deleted (NoSuchVersion / NoSuchKey):
            // the version the reader is on is gone, as with a changed ETag.
            Err(StoreError::NotFound(_)) if pin.is_some_and(|p| p.version_id.is_some()) => {
                Err(StoreError::PreconditionFailed(location))
            }
            other => other,
        }
    }

    async fn put(&self, key: &str, source: PutSource) -> StoreResult<ObjectMeta> {
        match source {
            PutSource::Bytes(bytes) => {
                let size = bytes.len() as u64;
                self.put_single(key, ByteStream::from(bytes), size).await
            }
            PutSource::File(path) => {
                let size = tokio::fs::metadata(&path)
                    .await
                    .map_err(|e| StoreError::Io {
                        context: format!("reading {}", path.display()),
                        error: e,
                    })?
                    .len();
                if size >= self.tuning.multipart_threshold {
                    return self.put_multipart(key, &path, size).await;
                }
                let body = ByteStream::from_path(&path)
                    .await
                    .map_err(|e| StoreError::Other {
                        key: self.location(key),
                        message: format!("reading {}: {e}", path.display()),
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
        // REPLACE is what makes a self-copy legal; it also drops metadata, so copy it over.
        let copied = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .copy_source(copy_source(&self.bucket, &self.full_key(key), None))
            .metadata_directive(MetadataDirective::Replace)
            .copy_source_if_unmodified_since(DateTime::from(older_than))
            .set_metadata(head.metadata().cloned())
            .set_content_type(head.content_type().map(str::to_string))
            .set_content_encoding(head.content_encoding().map(str::to_string))
            .set_content_disposition(head.content_disposition().map(str::to_string))
            .set_cache_control(head.cache_control().map(str::to_string))
            .set_storage_class(head.storage_class().cloned())
            .set_server_side_encryption(head.server_side_encryption().cloned())
            .set_ssekms_key_id(head.ssekms_key_id().map(str::to_string))
            .send()
            .await;
        match copied {
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

    #[test]
    fn part_sizes_respect_the_part_limit() {
        assert_eq!(part_size(70 * MIB, 16 * MIB), 16 * MIB);
        let huge = 500 * GIB;
        let p = part_size(huge, 16 * MIB);
        assert!(huge.div_ceil(p) <= MAX_PARTS && p.is_multiple_of(MIB));
    }

    #[test]
    fn ranges_cover_the_object() {
        let r: Vec<_> = upload_ranges(10, 4).collect();
        assert_eq!(r, vec![(1, 0..4), (2, 4..8), (3, 8..10)]);
        assert_eq!(upload_ranges(8, 4).count(), 2);
    }

    /// What S3 asks of a composition's copied parts, whatever the tuning.
    fn check_copy_plan(prefix_len: u64, max_part: u64) -> Result<(), String> {
        let parts = copy_ranges(prefix_len, max_part);
        let lens: Vec<u64> = parts.iter().map(|r| r.end - r.start).collect();
        let (min, max) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
        let mut next = 0;
        for r in &parts {
            if r.start != next {
                return Err(format!("gap or overlap at {r:?}"));
            }
            next = r.end;
        }
        if next != prefix_len {
            return Err(format!("covers 0..{next}, not 0..{prefix_len}"));
        }
        if *min < PART_MIN || *max > PART_MAX {
            return Err(format!("a part outside 5 MiB..=5 GiB: {min}..={max}"));
        }
        if max - min > 1 {
            return Err(format!("uneven: {min}..={max}"));
        }
        if parts.len() as u64 > MAX_PARTS / 2 {
            return Err(format!("{} parts leave too few for the tail", parts.len()));
        }
        // The tuning is honoured whenever S3's limits allow it.
        if (2 * PART_MIN..=PART_MAX).contains(&max_part)
            && prefix_len <= max_part * (MAX_PARTS / 2)
            && *max > max_part
        {
            return Err(format!("a part of {max} above copy_part_size {max_part}"));
        }
        Ok(())
    }

    #[test]
    fn copy_plans_on_the_edges() {
        assert_eq!(copy_ranges(PART_MIN, GIB), vec![0..PART_MIN]);
        assert_eq!(copy_ranges(12 * MIB, GIB), vec![0..12 * MIB]);
        // 10 GiB + 1 in parts of at most 5 GiB: three, not 5 GiB, 5 GiB and 1 byte.
        let p = 10 * GIB + 1;
        assert_eq!(copy_ranges(p, PART_MAX).len(), 3);
        // A copy_part_size below what S3 allows for the prefix cannot make parts too small.
        assert_eq!(
            copy_ranges(12 * MIB, 5 * MIB),
            vec![0..6 * MIB, 6 * MIB..12 * MIB]
        );
        assert_eq!(copy_ranges(7 * MIB, MIB), vec![0..7 * MIB]);
        for (len, max) in [
            (PART_MIN, 1),
            (PART_MIN + 1, PART_MIN),
            (5 * 1024 * GIB, GIB),
            (5 * 1024 * GIB, u64::MAX),
            (PART_MAX + 1, PART_MAX),
            (2 * PART_MAX, PART_MAX),
        ] {
            check_copy_plan(len, max).unwrap_or_else(|e| panic!("{len}, {max}: {e}"));
        }
    }

    proptest::proptest! {
        #[test]
        fn copy_plans_respect_s3_part_limits(
            // Up to S3's largest object (5 TiB).
            prefix_len in PART_MIN..=5 * 1024 * GIB,
            max_part in proptest::prop_oneof![1..=16 * MIB, 16 * MIB..=8 * GIB, proptest::strategy::Just(GIB)],
        ) {
            check_copy_plan(prefix_len, max_part).map_err(proptest::test_runner::TestCaseError::fail)?;
        }

        #[test]
        fn joined_parts_split_at_the_prefix_end(
            prefix_len in 0u64..100,
            start in 0u64..200,
            len in 0u64..100,
        ) {
            let range = start..start + len;
            let (head, tail) = split_joined(prefix_len, range.clone());
            proptest::prop_assert_eq!(head.end - head.start + tail.end - tail.start, len);
            // Together they are `range` of prefix ++ tail, in order.
            let joined: Vec<u64> = head.clone().chain(tail.map(|t| t + prefix_len)).collect();
            proptest::prop_assert_eq!(joined, range.collect::<Vec<_>>());
            proptest::prop_assert!(head.end <= prefix_len);
        }
    }

    #[test]
    fn tail_parts_fit_in_what_the_copies_leave() {
        let copies = MAX_PARTS / 2;
        let tail = 5 * 1024 * GIB;
        let p = part_size_within(tail, 16 * MIB, MAX_PARTS - copies);
        assert!(tail.div_ceil(p) <= MAX_PARTS - copies);
        assert_eq!(part_size_within(0, 16 * MIB, 1), 16 * MIB);
    }

    #[test]
    fn copy_source_encodes_the_key() {
        assert_eq!(
            copy_source("b", "p/keys/a%2Fb c", None),
            "b/p/keys/a%252Fb%20c"
        );
        assert_eq!(
            copy_source("b", "k", Some("3/L4kqtJl+cA")),
            "b/k?versionId=3%2FL4kqtJl%2BcA"
        );
    }

    // --- the resume logic, without a server ---

    use std::collections::VecDeque;
    use std::sync::Mutex;

    fn version(tag: &str) -> ObjectVersion {
        ObjectVersion {
            etag: tag.into(),
            version_id: None,
        }
    }

    fn object(seed: u8, len: usize) -> Arc<Vec<u8>> {
        Arc::new(
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect(),
        )
    }

    /// What the fake server does on one GET.
    enum Step {
        /// The requested bytes, whole.
        Full(ObjectVersion, Arc<Vec<u8>>),
        /// The first `n` requested bytes, then a broken connection.
        Cut(ObjectVersion, Arc<Vec<u8>>, usize),
        /// The first `n` requested bytes, then a clean end (a truncated body).
        Short(ObjectVersion, Arc<Vec<u8>>, usize),
        /// The first `n` requested bytes, then nothing, ever.
        Stall(ObjectVersion, Arc<Vec<u8>>, usize),
        /// No response, ever.
        Hang,
        Fail(StoreError),
    }

    type Fetched = Pin<Box<dyn Future<Output = StoreResult<Answer<Body>>> + Send>>;
    type Calls = Arc<Mutex<Vec<(Range<u64>, Option<String>)>>>;

    /// A fake `fetch` playing `steps` in order; records what it was asked.
    fn server(
        steps: Vec<Step>,
    ) -> (
        impl FnMut(Range<u64>, Option<ObjectVersion>) -> Fetched,
        Calls,
    ) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let mut steps = VecDeque::from(steps);
        let fetch = move |want: Range<u64>, pin: Option<ObjectVersion>| -> Fetched {
            seen.lock()
                .unwrap()
                .push((want.clone(), pin.map(|p| p.etag)));
            let step = steps.pop_front().expect("more GETs than the script has");
            let answer = |v: ObjectVersion, data: &[u8], n: usize, tail: Body| {
                let bytes = data[want.start as usize..want.end as usize][..n].to_vec();
                // Two chunks, to exercise appending.
                let (a, b) = bytes.split_at(n / 2);
                let chunks = vec![Ok(Bytes::copy_from_slice(a)), Ok(Bytes::copy_from_slice(b))];
                Ok(Answer {
                    version: Some(v),
                    start: want.start,
                    total: Some(data.len() as u64),
                    body: Box::pin(futures::stream::iter(chunks).chain(tail)) as Body,
                })
            };
            let len = (want.end - want.start) as usize;
            let result = match step {
                Step::Full(v, d) => answer(v, &d, len, Box::pin(futures::stream::empty())),
                Step::Cut(v, d, n) => answer(
                    v,
                    &d,
                    n,
                    Box::pin(futures::stream::iter([Err("connection reset".to_string())])),
                ),
                Step::Short(v, d, n) => answer(v, &d, n, Box::pin(futures::stream::empty())),
                Step::Stall(v, d, n) => answer(v, &d, n, Box::pin(futures::stream::pending())),
                Step::Hang => return Box::pin(futures::future::pending()),
                Step::Fail(e) => Err(e),
            };
            Box::pin(std::future::ready(result))
        };
        (fetch, calls)
    }

    fn quick() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            body_stall_timeout: Duration::from_millis(50),
            max_body_retries: 3,
            read_deadline: Duration::from_secs(10),
            ..RetryPolicy::default()
        }
    }

    const TARGET: ReadTarget<'static> = ReadTarget {
        endpoint: "http://test",
        location: "s3://b/k",
    };

    #[test]
    fn the_remaining_range_starts_after_the_bytes_received() {
        assert_eq!(remaining_range(&(100..200), 0), 100..200);
        assert_eq!(remaining_range(&(100..200), 37), 137..200);
        assert_eq!(remaining_range(&(100..200), 100), 200..200);
        assert_eq!(remaining_range(&(100..200), 500), 200..200);
    }

    #[test]
    fn content_ranges_parse() {
        assert_eq!(
            parse_content_range("bytes 10-19/100"),
            Some((10, 19, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, 0, None)));
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn policy_reads_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let (p, problems) = RetryPolicy::default().with_vars(env(&[
            (ENV_ATTEMPTS, "2"),
            (ENV_READ_TIMEOUT, "0.5"),
            (ENV_STALL_TIMEOUT, "1"),
            (ENV_READ_DEADLINE, "7"),
        ]));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(p.max_attempts, 2);
        assert_eq!(p.read_attempt_timeout, Duration::from_millis(500));
        assert_eq!(p.body_stall_timeout, Duration::from_secs(1));
        assert_eq!(p.read_deadline, Duration::from_secs(7));
        let (p, problems) = RetryPolicy::default()
            .with_vars(env(&[(ENV_ATTEMPTS, "0"), (ENV_READ_TIMEOUT, "soon")]));
        assert_eq!(p, RetryPolicy::default());
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn resume_backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        for n in 1..40 {
            let d = p.resume_backoff(n);
            assert!(d <= p.max_backoff, "{n}: {d:?}");
            assert!(
                d <= p.initial_backoff * 2u32.pow(n.min(20) - 1),
                "{n}: {d:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_cut_body_resumes_from_the_bytes_received_with_the_same_pin() {
        let a = object(1, 2000);
        let (fetch, calls) = server(vec![
            Step::Cut(version("A"), a.clone(), 100),
            Step::Short(version("A"), a.clone(), 300),
            Step::Full(version("A"), a.clone()),
        ]);
        let got = read_resuming(TARGET, 10..1010, Some(&version("A")), &quick(), fetch)
            .await
            .unwrap();
        assert_eq!(&got[..], &a[10..1010]);
        let calls = calls.lock().unwrap().clone();
        let pin = Some("A".to_string());
        assert_eq!(
            calls,
            vec![
                (10..1010, pin.clone()),
                (110..1010, pin.clone()),
                (410..1010, pin)
            ]
        );
    }

    #[tokio::test]
    async fn an_unpinned_read_pins_its_resumptions_to_its_first_answer() {
        let a = object(1, 500);
        let (fetch, calls) = server(vec![
            Step::Cut(version("A"), a.clone(), 7),
            Step::Full(version("A"), a.clone()),
        ]);
        let got = read_resuming(TARGET, 0..500, None, &quick(), fetch)
            .await
            .unwrap();
        assert_eq!(&got[..], &a[..]);
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls, vec![(0..500, None), (7..500, Some("A".into()))]);
    }

    #[tokio::test]
    async fn a_stalled_body_is_abandoned_and_resumed() {
        let a = object(2, 1000);
        let (fetch, calls) = server(vec![
            Step::Stall(version("A"), a.clone(), 400),
            Step::Full(version("A"), a.clone()),
        ]);
        let started = Instant::now();
        let got = read_resuming(TARGET, 0..1000, Some(&version("A")), &quick(), fetch)
            .await
            .unwrap();
        assert_eq!(&got[..], &a[..]);
        assert_eq!(calls.lock().unwrap()[1].0, 400..1000);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_pinned_read_never_mixes_versions() {
        let (a, b) = (object(1, 1000), object(2, 1000));
        // The object changed between the cut and the resumption: 412.
        let (fetch, _) = server(vec![
            Step::Cut(version("A"), a.clone(), 100),
            Step::Fail(StoreError::PreconditionFailed("s3://b/k".into())),
        ]);
        let r = read_resuming(TARGET, 0..1000, Some(&version("A")), &quick(), fetch).await;
        assert!(matches!(r, Err(StoreError::PreconditionFailed(_))), "{r:?}");
        // A server that ignores If-Match answers with the new version: refused too.
        let (fetch, _) = server(vec![
            Step::Cut(version("A"), a.clone(), 100),
            Step::Full(version("B"), b.clone()),
        ]);
        let r = read_resuming(TARGET, 0..1000, Some(&version("A")), &quick(), fetch).await;
        assert!(matches!(r, Err(StoreError::PreconditionFailed(_))), "{r:?}");
    }

    #[tokio::test]
    async fn an_unpinned_read_starts_over_when_the_object_changes() {
        let (a, b) = (object(1, 1000), object(2, 1000));
        for second in [
            Step::Fail(StoreError::PreconditionFailed("s3://b/k".into())),
            Step::Full(version("B"), b.clone()),
        ] {
            let (fetch, calls) = server(vec![
                Step::Cut(version("A"), a.clone(), 100),
                second,
                Step::Full(version("B"), b.clone()),
            ]);
            let got = read_resuming(TARGET, 0..1000, None, &quick(), fetch)
                .await
                .unwrap();
            assert_eq!(&got[..], &b[..]);
            assert_eq!(calls.lock().unwrap()[2], (0..1000, None));
        }
    }

    #[tokio::test]
    async fn interrupted_reads_give_up_and_say_why() {
        let a = object(1, 1000);
        let steps = (0..4)
            .map(|_| Step::Cut(version("A"), a.clone(), 10))
            .collect();
        let (fetch, calls) = server(steps);
        let r = read_resuming(TARGET, 0..1000, Some(&version("A")), &quick(), fetch).await;
        let Err(StoreError::Unreachable { message, .. }) = r else {
            panic!("{r:?}")
        };
        assert!(
            message.contains("gave up after 4 interrupted transfers")
                && message.contains("got 40 of 1000 bytes")
                && message.contains("connection reset")
                && message.contains("bytes 0-999 of s3://b/k"),
            "{message}"
        );
        assert_eq!(calls.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn a_read_with_no_answer_fails_at_the_deadline() {
        let policy = RetryPolicy {
            read_deadline: Duration::from_millis(200),
            ..quick()
        };
        let (fetch, _) = server(vec![Step::Hang]);
        let started = Instant::now();
        let r = read_resuming(TARGET, 0..10, None, &policy, fetch).await;
        let Err(StoreError::Unreachable { message, .. }) = r else {
            panic!("{r:?}")
        };
        assert!(message.contains("read deadline"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_range_past_the_end_is_invalid() {
        let a = object(1, 50);
        let (fetch, _) = server(vec![Step::Full(version("A"), a.clone())]);
        let r = read_resuming(TARGET, 40..50, None, &quick(), fetch).await;
        assert_eq!(&r.unwrap()[..], &a[40..]);
        let (mut fetch, _) = server(vec![Step::Full(version("A"), a.clone())]);
        // The fake answers at most what exists; what it says about the size decides.
        let r = read_resuming(TARGET, 40..60, None, &quick(), move |w: Range<u64>, v| {
            fetch(w.start..w.end.min(50), v)
        })
        .await;
        assert!(
            matches!(r, Err(StoreError::InvalidRange { size: 50, .. })),
            "{r:?}"
        );
    }
}
