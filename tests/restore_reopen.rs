//! `restore` of a key whose content-addressed blob gets a new ETag in the
//! middle of the download (the identical bytes re-uploaded as a multipart
//! upload, as another machine's lifetime refresh does on AWS): the restore
//! follows the new version, keeps what it already has, and succeeds with the
//! right bytes.

mod common;

use std::fs;
use std::sync::Arc;
use std::time::Duration;

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
    // Before the 2nd ranged GET is forwarded, once the 1st has been answered
    // (so that there is a finished range to keep): the same bytes again, as a
    // multipart upload (a new ETag).
    let changed = Arc::new(std::sync::Mutex::new(None));
    let (s3_hook, blob_hook, changed_hook) = (s3.clone(), blob.clone(), changed.clone());
    let watcher = proxy.watcher();
    proxy.change_on_nth_ranged_get(2, move || {
        assert!(
            watcher.wait_for(Duration::from_secs(60), |a| a.request.is_ranged_get()
                && a.status == 206),
            "the first range was never answered"
        );
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
    // The change reached the restore as a 412, and the restore kept what it
    // had: no range of the blob was downloaded twice.
    let gets: Vec<_> = proxy
        .answered()
        .into_iter()
        .filter(|a| a.request.is_ranged_get() && a.request.target.contains(&blob))
        .collect();
    assert!(
        gets.iter().any(|a| a.status == 412),
        "no 412 reached the restore: {gets:#?}"
    );
    let mut ranges: Vec<&str> = gets
        .iter()
        .filter(|a| a.status == 206)
        .map(|a| a.request.range.as_deref().unwrap())
        .collect();
    let finished = ranges.len();
    ranges.sort();
    ranges.dedup();
    assert_eq!(
        ranges.len(),
        finished,
        "a finished range was downloaded again after the change: {gets:#?}"
    );
    eprintln!(
        "{test}: ETag {etag} → {new_etag:?}; proxy saw {} ranged GETs",
        proxy.ranged_gets()
    );
}
