//! The stored index in chunks, so that a mount decodes it on every core.
//!
//! Decompressing and parsing the index is the largest part of a mount's
//! start-up (a 58k-entry index: 6.8 MB, ~11 ms on one core). A large index
//! is therefore stored as one zstd frame per chunk of about [`CHUNK_LEN`]
//! encoded bytes, each cut at an entry boundary, behind a zstd *skippable*
//! frame that lists the chunks:
//!
//! ```text
//! skippable frame: magic 0x184D2A5C, u32 LE length, then
//!     "CMCHUNK1", varint chunk count, per chunk:
//!     varint compressed length, varint encoded length, varint entries
//! one zstd frame per chunk, in order
//! ```
//!
//! Concatenated, the chunks are exactly the encoding a single frame holds,
//! and any zstd decoder skips the table and decodes the frames one after
//! another into it: older cachemount readers, Buildkite's reader and the
//! `zip` crate read these indexes unchanged. This reader decodes each chunk
//! on its own thread, straight into its part of the one entry vector.
//!
//! The table is store input like the rest: its lengths must add up to the
//! stored bytes exactly and stay within the archive's [`IndexBound`], every
//! chunk must decode to exactly its declared length and hold exactly its
//! declared entries, and they must add up to the count the header declares.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::index::{self, ArchiveIndex, Entry, Reader, MIN_ENTRY_LEN};
use super::limits::IndexBound;
use super::FormatError;

/// About how many encoded bytes go in one chunk: large enough that zstd
/// keeps its ratio (the index grows 1–2%), small enough that a 50k-entry
/// index spreads over a few cores.
pub const CHUNK_LEN: usize = 512 * 1024;

/// The skippable-frame magic of the chunk table (zstd reserves
/// 0x184D2A50..=0x184D2A5F for skippable frames).
const TABLE_MAGIC: u32 = 0x184D_2A5C;
const TABLE_TAG: &[u8; 8] = b"CMCHUNK1";
/// At most this many chunks (a 2 GiB index); a table listing more is corrupt.
const MAX_CHUNKS: u64 = 4096;

/// An index encoding and where it is cut into chunks.
pub struct Encoded {
    pub raw: Vec<u8>,
    /// Where each chunk after the first begins, in order.
    pub(super) cuts: Vec<Cut>,
}

/// A chunk boundary: an offset in the encoding where an entry begins.
pub(super) struct Cut {
    pub at: usize,
    /// That entry's number.
    pub entry: usize,
}

/// One chunk as the table lists it.
#[derive(Debug)]
pub(super) struct Chunk<'a> {
    /// Its zstd frame.
    frame: &'a [u8],
    shape: Shape,
}

/// What the table says of one chunk.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    /// The length of its zstd frame.
    pub size: usize,
    /// How many encoded bytes it decodes to.
    pub len: usize,
    /// How many entries those bytes hold.
    pub entries: usize,
}

/// What the first bytes of a stored index say of its layout.
pub(super) enum Head {
    /// No chunk table: one frame.
    OneFrame,
    /// Too few bytes yet to tell.
    Incomplete,
    /// The chunks' shapes, their frames from byte `frames_at` on.
    Chunked {
        frames_at: usize,
        shapes: Vec<Shape>,
    },
}

/// The stored index: one frame when the encoding is one chunk, else the
/// table and a frame per chunk (compressed in parallel).
pub fn compress(encoded: &Encoded) -> Vec<u8> {
    if encoded.cuts.is_empty() {
        return index::compress_frame(&encoded.raw);
    }
    let total_entries = entry_count(encoded);
    let mut bounds = vec![(0, 0)];
    bounds.extend(encoded.cuts.iter().map(|c| (c.at, c.entry)));
    bounds.push((encoded.raw.len(), total_entries));
    let frames: Vec<(Vec<u8>, usize, usize)> = bounds
        .par_windows(2)
        .map(|w| {
            let ((start, first), (end, next)) = (w[0], w[1]);
            let frame = index::compress_frame(&encoded.raw[start..end]);
            (frame, end - start, next - first)
        })
        .collect();
    let mut table = TABLE_TAG.to_vec();
    index::put_varint(&mut table, frames.len() as u64);
    for (frame, len, entries) in &frames {
        index::put_varint(&mut table, frame.len() as u64);
        index::put_varint(&mut table, *len as u64);
        index::put_varint(&mut table, *entries as u64);
    }
    let mut out =
        Vec::with_capacity(8 + table.len() + frames.iter().map(|f| f.0.len()).sum::<usize>());
    out.extend_from_slice(&TABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&(table.len() as u32).to_le_bytes());
    out.extend_from_slice(&table);
    for (frame, _, _) in &frames {
        out.extend_from_slice(frame);
    }
    out
}

