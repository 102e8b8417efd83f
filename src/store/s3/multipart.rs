//! Multipart writes: the one runner ([`S3Store::run_multipart`]: create, parts,
//! complete; abort on failure) and what is built on it — uploads of large
//! files, compositions ([`ObjectStore::compose`](super::ObjectStore::compose):
//! `UploadPartCopy` ranges of the base, pinned to its version, then the local
//! tail) and the lifetime refresh of objects above CopyObject's 5 GiB limit
//! (a self-copy in parts) — with the part planning that keeps every upload
//! within S3's limits (5 MiB to 5 GiB a part, 10 000 parts).

use std::ops::Range;
use std::path::Path;

use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use futures::future::Either;
use futures::{StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{error_chain, file_len, quote_etag, S3Store, GIB, MIB};
use crate::store::{
    Composition, ObjectMeta, ObjectVersion, RefreshOutcome, StoreError, StoreResult,
};

/// S3 refuses more parts than this in one multipart upload.
const MAX_PARTS: u64 = 10_000;
/// S3 refuses a multipart part (uploaded or copied) smaller than this, except the last.
const PART_MIN: u64 = 5 * MIB;
/// S3 refuses a multipart part (uploaded or copied) larger than this.
const PART_MAX: u64 = 5 * GIB;

/// One part of a multipart upload, as the runner is asked for it.
enum Part<'a> {
    /// Bytes sent from here.
    Upload(PartBody<'a>),
    /// A range of an object copied inside the store (`UploadPartCopy`).
    Copy(&'a CopySource<'a>, Range<u64>),
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

impl S3Store {
    /// [`ObjectStore::compose`](super::ObjectStore::compose). The base is
    /// checked first (HEAD pinned to its version): a stale base or a prefix past
    /// its end fails before any upload starts — and on servers that ignore
    /// `CopySourceIfMatch` on `UploadPartCopy` (moto) or answer a range past the
    /// end with the whole object (moto again), that check is the only one, so a
    /// base replaced in the moment between it and the copies goes unnoticed
    /// there. AWS and SeaweedFS refuse such a copy with 412, which aborts the upload.
    pub(super) async fn compose_object(
        &self,
        key: &str,
        c: Composition,
    ) -> StoreResult<ObjectMeta> {
        let base_size = self.size_if_version(&c.base_key, &c.base_version).await?;
        if c.prefix_len > base_size {
            return Err(StoreError::InvalidRange {
                key: self.location(&c.base_key),
                range: 0..c.prefix_len,
                size: base_size,
            });
        }
        let tail_len = file_len(&c.tail).await?;
        if c.prefix_len < PART_MIN {
            // A copied part this small could only be the last one: send the prefix
            // with the tail instead (at most 5 MiB more on the wire).
            let prefix = if c.prefix_len == 0 {
                Bytes::new()
            } else {
                self.read_range(&c.base_key, 0..c.prefix_len, Some(&c.base_version))
                    .await?
            };
            return self.put_joined(key, prefix, &c.tail, tail_len).await;
        }

        let copies = copy_ranges(c.prefix_len, self.tuning.copy_part_size);
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
        let copied = copies.into_iter().map(|range| Part::Copy(&source, range));
        let sent = part_ranges(tail_len, tail_part_size)
            .map(|range| Part::Upload(PartBody::file(&c.tail, range)));
        let version = self
            .run_multipart(key, None, copied.chain(sent).collect())
            .await?;
        self.meta_after_put(key, c.prefix_len + tail_len, version)
            .await
    }

    /// Uploads `prefix` followed by the file `tail` (`tail_len` bytes) as `key`,
    /// the way `put` uploads one file of that size: at or above the multipart
    /// threshold in parts streamed from the file (only a part that joins the
    /// two is held in memory). `put` of a large file is this with an empty prefix.
    pub(super) async fn put_joined(
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
        let parts = part_ranges(size, part_size(size, self.tuning.min_part_size))
            .map(|range| {
                let (head, tail_range) = split_joined(prefix.len() as u64, range);
                Part::Upload(PartBody {
                    head: prefix.slice(head.start as usize..head.end as usize),
                    path: tail,
                    range: tail_range,
                })
            })
            .collect();
        let version = self.run_multipart(key, None, parts).await?;
        self.meta_after_put(key, size, version).await
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

    /// Refreshes an object above CopyObject's limit by copying it onto itself in
    /// parts, keeping its attributes (`head`'s). Every part is pinned to the
    /// version the HEAD saw: if the object is rewritten meanwhile, it is fresh anyway.
    pub(super) async fn refresh_multipart(
        &self,
        key: &str,
        head: &HeadObjectOutput,
        size: u64,
    ) -> StoreResult<RefreshOutcome> {
        let source = CopySource {
            key,
            header: copy_source(&self.bucket, &self.full_key(key), None),
            if_match: quote_etag(&self.etag_of(key, head.e_tag())?),
            version_pinned: false,
        };
        let parts = part_ranges(size, self.tuning.copy_part_size)
            .map(|range| Part::Copy(&source, range))
            .collect();
        match self.run_multipart(key, Some(head), parts).await {
            Ok(_) => Ok(RefreshOutcome::Refreshed),
            Err(StoreError::PreconditionFailed(_)) => Ok(RefreshOutcome::StillFresh),
            Err(e) => Err(e),
        }
    }

    /// The one multipart upload of `key`: creates it (with `attributes`'
    /// metadata, content headers, storage class and encryption, for a rewrite
    /// that must keep them), runs `parts` as parts 1, 2, … at most
    /// `concurrency` at once, and completes it. On any failure the upload is
    /// aborted, so no orphaned parts are left to pay for.
    async fn run_multipart(
        &self,
        key: &str,
        attributes: Option<&HeadObjectOutput>,
        parts: Vec<Part<'_>>,
    ) -> StoreResult<ObjectVersion> {
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(key));
        if let Some(head) = attributes {
            create = with_attributes_of!(create, head);
        }
        let created = create.send().await.map_err(|e| self.map_err(key, e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StoreError::other(self.location(key), "the server sent no upload id"))?;
        // Made up front rather than mapped inside the stream: a closure held by
        // the stream would make this future's `Send` depend on higher-ranked
        // lifetimes the compiler cannot prove, and callers need it `Send`.
        let requests: Vec<_> = (1..)
            .zip(parts)
            .map(|(number, part)| match part {
                Part::Upload(body) => Either::Left(self.upload_part(key, upload_id, number, body)),
                Part::Copy(source, range) => {
                    Either::Right(self.copy_part(key, upload_id, number, source, range))
                }
            })
            .collect();
        let result = async {
            let parts = futures::stream::iter(requests)
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
        let reading_failed = |e: &dyn std::fmt::Display| {
            StoreError::other(
                self.location(key),
                format!("reading part {number} from {}: {e}", path.display()),
            )
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

/// Consecutive ranges of `part` bytes covering `0..size` (the runner numbers them from 1).
fn part_ranges(size: u64, part: u64) -> impl Iterator<Item = Range<u64>> {
    (0..size.div_ceil(part)).map(move |i| i * part..((i + 1) * part).min(size))
}

/// `x-amz-copy-source`: bucket and URL-encoded key (keys hold `%` from key
/// escaping), and the version id when the copy is pinned to one.
pub(super) fn copy_source(bucket: &str, key: &str, version_id: Option<&str>) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_respect_the_part_limit() {
        assert_eq!(part_size(70 * MIB, 16 * MIB), 16 * MIB);
        let huge = 500 * GIB;
        let p = part_size(huge, 16 * MIB);
        assert!(huge.div_ceil(p) <= MAX_PARTS && p.is_multiple_of(MIB));
    }

    #[test]
    fn ranges_cover_the_object() {
        let r: Vec<_> = part_ranges(10, 4).collect();
        assert_eq!(r, vec![0..4, 4..8, 8..10]);
        assert_eq!(part_ranges(8, 4).count(), 2);
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
}
