//! The end of central directory search and decode, and the zip64 end record.
//! Input: 8 bytes choosing the archive size the tail belongs to, then the tail.
#![no_main]

#[path = "common.rs"]
mod common;

use cachemount::archive::zip;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (skew, tail) = common::take_u64(data);
    // Mostly a tail of a larger archive; sometimes any size at all (even too small).
    let size = if skew >> 63 == 1 {
        skew & !(1 << 63)
    } else {
        tail.len() as u64 + (skew & 0xFFFF_FFFF_FFFF)
    };
    let tail_start = size.wrapping_sub(tail.len() as u64);
    if let Ok(mut eocd) = zip::find_eocd(tail, size) {
        assert!(eocd.comment.len() <= u16::MAX as usize);
        if let Some(off) = eocd.zip64_eocd_offset {
            // The record outside the tail: what a second read would return.
            let record = off
                .checked_sub(tail_start)
                .and_then(|s| tail.get(s as usize..))
                .unwrap_or(tail);
            let _ = zip::apply_zip64_eocd(&mut eocd, record);
        }
    }
    let mut eocd = zip::EndOfCentralDirectory {
        entries: 0,
        cd_offset: 0,
        cd_size: 0,
        comment: Vec::new(),
        eocd_offset: 0,
        zip64_eocd_offset: None,
    };
    let _ = zip::apply_zip64_eocd(&mut eocd, tail);
});
