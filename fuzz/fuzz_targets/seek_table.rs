//! The zstd seekable format's seek table at the end of an entry.
#![no_main]

#[path = "common.rs"]
mod common;

use cachemount::archive::seek_table;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frames) = seek_table::decode(data) {
        assert!(frames.len() * 8 < data.len());
        let checksummed = seek_table::encode(&frames);
        if data[data.len() - 5] & 0x80 != 0 {
            assert_eq!(seek_table::decode(&checksummed).unwrap(), frames);
        }
    }
});
