//! Opening an archive from any byte-range source: find the EOCD in the tail,
//! then either follow the comment to cachemount's index, or build an index
//! from the central directory (foreign zips).
//!
//! The logic is sans-IO ([`Opener`]): it says which byte range it needs next
//! ([`OpenStep::Need`]) and the caller fetches it — from S3, a local store or a
//! file — so the same code serves the mount, restore and the fuzzers. A
//! cachemount archive opens with the tail read plus at most one more (the
//! index, when it is not in the tail).

use std::future::Future;
use std::ops::Range;

use bytes::Bytes;

use super::index::{ArchiveIndex, Compression, DataOffset, Entry, EntryKind, Timestamp};
use super::limits::{self, IndexBound};
use super::manifest::Manifest;
use super::zip::{self, CentralRecord};
use super::{FormatError, INDEX_NAME, MANIFEST_NAME};

/// How much of the end of an archive the first read takes: the EOCD with the
/// longest possible comment, and for most caches the index too.
pub const TAIL_LEN: u64 = 512 * 1024;

/// The first read when the index is fetched on its own (a key pointer says
/// where it lies): the end records alone, the EOCD with the longest possible
/// comment (22 + 65,535 bytes) and the zip64 locator and record before it.
/// Serving 512 KiB nobody reads slowed the index GET running beside it.
pub const END_RECORDS_LEN: u64 = 66 * 1024;

const COMMENT_PREFIX: &str = "cachemount:index:v1:";
/// A Buildkite manifest is a few dozen bytes; a larger one is not decoded.
const MAX_MANIFEST_LEN: u64 = 1 << 20;

pub enum OpenStep {
    Done(ArchiveIndex),
    Need(Range<u64>),
}

/// Holds the byte ranges fetched so far and turns them into an index.
pub struct Opener {
    size: u64,
    /// How much of the end the first read takes ([`TAIL_LEN`] or [`END_RECORDS_LEN`]).
    tail_len: u64,
    pieces: Vec<(u64, Bytes)>,
}

impl Opener {
    /// Starts opening an archive of `size` bytes whose first read is its last
    /// `tail_len` bytes.
    pub fn new(size: u64, tail_len: u64) -> Self {
        Opener {
            size,
            tail_len,
            pieces: Vec::new(),
        }
    }

    /// Adds fetched bytes that start at `offset`.
    pub fn add(&mut self, offset: u64, bytes: Bytes) {
        self.pieces.push((offset, bytes));
    }

    fn find(&self, range: &Range<u64>) -> Option<&[u8]> {
        self.pieces.iter().find_map(|(start, bytes)| {
            let end = start + bytes.len() as u64;
            (*start <= range.start && range.start <= range.end && range.end <= end)
                .then(|| &bytes[(range.start - start) as usize..(range.end - start) as usize])
        })
    }

    /// The end records (EOCD, and zip64's when it has them), or the range
    /// still missing for them.
    fn end_records(&self) -> Result<Result<zip::EndOfCentralDirectory, Range<u64>>, FormatError> {
        if self.size < zip::EOCD_LEN as u64 {
            return Err(FormatError::NotZip("too short to be a zip archive"));
        }
        let tail_range = self.size.saturating_sub(self.tail_len)..self.size;
        let Some(tail) = self.find(&tail_range) else {
            return Ok(Err(tail_range));
        };
        let mut eocd = zip::find_eocd(tail, self.size)?;
        if let Some(off) = eocd.zip64_eocd_offset {
            let range = off..off + zip::ZIP64_EOCD_LEN as u64;
            let Some(record) = self.find(&range) else {
                return Ok(Err(range));
            };
            zip::apply_zip64_eocd(&mut eocd, record)?;
        }
        // Checked for both kinds of archive before anything is sized by it.
        limits::check_central_directory(&eocd)?;
        Ok(Ok(eocd))
    }

