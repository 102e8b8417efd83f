//! A local file header: where its entry's data starts.
#![no_main]

#[path = "common.rs"]
mod common;

use cachemount::archive::zip;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(start) = zip::local_header_data_start(data) {
        assert!(start >= zip::LOCAL_HEADER_LEN as u64 && start <= 30 + 2 * 65_535);
    }
});
