//! Bounds on what an archive may declare (DESIGN §7): a cache is shared,
//! less-trusted input, so every name, symlink target, xattr, count and length
//! it declares is checked against what the kernel accepts or what the
//! archive's own bytes could honestly hold *before* anything is allocated for
//! it. The reader refuses an archive over a bound with a [`FormatError`]
//! naming the entry and the limit; the writer checks the same bounds, so
//! everything cachemount saves it can also read.

use std::io::{self, Read};

use super::zip::{EndOfCentralDirectory, CENTRAL_HEADER_LEN};
use super::FormatError;

/// An index larger than this uncompressed is refused whatever the archive
/// (a decompression bomb, not a cache); [`IndexBound`] is usually far tighter.
pub const MAX_INDEX_LEN: usize = 1 << 30;
/// The largest frame an index may declare: a frame is decoded into one buffer
/// of this size, so a corrupt index must not make it gigabytes. (cachemount
/// writes [`DEFAULT_FRAME_SIZE`](super::DEFAULT_FRAME_SIZE) frames.)
pub const MAX_FRAME_SIZE: u32 = 1 << 26;

/// The longest path (entry name, symlink target) the kernel takes: PATH_MAX
/// (4096) counts the terminating NUL.
pub const MAX_PATH: usize = libc::PATH_MAX as usize - 1;
/// The longest path component (NAME_MAX).
pub const MAX_NAME: usize = 255;
/// The longest xattr name (XATTR_NAME_MAX).
pub const MAX_XATTR_NAME: usize = 255;
/// The namespace of the xattrs an archive may carry.
const USER_PREFIX: &[u8] = b"user.";
/// The most xattr bytes (names and values) one entry may carry (a value's
/// own kernel limit, XATTR_SIZE_MAX): more than any Linux filesystem keeps per
/// inode (ext4 one block, btrfs one leaf), so no saved file is refused.
pub const MAX_XATTRS_LEN: usize = 64 * 1024;
/// The most compressed bytes a foreign symlink's target may take: a target of
/// at most [`MAX_PATH`] bytes is that long stored and shorter deflated, so
/// this leaves room for any encoder while keeping a crafted "symlink" of
/// gigabytes from being read into memory.
pub const MAX_LINK_COMPRESSED: u64 = 64 * 1024;

/// Upper bound of an index entry's encoding without its name, symlink target,
/// xattrs and frame table (every varint at its widest: 127 bytes), plus room
/// for an average of 129 xattr bytes per entry — more than any cache seen
/// carries, and the writer refuses an archive that needs more.
const INDEX_ENTRY_ALLOWANCE: u64 = 256;
/// The index's magic, manifest (JSON) and entry count.
const INDEX_HEADER_ALLOWANCE: u64 = 1 << 20;

/// What the archive around an index allows that index to declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexBound {
    /// The most entries (cachemount writes one central-directory record per
    /// index entry, plus the manifest's and the index's own).
    pub entries: u64,
    /// The most bytes the index may decode to.
    pub len: u64,
}

impl IndexBound {
    /// The most any archive may declare (the index decoder's own limit; for
    /// fuzzing and tests: real archives are bounded by [`IndexBound::for_archive`]).
    pub const MAX: IndexBound = IndexBound {
        entries: u64::MAX,
        len: MAX_INDEX_LEN as u64,
    };

    /// The bound of an index in an archive whose end record lists `records`
    /// central-directory records in `cd_size` bytes, after `data_len` bytes of
    /// entries. Every part of an honest index is paid for by archive bytes:
    /// each name is also in its central-directory record, each symlink target
    /// is its entry's stored data, each frame-table row (≤ 9 bytes) describes
    /// a zstd frame of at least 13 bytes; only the fixed fields and xattrs are
    /// per-entry allowances.
    pub fn for_archive(records: u64, cd_size: u64, data_len: u64) -> IndexBound {
        let len = INDEX_HEADER_ALLOWANCE
            .saturating_add(records.saturating_mul(INDEX_ENTRY_ALLOWANCE))
            .saturating_add(cd_size)
            .saturating_add(data_len)
            .min(Self::MAX.len);
        IndexBound {
            entries: records,
            len,
        }
    }
}

/// The central directory the end record declares must lie before it, and its
/// entry count must fit its size (each record is at least 46 bytes), so
/// neither is trusted as an allocation size.
pub fn check_central_directory(eocd: &EndOfCentralDirectory) -> Result<(), FormatError> {
    let (entries, cd_size) = (eocd.entries, eocd.cd_size);
    if eocd
        .cd_offset
        .checked_add(cd_size)
        .is_none_or(|end| end > eocd.eocd_offset)
    {
        return Err(FormatError::Implausible(format!(
            "the end record declares a central directory of {cd_size} bytes at offset {}, \
             past the end record at {} (or the archive is truncated)",
            eocd.cd_offset, eocd.eocd_offset
        )));
    }
    let fits = cd_size / CENTRAL_HEADER_LEN as u64;
    if entries > fits {
        return Err(FormatError::Implausible(format!(
            "the end record declares {entries} entries, but a central directory of \
             {cd_size} bytes holds at most {fits}"
        )));
    }
    Ok(())
}

