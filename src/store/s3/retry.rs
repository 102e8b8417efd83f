//! [`RetryPolicy`]: how S3 requests and reads survive a flaky network or a
//! struggling server (attempts, timeouts, backoff), and its translation into
//! the SDK's retry and timeout configuration.
//!
//! A plain options struct: the command line fills it (from `CACHEMOUNT_S3_*`,
//! see `cli`), tests build it directly. Nothing here reads the environment, so
//! a store behaves as the policy it was given says.

use std::time::{Duration, SystemTime};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::config::retry::{RetryPartition, TokenBucket};
use aws_sdk_s3::Client;

/// How requests and reads survive a flaky network or a struggling server.
///
/// The defaults suit CI: transient faults (a dropped connection, a burst of 503
/// SlowDown, a stalled transfer) cost seconds and are invisible to the caller;
/// a store that is down makes a read fail within about two minutes with an error
/// that says what happened (the mount turns it into `EIO` and a log line),
/// rather than hanging a build for the job's whole timeout.
///
/// [`S3Store::new`](super::S3Store::new) takes one; the command line starts
/// from [`RetryPolicy::default`] and applies the `CACHEMOUNT_S3_*` variables
/// named below.
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

impl RetryPolicy {
    /// The wait before resuming a body for the `n`th time (from 1): exponential
    /// with full jitter, like the SDK's.
    pub(super) fn resume_backoff(&self, n: u32) -> Duration {
        let cap = self
            .initial_backoff
            .saturating_mul(1 << n.saturating_sub(1).min(16))
            .min(self.max_backoff);
        cap.mul_f64(jitter())
    }

    /// The write and read clients for this policy, sharing `base`'s connection
    /// pool, credentials and retry quota: they differ only in how long one
    /// attempt may take.
    pub(super) fn clients(&self, base: &aws_sdk_s3::Config) -> (Client, Client) {
        let retry = RetryConfig::standard()
            .with_max_attempts(self.max_attempts)
            .with_initial_backoff(self.initial_backoff)
            .with_max_backoff(self.max_backoff);
        let client = |attempt: Duration| {
            let timeouts = TimeoutConfig::builder()
                .connect_timeout(self.connect_timeout)
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
            client(self.write_attempt_timeout),
            client(self.read_attempt_timeout),
        )
    }
}

/// The SDK stops retrying when its retry quota (a token bucket: a retry takes
/// tokens, a success gives them back) runs dry. The default bucket never refills
/// by time, so after one long outage a long-lived mount daemon would never retry
/// again; this one refills (a full bucket in under a minute) and is this
/// store's own.
pub(super) fn retry_partition() -> RetryPartition {
    RetryPartition::custom("cachemount")
        .token_bucket(
            TokenBucket::builder()
                .capacity(500)
                .refill_rate(10.0)
                .build(),
        )
        .build()
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
