//! Behaviour every `ObjectStore` must have, written once as generic bodies and
//! run against both the local directory store and the real S3 test server
//! (`scripts/s3-server.sh start`; skipped without it outside CI).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cachemount::store::layout::{self, KeyPointer, LayoutError};
use cachemount::store::local::LocalStore;
use cachemount::store::s3::S3Tuning;
use cachemount::store::{ObjectStore, PutSource, RefreshOutcome, StoreError};
use futures::{StreamExt, TryStreamExt};

/// Runs each named generic body once on a fresh local store and once on a fresh S3 prefix.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn local() {
                let dir = tempfile::tempdir().unwrap();
                super::$name(&cachemount::store::local::LocalStore::new(dir.path().join("store"))).await;
            }

            #[tokio::test]
            async fn s3() {
                if let Some(store) = crate::common::s3::s3_store(concat!(stringify!($name), "_s3")).await {
                    super::$name(&store).await;
                }
            }
        }
    )*};
}

on_both_stores!(
    pinned_reads_fail_after_an_overwrite,
    missing_objects_are_not_found,
    refresh_rewrites_only_old_objects,
    delete_removes_objects,
    put_from_a_file,
    fallback_resolution_takes_the_newest,
    concurrent_pointer_writes_leave_a_readable_pointer,
    a_tail_read_tells_what_a_head_tells,
);

fn bytes(s: &'static str) -> PutSource {
    PutSource::Bytes(Bytes::from_static(s.as_bytes()))
}

fn pointer(digest_char: char, created: u64) -> KeyPointer {
    KeyPointer {
        digest: digest_char.to_string().repeat(64),
        size: 1,
        created,
        paths: vec!["target".into()],
        format_version: 1,
        index: None,
    }
}

async fn pinned_reads_fail_after_an_overwrite<S: ObjectStore>(store: &S) {
    let first = store.put("obj", bytes("hello world")).await.unwrap();
    let head = store.head("obj").await.unwrap();
    assert_eq!((head.size, &head.version), (11, &first.version));
    assert_eq!(
        store
            .get_range("obj", 6..11, Some(&head.version))
            .await
            .unwrap(),
        &b"world"[..]
    );
    assert_eq!(
        store.get_range("obj", 0..5, None).await.unwrap(),
        &b"hello"[..]
    );
    let past_end = store.get_range("obj", 6..20, None).await;
    assert!(
        matches!(past_end, Err(StoreError::InvalidRange { size: 11, .. })),
        "{past_end:?}"
    );

    let second = store.put("obj", bytes("HELLO WORLD")).await.unwrap();
    assert_ne!(first.version, second.version);
    let stale = store.get_range("obj", 6..11, Some(&first.version)).await;
    assert!(
        matches!(stale, Err(StoreError::PreconditionFailed(_))),
        "{stale:?}"
    );
    assert_eq!(
        store
            .get_range("obj", 6..11, Some(&second.version))
            .await
            .unwrap(),
        &b"WORLD"[..]
    );
}