/// An entry name (without its trailing slash) must be a path the kernel takes.
pub fn check_name(name: &[u8]) -> Result<(), FormatError> {
    if name.len() > MAX_PATH {
        return Err(over_limit(
            name,
            format!(
                "its name is {} bytes, over PATH_MAX ({MAX_PATH} bytes)",
                name.len()
            ),
        ));
    }
    // A name no longer than NAME_MAX has no longer component (the common
    // case, checked for every entry of an index on the mount's start-up path).
    if name.len() <= MAX_NAME {
        return Ok(());
    }
    if let Some(c) = name.split(|b| *b == b'/').find(|c| c.len() > MAX_NAME) {
        return Err(over_limit(
            name,
            format!(
                "a component of its name is {} bytes, over NAME_MAX ({MAX_NAME} bytes)",
                c.len()
            ),
        ));
    }
    Ok(())
}

/// A symlink's target (`declared` bytes, taking `compressed` bytes in the
/// archive) must be one `symlink(2)` takes; decoding it then never produces
/// more than [`MAX_PATH`] + 1 bytes, whatever the data inflates to.
pub fn check_link(name: &[u8], declared: u64, compressed: u64) -> Result<(), FormatError> {
    if declared > MAX_PATH as u64 {
        return Err(over_limit(
            name,
            format!("it is a symlink whose target is {declared} bytes, over PATH_MAX ({MAX_PATH} bytes)"),
        ));
    }
    if compressed > MAX_LINK_COMPRESSED {
        return Err(over_limit(
            name,
            format!(
                "it is a symlink whose target takes {compressed} compressed bytes, \
                 over the limit of {MAX_LINK_COMPRESSED}"
            ),
        ));
    }
    Ok(())
}