    /// What the end record says of a cachemount index, once the end
    /// records are at hand; None before, and for a foreign archive.
    pub fn index_record(&self) -> Result<Option<IndexRecord>, FormatError> {
        match self.end_records()? {
            Ok(eocd) => IndexRecord::of(&eocd),
            Err(_) => Ok(None),
        }
    }

    /// The next step: the index, or the range still missing.
    pub fn step(&self) -> Result<OpenStep, FormatError> {
        let eocd = match self.end_records()? {
            Ok(eocd) => eocd,
            Err(missing) => return Ok(OpenStep::Need(missing)),
        };
        if let Some(record) = IndexRecord::of(&eocd)? {
            let Some(stored) = self.find(&record.range) else {
                return Ok(OpenStep::Need(record.range));
            };
            let index = ArchiveIndex::from_stored(stored, &record.sha256, record.bound)?;
            return Ok(OpenStep::Done(record.accept(index)?));
        }
        let cd_range = eocd.cd_offset..eocd.cd_offset + eocd.cd_size;
        let Some(cd) = self.find(&cd_range) else {
            return Ok(OpenStep::Need(cd_range));
        };
        let records = zip::decode_central_directory(cd, eocd.entries)?;
        let manifest = match records.iter().find(|r| r.name == MANIFEST_NAME.as_bytes()) {
            Some(r) => {
                // Checks first that the entry lies before the central directory.
                let entry = foreign_entry(r, cd_range.start)?;
                if r.uncompressed_size > MAX_MANIFEST_LEN || r.compressed_size > MAX_MANIFEST_LEN {
                    return Err(FormatError::Invalid("manifest entry is too large"));
                }
                // Local header + name + extra (≤ 64 KiB each) + data: one read covers it.
                let end = (r.local_header_offset + 30 + 2 * 65_535)
                    .saturating_add(r.compressed_size)
                    .min(self.size);
                let range = r.local_header_offset..end;
                let Some(bytes) = self.find(&range) else {
                    return Ok(OpenStep::Need(range));
                };
                let start = zip::local_header_data_start(bytes)?;
                let data = start
                    .checked_add(r.compressed_size)
                    .and_then(|end| {
                        bytes.get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
                    })
                    .ok_or(FormatError::Truncated("manifest entry"))?;
                let json = super::decode::decode_entry(&entry, data)
                    .map_err(|_| FormatError::Invalid("manifest entry does not decode"))?;
                Manifest::parse(&json)?
            }
            None => Manifest {
                mappings: Default::default(),
                ..Manifest::default()
            },
        };
        let mut entries = Vec::with_capacity(records.len());
        for r in &records {
            if r.name == MANIFEST_NAME.as_bytes() || r.name == INDEX_NAME.as_bytes() {
                continue;
            }
            entries.push(foreign_entry(r, cd_range.start)?);
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(OpenStep::Done(ArchiveIndex { manifest, entries }))
    }
}

/// What a cachemount archive's end record says of its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRecord {
    /// Where the stored index lies.
    pub range: Range<u64>,
    /// Its SHA-256 (hex).
    pub sha256: String,
    /// What the archive around it allows it to declare.
    pub bound: IndexBound,
}

impl IndexRecord {
    fn of(eocd: &zip::EndOfCentralDirectory) -> Result<Option<IndexRecord>, FormatError> {
        let Some(pointer) = IndexPointer::parse(&eocd.comment)? else {
            return Ok(None);
        };
        let range = pointer.offset
            ..pointer
                .offset
                .checked_add(pointer.len)
                .ok_or(FormatError::Invalid("index pointer"))?;
        if range.end > eocd.eocd_offset {
            return Err(FormatError::Invalid(
                "index pointer past the end of the archive",
            ));
        }
        Ok(Some(IndexRecord {
            range,
            sha256: pointer.sha256,
            bound: IndexBound::for_archive(eocd.entries, eocd.cd_size, eocd.cd_offset),
        }))
    }

