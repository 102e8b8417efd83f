//! The whole open path: the input is an archive. Opens it the way a mount or
//! restore does (`open_archive`: tail, zip64 record, index or central directory,
//! manifest), then decodes every entry and every frame of the index it got.
//!
//! An index pointer's SHA-256 would stop almost every mutation at the checksum,
//! so the harness first rewrites the digest in the comment to the true digest
//! of the bytes it points at: the index decoder is reached, and the checksum
//! check itself is covered by the `index` target's unit tests.
#![no_main]

#[path = "common.rs"]
mod common;

use std::ops::Range;

use bytes::Bytes;
use cachemount::archive::decode::{decode_entry, decode_frame};
use cachemount::archive::reader::resolve_data_offset;
use cachemount::archive::{open_archive, zip, ArchiveIndex};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

const PREFIX: &[u8] = b"cachemount:index:v1:";

fuzz_target!(|data: &[u8]| {
    let archive = with_true_index_digest(data);
    let Some(index) = open(&archive) else {
        return;
    };
    for entry in &index.entries {
        let read_at = |off: u64, len: usize| {
            slice(&archive, off, len as u64)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| std::io::Error::other("past the end"))
        };
        let Ok(start) = resolve_data_offset(entry, read_at) else {
            continue;
        };
        let Some(bytes) = slice(&archive, start, entry.compressed_size) else {
            continue;
        };
        for (i, frame) in entry.frames.iter().enumerate() {
            let (off, _len) = entry.frame_span(i);
            if let Some(f) = slice(bytes, off, frame.compressed_len.into()) {
                let _ = decode_frame(entry, i, f);
            }
        }
        let _ = decode_entry(entry, bytes);
    }
});

fn slice(buf: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let end = off.checked_add(len)?;
    buf.get(usize::try_from(off).ok()?..usize::try_from(end).ok()?)
}

fn open(archive: &[u8]) -> Option<ArchiveIndex> {
    let size = archive.len() as u64;
    let fetch = |range: Range<u64>| {
        // The opener must only ask for bytes of the archive it was told about.
        assert!(
            range.start <= range.end && range.end <= size,
            "asked for {range:?} of a {size}-byte archive"
        );
        std::future::ready(Ok::<_, std::io::Error>(Bytes::copy_from_slice(
            &archive[range.start as usize..range.end as usize],
        )))
    };
    futures::executor::block_on(open_archive(size, fetch)).ok()
}

/// The input with the SHA-256 in an index pointer comment replaced by the digest
/// of the range it names (when that range is inside the input).
fn with_true_index_digest(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    let Ok(eocd) = zip::find_eocd(data, data.len() as u64) else {
        return out;
    };
    let Some(rest) = eocd.comment.strip_prefix(PREFIX) else {
        return out;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return out;
    };
    let parts: Vec<&str> = text.split(':').collect();
    let [offset, len, sha] = parts[..] else {
        return out;
    };
    let (Ok(offset), Ok(len)) = (offset.parse::<u64>(), len.parse::<u64>()) else {
        return out;
    };
    if sha.len() != 64 {
        return out;
    }
    if let Some(stored) = slice(data, offset, len) {
        let digest = hex::encode(Sha256::digest(stored));
        let n = out.len();
        out[n - 64..].copy_from_slice(digest.as_bytes());
    }
    out
}
