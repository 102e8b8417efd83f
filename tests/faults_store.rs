//! `S3Store::get_range` through the fault-injecting proxy (tests/common/proxy.rs)
//! in front of the real S3 server: cut, truncated and stalled bodies are resumed
//! from the bytes received; retries run out into clear errors in bounded time;
//! a resumption never mixes two versions of an object.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cachemount::store::s3::{RetryPolicy, S3Store};
use cachemount::store::{ObjectStore, PutSource, StoreError};
use common::proxy::{Fault, Proxy, Rule};
use common::s3::TestS3;
use common::tree::Rng;

/// Quick retries, so a test takes seconds.
fn quick() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        read_attempt_timeout: Duration::from_secs(1),
        body_stall_timeout: Duration::from_millis(500),
        read_deadline: Duration::from_secs(5),
        ..RetryPolicy::default()
    }
}

/// A store on `s3`'s prefix that goes through `proxy`.
async fn through(s3: &TestS3, proxy: &Proxy, policy: RetryPolicy) -> S3Store {
    S3Store::new(&s3.bucket, &s3.prefix, Some(proxy.url()), None, policy).await
}

/// An object of `len` noise bytes put directly (not through the proxy).
async fn object(s3: &TestS3, key: &str, seed: u64, len: usize) -> Bytes {
    let data = Bytes::from(Rng::new(seed).noise(len));
    s3.store()
        .await
        .put(key, PutSource::Bytes(data.clone()))
        .await
        .unwrap();
    data
}

/// Overwrites `key` with `data` directly on the server, from the proxy's hook thread.
fn overwrite(s3: &TestS3, key: &str, data: &Bytes) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        s3.store()
            .await
            .put(key, PutSource::Bytes(data.clone()))
            .await
            .unwrap();
    });
}

#[tokio::test]
async fn cut_truncated_and_stalled_bodies_are_resumed() {
    let Some(s3) = TestS3::from_env("cut_truncated_and_stalled_bodies_are_resumed") else {
        return;
    };
    let data = object(&s3, "obj", 1, 3 << 20).await;
    let proxy = Proxy::start(&s3.endpoint);
    let store = through(&s3, &proxy, quick()).await;
    let pin = store.head("obj").await.unwrap().version;
    for fault in [Fault::Cut, Fault::Truncate, Fault::StallMidBody] {
        // Every other GET: each resumption gets through.
        proxy.set(Rule::new(fault.clone()).every(2));
        let before = (proxy.ranged_gets(), proxy.faults());
        let started = Instant::now();
        for (range, pinned) in [(0..3 << 20, true), (100..2_000_000, false)] {
            let got = store
                .get_range("obj", range.clone(), pinned.then_some(&pin))
                .await
                .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
            assert!(
                got == data[range.start as usize..range.end as usize],
                "{fault:?}"
            );
        }
        eprintln!(
            "{fault:?}: {} GETs, {} faults, {:.2} s",
            proxy.ranged_gets() - before.0,
            proxy.faults() - before.1,
            started.elapsed().as_secs_f64()
        );
        assert!(proxy.faults() > before.1, "{fault:?} was not injected");
    }
}

