//! The archive index: one record per path with everything a reader needs
//! (kind, mode, owner, ns mtime, size, symlink target, xattrs, where the data
//! is, its frame table and content hash), so a mount needs no other read than
//! the archive's tail.
//!
//! cachemount archives carry it as the zstd-compressed entry
//! [`INDEX_NAME`](super::INDEX_NAME) in a compact binary encoding (varints),
//! and the archive's name in a store is the SHA-256 of those stored bytes
//! ([`ArchiveIndex::digest`]). Foreign archives get an index built from their
//! central directory ([`super::reader`]), which is never encoded.

use sha2::{Digest, Sha256};

use super::chunks::{self, Cut, Encoded};
use super::limits::{self, IndexBound, MAX_FRAME_SIZE};
use super::manifest::Manifest;
use super::FormatError;

const MAGIC: &[u8; 8] = b"CMINDEX1";
/// Compression level of the index itself: it is small and read on every mount.
const INDEX_ZSTD_LEVEL: i32 = 9;
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    Stored,
    Deflate,
    /// One or more zstd frames (one stream when `frames` is empty).
    Zstd,
}

/// Where an entry's compressed bytes start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataOffset {
    /// Known exactly (cachemount archives).
    Data(u64),
    /// Only the local header's offset is known (foreign archives, from the
    /// central directory); the data starts after that header's name and extra.
    LocalHeader(u64),
}

/// One independent zstd frame of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Frame {
    pub compressed_len: u32,
    /// Low 32 bits of XXH64 of the frame's content, as in the frame itself.
    pub checksum: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The zip name without a trailing slash, e.g. `_0/node_modules/a.js`.
    pub name: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits (including setuid/setgid/sticky), no type bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    /// Uncompressed size (for symlinks, the target's length).
    pub size: u64,
    /// The symlink target; for foreign archives None until read from the data.
    pub link_target: Option<Vec<u8>>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub offset: DataOffset,
    pub compressed_size: u64,
    pub compression: Compression,
    pub crc32: u32,
    /// Uncompressed size of each frame but the last (0 when not framed).
    pub frame_size: u32,
    /// The frames, in order; empty for stored, deflate and single-stream zstd.
    pub frames: Vec<Frame>,
    /// SHA-256 over the per-frame SHA-256s of the content (cachemount archives);
    /// None for foreign ones.
    pub content_hash: Option<[u8; 32]>,
}

impl Entry {
    /// An entry of `kind` at `name` with neutral metadata (mode 0644, owner 0,
    /// time 0, empty, stored at offset 0, no frames, xattrs or hash): the one
    /// builder for entries made in code (tests: `Entry { size: 5,
    /// ..Entry::new(EntryKind::File, "_0/a") }`).
    pub fn new(kind: EntryKind, name: impl AsRef<[u8]>) -> Entry {
        Entry {
            name: name.as_ref().to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            size: 0,
            link_target: None,
            xattrs: Vec::new(),
            offset: DataOffset::Data(0),
            compressed_size: 0,
            compression: Compression::Stored,
            crc32: 0,
            frame_size: 0,
            frames: Vec::new(),
            content_hash: None,
        }
    }

    /// Byte offset (within the entry's compressed data) and uncompressed
    /// length of frame `i`.
    pub fn frame_span(&self, i: usize) -> (u64, u64) {
        let start: u64 = self.frames[..i]
            .iter()
            .map(|f| u64::from(f.compressed_len))
            .sum();
        (start, self.frame_len(i))
    }

    /// Uncompressed length of frame `i` (0 past the end): without the sum
    /// over the frames before it that [`Entry::frame_span`] needs.
    pub fn frame_len(&self, i: usize) -> u64 {
        let frame = u64::from(self.frame_size);
        self.size.saturating_sub(i as u64 * frame).min(frame)
    }
}

/// Everything known about an archive's contents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ArchiveIndex {
    pub manifest: Manifest,
    /// Sorted by name.
    pub entries: Vec<Entry>,
}

