//! Cache key escaping (`store::layout`): a key becomes one object name under
//! `keys/`, and listed object names become keys again.
//!
//! For any key: escaping succeeds exactly up to `MAX_KEY_LEN` bytes and
//! round-trips; the escaped name uses only `[A-Za-z0-9._%+-]` and `/`, every
//! `/` is the layout's segment separator `+/`, and no segment is empty, `.`,
//! `..`, hidden (a leading `.`) or longer than a file name may be — on a
//! local store each segment is a directory or file name. A prefix of a key
//! escapes to a prefix of its escaped name (what `--fallback` listing relies
//! on). For any listed name, unescaping never panics.
#![no_main]

#[path = "common.rs"]
mod common;

use cachemount::store::layout::{
    escape_key, pointer_key, unescape_key, KeyError, KEYS_PREFIX, MAX_KEY_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = String::from_utf8_lossy(data);
    if let Ok(k) = unescape_key(&key) {
        let _ = escape_key(&k);
    }
    let escaped = match escape_key(&key) {
        Ok(escaped) => escaped,
        Err(KeyError::TooLong { len }) => {
            assert!(len == key.len() && len > MAX_KEY_LEN);
            return;
        }
        Err(e) => panic!("escaping {key:?}: {e}"),
    };
    assert!(key.len() <= MAX_KEY_LEN);
    assert_eq!(
        unescape_key(&escaped).as_deref(),
        Ok(&*key),
        "round trip of {escaped:?}"
    );
    for segment in escaped.split("+/") {
        assert!(
            segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._%-".contains(&b)),
            "segment {segment:?} of {escaped:?} has a character beyond the layout's"
        );
        assert!(
            !segment.is_empty() || key.is_empty(),
            "empty segment in {escaped:?}"
        );
        assert!(
            !segment.starts_with('.'),
            "segment {segment:?} of {escaped:?} is `.`, `..` or hidden"
        );
        assert!(segment.len() <= 255, "segment of {} bytes", segment.len());
    }
    if !key.is_empty() {
        assert_eq!(pointer_key(&key), Ok(format!("{KEYS_PREFIX}{escaped}")));
    }
    for cut in [1, key.len() / 3, key.len() / 2, key.len().saturating_sub(1)] {
        let cut = (0..=cut.min(key.len()))
            .rev()
            .find(|&c| key.is_char_boundary(c))
            .unwrap_or(0);
        let prefix = escape_key(&key[..cut]).expect("a shorter key escapes");
        assert!(
            escaped.starts_with(&prefix),
            "{:?} escapes to {prefix:?}, not a prefix of {escaped:?}",
            &key[..cut]
        );
    }
});
