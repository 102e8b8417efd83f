//! cachemount's archive index. First byte 0: the raw encoding (`decode`);
//! otherwise the stored, zstd-compressed form, one frame or chunks
//! (`from_stored`, given its true digest so the checksum does not stop the
//! fuzzer). A decoded index must re-encode to itself, and every frame span
//! must be computable.
#![no_main]

#[path = "common.rs"]
mod common;

use cachemount::archive::index::{digest, ArchiveIndex};
use cachemount::archive::limits::IndexBound;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let index = if mode == 0 {
        ArchiveIndex::decode(rest, IndexBound::MAX)
    } else {
        ArchiveIndex::from_stored(rest, &digest(rest), IndexBound::MAX)
    };
    let Ok(index) = index else {
        return;
    };
    for e in &index.entries {
        for i in 0..e.frames.len() {
            let (_, len) = e.frame_span(i);
            assert!(len <= u64::from(e.frame_size));
        }
    }
    let again = ArchiveIndex::decode(&index.encode(), IndexBound::MAX).expect("a decoded index re-encodes");
    assert_eq!(again, index);
});