/// The number of entries the encoding declares (its header's count).
fn entry_count(encoded: &Encoded) -> usize {
    let mut r = Reader::new(&encoded.raw);
    index::decode_header(&mut r, IndexBound::MAX)
        .map(|(_, count)| count)
        .expect("an index this process encoded")
}

/// Reads the chunk table from `head`, the first bytes of a stored index of
/// `stored_len` bytes: the table must lie inside it, and its frames must
/// fill the rest of it exactly.
pub(super) fn read_head(head: &[u8], stored_len: usize) -> Result<Head, FormatError> {
    let invalid = || FormatError::Invalid("index chunk table");
    let Some(magic) = head.get(..4) else {
        return Ok(if stored_len < 4 {
            Head::OneFrame
        } else {
            Head::Incomplete
        });
    };
    if u32::from_le_bytes(magic.try_into().unwrap()) != TABLE_MAGIC {
        return Ok(Head::OneFrame);
    }
    let Some(len) = head.get(4..8) else {
        return if stored_len < 8 {
            Err(invalid())
        } else {
            Ok(Head::Incomplete)
        };
    };
    let len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
    let frames_at = 8usize.saturating_add(len);
    if frames_at > stored_len {
        return Err(invalid());
    }
    let Some(body) = head.get(8..frames_at) else {
        return Ok(Head::Incomplete);
    };
    let mut r = Reader::new(body);
    if r.take(TABLE_TAG.len())? != TABLE_TAG {
        return Err(invalid());
    }
    let count = r.varint()?;
    // Each row takes at least three bytes.
    if count == 0 || count > MAX_CHUNKS || count > (r.remaining() / 3) as u64 {
        return Err(invalid());
    }
    let mut frames_len = stored_len - frames_at;
    let mut shapes = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let size = usize::try_from(r.varint()?).map_err(|_| invalid())?;
        let len = usize::try_from(r.varint()?).map_err(|_| invalid())?;
        let entries = usize::try_from(r.varint()?).map_err(|_| invalid())?;
        if size > frames_len {
            return Err(FormatError::Truncated("index chunk"));
        }
        frames_len -= size;
        shapes.push(Shape { size, len, entries });
    }
    if r.remaining() != 0 || frames_len != 0 {
        return Err(invalid());
    }
    Ok(Head::Chunked { frames_at, shapes })
}

/// The chunk table at the start of `stored`, or None when it has none (one
/// frame: an index of one chunk, or one written before chunks).
pub(super) fn table(stored: &[u8]) -> Result<Option<Vec<Chunk<'_>>>, FormatError> {
    let (mut at, shapes) = match read_head(stored, stored.len())? {
        Head::OneFrame => return Ok(None),
        // Not with the whole index at hand; refused all the same, not a panic.
        Head::Incomplete => return Err(FormatError::Truncated("index chunk table")),
        Head::Chunked { frames_at, shapes } => (frames_at, shapes),
    };
    let chunks = shapes
        .into_iter()
        .map(|shape| {
            let frame = &stored[at..at + shape.size];
            at += shape.size;
            Chunk { frame, shape }
        })
        .collect();
    Ok(Some(chunks))
}

