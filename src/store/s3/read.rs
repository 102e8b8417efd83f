//! Resumable pinned range reads: [`S3Store::read_range`] behind
//! [`ObjectStore::get_range`](super::ObjectStore::get_range), and
//! [`S3Store::read_tail`] behind [`ObjectStore::get_tail`](super::ObjectStore::get_tail)
//! (one suffix-range GET instead of a HEAD and a GET).
//!
//! Every GET carries `If-Match` (and `versionId` when the bucket has versions).
//! The SDK retries a request until a response starts; a body that then breaks,
//! ends early or stalls is beyond its reach, so [`read_resuming`] resumes it
//! with a GET of the remaining sub-range, pinned to the version the first bytes
//! came from: a read never mixes two versions. The resume logic is generic over
//! the GET, so the tests below drive it with a scripted fake.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::time::Instant;

use super::{error_chain, normalize_etag, quote_etag, to_system_time, RetryPolicy, S3Store};
use crate::buffers;
use crate::store::{
    head_then_read_tail, ObjectMeta, ObjectStore, ObjectVersion, Pieces, StoreError, StoreResult,
};

impl S3Store {
    /// [`ObjectStore::get_range`]: the bytes in `range` of `key`, pinned to
    /// `pin` when given, resumed across broken bodies.
    pub(super) async fn read_range(
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
        let got = read_resuming(target, range, pin, &self.retry, |want, version| {
            self.get_attempt(key, Wanted::Span(want), version)
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

    /// [`ObjectStore::get_range_pieces`]: one unpinned GET of `range`, its
    /// body as it arrives. No answer within the read deadline, or a body
    /// that stalls past `body_stall_timeout`, is an error, never a wait.
    pub(super) async fn read_range_pieces(
        &self,
        key: &str,
        range: Range<u64>,
    ) -> StoreResult<Pieces> {
        let location = self.location(key);
        let unreachable = |message: String| StoreError::Unreachable {
            endpoint: self.endpoint.clone(),
            message,
        };
        let answer = tokio::time::timeout(
            self.retry.read_deadline,
            self.get_attempt(key, Wanted::Span(range.clone()), None),
        )
        .await
        .map_err(|_| {
            unreachable(format!(
                "reading bytes {}-{} of {location}: no answer within the read deadline ({:?})",
                range.start,
                range.end - 1,
                self.retry.read_deadline
            ))
        })??;
        if answer.start != range.start || answer.total.is_some_and(|total| range.end > total) {
            return Err(StoreError::other(
                location,
                format!(
                    "asked for bytes {}-{}, the server answered from {} of {:?}",
                    range.start,
                    range.end - 1,
                    answer.start,
                    answer.total
                ),
            ));
        }
        let stall = self.retry.body_stall_timeout;
        let pieces = futures::stream::unfold(Some(answer.body), move |body| {
            let location = location.clone();
            async move {
                let mut body = body?;
                let problem = match tokio::time::timeout(stall, body.next()).await {
                    Ok(None) => return None,
                    Ok(Some(Ok(piece))) => return Some((Ok(piece), Some(body))),
                    Ok(Some(Err(e))) => format!("the connection broke mid-body: {e}"),
                    Err(_) => format!("the transfer stalled (no bytes for {stall:?})"),
                };
                Some((Err(StoreError::other(location, problem)), None))
            }
        });
        Ok(Box::pin(pieces))
    }

    /// [`ObjectStore::get_tail`]: one GET of the last `max_len` bytes
    /// (`Range: bytes=-N`), whose answer also tells the object's size,
    /// version and modification time. A body that breaks is resumed by a
    /// read of the rest pinned to the version that answered; a server that
    /// ignores suffix ranges gets a HEAD and a read of the range instead.
    pub(super) async fn read_tail(
        &self,
        key: &str,
        max_len: u64,
    ) -> StoreResult<(ObjectMeta, Bytes)> {
        let head_then_read = || head_then_read_tail(self, key, max_len);
        if max_len == 0 {
            return head_then_read().await;
        }
        let first = tokio::time::timeout(
            self.retry.read_deadline,
            self.get_attempt(key, Wanted::Last(max_len), None),
        )
        .await;
        let answer = match first {
            Err(_) => {
                return Err(StoreError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    message: format!(
                        "reading the last {max_len} bytes of {}: no answer within the read \
                         deadline ({:?})",
                        self.location(key),
                        self.retry.read_deadline
                    ),
                })
            }
            // An empty object has no last bytes to send (416).
            Ok(Err(StoreError::InvalidRange { size: 0, .. })) => return head_then_read().await,
            Ok(answer) => answer?,
        };
        let (Some(version), Some(total)) = (answer.version.clone(), answer.total) else {
            return head_then_read().await;
        };
        if answer.start != total.saturating_sub(max_len) {
            // Not the suffix asked for (a 200 with the whole object).
            return head_then_read().await;
        }
        let len = total - answer.start;
        let mut buf = Vec::with_capacity(len as usize);
        match read_body(answer.body, &mut buf, len, self.retry.body_stall_timeout).await {
            Ok(()) => {}
            Err(BodyError::TooLong) => {
                return Err(StoreError::other(
                    self.location(key),
                    format!("the server sent more than the {len} bytes asked for"),
                ))
            }
            Err(BodyError::Interrupted(problem)) => {
                tracing::info!(
                    what = %self.location(key),
                    received = buf.len(),
                    %problem,
                    "resuming an interrupted read of an object's tail"
                );
                let rest = self
                    .read_range(key, answer.start + buf.len() as u64..total, Some(&version))
                    .await?;
                buf.extend_from_slice(&rest);
            }
        }
        let meta = ObjectMeta {
            size: total,
            version,
            last_modified: answer.last_modified.unwrap_or(SystemTime::UNIX_EPOCH),
        };
        Ok((meta, Bytes::from(buf)))
    }

    /// One GET of `want`, pinned to `version` when given (the SDK retries it
    /// until a response starts). The body is left to the caller.
    async fn get_attempt(
        &self,
        key: &str,
        want: Wanted,
        version: Option<ObjectVersion>,
    ) -> StoreResult<Answer<Body>> {
        let request = self
            .read_client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .range(want.header())
            .set_if_match(version.as_ref().map(|p| quote_etag(&p.etag)))
            .set_version_id(version.and_then(|p| p.version_id));
        let out = match request.send().await {
            Ok(out) => out,
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                let size = self.head(key).await?.size;
                return Err(StoreError::InvalidRange {
                    key: self.location(key),
                    range: want.within(size),
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
                        StoreError::other(
                            key,
                            format!(
                                "{message} (after up to {} attempts)",
                                self.retry.max_attempts
                            ),
                        )
                    }
                    StoreError::Unreachable { endpoint, message } => StoreError::Unreachable {
                        endpoint,
                        message: format!(
                            "reading {} of {}: {message} (after up to {} attempts, \
                             each waiting up to {:?} for an answer)",
                            want.describe(),
                            self.location(key),
                            self.retry.max_attempts,
                            self.retry.read_attempt_timeout
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
            last_modified: out.last_modified().and_then(to_system_time),
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
}

/// What one GET asks for: a span of bytes, or the object's last bytes.
enum Wanted {
    Span(Range<u64>),
    Last(u64),
}

impl Wanted {
    /// The `Range` header (HTTP cannot ask for zero bytes: callers never do).
    fn header(&self) -> String {
        match self {
            Wanted::Span(r) => format!("bytes={}-{}", r.start, r.end - 1),
            Wanted::Last(n) => format!("bytes=-{n}"),
        }
    }

    /// `bytes 10-19`, `the last 512 bytes`: for messages.
    fn describe(&self) -> String {
        match self {
            Wanted::Span(r) => format!("bytes {}-{}", r.start, r.end - 1),
            Wanted::Last(n) => format!("the last {n} bytes"),
        }
    }

    /// The span asked for, in an object of `size` bytes.
    fn within(self, size: u64) -> Range<u64> {
        match self {
            Wanted::Span(r) => r,
            Wanted::Last(n) => size.saturating_sub(n)..size,
        }
    }
}

/// One GET answer, as [`read_resuming`] sees it.
struct Answer<B> {
    /// The version that answered; `None` when the server sent no ETag.
    version: Option<ObjectVersion>,
    /// When that version was written, when the server said.
    last_modified: Option<SystemTime>,
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
    // A reused buffer for a large body: a fresh one is faulted in and zeroed
    // by the kernel as the body arrives.
    let mut buf = buffers::get_body(len as usize);
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
                        return Err(StoreError::other(
                            target.location,
                            format!(
                                "asked for bytes from {}, the server answered from {}",
                                want.start, answer.start
                            ),
                        ));
                    }
                    match read_body(answer.body, &mut buf, len, policy.body_stall_timeout).await {
                        Ok(()) => return Ok(buffers::get_body_bytes(buf)),
                        Err(BodyError::TooLong) => {
                            return Err(StoreError::other(
                                target.location,
                                format!("the server sent more than the {len} bytes asked for"),
                            ))
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
    buf: &mut Vec<u8>,
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

#[cfg(test)]
mod tests {
    //! The resume logic, without a server.

    use super::*;

    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

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
                    last_modified: None,
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