/// An entry's xattrs must be `user.*` ones (the only ones saved and
/// restored, DESIGN §7) that `setxattr(2)` takes, [`MAX_XATTRS_LEN`] bytes in
/// all. The `user.` prefix also makes each xattr at least 8 encoded bytes,
/// which bounds how much larger than the index its decoded form can be.
pub fn check_xattrs(name: &[u8], xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<(), FormatError> {
    let mut total = 0usize;
    for (k, v) in xattrs {
        if k.len() <= USER_PREFIX.len() || k.len() > MAX_XATTR_NAME || !k.starts_with(USER_PREFIX) {
            return Err(over_limit(
                name,
                format!(
                    "it has an xattr {:?}, not a user.* name of at most {MAX_XATTR_NAME} bytes",
                    String::from_utf8_lossy(&k[..k.len().min(100)])
                ),
            ));
        }
        total += k.len() + v.len();
    }
    if total > MAX_XATTRS_LEN {
        return Err(over_limit(
            name,
            format!("its xattrs take {total} bytes, over the limit of {MAX_XATTRS_LEN}"),
        ));
    }
    Ok(())
}

fn over_limit(name: &[u8], reason: String) -> FormatError {
    FormatError::EntryOverLimit {
        name: shown_name(name),
        reason,
    }
}

/// An entry name for an error message: lossy UTF-8, cut after 100 bytes (a
/// crafted name may be 64 KiB).
fn shown_name(name: &[u8]) -> String {
    const SHOWN: usize = 100;
    if name.len() <= SHOWN {
        return format!("{:?}", String::from_utf8_lossy(name));
    }
    format!(
        "{:?}… ({} bytes)",
        String::from_utf8_lossy(&name[..SHOWN]),
        name.len()
    )
}

/// Decodes a zstd stream (any number of frames, skippable frames ignored) of at
/// most `max_len` decoded bytes.
pub fn zstd_stream(data: &[u8], max_len: usize) -> io::Result<Vec<u8>> {
    // Sized once from the frame header when it declares a size within the
    // bound (no regrowing and copying of a large buffer); the bound still
    // holds whatever the header says.
    let declared = zstd::zstd_safe::get_frame_content_size(data)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n <= max_len)
        // A header may lie: reserve no more than a plausible ratio of the input.
        .map(|n| n.min(data.len().saturating_mul(64)));
    let mut out = Vec::with_capacity(declared.unwrap_or(0));
    // One pass into the buffer as allocated (no zeroing, no stream
    // buffers) when the declared size holds everything; a header that
    // declares less than there is (or more frames) falls through to the
    // bounded stream below.
    if declared.is_some()
        && zstd::bulk::Decompressor::new()?
            .decompress_to_buffer(data, &mut out)
            .is_ok()
    {
        return Ok(out);
    }
    out.clear();
    zstd::stream::read::Decoder::new(data)?
        .take(max_len as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > max_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "decoded data exceeds its bound",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_up_to_the_kernel_limits_pass() {
        let component = vec![b'a'; MAX_NAME];
        let mut name = Vec::new();
        while name.len() + component.len() < MAX_PATH {
            name.extend_from_slice(&component);
            name.push(b'/');
        }
        name.resize(MAX_PATH, b'b');
        check_name(&name).unwrap();
        name.push(b'b');
        let err = check_name(&name).unwrap_err().to_string();
        assert!(err.contains("over PATH_MAX (4095 bytes)"), "{err}");
        assert!(err.contains("(4096 bytes)"), "the name is shown cut: {err}");
        let err = check_name(&[b'x'; MAX_NAME + 1]).unwrap_err().to_string();
        assert!(err.contains("256 bytes, over NAME_MAX"), "{err}");
    }

    #[test]
    fn symlinks_are_bounded_by_declared_and_compressed_size() {
        check_link(b"l", MAX_PATH as u64, MAX_LINK_COMPRESSED).unwrap();
        let err = check_link(b"l", 1 << 32, 10).unwrap_err().to_string();
        assert!(
            err.contains("\"l\"") && err.contains("4294967296 bytes"),
            "{err}"
        );
        assert!(check_link(b"l", 10, MAX_LINK_COMPRESSED + 1).is_err());
    }

    #[test]
    fn xattrs_are_bounded() {
        let big = vec![(b"user.a".to_vec(), vec![0; MAX_XATTRS_LEN - 6])];
        check_xattrs(b"f", &big).unwrap();
        let bigger = vec![(b"user.a".to_vec(), vec![0; MAX_XATTRS_LEN - 5])];
        assert!(check_xattrs(b"f", &bigger).is_err());
        for bad in [&b""[..], b"user.", b"trusted.x", b"security.capability"] {
            let err = check_xattrs(b"f", &[(bad.to_vec(), Vec::new())]).unwrap_err();
            assert!(err.to_string().contains("not a user.* name"), "{err}");
        }
    }

    #[test]
    fn a_zstd_stream_decodes_whole_when_its_header_undercounts_and_stays_bounded() {
        let a = vec![7u8; 100_000];
        let b: Vec<u8> = (0..50_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let one = zstd::bulk::compress(&a, 3).unwrap();
        // One frame: the declared size holds it all (the one-pass path).
        assert_eq!(zstd_stream(&one, a.len()).unwrap(), a);
        // Two frames: the first header declares less than there is, so the
        // one pass fails and the stream decodes both.
        let mut two = one.clone();
        two.extend_from_slice(&zstd::bulk::compress(&b, 3).unwrap());
        let mut both = a.clone();
        both.extend_from_slice(&b);
        assert_eq!(zstd_stream(&two, both.len()).unwrap(), both);
        // The bound holds on either path.
        for (data, len) in [(&one, a.len()), (&two, both.len())] {
            let err = zstd_stream(data, len - 1).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        }
    }

    #[test]
    fn an_end_record_must_fit_its_archive() {
        let eocd = |entries, cd_size| EndOfCentralDirectory {
            entries,
            cd_offset: 10,
            cd_size,
            comment: Vec::new(),
            eocd_offset: 102,
            zip64_eocd_offset: None,
        };
        check_central_directory(&eocd(2, 92)).unwrap();
        let err = check_central_directory(&eocd(1_000_000, 92))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1000000 entries") && err.contains("at most 2"),
            "{err}"
        );
        let err = check_central_directory(&eocd(2, 93))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("93 bytes at offset 10, past the end record at 102"),
            "{err}"
        );
        let mut wraps = eocd(0, u64::MAX);
        wraps.cd_offset = 1;
        assert!(check_central_directory(&wraps).is_err());
    }

    proptest! {
        /// The index bound grows with every part of the archive and never
        /// exceeds the decoder's own limit.
        #[test]
        fn the_index_bound_is_monotone_and_capped(
            records in 0u64..1 << 40, cd in 0u64..1 << 40, data in 0u64..1 << 40, more in 0u64..1 << 20,
        ) {
            let b = IndexBound::for_archive(records, cd, data);
            prop_assert!(b.len <= IndexBound::MAX.len);
            prop_assert!(IndexBound::for_archive(records + more, cd, data).len >= b.len);
            prop_assert!(IndexBound::for_archive(records, cd + more, data).len >= b.len);
            prop_assert!(IndexBound::for_archive(records, cd, data + more).len >= b.len);
        }
    }
}