/// Decodes a chunked index: each chunk decompressed and parsed on a thread
/// of its own, into its own part of one vector.
pub(super) fn decode(chunks: &[Chunk<'_>], bound: IndexBound) -> Result<ArchiveIndex, FormatError> {
    let shapes: Vec<Shape> = chunks.iter().map(|c| c.shape).collect();
    decode_into_parts(&shapes, bound, |parts| {
        chunks
            .par_iter()
            .zip(parts)
            .enumerate()
            .map(|(i, (chunk, part))| decode_chunk(chunk.frame, chunk.shape, part, i == 0, bound))
            .collect()
    })
}

/// The checked part of decoding chunks the table lists as `shapes`: bounds
/// what they declare by `bound` before anything is allocated, gives `decode`
/// one [`Part`] of the entry vector per chunk to fill (with
/// [`decode_chunk`], in any order, on any thread), and checks that what it
/// got back adds up.
pub(super) fn decode_into_parts<F>(
    shapes: &[Shape],
    bound: IndexBound,
    decode: F,
) -> Result<ArchiveIndex, FormatError>
where
    F: for<'p> FnOnce(Vec<Part<'p>>) -> Vec<Result<Decoded<'p>, FormatError>>,
{
    let mut len = 0usize;
    let mut total = 0usize;
    for c in shapes {
        if c.entries > c.len / MIN_ENTRY_LEN {
            return Err(FormatError::Invalid(
                "index chunk entry count exceeds its size",
            ));
        }
        len = len.saturating_add(c.len);
        total += c.entries;
    }
    if len as u64 > bound.len {
        return Err(FormatError::Implausible(format!(
            "its index declares {len} decompressed bytes, more than the {} bytes an archive \
             of its size can hold",
            bound.len
        )));
    }
    if total as u64 > bound.entries {
        return Err(FormatError::Implausible(format!(
            "its index declares {total} entries, but the archive lists only {} \
             (cachemount writes one central-directory record per index entry)",
            bound.entries
        )));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(total);
    let mut free = &mut entries.spare_capacity_mut()[..total];
    let mut parts = Vec::with_capacity(shapes.len());
    for c in shapes {
        let (part, rest) = free.split_at_mut(c.entries);
        parts.push(Part {
            slots: part,
            filled: 0,
        });
        free = rest;
    }
    let decoded = decode(parts);
    if decoded.len() != shapes.len() {
        return Err(FormatError::Truncated("index chunks"));
    }
    let mut parts = Vec::with_capacity(shapes.len());
    let mut header = None;
    for d in decoded {
        let (part, h) = d?;
        header = header.or(h);
        parts.push(part);
    }
    let (manifest, count) = header.expect("the first chunk has the header");
    if count != total {
        return Err(FormatError::Invalid(
            "index chunks hold other than its entry count",
        ));
    }
    // Every part is full: the vector's first `total` slots hold entries.
    for part in &mut parts {
        part.filled = 0;
    }
    drop(parts);
    // SAFETY: the parts cover the first `total` spare slots exactly, and each
    // was filled completely (decode_chunk fails otherwise); their guards were
    // disarmed above, so the entries are dropped once, by the vector.
    unsafe { entries.set_len(total) };
    Ok(ArchiveIndex { manifest, entries })
}

type Header = (super::Manifest, usize);

/// A chunk decoded into its part, and the header when it was the first.
pub(super) type Decoded<'p> = (Part<'p>, Option<Header>);

/// Decompresses one chunk's `frame` to exactly its declared length and
/// parses exactly its declared entries into `part` (the first chunk: the
/// header first).
pub(super) fn decode_chunk<'a>(
    frame: &[u8],
    shape: Shape,
    mut part: Part<'a>,
    first: bool,
    bound: IndexBound,
) -> Result<Decoded<'a>, FormatError> {
    let mut raw = Vec::with_capacity(shape.len);
    let decoded =
        zstd::bulk::Decompressor::new().and_then(|mut d| d.decompress_to_buffer(frame, &mut raw));
    if decoded.is_err() || raw.len() != shape.len {
        return Err(FormatError::Invalid(
            "index chunk does not decode to its length",
        ));
    }
    let mut r = Reader::new(&raw);
    let header = if first {
        Some(index::decode_header(&mut r, bound)?)
    } else {
        None
    };
    while part.filled < part.slots.len() {
        let entry = index::decode_entry(&mut r)?;
        part.slots[part.filled].write(entry);
        part.filled += 1;
    }
    if r.remaining() != 0 {
        return Err(FormatError::Invalid(
            "index chunk holds more than its entries",
        ));
    }
    Ok((part, header))
}

/// One chunk's slots in the entry vector, and how many it has filled: a
/// chunk that fails, or a decode that fails after it, drops what it wrote.
pub(super) struct Part<'a> {
    slots: &'a mut [MaybeUninit<Entry>],
    filled: usize,
}