    /// Takes `index`, decoded within [`IndexRecord::bound`] from bytes that
    /// hash to [`IndexRecord::sha256`]: when every entry's data lies before it.
    pub fn accept(&self, index: ArchiveIndex) -> Result<ArchiveIndex, FormatError> {
        check_bounds(&index, self.range.start)?;
        Ok(index)
    }
}

/// Every entry's data must lie before `limit` (the index or central directory).
fn check_bounds(index: &ArchiveIndex, limit: u64) -> Result<(), FormatError> {
    for e in &index.entries {
        let DataOffset::Data(off) = e.offset else {
            continue;
        };
        if off
            .checked_add(e.compressed_size)
            .is_none_or(|end| end > limit)
        {
            return Err(FormatError::Invalid("entry data lies outside the archive"));
        }
    }
    Ok(())
}

/// `cachemount:index:v1:<offset>:<len>:<sha256>` in the EOCD comment.
struct IndexPointer {
    offset: u64,
    len: u64,
    sha256: String,
}

impl IndexPointer {
    fn parse(comment: &[u8]) -> Result<Option<Self>, FormatError> {
        let Some(rest) = comment.strip_prefix(COMMENT_PREFIX.as_bytes()) else {
            return Ok(None);
        };
        let bad = FormatError::Invalid("index pointer in the zip comment");
        let text = std::str::from_utf8(rest)
            .map_err(|_| FormatError::Invalid("index pointer in the zip comment"))?;
        let mut parts = text.split(':');
        let (Some(offset), Some(len), Some(sha256), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad);
        };
        let offset = offset
            .parse()
            .map_err(|_| FormatError::Invalid("index offset"))?;
        let len: u64 = len
            .parse()
            .map_err(|_| FormatError::Invalid("index length"))?;
        if sha256.len() != 64 || len > super::limits::MAX_INDEX_LEN as u64 {
            return Err(bad);
        }
        Ok(Some(IndexPointer {
            offset,
            len,
            sha256: sha256.to_string(),
        }))
    }
}

/// The index digest a cachemount archive's tail names (its EOCD comment), or
/// None for a foreign zip. `tail` is the archive's last bytes (of `size`).
pub fn tail_index_digest(tail: &[u8], size: u64) -> Result<Option<String>, FormatError> {
    let eocd = zip::find_eocd(tail, size)?;
    Ok(IndexPointer::parse(&eocd.comment)?.map(|p| p.sha256))
}

