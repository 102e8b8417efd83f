//! The access profile under `profiles/` (untrusted: a pull-request build may
//! write it): whatever the bytes, parsing is bounded and never panics, and
//! what parses encodes back to a profile that parses the same.
#![no_main]

#[path = "common.rs"]
mod common;

use cachemount::profile::format::{MAX_ENTRIES, MAX_NAME_LEN};
use cachemount::profile::Profile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Profile::parse(data) {
        assert!(p.entries.len() <= MAX_ENTRIES);
        assert!(p
            .entries
            .iter()
            .all(|e| !e.name.is_empty() && e.name.len() <= MAX_NAME_LEN && e.start <= e.end));
        assert_eq!(Profile::parse(&p.encode()).as_ref(), Ok(&p));
    }
});