impl ArchiveIndex {
    /// The binary encoding, before compression.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_in_chunks().raw
    }

    /// The binary encoding, and where it is cut into chunks that decode on
    /// their own: at the first entry boundary past every
    /// [`chunks::CHUNK_LEN`] bytes.
    pub fn encode_in_chunks(&self) -> Encoded {
        let mut out = Vec::with_capacity(64 + self.entries.len() * 96);
        out.extend_from_slice(MAGIC);
        put_bytes(
            &mut out,
            &serde_json::to_vec(&self.manifest).expect("manifest serialises"),
        );
        put_varint(&mut out, self.entries.len() as u64);
        let mut cuts = Vec::new();
        let mut chunk_start = 0;
        for (i, e) in self.entries.iter().enumerate() {
            if out.len() - chunk_start >= chunks::CHUNK_LEN {
                chunk_start = out.len();
                cuts.push(Cut {
                    at: chunk_start,
                    entry: i,
                });
            }
            put_bytes(&mut out, &e.name);
            out.push(match e.kind {
                EntryKind::File => 0,
                EntryKind::Dir => 1,
                EntryKind::Symlink => 2,
            });
            put_varint(&mut out, e.mode.into());
            put_varint(&mut out, e.uid.into());
            put_varint(&mut out, e.gid.into());
            put_varint(&mut out, zigzag(e.mtime.secs));
            put_varint(&mut out, e.mtime.nanos.into());
            put_varint(&mut out, e.size);
            put_bytes(&mut out, e.link_target.as_deref().unwrap_or_default());
            put_varint(&mut out, e.xattrs.len() as u64);
            for (k, v) in &e.xattrs {
                put_bytes(&mut out, k);
                put_bytes(&mut out, v);
            }
            let offset = match e.offset {
                DataOffset::Data(o) => o,
                DataOffset::LocalHeader(_) => {
                    unreachable!("only foreign archives have unresolved offsets")
                }
            };
            out.push(match e.compression {
                Compression::Stored => 0,
                Compression::Deflate => 1,
                Compression::Zstd => 2,
            });
            put_varint(&mut out, offset);
            put_varint(&mut out, e.compressed_size);
            out.extend_from_slice(&e.crc32.to_le_bytes());
            put_varint(&mut out, e.frame_size.into());
            put_varint(&mut out, e.frames.len() as u64);
            for f in &e.frames {
                put_varint(&mut out, f.compressed_len.into());
                out.extend_from_slice(&f.checksum.to_le_bytes());
            }
            out.extend_from_slice(&e.content_hash.unwrap_or_default());
        }
        Encoded { raw: out, cuts }
    }

    /// The index as stored in the archive (zstd-compressed encoding).
    pub fn to_stored(&self) -> Vec<u8> {
        chunks::compress(&self.encode_in_chunks())
    }

    /// Parses the stored (compressed) index after checking it against
    /// `sha256_hex`. It is decompressed only up to `bound.len` bytes, and
    /// refused before any of that when its zstd frame header declares more.
    pub fn from_stored(
        stored: &[u8],
        sha256_hex: &str,
        bound: IndexBound,
    ) -> Result<Self, FormatError> {
        // The checksum and the decoding run side by side (they take about as
        // long, and a mount waits for both); a checksum that fails wins over
        // whatever the decoding found. Decoding unchecked bytes is safe: it
        // is bounded like any decoding of store bytes.
        let (actual, decoded) = rayon::join(|| digest(stored), || Self::decompress(stored, bound));
        if !actual.eq_ignore_ascii_case(sha256_hex) {
            return Err(FormatError::IndexChecksum {
                expected: sha256_hex.to_string(),
                actual,
            });
        }
        decoded
    }

    /// Decompresses (bounded) and decodes a stored index, unchecked.
    pub(super) fn decompress(stored: &[u8], bound: IndexBound) -> Result<Self, FormatError> {
        if let Some(table) = chunks::table(stored)? {
            return chunks::decode(&table, bound);
        }
        if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(stored) {
            if declared > bound.len {
                return Err(FormatError::Implausible(format!(
                    "its index declares {declared} decompressed bytes, more than the \
                     {} bytes an archive of its size can hold",
                    bound.len
                )));
            }
        }
        // Streaming, with a hard cap: `zstd_stream` stops one byte past the
        // bound and reports it as InvalidData (zstd's own errors are Other).
        let raw = super::limits::zstd_stream(stored, bound.len as usize).map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                FormatError::Implausible(format!(
                    "its index decompresses to more than the {} bytes an archive of its size can hold",
                    bound.len
                ))
            } else {
                FormatError::Invalid("index is not valid zstd")
            }
        })?;
        Self::decode(&raw, bound)
    }

    /// Decodes the binary encoding of an index of at most `bound.entries` entries.
    pub fn decode(buf: &[u8], bound: IndexBound) -> Result<Self, FormatError> {
        let mut r = Reader::new(buf);
        let (manifest, count) = decode_header(&mut r, bound)?;
        // Every entry takes at least MIN_ENTRY_LEN bytes: a larger count is corrupt.
        if count > r.remaining() / MIN_ENTRY_LEN {
            return Err(FormatError::Invalid("index entry count exceeds its size"));
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            entries.push(decode_entry(&mut r)?);
        }
        if r.remaining() != 0 {
            return Err(FormatError::Invalid("trailing bytes after the index"));
        }
        Ok(ArchiveIndex { manifest, entries })
    }
}

