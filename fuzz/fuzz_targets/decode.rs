//! Entry decoders (stored, deflate, zstd stream, zstd frames) on an entry whose
//! metadata comes from the input too, as a corrupt index or central directory
//! would give it: sizes and CRCs lie, frame data is garbage. Must never panic,
//! and never allocate for a claimed size what the data cannot back.
//!
//! Input: kind (1 byte: 0 stored, 1 deflate, 2 zstd stream, 3 zstd frames),
//! size (u64), crc32 (u32), frame size (u32), then for frames one u16 length
//! per frame, then the compressed data.
#![no_main]

#[path = "common.rs"]
mod common;

use cachemount::archive::decode::{decode_entry, decode_frame};
use cachemount::archive::{Compression, DataOffset, Entry, EntryKind, Frame, Timestamp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let (size, rest) = common::take_u64(rest);
    let (crc_and_frame, rest) = common::take_u64(rest);
    let crc32 = crc_and_frame as u32;
    let frame_size = (crc_and_frame >> 32) as u32;
    let mut entry = Entry {
        name: b"_0/fuzz".to_vec(),
        kind: EntryKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: Timestamp::default(),
        size,
        link_target: None,
        xattrs: Vec::new(),
        offset: DataOffset::Data(0),
        compressed_size: 0,
        compression: match kind % 4 {
            0 => Compression::Stored,
            1 => Compression::Deflate,
            _ => Compression::Zstd,
        },
        crc32,
        frame_size: 0,
        frames: Vec::new(),
        content_hash: None,
    };
    let mut payload = rest;
    if kind % 4 == 3 {
        // A frame table as the index validates it: ceil(size / frame_size) frames.
        if frame_size == 0 {
            return;
        }
        let count = size.div_ceil(u64::from(frame_size));
        if count > 64 || rest.len() < 2 * count as usize {
            return;
        }
        let (lens, data) = rest.split_at(2 * count as usize);
        entry.frame_size = frame_size;
        let mut off = 0usize;
        for l in lens.chunks(2) {
            let len = usize::from(u16::from_le_bytes([l[0], l[1]]));
            // The checksum the index records is the frame's own trailer, so
            // decoding gets past the index check to zstd.
            let checksum = data
                .get(off..off + len)
                .filter(|f| f.len() >= 4)
                .map_or(0, |f| {
                    u32::from_le_bytes(f[f.len() - 4..].try_into().unwrap())
                });
            entry.frames.push(Frame {
                compressed_len: len as u32,
                checksum,
            });
            off += len;
        }
        payload = data;
    }
    entry.compressed_size = payload.len() as u64;
    let mut off = 0usize;
    for (i, f) in entry.frames.iter().enumerate() {
        let end = off + f.compressed_len as usize;
        if let Some(frame) = payload.get(off..end) {
            if let Ok(content) = decode_frame(&entry, i, frame) {
                assert_eq!(content.len() as u64, entry.frame_span(i).1);
            }
        }
        off = end;
    }
    if let Ok(content) = decode_entry(&entry, payload) {
        assert_eq!(content.len() as u64, entry.size);
    }
});