/// An index entry for a central directory record of a foreign zip.
fn foreign_entry(r: &CentralRecord, limit: u64) -> Result<Entry, FormatError> {
    let compression = match r.method {
        zip::METHOD_STORED => Compression::Stored,
        zip::METHOD_DEFLATE => Compression::Deflate,
        zip::METHOD_ZSTD => Compression::Zstd,
        m => {
            return Err(FormatError::Unsupported(format!(
                "compression method {m} of {}",
                String::from_utf8_lossy(&r.name)
            )))
        }
    };
    if r.local_header_offset
        .checked_add(r.compressed_size)
        .is_none_or(|end| end > limit)
    {
        return Err(FormatError::Invalid("entry data lies outside the archive"));
    }
    let is_dir_name = r.name.ends_with(b"/");
    let mode = r.unix_mode();
    let kind = match mode.map(|m| m & libc::S_IFMT) {
        Some(libc::S_IFDIR) => EntryKind::Dir,
        Some(libc::S_IFLNK) => EntryKind::Symlink,
        _ if is_dir_name => EntryKind::Dir,
        _ => EntryKind::File,
    };
    let default_mode = if kind == EntryKind::Dir { 0o755 } else { 0o644 };
    let secs = r
        .mtime_secs
        .unwrap_or_else(|| zip::dos_to_unix(r.dos_time, r.dos_date));
    let mut name = r.name.clone();
    while name.ends_with(b"/") {
        name.pop();
    }
    limits::check_name(&name)?;
    if kind == EntryKind::Symlink {
        limits::check_link(&name, r.uncompressed_size, r.compressed_size)?;
    }
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    Ok(Entry {
        name,
        kind,
        mode: mode.map_or(default_mode, |m| m & 0o7777),
        uid,
        gid,
        mtime: Timestamp { secs, nanos: 0 },
        size: r.uncompressed_size,
        link_target: None,
        xattrs: Vec::new(),
        offset: DataOffset::LocalHeader(r.local_header_offset),
        compressed_size: r.compressed_size,
        compression,
        crc32: r.crc32,
        frame_size: 0,
        frames: Vec::new(),
        content_hash: None,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError<E> {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Source(E),
}

/// Opens an archive of `size` bytes, reading ranges with `fetch`, the first
/// of them its last `tail_len` bytes.
pub async fn open_archive<F, Fut, E>(
    size: u64,
    tail_len: u64,
    mut fetch: F,
) -> Result<ArchiveIndex, OpenError<E>>
where
    F: FnMut(Range<u64>) -> Fut,
    Fut: Future<Output = Result<Bytes, E>>,
{
    let mut opener = Opener::new(size, tail_len);
    // A well-formed archive needs at most: tail, zip64 record, index or CD, manifest.
    for _ in 0..5 {
        match opener.step()? {
            OpenStep::Done(index) => return Ok(index),
            OpenStep::Need(range) => {
                let bytes = fetch(range.clone()).await.map_err(OpenError::Source)?;
                if bytes.len() as u64 != range.end - range.start {
                    return Err(FormatError::Truncated("archive read").into());
                }
                opener.add(range.start, bytes);
            }
        }
    }
    Err(FormatError::Invalid("archive structure needs too many reads").into())
}

/// Opens an archive in a local file.
pub fn open_file(file: &std::fs::File) -> Result<ArchiveIndex, OpenError<std::io::Error>> {
    use std::os::unix::fs::FileExt;
    let size = file.metadata().map_err(OpenError::Source)?.len();
    let fetch = |range: Range<u64>| {
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        let res = file
            .read_exact_at(&mut buf, range.start)
            .map(|_| Bytes::from(buf));
        std::future::ready(res)
    };
    futures::executor::block_on(open_archive(size, TAIL_LEN, fetch))
}

/// Where `entry`'s data starts, reading its local header with `read_at` when
/// only that is known (foreign archives).
pub fn resolve_data_offset(
    entry: &Entry,
    read_at: impl FnOnce(u64, usize) -> std::io::Result<Vec<u8>>,
) -> Result<u64, OpenError<std::io::Error>> {
    match entry.offset {
        DataOffset::Data(off) => Ok(off),
        DataOffset::LocalHeader(off) => {
            let header = read_at(off, zip::LOCAL_HEADER_LEN).map_err(OpenError::Source)?;
            Ok(off + zip::local_header_data_start(&header)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::zip::HeaderFields;

    /// Serves `archive` to an [`Opener`] until it is done or fails.
    fn open_bytes(archive: &[u8]) -> Result<ArchiveIndex, FormatError> {
        let mut opener = Opener::new(archive.len() as u64, TAIL_LEN);
        for _ in 0..8 {
            match opener.step()? {
                OpenStep::Done(index) => return Ok(index),
                OpenStep::Need(r) => {
                    assert!(r.start <= r.end && r.end <= archive.len() as u64, "{r:?}");
                    let bytes = Bytes::copy_from_slice(&archive[r.start as usize..r.end as usize]);
                    opener.add(r.start, bytes);
                }
            }
        }
        panic!("the opener keeps asking");
    }

    /// A zip of only a central directory with these records, and its EOCD.
    fn directory_only(records: &[HeaderFields]) -> Vec<u8> {
        let cd: Vec<u8> = records.iter().flat_map(|r| r.encode_central()).collect();
        let mut archive = cd.clone();
        archive.extend(zip::encode_end(
            records.len() as u64,
            0,
            cd.len() as u64,
            b"",
        ));
        archive
    }

    fn manifest_record(local_header_offset: u64, uncompressed_size: u64) -> HeaderFields {
        HeaderFields {
            name: MANIFEST_NAME.as_bytes().to_vec(),
            method: zip::METHOD_STORED,
            crc32: 0,
            compressed_size: 0,
            uncompressed_size,
            local_header_offset,
            unix_mode: 0o100644,
            mtime_secs: 0,
            zip64_local: false,
        }
    }

    /// Found by fuzzing (`open`): a manifest whose local header offset lies
    /// past the end made an inverted range, and slicing it panicked.
    #[test]
    fn a_manifest_past_the_end_is_an_error() {
        let archive = directory_only(&[manifest_record(0xFF_0000, 0)]);
        assert!(matches!(open_bytes(&archive), Err(FormatError::Invalid(_))));
    }

    #[test]
    fn a_huge_manifest_is_not_decoded() {
        let archive = directory_only(&[manifest_record(0, 1 << 30)]);
        assert!(matches!(open_bytes(&archive), Err(FormatError::Invalid(_))));
    }

    fn record(name: &[u8], unix_mode: u32, size: u64, compressed: u64) -> HeaderFields {
        HeaderFields {
            name: name.to_vec(),
            method: zip::METHOD_DEFLATE,
            crc32: 0,
            compressed_size: compressed,
            uncompressed_size: size,
            local_header_offset: 0,
            unix_mode,
            mtime_secs: 0,
            zip64_local: false,
        }
    }

    /// A zip whose records claim `compressed` bytes of data before the
    /// central directory (zeros: only the headers are read at open).
    fn with_data(records: &[HeaderFields], data_len: usize) -> Vec<u8> {
        let cd: Vec<u8> = records.iter().flat_map(|r| r.encode_central()).collect();
        let mut archive = vec![0u8; data_len];
        archive.extend_from_slice(&cd);
        archive.extend(zip::encode_end(
            records.len() as u64,
            data_len as u64,
            cd.len() as u64,
            b"",
        ));
        archive
    }

    #[test]
    fn foreign_symlinks_are_bounded_at_open() {
        let huge = with_data(&[record(b"_0/l", 0o120777, 4 << 30, 100)], 100);
        let err = open_bytes(&huge).unwrap_err().to_string();
        assert!(
            err.contains("\"_0/l\"") && err.contains("4294967296 bytes, over PATH_MAX"),
            "{err}"
        );
        let inflating = with_data(&[record(b"_0/l", 0o120777, 10, 1 << 20)], 1 << 20);
        let err = open_bytes(&inflating).unwrap_err().to_string();
        assert!(err.contains("takes 1048576 compressed bytes"), "{err}");
        let fine = with_data(&[record(b"_0/l", 0o120777, 10, 12)], 12);
        assert_eq!(open_bytes(&fine).unwrap().entries.len(), 1);
    }

    #[test]
    fn a_foreign_name_over_path_max_is_refused() {
        let name = vec![b'a'; 65_000];
        let archive = with_data(&[record(&name, 0o100644, 0, 0)], 0);
        let err = open_bytes(&archive).unwrap_err().to_string();
        assert!(err.contains("65000 bytes, over PATH_MAX"), "{err}");
    }

    #[test]
    fn an_end_record_declaring_more_than_the_archive_holds_is_refused() {
        let mut archive = directory_only(&[manifest_record(0, 0)]);
        let n = archive.len();
        // The 16-bit entry count of the end record.
        archive[n - 12..n - 10].copy_from_slice(&60_000u16.to_le_bytes());
        let err = open_bytes(&archive).unwrap_err().to_string();
        assert!(err.contains("declares 60000 entries"), "{err}");
        archive[n - 12..n - 10].copy_from_slice(&1u16.to_le_bytes());
        archive[n - 10..n - 6].copy_from_slice(&(100u32 << 20).to_le_bytes());
        let err = open_bytes(&archive).unwrap_err().to_string();
        assert!(
            err.contains("central directory of 104857600 bytes"),
            "{err}"
        );
    }
}