/// The fewest bytes an encoded entry takes (its fixed fields, empty names).
pub(super) const MIN_ENTRY_LEN: usize = 20;

/// Decodes the encoding's header: the magic, the manifest and the entry
/// count, which must be within `bound`.
pub(super) fn decode_header(
    r: &mut Reader<'_>,
    bound: IndexBound,
) -> Result<(Manifest, usize), FormatError> {
    if r.take(MAGIC.len())? != MAGIC {
        return Err(FormatError::Invalid("index magic"));
    }
    let manifest: Manifest =
        serde_json::from_slice(r.bytes()?).map_err(|_| FormatError::Invalid("index manifest"))?;
    let count = r.varint()?;
    if count > bound.entries {
        return Err(FormatError::Implausible(format!(
            "its index declares {count} entries, but the archive lists only {} \
             (cachemount writes one central-directory record per index entry)",
            bound.entries
        )));
    }
    let count = usize::try_from(count).map_err(|_| FormatError::Invalid("index entry count"))?;
    Ok((manifest, count))
}

/// Decodes one entry, checking what it declares (names, targets, xattrs,
/// frame table) before it allocates for it.
pub(super) fn decode_entry(r: &mut Reader<'_>) -> Result<Entry, FormatError> {
    let name = r.bytes()?;
    limits::check_name(name)?;
    let name = name.to_vec();
    let kind = match r.u8()? {
        0 => EntryKind::File,
        1 => EntryKind::Dir,
        2 => EntryKind::Symlink,
        _ => return Err(FormatError::Invalid("index entry kind")),
    };
    let mode = r.varint_u32()?;
    let uid = r.varint_u32()?;
    let gid = r.varint_u32()?;
    let secs = unzigzag(r.varint()?);
    let nanos = r.varint_u32()?;
    if nanos >= 1_000_000_000 {
        return Err(FormatError::Invalid("index mtime nanoseconds"));
    }
    let size = r.varint()?;
    let target = r.bytes()?;
    if kind == EntryKind::Symlink {
        limits::check_link(&name, size.max(target.len() as u64), 0)?;
    }
    let target = target.to_vec();
    let xattr_count = r.varint()?;
    // Each xattr takes at least two bytes (two lengths).
    if xattr_count > (r.remaining() / 2) as u64 {
        return Err(FormatError::Invalid("index xattr count"));
    }
    let mut xattrs = Vec::with_capacity(xattr_count as usize);
    for _ in 0..xattr_count {
        xattrs.push((r.bytes()?.to_vec(), r.bytes()?.to_vec()));
    }
    limits::check_xattrs(&name, &xattrs)?;
    let compression = match r.u8()? {
        0 => Compression::Stored,
        1 => Compression::Deflate,
        2 => Compression::Zstd,
        _ => return Err(FormatError::Invalid("index compression")),
    };
    let offset = r.varint()?;
    let compressed_size = r.varint()?;
    let crc32 = r.u32()?;
    let frame_size = r.varint_u32()?;
    let frame_count = r.varint()?;
    if frame_count > (r.remaining() / 5) as u64 {
        return Err(FormatError::Invalid("index frame count"));
    }
    let frames = (0..frame_count)
        .map(|_| {
            Ok(Frame {
                compressed_len: r.varint_u32()?,
                checksum: r.u32()?,
            })
        })
        .collect::<Result<Vec<_>, FormatError>>()?;
    let content_hash: [u8; 32] = r.take(32)?.try_into().unwrap();
    let entry = Entry {
        name,
        kind,
        mode,
        uid,
        gid,
        mtime: Timestamp { secs, nanos },
        size,
        link_target: (kind == EntryKind::Symlink).then_some(target),
        xattrs,
        offset: DataOffset::Data(offset),
        compressed_size,
        compression,
        crc32,
        frame_size,
        frames,
        content_hash: Some(content_hash),
    };
    validate_frames(&entry)?;
    Ok(entry)
}

