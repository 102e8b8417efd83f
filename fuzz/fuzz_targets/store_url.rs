//! Store URLs (`--store`, and the object URL `mount` takes): `StoreUrl::parse`
//! and `split_object_url` never panic; what parses displays as a URL that
//! parses to the same store (the form messages and the daemon's arguments
//! use); an S3 prefix has no empty component and no leading or trailing `/`,
//! a local root is absolute; an object URL splits into a store and a
//! non-empty object name without `/` that join back to the same split.
#![no_main]

#[path = "common.rs"]
mod common;

use cachemount::store::url::{split_object_url, StoreUrl};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(url) = StoreUrl::parse(&s) {
        match &url {
            StoreUrl::Local { root } => assert!(root.is_absolute(), "{url:?}"),
            StoreUrl::S3 { bucket, prefix } => {
                assert!(!bucket.is_empty() && !bucket.contains('/'), "{url:?}");
                assert!(
                    prefix.is_empty() || prefix.split('/').all(|c| !c.is_empty()),
                    "{url:?}"
                );
            }
        }
        let shown = url.to_string();
        assert_eq!(
            StoreUrl::parse(&shown).as_ref(),
            Ok(&url),
            "{s:?} shown as {shown:?}"
        );
    }
    if let Ok((store, name)) = split_object_url(&s) {
        assert!(
            !name.is_empty() && !name.contains('/'),
            "{s:?}: object {name:?}"
        );
        let joined = format!("{store}/{name}");
        assert_eq!(
            split_object_url(&joined),
            Ok((store.clone(), name.clone())),
            "{s:?} → {joined:?}"
        );
    }
});
