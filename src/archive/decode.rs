//! Turning an entry's stored bytes back into its content, verified.
//!
//! Frames are checked twice: zstd checks the frame's own content checksum while
//! decoding, and the frame's checksum must equal the one the index recorded, so
//! a frame from another archive version can never pass for this one. Whole
//! entries (stored, deflate, single-stream zstd) are checked by CRC-32 and size.

use std::io::{self, Read, Write};

use super::index::{Compression, Entry};
use super::FormatError;

fn corrupt(entry: &Entry, reason: impl Into<String>) -> FormatError {
    FormatError::CorruptEntry {
        name: String::from_utf8_lossy(&entry.name).into_owned(),
        reason: reason.into(),
    }
}

/// Decodes frame `i` of `entry` from its compressed bytes, checking its length
/// and both checksums.
pub fn decode_frame(entry: &Entry, i: usize, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    decode_frame_into(entry, i, compressed, &mut out)?;
    Ok(out)
}

/// [`decode_frame`] into `out` (cleared first), so that a caller can reuse
/// its buffers.
pub fn decode_frame_into(
    entry: &Entry,
    i: usize,
    compressed: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FormatError> {
    out.clear();
    let frame = entry
        .frames
        .get(i)
        .ok_or_else(|| corrupt(entry, format!("no frame {i}")))?;
    let len = entry.frame_len(i);
    // The output buffer is sized at `len` up front: never for a lying size.
    if len > u64::from(super::limits::MAX_FRAME_SIZE) {
        return Err(corrupt(entry, format!("frame {i} is too large")));
    }
    if compressed.len() != frame.compressed_len as usize || compressed.len() < 4 {
        return Err(corrupt(entry, format!("frame {i} has the wrong length")));
    }
    let trailer = u32::from_le_bytes(compressed[compressed.len() - 4..].try_into().unwrap());
    if trailer != frame.checksum {
        return Err(corrupt(
            entry,
            format!("frame {i} checksum does not match the index"),
        ));
    }
    thread_local! {
        // One decompression context per thread instead of one per frame.
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
    }
    out.reserve_exact(len as usize);
    DECOMPRESSOR
        .with(|cell| -> io::Result<usize> {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new()?);
            }
            slot.as_mut()
                .expect("just set")
                .decompress_to_buffer(compressed, out)
        })
        .map_err(|e| corrupt(entry, format!("frame {i}: {e}")))?;
    if out.len() as u64 != len {
        return Err(corrupt(
            entry,
            format!("frame {i} decodes to {} bytes, expected {len}", out.len()),
        ));
    }
    Ok(())
}

/// A writer that counts and CRCs what passes through it.
struct Checked<W> {
    inner: W,
    crc: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> Write for Checked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Decodes a whole entry from `data` (its compressed bytes, exactly) into
/// `out`, streaming, and verifies size and CRC-32. Errors writing `out` are
/// returned as they are; errors in the data name the entry.
pub fn decode_entry_to<R: Read, W: Write>(
    entry: &Entry,
    mut data: R,
    out: W,
) -> Result<(), DecodeError> {
    let mut out = Checked {
        inner: out,
        crc: crc32fast::Hasher::new(),
        written: 0,
    };
    if !entry.frames.is_empty() {
        let mut buf = Vec::new();
        for (i, f) in entry.frames.iter().enumerate() {
            buf.resize(f.compressed_len as usize, 0);
            data.read_exact(&mut buf).map_err(DecodeError::Read)?;
            let content = decode_frame(entry, i, &buf)?;
            out.write_all(&content).map_err(DecodeError::Write)?;
        }
    } else {
        let limited = (&mut data).take(entry.compressed_size);
        let copied = match entry.compression {
            Compression::Stored => copy_decoded(limited, &mut out, entry.size),
            Compression::Deflate => copy_decoded(
                flate2::read::DeflateDecoder::new(limited),
                &mut out,
                entry.size,
            ),
            Compression::Zstd => match zstd::stream::read::Decoder::new(limited) {
                Ok(d) => copy_decoded(d, &mut out, entry.size),
                Err(e) => Err(DecodeError::Corrupt(corrupt(entry, e.to_string()))),
            },
        };
        copied.map_err(|e| match e {
            DecodeError::Corrupt(FormatError::CorruptEntry { reason, .. }) => {
                DecodeError::Corrupt(corrupt(entry, reason))
            }
            other => other,
        })?;
    }
    if out.written != entry.size {
        return Err(corrupt(
            entry,
            format!("decodes to {} bytes, expected {}", out.written, entry.size),
        )
        .into());
    }
    let crc = out.crc.clone().finalize();
    if crc != entry.crc32 {
        return Err(corrupt(
            entry,
            format!("CRC-32 {crc:08x} does not match {:08x}", entry.crc32),
        )
        .into());
    }
    Ok(())
}

/// Copies a decoder's output; a read error is the data's fault (corrupt), a
/// write error is the destination's.
fn copy_decoded<R: Read, W: Write>(from: R, to: &mut W, size: u64) -> Result<(), DecodeError> {
    // Sized to the entry: a fixed large buffer per small file costs an mmap each.
    let mut buf = vec![0u8; size.clamp(1, 256 * 1024) as usize + 1];
    // One byte more than the entry's size is enough to know it is wrong: a
    // decompression bomb must not fill memory (or a disk) before that shows.
    let mut from = from.take(size.saturating_add(1));
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(DecodeError::Corrupt(FormatError::CorruptEntry {
                    name: String::new(),
                    reason: e.to_string(),
                }))
            }
        };
        to.write_all(&buf[..n]).map_err(DecodeError::Write)?;
    }
}

/// Decodes a whole entry into memory (small entries, symlink targets).
pub fn decode_entry(entry: &Entry, data: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(entry.size.min(1 << 26) as usize);
    decode_entry_to(entry, data, &mut out)?;
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Corrupt(#[from] FormatError),
    #[error("reading archive data: {0}")]
    Read(#[source] io::Error),
    #[error("writing extracted data: {0}")]
    Write(#[source] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::index::{EntryKind, Frame};

    fn entry(compression: Compression, size: u64, data: &[u8]) -> Entry {
        Entry {
            size,
            compressed_size: data.len() as u64,
            compression,
            ..Entry::new(EntryKind::File, "_0/f")
        }
    }

    /// Found by fuzzing (`decode`): a frame size from a corrupt index became
    /// the capacity of the output buffer (here 480 MB).
    #[test]
    fn a_lying_frame_size_is_not_allocated() {
        let data = zstd::bulk::compress(b"tiny", 3).unwrap();
        let mut e = entry(Compression::Zstd, 0x1cab_1e5e, &data);
        e.frame_size = 0x1cab_1e5e;
        e.frames = vec![Frame {
            compressed_len: data.len() as u32,
            checksum: u32::from_le_bytes(data[data.len() - 4..].try_into().unwrap()),
        }];
        let err = decode_frame(&e, 0, &data).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
    }

    /// A zstd stream that decodes to far more than the entry's size stops one
    /// byte past it instead of filling memory.
    #[test]
    fn a_decompression_bomb_stops_at_the_entry_size() {
        let data = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        let e = entry(Compression::Zstd, 10, &data);
        let mut out = Vec::new();
        let err = decode_entry_to(&e, &data[..], &mut out).unwrap_err();
        assert!(err.to_string().contains("decodes to 11 bytes"), "{err}");
        assert_eq!(out.len(), 11);
    }
}