impl Drop for Part<'_> {
    fn drop(&mut self) {
        for slot in &mut self.slots[..self.filled] {
            // SAFETY: the first `filled` slots were written and not moved out.
            unsafe { slot.assume_init_drop() };
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::archive::{EntryKind, Manifest};
    use proptest::prelude::*;

    /// An index of `n` files, large enough at 20k entries for a few chunks.
    pub(in crate::archive) fn index_of(n: usize) -> ArchiveIndex {
        let entries = (0..n)
            .map(|i| Entry {
                size: i as u64,
                content_hash: Some([(i % 251) as u8; 32]),
                ..Entry::new(
                    EntryKind::File,
                    format!("_0/node_modules/p{:03}/f{i:06}.js", i % 700),
                )
            })
            .collect::<Vec<_>>();
        let mut index = ArchiveIndex {
            manifest: Manifest::default(),
            entries,
        };
        index.entries.sort_by(|a, b| a.name.cmp(&b.name));
        index
    }

    /// `stored` with its table's rows (compressed length, length, entries)
    /// changed by `change`, the frames as they were.
    fn with_rows(stored: &[u8], change: impl FnOnce(&mut Vec<[u64; 3]>)) -> Vec<u8> {
        let rows = table(stored).unwrap().unwrap();
        let mut rows: Vec<[u64; 3]> = rows
            .iter()
            .map(|c| {
                [
                    c.shape.size as u64,
                    c.shape.len as u64,
                    c.shape.entries as u64,
                ]
            })
            .collect();
        let frames_at = 8 + u32::from_le_bytes(stored[4..8].try_into().unwrap()) as usize;
        change(&mut rows);
        let mut body = TABLE_TAG.to_vec();
        index::put_varint(&mut body, rows.len() as u64);
        for row in &rows {
            for v in row {
                index::put_varint(&mut body, *v);
            }
        }
        let mut out = TABLE_MAGIC.to_le_bytes().to_vec();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&stored[frames_at..]);
        out
    }

    fn decoded(stored: &[u8], bound: IndexBound) -> Result<ArchiveIndex, String> {
        let chunks = table(stored)
            .map_err(|e| e.to_string())?
            .expect("a chunk table");
        decode(&chunks, bound).map_err(|e| e.to_string())
    }

    #[test]
    fn a_large_index_is_stored_in_chunks_and_reads_back_the_same() {
        let index = index_of(20_000);
        let stored = index.to_stored();
        let chunks = table(&stored).unwrap().expect("a chunk table");
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        assert_eq!(decoded(&stored, IndexBound::MAX), Ok(index.clone()));
        let digest = index::digest(&stored);
        assert_eq!(
            ArchiveIndex::from_stored(&stored, &digest, IndexBound::MAX).unwrap(),
            index
        );
    }

    #[test]
    fn a_small_index_stays_one_frame() {
        let stored = index_of(10).to_stored();
        assert!(table(&stored).unwrap().is_none());
    }

    /// Any zstd decoder (an older cachemount, Buildkite's reader, the `zip`
    /// crate) skips the table and reads the chunks as the plain encoding.
    #[test]
    fn any_zstd_decoder_reads_a_chunked_index_as_the_plain_encoding() {
        let index = index_of(20_000);
        let stored = index.to_stored();
        let plain = zstd::stream::decode_all(&stored[..]).unwrap();
        assert_eq!(plain, index.encode());
        let bounded = crate::archive::limits::zstd_stream(&stored, 64 << 20).unwrap();
        assert_eq!(bounded, plain);
    }

    #[test]
    fn a_table_that_does_not_match_its_chunks_is_refused() {
        let stored = index_of(20_000).to_stored();
        // An entry moved from the second chunk to the first: the first
        // chunk ends mid-entry, or the second has bytes left over.
        let moved = with_rows(&stored, |rows| {
            rows[0][2] += 1;
            rows[1][2] -= 1;
        });
        assert!(decoded(&moved, IndexBound::MAX).is_err());
        // One entry fewer in all: the header's count disagrees.
        let fewer = with_rows(&stored, |rows| rows[1][2] -= 1);
        assert!(decoded(&fewer, IndexBound::MAX).is_err());
        // A length that is not what the frame decodes to.
        let longer = with_rows(&stored, |rows| rows[0][1] += 1);
        let err = decoded(&longer, IndexBound::MAX).unwrap_err();
        assert!(err.contains("does not decode to its length"), "{err}");
        // Frames that do not add up to the stored bytes.
        let short = with_rows(&stored, |rows| rows[2][0] -= 1);
        assert!(table(&short).is_err());
        let truncated = &stored[..stored.len() - 1];
        assert!(table(truncated).is_err());
    }

    /// What a table declares is bounded by the archive before anything is
    /// allocated for it.
    #[test]
    fn a_table_declaring_more_than_the_archive_holds_is_refused() {
        let stored = index_of(20_000).to_stored();
        let huge = with_rows(&stored, |rows| rows[0][1] = 1 << 40);
        let err = decoded(&huge, IndexBound::MAX).unwrap_err();
        assert!(err.contains("decompressed bytes, more than"), "{err}");
        let many = with_rows(&stored, |rows| rows[0][2] = 1 << 40);
        assert!(decoded(&many, IndexBound::MAX).is_err());
        let bound = IndexBound {
            entries: 19_999,
            ..IndexBound::MAX
        };
        let err = decoded(&stored, bound).unwrap_err();
        assert!(err.contains("declares 20000 entries"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A damaged chunked index never panics (or leaks what its chunks
        /// decoded), and what it still accepts is the index it was.
        #[test]
        fn damaged_chunked_indexes_are_refused_or_read_right(
            at in any::<prop::sample::Index>(),
            bit in 0..8u8,
            in_table in any::<bool>(),
        ) {
            let index = index_of(12_000);
            let mut stored = index.to_stored();
            let table_len = 8 + u32::from_le_bytes(stored[4..8].try_into().unwrap()) as usize;
            let i = if in_table { at.index(table_len) } else { at.index(stored.len()) };
            stored[i] ^= 1 << bit;
            if let Ok(Some(chunks)) = table(&stored) {
                if let Ok(read) = decode(&chunks, IndexBound::MAX) {
                    prop_assert_eq!(read.entries.len(), index.entries.len());
                }
            }
        }
    }
}
