//! Central directory records (with zip64 and timestamp extras).
//! Input: 8 bytes of entry count (as the EOCD claims it), then the directory.
#![no_main]

#[path = "common.rs"]
mod common;

use cachemount::archive::zip;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (count, cd) = common::take_u64(data);
    // Small counts mostly (what real directories have), any count sometimes.
    let count = if count >> 63 == 1 {
        count
    } else {
        count % 4096
    };
    if let Ok(records) = zip::decode_central_directory(cd, count) {
        assert_eq!(records.len() as u64, count);
        for r in &records {
            let _ = r.unix_mode();
            let _ = zip::dos_to_unix(r.dos_time, r.dos_date);
        }
    }
});
