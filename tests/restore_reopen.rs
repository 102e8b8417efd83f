//! `restore` of a key whose content-addressed blob gets a new ETag in the
//! middle of the download (the identical bytes re-uploaded as a multipart
//! upload, as another machine's lifetime refresh does on AWS): the restore
//! follows the new version, keeps what it already has, and succeeds with the
//! right bytes.

mod common;

use std::fs;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cachemount::store::s3::S3Tuning;
use cachemount::store::{ObjectStore, PutSource};

use common::proxy::Proxy;
use common::saved::Saved;
use common::tree::{assert_same_tree, feature_tree, Rng};

#[test]
fn restore_of_a_key_survives_an_etag_change_mid_download() {
    let test = "restore_of_a_key_survives_an_etag_change_mid_download";
    let Some(Saved { sb, s3, expected }) = Saved::on_s3(test, |src| {
        feature_tree(src, 31);
        fs::write(src.join("noise.bin"), Rng::new(32).noise(30 << 20)).unwrap();
    }) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (blob, bytes, etag) = rt.block_on(async {
        let store = s3.store().await;
        let blob = cachemount::store::layout::resolve(&store, "k", &[])
            .await
            .unwrap()
            .pointer
            .blob_key();
        let meta = store.head(&blob).await.unwrap();
        let bytes = store.get_range(&blob, 0..meta.size, None).await.unwrap();
        (blob, bytes, meta.version.etag)
    });
    let proxy = Proxy::start(&s3.endpoint);
    // On the 2nd ranged GET, before it is forwarded: the same bytes again,
    // as a multipart upload (a new ETag).
    let gets = Arc::new(AtomicU64::new(0));
    let changed = Arc::new(std::sync::Mutex::new(None));
    let (s3_hook, blob_hook, changed_hook) = (s3.clone(), blob.clone(), changed.clone());
    proxy.set_hook(move |req| {
        if req.is_ranged_get() && gets.fetch_add(1, Ordering::SeqCst) == 1 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let etag = rt.block_on(async {
                let tmp = tempfile::NamedTempFile::new().unwrap();
                fs::write(tmp.path(), &bytes).unwrap();
                let store = s3_hook.store().await.with_tuning(S3Tuning {
                    multipart_threshold: 5 << 20,
                    min_part_size: 5 << 20,
                    ..S3Tuning::default()
                });
                store
                    .put(&blob_hook, PutSource::File(tmp.path().to_path_buf()))
                    .await
                    .unwrap()
                    .version
                    .etag
            });
            *changed_hook.lock().unwrap() = Some(etag);
        }
    });
    let out = sb.run(&[
        "restore",
        "-q",
        "--endpoint-url",
        &proxy.url(),
        "--key",
        "k",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "restore failed: {stderr}");
    let new_etag = changed.lock().unwrap().clone();
    assert!(
        new_etag.as_ref().is_some_and(|e| *e != etag),
        "the ETag changed mid-download: {etag} → {new_etag:?}"
    );
    assert_same_tree(&expected, &sb.work().join("cache"));
    eprintln!(
        "{test}: ETag {etag} → {new_etag:?}; proxy saw {} ranged GETs",
        proxy.ranged_gets()
    );
}
