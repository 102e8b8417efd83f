//! The zstd seekable format's seek table: a skippable frame after an entry's
//! data frames listing each frame's compressed and decompressed size and
//! checksum. Any zstd decoder skips it; a seekable reader (ours, or zstd's
//! contrib `seekable` library) uses it to jump to a frame.
//!
//! cachemount's own reader takes the frame table from the index instead, so
//! this table exists for other readers and is parsed only for verification and fuzzing.

use super::zip::Cursor;
use super::FormatError;

const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
const CHECKSUM_FLAG: u8 = 1 << 7;
const FOOTER_LEN: usize = 9;

/// One frame as the seek table records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeekEntry {
    pub compressed_size: u32,
    pub decompressed_size: u32,
    /// The low 32 bits of the frame content's XXH64 (zstd's content checksum).
    pub checksum: u32,
}

/// Encodes the seek table frame for `frames`.
pub fn encode(frames: &[SeekEntry]) -> Vec<u8> {
    let payload = frames.len() * 12 + FOOTER_LEN;
    let mut out = Vec::with_capacity(8 + payload);
    out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&(payload as u32).to_le_bytes());
    for f in frames {
        out.extend_from_slice(&f.compressed_size.to_le_bytes());
        out.extend_from_slice(&f.decompressed_size.to_le_bytes());
        out.extend_from_slice(&f.checksum.to_le_bytes());
    }
    out.extend_from_slice(&(frames.len() as u32).to_le_bytes());
    out.push(CHECKSUM_FLAG);
    out.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
    out
}

/// Parses a seek table frame that ends exactly at the end of `buf`.
pub fn decode(buf: &[u8]) -> Result<Vec<SeekEntry>, FormatError> {
    if buf.len() < 8 + FOOTER_LEN {
        return Err(FormatError::Truncated("seek table"));
    }
    let footer = &buf[buf.len() - FOOTER_LEN..];
    let count = u32::from_le_bytes(footer[0..4].try_into().unwrap()) as usize;
    let descriptor = footer[4];
    if u32::from_le_bytes(footer[5..9].try_into().unwrap()) != SEEKABLE_MAGIC {
        return Err(FormatError::Invalid("seek table magic"));
    }
    let with_checksum = descriptor & CHECKSUM_FLAG != 0;
    let entry_len = if with_checksum { 12 } else { 8 };
    let payload = count
        .checked_mul(entry_len)
        .and_then(|n| n.checked_add(FOOTER_LEN))
        .ok_or(FormatError::Invalid("seek table frame count"))?;
    if payload + 8 > buf.len() {
        return Err(FormatError::Truncated("seek table"));
    }
    let mut c = Cursor::new(&buf[buf.len() - payload - 8..]);
    if c.u32()? != SKIPPABLE_MAGIC || c.u32()? as usize != payload {
        return Err(FormatError::Invalid("seek table frame header"));
    }
    (0..count)
        .map(|_| {
            Ok(SeekEntry {
                compressed_size: c.u32()?,
                decompressed_size: c.u32()?,
                checksum: if with_checksum { c.u32()? } else { 0 },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let frames: Vec<_> = (0..5)
            .map(|i| SeekEntry {
                compressed_size: 100 + i,
                decompressed_size: 1 << 20,
                checksum: i * 7,
            })
            .collect();
        let mut buf = b"frames before".to_vec();
        buf.extend(encode(&frames));
        assert_eq!(decode(&buf).unwrap(), frames);
    }

    #[test]
    fn zstd_skips_it() {
        let mut data = zstd::bulk::compress(b"hello world", 3).unwrap();
        data.extend(encode(&[SeekEntry {
            compressed_size: 1,
            decompressed_size: 11,
            checksum: 0,
        }]));
        assert_eq!(zstd::stream::decode_all(&data[..]).unwrap(), b"hello world");
    }

    #[test]
    fn lying_count_is_an_error() {
        let mut buf = encode(&[]);
        let n = buf.len();
        buf[n - 9..n - 5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&buf).is_err());
    }
}
