//! The mount point field of /proc/self/mountinfo, unescaped
//! (`mount::preflight::unescape_mountinfo`) to tell whether a target is
//! already a mount. Mount point names are chosen by whoever made the
//! directory, so: first byte even, any field text, which must unescape
//! without panicking (overflow checks on) to at most its own length; odd,
//! a path escaped as the kernel writes it (space, tab, newline and
//! backslash as `\ooo`), which must contain no space (fields split on
//! spaces) and unescape to the path itself.
#![no_main]

#[path = "common.rs"]
mod common;

use cachemount::mount::preflight::unescape_mountinfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if mode % 2 == 0 {
        assert!(unescape_mountinfo(&text).len() <= text.len());
        return;
    }
    let mut field = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => field.push_str(&format!("\\{:03o}", c as u32)),
            c => field.push(c),
        }
    }
    assert!(!field.contains(' '));
    assert_eq!(
        unescape_mountinfo(&field),
        text.as_bytes(),
        "field {field:?}"
    );
});
