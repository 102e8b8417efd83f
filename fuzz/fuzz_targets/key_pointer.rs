//! The key pointer JSON under `keys/`: its digest becomes an object key.
#![no_main]

#[path = "common.rs"]
mod common;

use cachemount::store::layout::KeyPointer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = KeyPointer::parse(data) {
        assert!(p.digest.len() == 64 && p.digest.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(p.blob_key(), format!("blobs/sha256/{}", p.digest));
    }
});
