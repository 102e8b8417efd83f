//! [`S3Store`]: the object store on S3 or any S3-compatible server (aws-sdk-s3).
//!
//! It owns the S3 specifics cachemount relies on: ETag-pinned range GETs
//! (`If-Match`, plus `versionId` when the bucket has versions), multipart upload
//! of large archives with bounded concurrency, the lifetime refresh by server-side
//! self-copy (multipart `UploadPartCopy` above CopyObject's 5 GiB limit), paginated
//! listing, and the mapping of SDK errors onto [`StoreError`] — by HTTP status
//! where servers disagree on error codes (a 412 may come with an empty body).

use std::error::Error as StdError;
use std::ops::Range;
use std::path::Path;
use std::time::{Duration, SystemTime};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::primitives::{ByteStream, DateTime, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, MetadataDirective};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::{
    ListedObject, ObjectMeta, ObjectStore, ObjectVersion, PutSource, RefreshOutcome, StoreError,
    StoreResult,
};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// S3 refuses more parts than this in one multipart upload.
const MAX_PARTS: u64 = 10_000;
/// CopyObject refuses sources larger than this; bigger objects are copied in parts.
const COPY_OBJECT_MAX: u64 = 5 * GIB;

/// Failing fast on a dead endpoint matters more than patience: CI retries jobs.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One attempt must fit a whole part (16 MiB+) or a below-threshold PutObject on a slow link.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_ATTEMPTS: u32 = 3;

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
    client: Client,
    bucket: String,
    /// Empty, or ending in `/`.
    prefix: String,
    /// Where requests go, for error messages.
    endpoint: String,
    tuning: S3Tuning,
}

impl S3Store {
    /// Builds a client from the standard AWS configuration chain (environment,
    /// profile, instance role; `AWS_ENDPOINT_URL` included), overridden by
    /// `endpoint_url` and `region` when given. Without any configured region it
    /// uses us-east-1 (S3-compatible servers mostly ignore it). An explicit
    /// endpoint implies path-style addressing, which S3-compatible servers need.
    pub async fn new(
        bucket: &str,
        prefix: &str,
        endpoint_url: Option<String>,
        region: Option<String>,
    ) -> Self {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
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
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
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
        S3Store {
            client: Client::from_conf(config.build()),
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            endpoint,
            tuning: S3Tuning::default(),
        }
    }

    /// Replaces the multipart and listing parameters.
    pub fn with_tuning(mut self, tuning: S3Tuning) -> Self {
        self.tuning = tuning;
        self
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
            .client
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
            .client
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
            .client
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
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StoreError::Other {
                key: self.location(key),
                message: "the server sent no upload id".into(),
            })?
            .to_string();
        let result = async {
            let part_size = part_size(size, self.tuning.min_part_size);
            let parts = upload_ranges(size, part_size)
                .map(|(number, range)| self.upload_part(key, &upload_id, path, number, range))
                .collect::<Vec<_>>();
            let parts = futures::stream::iter(parts)
                .buffer_unordered(self.tuning.concurrency)
                .try_collect()
                .await?;
            self.complete(key, &upload_id, parts).await
        }
        .await;
        match result {
            Ok(version) => self.meta_after_put(key, size, version).await,
            Err(e) => {
                self.abort(key, &upload_id).await;
                Err(e)
            }
        }
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        path: &Path,
        number: i32,
        range: Range<u64>,
    ) -> StoreResult<CompletedPart> {
        let len = range.end - range.start;
        // Streams the part from the file (and re-reads it on a retry): no part is held in memory.
        let body = ByteStream::read_from()
            .path(path)
            .offset(range.start)
            .length(Length::Exact(len))
            .build()
            .await
            .map_err(|e| StoreError::Other {
                key: self.location(key),
                message: format!("reading part {number} of {}: {e}", path.display()),
            })?;
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
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StoreError::Other {
                key: self.location(key),
                message: "the server sent no upload id".into(),
            })?
            .to_string();
        let source = copy_source(&self.bucket, &full_key);
        let result = async {
            let parts = upload_ranges(size, self.tuning.copy_part_size)
                .map(|(number, range)| {
                    let request = self
                        .client
                        .upload_part_copy()
                        .bucket(&self.bucket)
                        .key(&full_key)
                        .upload_id(&upload_id)
                        .part_number(number)
                        .copy_source(&source)
                        .copy_source_range(format!("bytes={}-{}", range.start, range.end - 1))
                        .copy_source_if_match(&etag);
                    async move {
                        let out = request.send().await.map_err(|e| self.map_err(key, e))?;
                        let part_etag = out.copy_part_result().and_then(|r| r.e_tag());
                        Ok::<_, StoreError>(
                            CompletedPart::builder()
                                .part_number(number)
                                .e_tag(self.etag_of(key, part_etag)?)
                                .build(),
                        )
                    }
                })
                .collect::<Vec<_>>();
            let parts = futures::stream::iter(parts)
                .buffer_unordered(self.tuning.concurrency)
                .try_collect()
                .await?;
            self.complete(key, &upload_id, parts).await
        }
        .await;
        match result {
            Ok(_) => Ok(RefreshOutcome::Refreshed),
            Err(e) => {
                self.abort(key, &upload_id).await;
                match e {
                    StoreError::PreconditionFailed(_) => Ok(RefreshOutcome::StillFresh),
                    e => Err(e),
                }
            }
        }
    }
}