/// A frame table must describe exactly the entry's bytes, or reads would run
/// off the entry (into a neighbour's data) or past the end of the file.
fn validate_frames(e: &Entry) -> Result<(), FormatError> {
    if e.frames.is_empty() {
        return Ok(());
    }
    if e.compression != Compression::Zstd || e.frame_size == 0 {
        return Err(FormatError::Invalid("frame table on a non-framed entry"));
    }
    if e.frame_size > MAX_FRAME_SIZE {
        return Err(FormatError::Invalid("frame size too large"));
    }
    let expected_frames = e.size.div_ceil(u64::from(e.frame_size));
    let compressed: u64 = e.frames.iter().map(|f| u64::from(f.compressed_len)).sum();
    if expected_frames != e.frames.len() as u64 || compressed > e.compressed_size {
        return Err(FormatError::Invalid(
            "frame table does not match the entry size",
        ));
    }
    Ok(())
}

/// One zstd frame of encoded index bytes (the whole index, or one chunk).
pub(super) fn compress_frame(raw: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(raw, INDEX_ZSTD_LEVEL).expect("in-memory zstd compression")
}

/// Lower-case hex SHA-256.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A cursor over encoded index bytes; every read is bounds-checked.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if n > self.remaining() {
            return Err(FormatError::Truncated("index"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub(super) fn varint(&mut self) -> Result<u64, FormatError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(FormatError::Invalid("index varint too long"))
    }
    fn varint_u32(&mut self) -> Result<u32, FormatError> {
        u32::try_from(self.varint()?).map_err(|_| FormatError::Invalid("index value out of range"))
    }
    fn bytes(&mut self) -> Result<&'a [u8], FormatError> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| FormatError::Truncated("index"))?;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(name: &str, size: u64) -> Entry {
        Entry {
            uid: 1000,
            gid: 1000,
            mtime: Timestamp {
                secs: -5,
                nanos: 999_999_999,
            },
            size,
            xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
            offset: DataOffset::Data(1234),
            compressed_size: 10,
            compression: Compression::Zstd,
            crc32: 77,
            frame_size: 4,
            frames: (0..size.div_ceil(4))
                .map(|i| Frame {
                    compressed_len: 1,
                    checksum: i as u32,
                })
                .collect(),
            content_hash: Some([7; 32]),
            ..Entry::new(EntryKind::File, name)
        }
    }

    #[test]
    fn round_trip() {
        let index = ArchiveIndex {
            manifest: Manifest::default(),
            entries: vec![entry("_0/a", 9), entry("_0/b", 0)],
        };
        let stored = index.to_stored();
        assert_eq!(
            ArchiveIndex::from_stored(&stored, &digest(&stored), IndexBound::MAX).unwrap(),
            index
        );
    }

    #[test]
    fn checksum_mismatch_is_refused() {
        let stored = ArchiveIndex::default().to_stored();
        assert!(matches!(
            ArchiveIndex::from_stored(&stored, &"0".repeat(64), IndexBound::MAX),
            Err(FormatError::IndexChecksum { .. })
        ));
    }

    #[test]
    fn frame_table_must_cover_the_size() {
        let mut e = entry("_0/a", 9);
        e.frames.pop();
        let index = ArchiveIndex {
            manifest: Manifest::default(),
            entries: vec![e],
        };
        assert!(ArchiveIndex::decode(&index.encode(), IndexBound::MAX).is_err());
    }

    #[test]
    fn a_huge_frame_size_is_refused() {
        let mut e = entry("_0/a", u64::from(MAX_FRAME_SIZE) + 1);
        e.frame_size = MAX_FRAME_SIZE + 1;
        e.frames.truncate(1);
        let index = ArchiveIndex {
            manifest: Manifest::default(),
            entries: vec![e],
        };
        assert!(ArchiveIndex::decode(&index.encode(), IndexBound::MAX).is_err());
    }

    fn one_entry_index(e: Entry) -> ArchiveIndex {
        ArchiveIndex {
            manifest: Manifest::default(),
            entries: vec![e],
        }
    }

    #[test]
    fn names_targets_and_xattrs_over_the_kernel_limits_are_refused() {
        let long = entry(&format!("_0/{}", "a".repeat(300)), 0);
        let err = ArchiveIndex::decode(&one_entry_index(long).encode(), IndexBound::MAX)
            .unwrap_err()
            .to_string();
        assert!(err.contains("over NAME_MAX"), "{err}");
        let mut link = entry("_0/l", 0);
        link.kind = EntryKind::Symlink;
        link.frames.clear();
        link.size = 5000;
        link.link_target = Some(vec![b'x'; 5000]);
        let err = ArchiveIndex::decode(&one_entry_index(link).encode(), IndexBound::MAX)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"_0/l\"") && err.contains("5000 bytes, over PATH_MAX"),
            "{err}"
        );
        let mut fat = entry("_0/x", 0);
        fat.xattrs = vec![(b"user.big".to_vec(), vec![0; limits::MAX_XATTRS_LEN])];
        let err = ArchiveIndex::decode(&one_entry_index(fat).encode(), IndexBound::MAX)
            .unwrap_err()
            .to_string();
        assert!(err.contains("xattrs take 65544 bytes"), "{err}");
    }

    /// The entry count is checked against the archive's before anything is
    /// allocated for it.
    #[test]
    fn more_entries_than_the_archive_lists_are_refused() {
        let mut raw = MAGIC.to_vec();
        put_bytes(&mut raw, br#"{"version":2,"mappings":{}}"#);
        put_varint(&mut raw, 1_000_000);
        let bound = IndexBound {
            entries: 3,
            len: 1 << 20,
        };
        let err = ArchiveIndex::decode(&raw, bound).unwrap_err().to_string();
        assert!(
            err.contains("declares 1000000 entries, but the archive lists only 3"),
            "{err}"
        );
    }

    /// An index bomb stops at the bound: refused from its frame header when
    /// that declares the size, else after decompressing one byte past it.
    #[test]
    fn an_index_larger_than_its_bound_is_refused() {
        let mut raw = ArchiveIndex::default().encode();
        raw.resize(64 << 20, 0);
        let bound = IndexBound {
            entries: 3,
            len: 1 << 20,
        };
        let declared = compress_frame(&raw);
        let err = ArchiveIndex::from_stored(&declared, &digest(&declared), bound)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("declares 67108864 decompressed bytes, more than the 1048576"),
            "{err}"
        );
        let mut undeclared = Vec::new();
        let mut enc = zstd::stream::write::Encoder::new(&mut undeclared, 3).unwrap();
        std::io::Write::write_all(&mut enc, &raw).unwrap();
        enc.finish().unwrap();
        let err = ArchiveIndex::from_stored(&undeclared, &digest(&undeclared), bound)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("decompresses to more than the 1048576 bytes"),
            "{err}"
        );
    }

    /// Any entry `decode` accepts: names, kinds, modes, owners, ns mtimes
    /// (negative too), symlink targets, user xattrs, offsets and a frame
    /// table consistent with the size (or none), a content hash.
    fn arb_entry() -> impl Strategy<Value = Entry> {
        let name = proptest::collection::vec(
            prop_oneof![Just("_0".to_string()), "[a-z.]{1,8}", "[\\PC]{1,4}"],
            1..5,
        )
        .prop_map(|parts| parts.join("/").into_bytes());
        let xattr = ("[a-z]{1,10}", proptest::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(k, v)| (format!("user.{k}").into_bytes(), v));
        (
            name,
            0..3u8,
            (any::<u32>(), any::<u32>(), any::<u32>()),
            (any::<i64>(), 0..1_000_000_000u32),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(xattr, 0..3),
            (any::<u64>(), any::<u32>(), 0..3u8),
            (
                1..=4u32,
                proptest::collection::vec((any::<u32>(), any::<u32>()), 0..6),
            ),
            any::<[u8; 32]>(),
        )
            .prop_map(
                |(
                    name,
                    kind,
                    (mode, uid, gid),
                    (secs, nanos),
                    target,
                    xattrs,
                    (offset, crc32, c),
                    (frame_size, frames),
                    hash,
                )| {
                    let kind = [EntryKind::File, EntryKind::Dir, EntryKind::Symlink][kind as usize];
                    let compression =
                        [Compression::Stored, Compression::Deflate, Compression::Zstd][c as usize];
                    let framed = compression == Compression::Zstd && !frames.is_empty();
                    let frames: Vec<Frame> = if framed {
                        frames
                            .into_iter()
                            .map(|(len, checksum)| Frame {
                                compressed_len: len >> 8,
                                checksum,
                            })
                            .collect()
                    } else {
                        Vec::new()
                    };
                    let size = if framed {
                        // n frames of frame_size bytes: the last one 1..=frame_size.
                        (frames.len() as u64 - 1) * u64::from(frame_size) + 1
                    } else if kind == EntryKind::Symlink {
                        target.len() as u64
                    } else {
                        offset >> 20
                    };
                    let compressed_size: u64 = frames
                        .iter()
                        .map(|f| u64::from(f.compressed_len))
                        .sum::<u64>()
                        + (offset & 0xff);
                    Entry {
                        mode,
                        uid,
                        gid,
                        mtime: Timestamp { secs, nanos },
                        size,
                        link_target: (kind == EntryKind::Symlink).then_some(target),
                        xattrs,
                        offset: DataOffset::Data(offset),
                        compressed_size,
                        compression,
                        crc32,
                        frame_size: if framed { frame_size } else { frame_size - 1 },
                        frames,
                        content_hash: Some(hash),
                        ..Entry::new(kind, name)
                    }
                },
            )
    }

    fn arb_index() -> impl Strategy<Value = ArchiveIndex> {
        proptest::collection::vec(arb_entry(), 0..6).prop_map(|mut entries| {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            ArchiveIndex {
                entries,
                ..ArchiveIndex::default()
            }
        })
    }

    /// One change to an encoded index: flip a bit, overwrite, insert or
    /// delete a byte, truncate, or append.
    #[derive(Debug, Clone)]
    enum Mutation {
        Flip(usize, u8),
        Set(usize, u8),
        Insert(usize, u8),
        Delete(usize),
        Truncate(usize),
        Append(Vec<u8>),
    }

    fn arb_mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), 0..8u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
            any::<usize>().prop_map(Mutation::Delete),
            any::<usize>().prop_map(Mutation::Truncate),
            proptest::collection::vec(any::<u8>(), 1..8).prop_map(Mutation::Append),
        ]
    }

    fn mutate(buf: &mut Vec<u8>, m: &Mutation) {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
        match m {
            Mutation::Flip(i, b) if !buf.is_empty() => {
                let i = at(*i, buf.len());
                buf[i] ^= 1 << b
            }
            Mutation::Set(i, b) if !buf.is_empty() => {
                let i = at(*i, buf.len());
                buf[i] = *b
            }
            Mutation::Insert(i, b) => {
                let i = at(*i, buf.len() + 1);
                buf.insert(i, *b)
            }
            Mutation::Delete(i) if !buf.is_empty() => {
                let i = at(*i, buf.len());
                buf.remove(i);
            }
            Mutation::Truncate(i) => buf.truncate(at(*i, buf.len())),
            Mutation::Append(bytes) => buf.extend_from_slice(bytes),
            _ => {}
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = MAGIC.to_vec();
            buf.extend(bytes);
            let _ = ArchiveIndex::decode(&buf, IndexBound::MAX);
        }

        /// Every index the writer can produce decodes to itself.
        #[test]
        fn structured_indexes_round_trip(index in arb_index()) {
            let decoded = ArchiveIndex::decode(&index.encode(), IndexBound::MAX)
                .map_err(|e| e.to_string());
            prop_assert_eq!(decoded, Ok(index));
        }

        /// A damaged valid index never panics the decoder, and what it still
        /// accepts is an index it would write the same way again (nothing is
        /// accepted that the format cannot express).
        #[test]
        fn mutated_indexes_are_refused_or_decode_consistently(
            index in arb_index(),
            mutations in proptest::collection::vec(arb_mutation(), 1..4),
        ) {
            let mut buf = index.encode();
            for m in &mutations {
                mutate(&mut buf, m);
            }
            if let Ok(decoded) = ArchiveIndex::decode(&buf, IndexBound::MAX) {
                let again = ArchiveIndex::decode(&decoded.encode(), IndexBound::MAX)
                    .map_err(|e| e.to_string());
                prop_assert_eq!(again, Ok(decoded));
            }
        }

        /// An index is refused when it declares more entries than the bound.
        #[test]
        fn the_entry_bound_is_enforced(index in arb_index()) {
            let n = index.entries.len() as u64;
            prop_assume!(n > 0);
            let bound = IndexBound { entries: n - 1, ..IndexBound::MAX };
            prop_assert!(matches!(
                ArchiveIndex::decode(&index.encode(), bound),
                Err(FormatError::Implausible(_))
            ));
        }

        #[test]
        fn zigzag_round_trips(v in any::<i64>()) {
            prop_assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}