/// `get_range_pieces` (a mount's streamed index download) is one attempt:
/// whole, its pieces are the range's bytes; a cut, truncated or stalled
/// body ends the stream with an error — within the stall timeout, never a
/// wait — so the mount reads the index the ordinary way instead.
#[tokio::test]
async fn a_streamed_range_is_the_bytes_or_ends_in_an_error_in_bounded_time() {
    let Some(s3) =
        TestS3::from_env("a_streamed_range_is_the_bytes_or_ends_in_an_error_in_bounded_time")
    else {
        return;
    };
    let data = object(&s3, "obj", 9, 3 << 20).await;
    let proxy = Proxy::start(&s3.endpoint);
    let policy = quick();
    let bound = policy.body_stall_timeout + Duration::from_secs(2);
    let store = through(&s3, &proxy, policy).await;
    let streamed = |range: std::ops::Range<u64>| {
        let store = &store;
        async move {
            let mut pieces = store.get_range_pieces("obj", range).await?;
            let mut got = Vec::new();
            while let Some(piece) = futures::StreamExt::next(&mut pieces).await {
                got.extend_from_slice(&piece?);
            }
            Ok::<_, StoreError>(got)
        }
    };
    assert!(streamed(1000..3_000_000).await.unwrap() == data[1000..3_000_000]);
    for fault in [Fault::Cut, Fault::Truncate, Fault::StallMidBody] {
        proxy.set(Rule::new(fault.clone()));
        let started = Instant::now();
        let err = streamed(0..3 << 20).await.unwrap_err();
        eprintln!("{fault:?}: {:.2} s: {err}", started.elapsed().as_secs_f64());
        assert!(
            started.elapsed() < bound,
            "{fault:?} took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(proxy.faults(), 3, "one attempt each, no retries");
}

#[tokio::test]
async fn slowdown_and_500_are_retried_then_reported() {
    let Some(s3) = TestS3::from_env("slowdown_and_500_are_retried_then_reported") else {
        return;
    };
    let data = object(&s3, "obj", 2, 100_000).await;
    let proxy = Proxy::start(&s3.endpoint);
    let store = through(&s3, &proxy, quick()).await;
    // Two failures in a row, then an answer: within 3 attempts.
    proxy.set(Rule::new(Fault::SlowDown).first(2));
    assert_eq!(
        store.get_range("obj", 0..100_000, None).await.unwrap(),
        data
    );
    proxy.set(Rule::new(Fault::Status500).first(2));
    assert_eq!(
        store.get_range("obj", 10..20, None).await.unwrap(),
        data[10..20]
    );
    assert_eq!(proxy.faults(), 4);
    // Always failing: the error says so once the attempts are spent.
    proxy.set(Rule::new(Fault::SlowDown));
    let started = Instant::now();
    let err = store.get_range("obj", 0..10, None).await.unwrap_err();
    assert_eq!(proxy.faults(), 4 + 3, "not every attempt was made");
    let message = err.to_string();
    eprintln!(
        "always SlowDown: {:.2} s: {message}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        message.contains("503") && message.contains("SlowDown"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_permanent_stall_fails_within_the_bound() {
    let Some(s3) = TestS3::from_env("a_permanent_stall_fails_within_the_bound") else {
        return;
    };
    object(&s3, "obj", 3, 1 << 20).await;
    let proxy = Proxy::start(&s3.endpoint);
    let policy = quick();
    let bound = policy.read_deadline + policy.body_stall_timeout + Duration::from_secs(2);
    let store = through(&s3, &proxy, policy).await;
    for fault in [Fault::Stall, Fault::StallMidBody] {
        proxy.set(Rule::new(fault.clone()));
        let started = Instant::now();
        let err = tokio::time::timeout(
            Duration::from_secs(60),
            store.get_range("obj", 0..1 << 20, None),
        )
        .await
        .expect("the read hung")
        .unwrap_err();
        let took = started.elapsed();
        eprintln!("{fault:?}: failed after {:.2} s: {err}", took.as_secs_f64());
        assert!(took < bound, "{fault:?}: took {took:?}");
        assert!(matches!(err, StoreError::Unreachable { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("timed out")
                || message.contains("stalled")
                || message.contains("deadline"),
            "{message}"
        );
    }
}

#[tokio::test]
async fn a_resumed_read_never_mixes_versions() {
    let Some(s3) = TestS3::from_env("a_resumed_read_never_mixes_versions") else {
        return;
    };
    let len = 2 << 20;
    let old = object(&s3, "obj", 4, len).await;
    let new = Bytes::from(Rng::new(5).noise(len));
    let proxy = Proxy::start(&s3.endpoint);
    let store = through(&s3, &proxy, quick()).await;

    // The first GET's body is cut; before the resumption goes out, the object
    // is overwritten on the server.
    let arm = |proxy: &Proxy| {
        let (s3, new) = (s3.clone(), new.clone());
        proxy.change_on_nth_ranged_get(2, move || overwrite(&s3, "obj", &new));
        proxy.set(Rule::new(Fault::Cut).first(1));
    };

    // Pinned: the resumption is refused (412), never served from the new version.
    arm(&proxy);
    let pin = store.head("obj").await.unwrap().version;
    let r = store.get_range("obj", 0..len as u64, Some(&pin)).await;
    assert!(matches!(r, Err(StoreError::PreconditionFailed(_))), "{r:?}");

    // Unpinned: the read starts over and returns the new version whole.
    object(&s3, "obj", 4, len).await;
    arm(&proxy);
    let got = store.get_range("obj", 0..len as u64, None).await.unwrap();
    assert!(
        got == new,
        "an unpinned resumed read returned a mix or the old version"
    );
    assert_eq!(proxy.faults(), 2);
    let _ = old;
}