/// `get_tail` answers, in one call, what a HEAD and a read of the last bytes
/// answer: for an object longer than asked, shorter, and empty; and a
/// missing object is not found.
async fn a_tail_read_tells_what_a_head_tells<S: ObjectStore>(store: &S) {
    store.put("t", bytes("0123456789")).await.unwrap();
    let head = store.head("t").await.unwrap();
    let (meta, last) = store.get_tail("t", 4).await.unwrap();
    assert_eq!(&last[..], b"6789");
    assert_eq!((meta.size, &meta.version), (10, &head.version));
    assert_eq!(meta.last_modified, head.last_modified);
    // The version it tells pins later reads.
    let pinned = store
        .get_range("t", 0..2, Some(&meta.version))
        .await
        .unwrap();
    assert_eq!(&pinned[..], b"01");
    let (meta, all) = store.get_tail("t", 1 << 20).await.unwrap();
    assert_eq!((&all[..], meta.size), (&b"0123456789"[..], 10));
    store.put("empty", bytes("")).await.unwrap();
    let (meta, none) = store.get_tail("empty", 64).await.unwrap();
    assert_eq!((none.len(), meta.size), (0, 0));
    assert!(matches!(
        store.get_tail("nope", 64).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn missing_objects_are_not_found<S: ObjectStore>(store: &S) {
    assert!(matches!(
        store.head("nope").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.get_range("nope", 0..1, None).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.refresh("nope", SystemTime::now()).await,
        Err(StoreError::NotFound(_))
    ));
    store.delete("nope").await.unwrap();
    assert!(store.list("nope").await.unwrap().is_empty());
    let missing = layout::read_pointer(store, "no-such-key").await;
    assert!(
        matches!(missing, Err(LayoutError::Store(StoreError::NotFound(_)))),
        "{missing:?}"
    );
}

async fn refresh_rewrites_only_old_objects<S: ObjectStore>(store: &S) {
    let put = store.put("blob", bytes("content")).await.unwrap();
    let young = store
        .refresh("blob", SystemTime::now() - Duration::from_secs(12 * 3600))
        .await
        .unwrap();
    assert_eq!(young, RefreshOutcome::StillFresh);
    assert_eq!(
        store.head("blob").await.unwrap(),
        put,
        "a fresh object is left alone"
    );

    // S3 keeps LastModified in whole seconds.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let old = store
        .refresh("blob", SystemTime::now() + Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(old, RefreshOutcome::Refreshed);
    let after = store.head("blob").await.unwrap();
    assert!(
        after.last_modified > put.last_modified,
        "{:?} -> {:?}",
        put.last_modified,
        after.last_modified
    );
    assert_eq!(after.size, put.size);
    assert_eq!(
        store
            .get_range("blob", 0..7, Some(&after.version))
            .await
            .unwrap(),
        &b"content"[..]
    );
}

async fn delete_removes_objects<S: ObjectStore>(store: &S) {
    store.put("d/a", bytes("a")).await.unwrap();
    store.put("d/b", bytes("b")).await.unwrap();
    store.delete("d/a").await.unwrap();
    assert!(matches!(
        store.head("d/a").await,
        Err(StoreError::NotFound(_))
    ));
    let left: Vec<_> = store
        .list("d/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(left, ["d/b"]);
    store.delete("d/a").await.unwrap();
}

async fn put_from_a_file<S: ObjectStore>(store: &S) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archive.zip");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let meta = store
        .put("blobs/sha256/file", PutSource::File(path))
        .await
        .unwrap();
    assert_eq!(meta.size, data.len() as u64);
    assert_eq!(
        store.head("blobs/sha256/file").await.unwrap().version,
        meta.version
    );
    let tail = store
        .get_range(
            "blobs/sha256/file",
            2_999_000..3_000_000,
            Some(&meta.version),
        )
        .await
        .unwrap();
    assert_eq!(&tail[..], &data[2_999_000..]);
    let missing = store
        .put("x", PutSource::File(dir.path().join("missing")))
        .await;
    assert!(matches!(missing, Err(StoreError::Io { .. })), "{missing:?}");
}

async fn fallback_resolution_takes_the_newest<S: ObjectStore>(store: &S) {
    layout::write_pointer(store, "node-aaa", &pointer('a', 1_000))
        .await
        .unwrap();
    layout::write_pointer(store, "node-bbb", &pointer('b', 3_000))
        .await
        .unwrap();
    layout::write_pointer(store, "node-ccc", &pointer('c', 2_000))
        .await
        .unwrap();
    layout::write_pointer(store, "nodejs/x y", &pointer('d', 9_000))
        .await
        .unwrap();

    let exact = layout::resolve(store, "node-aaa", &["node-".into()])
        .await
        .unwrap();
    assert_eq!(exact.key, "node-aaa");
    let newest = layout::resolve(store, "node-zzz", &["go-".into(), "node-".into()])
        .await
        .unwrap();
    assert_eq!(
        (newest.key.as_str(), newest.pointer.digest.as_str()),
        ("node-bbb", "b".repeat(64).as_str())
    );
    let escaped = layout::resolve(store, "nope", &["nodejs/".into()])
        .await
        .unwrap();
    assert_eq!(escaped.key, "nodejs/x y");

    let miss = layout::resolve(store, "rust-1", &["rust-".into()])
        .await
        .unwrap_err();
    assert!(
        matches!(&miss, LayoutError::NoMatch { key, fallbacks } if key == "rust-1" && fallbacks == &["rust-"])
    );

    let listed: Vec<_> = layout::list_keys(store, "")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(listed, ["node-aaa", "node-bbb", "node-ccc", "nodejs/x y"]);
}

async fn concurrent_pointer_writes_leave_a_readable_pointer<S: ObjectStore>(store: &S) {
    let writers = "0123456789abcdef".chars().map(|c| async move {
        layout::write_pointer(store, "shared key", &pointer(c, 1))
            .await
            .map(|()| c.to_string().repeat(64))
    });
    let written: BTreeSet<String> = futures::stream::iter(writers)
        .buffer_unordered(16)
        .try_collect()
        .await
        .unwrap();
    let read = layout::read_pointer(store, "shared key").await.unwrap();
    assert!(
        written.contains(&read.digest),
        "{} is none of the written pointers",
        read.digest
    );

    // Sequentially, the last writer wins.
    layout::write_pointer(store, "shared key", &pointer('f', 2))
        .await
        .unwrap();
    let last = layout::read_pointer(store, "shared key").await.unwrap();
    assert_eq!(last, pointer('f', 2));
}

/// Listing pages through many objects (a small page size makes S3 paginate).
async fn list_pages_through_everything<S: ObjectStore>(store: Arc<S>) {
    const N: usize = 250;
    let puts = (0..N).map(|i| {
        let store = store.clone();
        async move { store.put(&format!("many/k{i:04}"), bytes("x")).await }
    });
    futures::stream::iter(puts)
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    store.put("many-not/k", bytes("x")).await.unwrap();

    let listed = store.list("many/").await.unwrap();
    let keys: Vec<_> = listed.iter().map(|o| o.key.clone()).collect();
    let expected: Vec<_> = (0..N).map(|i| format!("many/k{i:04}")).collect();
    assert_eq!(keys, expected);
    assert!(listed.iter().all(|o| o.size == 1));
    assert_eq!(store.list("many/k01").await.unwrap().len(), 100);
}

#[tokio::test]
async fn list_pages_through_everything_local() {
    let dir = tempfile::tempdir().unwrap();
    list_pages_through_everything(Arc::new(LocalStore::new(dir.path()))).await;
}

#[tokio::test]
async fn list_pages_through_everything_s3() {
    let Some(s3) = common::s3::TestS3::from_env("list_pages_through_everything_s3") else {
        return;
    };
    let tuning = S3Tuning {
        list_page_size: Some(100),
        ..S3Tuning::default()
    };
    list_pages_through_everything(Arc::new(s3.store().await.with_tuning(tuning))).await;
}
