//! What the S3 store reads from response headers: `Content-Range` (where a
//! ranged answer starts, and the object's size) and ETags (the version every
//! read is pinned to). First byte even: the input is a `Content-Range`
//! value, which must parse without panicking, and whatever parses reads the
//! same when written back canonically. Odd: the input is an ETag as a server
//! sends it; its normalised form quoted (the `If-Match` sent) normalises to
//! itself, so a server echoing the pin compares equal, and the quoted, weak
//! and bare forms of a tag all compare equal.
#![no_main]

#[path = "common.rs"]
mod common;

use cachemount::store::s3::{normalize_etag, parse_content_range, quote_etag};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let value = String::from_utf8_lossy(rest);
    if mode % 2 == 0 {
        if let Some((start, end, total)) = parse_content_range(&value) {
            let total_s = total.map_or("*".to_string(), |t| t.to_string());
            let canonical = format!("bytes {start}-{end}/{total_s}");
            assert_eq!(parse_content_range(&canonical), Some((start, end, total)));
        }
        return;
    }
    let tag = normalize_etag(&value);
    assert_eq!(normalize_etag(&quote_etag(&tag)), tag, "ETag {value:?}");
    if !value.starts_with('"') && !value.ends_with('"') {
        let bare = &*value;
        assert_eq!(normalize_etag(&quote_etag(bare)), bare, "quoted {bare:?}");
        assert_eq!(
            normalize_etag(&format!("W/\"{bare}\"")),
            bare,
            "weak {bare:?}"
        );
    }
});