/// ETags come quoted from most servers, unquoted from some (SeaweedFS's copy
/// results); versions compare unquoted.
fn normalize_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

fn quote_etag(etag: &str) -> String {
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
    let needed = size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    needed.max(min)
}

/// Numbered (from 1) consecutive ranges of `part` bytes covering `0..size`.
fn upload_ranges(size: u64, part: u64) -> impl Iterator<Item = (i32, Range<u64>)> {
    (0..size.div_ceil(part)).map(move |i| (i as i32 + 1, i * part..((i + 1) * part).min(size)))
}

/// `x-amz-copy-source`: bucket and URL-encoded key (keys hold `%` from key escaping).
fn copy_source(bucket: &str, key: &str) -> String {
    let mut out = format!("{bucket}/");
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
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
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_if_match(pin.map(|p| quote_etag(&p.etag)))
            .set_version_id(pin.and_then(|p| p.version_id.clone()));
        let out = match request.send().await {
            Ok(out) => out,
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                let size = self.head(key).await?.size;
                return Err(StoreError::InvalidRange {
                    key: self.location(key),
                    range,
                    size,
                });
            }
            Err(e) => return Err(self.map_err(key, e)),
        };
        // Defence against servers that ignore If-Match: never return another version's bytes.
        if let (Some(pin), Some(etag)) = (pin, out.e_tag()) {
            if normalize_etag(etag) != pin.etag {
                return Err(StoreError::PreconditionFailed(self.location(key)));
            }
        }
        let total = out
            .content_range()
            .and_then(|r| r.rsplit_once('/'))
            .and_then(|(_, t)| t.parse::<u64>().ok());
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Unreachable {
                endpoint: self.endpoint.clone(),
                message: format!("reading {}: {}", self.location(key), error_chain(&e)),
            })?;
        let bytes = body.into_bytes();
        if bytes.len() as u64 != range.end - range.start {
            // S3 truncates a range that runs past the end instead of refusing it.
            let size = total.unwrap_or(range.start + bytes.len() as u64);
            return Err(StoreError::InvalidRange {
                key: self.location(key),
                range,
                size,
            });
        }
        Ok(bytes)
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
                        source: e,
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
            .copy_source(copy_source(&self.bucket, &self.full_key(key)))
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
            Ok(_) => Ok(RefreshOutcome::Refreshed),
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
                .client
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

    #[test]
    fn copy_source_encodes_the_key() {
        assert_eq!(copy_source("b", "p/keys/a%2Fb c"), "b/p/keys/a%252Fb%20c");
    }
}
