//! Writing a cachemount archive: the manifest entry first, then the caller's
//! entries in the order given (sorted paths), each file's zstd frames followed
//! by a seek table, then the index entry, the central directory and an EOCD
//! whose comment points at the index.
//!
//! Compression happens before the writer (see [`compress_frame`]): the writer
//! only lays bytes out, so callers can compress many frames in parallel.

use std::io::{self, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

use super::index::{
    digest, ArchiveIndex, Compression, DataOffset, Entry, EntryKind, Frame, Timestamp,
};
use super::limits::{self, IndexBound};
use super::manifest::Manifest;
use super::seek_table::{self, SeekEntry};
use super::zip::{self, HeaderFields};
use super::{FormatError, DEFAULT_FRAME_SIZE, INDEX_NAME, MANIFEST_NAME};

/// Fixed mtime of the entries cachemount adds itself (manifest, index), so the
/// same tree always gives the same archive bytes.
const FIXED_MTIME: i64 = 1_704_067_200; // 2024-01-01T00:00:00Z, as Buildkite uses
/// Files at least this large get a zip64 extra in their local header up front,
/// because their compressed size is only known after writing.
const ZIP64_LOCAL_THRESHOLD: u64 = 0xF000_0000;

#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    pub frame_size: u32,
    pub level: i32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            frame_size: DEFAULT_FRAME_SIZE,
            level: 3,
        }
    }
}

/// Metadata of one path, as the tree walk found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    pub name: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One compressed frame of a file, ready to be laid out.
#[derive(Debug, Clone)]
pub struct CompressedFrame {
    /// The zstd frame, or the raw bytes when `stored` (compression did not pay).
    pub data: Vec<u8>,
    pub stored: bool,
    pub len: u32,
    pub crc32: u32,
    pub sha256: [u8; 32],
}

/// Compresses one frame's worth of content (with zstd's content checksum on).
/// A lone frame that does not shrink is kept raw.
pub fn compress_frame(content: &[u8], level: i32, only_frame: bool) -> io::Result<CompressedFrame> {
    thread_local! {
        // A zstd context costs more to set up than compressing a small file:
        // keep one per thread (and level).
        static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { std::cell::RefCell::new(None) };
    }
    let zstd = COMPRESSOR.with(|cell| -> io::Result<Vec<u8>> {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            let mut c = zstd::bulk::Compressor::new(level)?;
            c.include_checksum(true)?;
            c.include_contentsize(true)?;
            *slot = Some((level, c));
        }
        slot.as_mut().expect("just set").1.compress(content)
    })?;
    let stored = only_frame && zstd.len() >= content.len();
    Ok(CompressedFrame {
        data: if stored { content.to_vec() } else { zstd },
        stored,
        len: content.len() as u32,
        crc32: crc32fast::hash(content),
        sha256: Sha256::digest(content).into(),
    })
}

/// The result of [`ArchiveWriter::finish`].
#[derive(Debug, Clone)]
pub struct FinishedArchive {
    /// SHA-256 (hex) of the stored index: the archive's name in a store.
    pub digest: String,
    /// Total archive size in bytes.
    pub size: u64,
    pub index: ArchiveIndex,
    /// Where the stored index lies in the archive (as its EOCD comment says).
    pub index_range: std::ops::Range<u64>,
}

pub struct ArchiveWriter<W: Write + Seek> {
    out: W,
    /// Position in the archive of the next byte written.
    pos: u64,
    /// Archive bytes before `out`'s first byte (see [`ArchiveWriter::append_to`]).
    base: u64,
    options: WriterOptions,
    central: Vec<HeaderFields>,
    index: ArchiveIndex,
}

impl<W: Write + Seek> ArchiveWriter<W> {
    /// Starts an archive at the current position of `out` (expected: 0).
    pub fn new(out: W, manifest: Manifest, options: WriterOptions) -> io::Result<Self> {
        Self::append_to(out, 0, manifest, options)
    }

    /// Continues an archive whose first `base` bytes already exist elsewhere
    /// (an older archive's entries, reused by [`ArchiveWriter::add_reused`]):
    /// `out` receives only what follows them, from its position 0, and every
    /// offset written is one in the whole archive. The manifest is written
    /// again (the old one, if any, becomes unreferenced bytes).
    pub fn append_to(
        out: W,
        base: u64,
        manifest: Manifest,
        options: WriterOptions,
    ) -> io::Result<Self> {
        let mut w = ArchiveWriter {
            out,
            pos: base,
            base,
            options,
            central: Vec::new(),
            index: ArchiveIndex::default(),
        };
        let json = serde_json::to_vec(&manifest).expect("manifest serialises");
        w.write_whole(
            MANIFEST_NAME.as_bytes(),
            zip::METHOD_STORED,
            libc::S_IFREG | 0o644,
            FIXED_MTIME,
            &json,
            crc32fast::hash(&json),
            json.len() as u64,
        )?;
        w.index.manifest = manifest;
        Ok(w)
    }

    pub fn options(&self) -> WriterOptions {
        self.options
    }

    pub fn add_dir(&mut self, meta: EntryMeta) -> io::Result<()> {
        check_meta(&meta)?;
        let mut name = meta.name.clone();
        name.push(b'/');
        let offset = self.write_whole(
            &name,
            zip::METHOD_STORED,
            libc::S_IFDIR | meta.mode,
            meta.mtime.secs,
            &[],
            0,
            0,
        )?;
        self.push_entry(
            meta,
            EntryKind::Dir,
            offset,
            Compression::Stored,
            0,
            0,
            None,
            Vec::new(),
            Some(Sha256::digest(Sha256::digest(b"")).into()),
        );
        Ok(())
    }

    pub fn add_symlink(&mut self, meta: EntryMeta, target: &[u8]) -> io::Result<()> {
        check_meta(&meta)?;
        let len = target.len() as u64;
        limits::check_link(&meta.name, len, len).map_err(unsavable)?;
        let crc = crc32fast::hash(target);
        let offset = self.write_whole(
            &meta.name,
            zip::METHOD_STORED,
            libc::S_IFLNK | meta.mode,
            meta.mtime.secs,
            target,
            crc,
            target.len() as u64,
        )?;
        let hash = Sha256::digest(Sha256::digest(target)).into();
        self.push_entry(
            meta,
            EntryKind::Symlink,
            offset,
            Compression::Stored,
            target.len() as u64,
            crc,
            Some(target.to_vec()),
            Vec::new(),
            Some(hash),
        );
        Ok(())
    }

    /// Adds a file of `size` bytes whose frames (of `options().frame_size`
    /// uncompressed bytes each, the last one shorter) come from `frames` in order.
    pub fn add_file<I>(&mut self, meta: EntryMeta, size: u64, frames: I) -> io::Result<()>
    where
        I: IntoIterator<Item = io::Result<CompressedFrame>>,
    {
        check_meta(&meta)?;
        let header_offset = self.pos;
        let mut fields = HeaderFields {
            name: meta.name.clone(),
            method: zip::METHOD_ZSTD,
            crc32: 0,
            compressed_size: 0,
            uncompressed_size: size,
            local_header_offset: header_offset,
            unix_mode: libc::S_IFREG | meta.mode,
            mtime_secs: meta.mtime.secs,
            zip64_local: size >= ZIP64_LOCAL_THRESHOLD,
        };
        let mut frames = frames.into_iter();
        if size <= u64::from(self.options.frame_size) {
            // One frame (or none): everything is known before the header is written.
            let frame = match frames.next() {
                Some(f) => f?,
                None => compress_frame(&[], self.options.level, true)?,
            };
            check_len(&frame, size)?;
            let stored = frame.stored || size == 0;
            let data: &[u8] = if size == 0 { &[] } else { &frame.data };
            let method = if stored {
                zip::METHOD_STORED
            } else {
                zip::METHOD_ZSTD
            };
            let offset = self.write_whole(
                &meta.name,
                method,
                libc::S_IFREG | meta.mode,
                meta.mtime.secs,
                data,
                frame.crc32,
                size,
            )?;
            let (compression, table) = if stored {
                (Compression::Stored, Vec::new())
            } else {
                (
                    Compression::Zstd,
                    vec![Frame {
                        compressed_len: data.len() as u32,
                        checksum: trailer(data),
                    }],
                )
            };
            let frame_size = if stored { 0 } else { self.options.frame_size };
            let hash = Sha256::digest(frame.sha256).into();
            self.push_entry(
                meta,
                EntryKind::File,
                offset,
                compression,
                size,
                frame.crc32,
                None,
                table,
                Some(hash),
            );
            self.index.entries.last_mut().unwrap().frame_size = frame_size;
            self.index.entries.last_mut().unwrap().compressed_size = data.len() as u64;
            return Ok(());
        }

        let header = fields.encode_local();
        self.write(&header)?;
        let data_offset = self.pos;
        let mut crc = crc32fast::Hasher::new();
        let mut hasher = Sha256::new();
        let mut table = Vec::new();
        let mut seek = Vec::new();
        let mut total = 0u64;
        for frame in frames {
            let frame = frame?;
            if frame.stored {
                return Err(io::Error::other(
                    "a frame of a multi-frame file must be zstd",
                ));
            }
            total += u64::from(frame.len);
            crc.combine(&crc32fast::Hasher::new_with_initial_len(
                frame.crc32,
                u64::from(frame.len),
            ));
            hasher.update(frame.sha256);
            let checksum = trailer(&frame.data);
            table.push(Frame {
                compressed_len: frame.data.len() as u32,
                checksum,
            });
            seek.push(SeekEntry {
                compressed_size: frame.data.len() as u32,
                decompressed_size: frame.len,
                checksum,
            });
            self.write(&frame.data)?;
        }
        if total != size {
            return Err(io::Error::other(format!(
                "{} changed size while being saved ({size} bytes expected, {total} read)",
                String::from_utf8_lossy(&meta.name)
            )));
        }
        self.write(&seek_table::encode(&seek))?;
        fields.crc32 = crc.finalize();
        fields.compressed_size = self.pos - data_offset;
        // Patch the local header now that sizes and CRC are known.
        self.out.seek(SeekFrom::Start(header_offset - self.base))?;
        self.out.write_all(&fields.encode_local())?;
        self.out.seek(SeekFrom::Start(self.pos - self.base))?;
        let crc32 = fields.crc32;
        let compressed = fields.compressed_size;
        self.central.push(fields);
        self.push_entry(
            meta,
            EntryKind::File,
            data_offset,
            Compression::Zstd,
            size,
            crc32,
            None,
            table,
            Some(hasher.finalize().into()),
        );
        let e = self.index.entries.last_mut().unwrap();
        e.compressed_size = compressed;
        e.frame_size = self.options.frame_size;
        Ok(())
    }

    /// Lists an entry whose local header and data are already in the
    /// archive's first `base` bytes (an entry of the archive those bytes come
    /// from, as its index describes it): only its central directory record
    /// and index entry are written. A zip entry is position independent, so
    /// nothing of it has to be read.
    pub fn add_reused(&mut self, entry: &Entry) -> io::Result<()> {
        let DataOffset::Data(data_offset) = entry.offset else {
            return Err(io::Error::other(
                "only entries of cachemount archives can be reused",
            ));
        };
        // The fields the writer gave the entry (add_dir, add_symlink, add_file).
        let (name, method, file_type) = match (entry.kind, entry.compression) {
            (EntryKind::Dir, _) => {
                let mut name = entry.name.clone();
                name.push(b'/');
                (name, zip::METHOD_STORED, libc::S_IFDIR)
            }
            (EntryKind::Symlink, _) => (entry.name.clone(), zip::METHOD_STORED, libc::S_IFLNK),
            (EntryKind::File, Compression::Stored) => {
                (entry.name.clone(), zip::METHOD_STORED, libc::S_IFREG)
            }
            (EntryKind::File, Compression::Zstd) => {
                (entry.name.clone(), zip::METHOD_ZSTD, libc::S_IFREG)
            }
            _ => {
                return Err(io::Error::other(
                    "only entries written by cachemount can be reused",
                ))
            }
        };
        let mut fields = HeaderFields {
            name,
            method,
            crc32: entry.crc32,
            compressed_size: entry.compressed_size,
            uncompressed_size: entry.size,
            local_header_offset: 0,
            unix_mode: file_type | entry.mode,
            mtime_secs: entry.mtime.secs,
            zip64_local: entry.size >= ZIP64_LOCAL_THRESHOLD,
        };
        let header_len = fields.encode_local().len() as u64;
        if data_offset < header_len || data_offset + entry.compressed_size > self.base {
            return Err(io::Error::other(format!(
                "{} lies outside the reused part of the archive",
                String::from_utf8_lossy(&entry.name)
            )));
        }
        fields.local_header_offset = data_offset - header_len;
        self.central.push(fields);
        self.index.entries.push(entry.clone());
        Ok(())
    }

    /// Writes the index, the central directory and the end records.
    pub fn finish(mut self) -> io::Result<FinishedArchive> {
        self.index.entries.sort_by(|a, b| a.name.cmp(&b.name));
        // Encoded once: the zip entry needs its size and CRC, the store its compressed bytes.
        let encoded = self.index.encode_in_chunks();
        self.check_index_len(encoded.raw.len() as u64)?;
        let stored = super::chunks::compress(&encoded);
        let raw_len = encoded.raw.len() as u64;
        let raw_crc = crc32fast::hash(&encoded.raw);
        let index_offset = self.write_whole(
            INDEX_NAME.as_bytes(),
            zip::METHOD_ZSTD,
            libc::S_IFREG | 0o644,
            FIXED_MTIME,
            &stored,
            raw_crc,
            raw_len,
        )?;
        let digest = digest(&stored);
        let cd_offset = self.pos;
        for fields in std::mem::take(&mut self.central) {
            let record = fields.encode_central();
            self.write(&record)?;
        }
        let cd_size = self.pos - cd_offset;
        let entries = self.index.entries.len() as u64 + 2; // + manifest + index
        let comment = format!(
            "cachemount:index:v1:{index_offset}:{}:{digest}",
            stored.len()
        );
        let end = zip::encode_end(entries, cd_offset, cd_size, comment.as_bytes());
        self.write(&end)?;
        self.out.flush()?;
        Ok(FinishedArchive {
            digest,
            size: self.pos,
            index: self.index,
            index_range: index_offset..index_offset + stored.len() as u64,
        })
    }

    /// Readers refuse an index longer than the archive around it could
    /// honestly hold ([`IndexBound::for_archive`]); this archive's bound is at
    /// least the one computed here from what is written so far (the index's
    /// own record and bytes only add to it). Names, targets and frame tables
    /// are paid for by archive bytes, so only xattrs can exceed it.
    fn check_index_len(&self, raw_len: u64) -> io::Result<()> {
        let records = self.central.len() as u64 + 1; // + the index's own
        let cd_size: u64 = self
            .central
            .iter()
            .map(|f| (zip::CENTRAL_HEADER_LEN + f.name.len()) as u64)
            .sum();
        let bound = IndexBound::for_archive(records, cd_size, self.pos);
        if raw_len > bound.len {
            return Err(io::Error::other(format!(
                "the archive's index would be {raw_len} bytes, more than readers accept for \
                 {records} entries ({} bytes): its files carry too many xattr bytes",
                bound.len
            )));
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Writes an entry whose bytes are all known; returns its data offset.
    #[allow(clippy::too_many_arguments)]
    fn write_whole(
        &mut self,
        name: &[u8],
        method: u16,
        unix_mode: u32,
        mtime_secs: i64,
        data: &[u8],
        crc32: u32,
        size: u64,
    ) -> io::Result<u64> {
        let fields = HeaderFields {
            name: name.to_vec(),
            method,
            crc32,
            compressed_size: data.len() as u64,
            uncompressed_size: size,
            local_header_offset: self.pos,
            unix_mode,
            mtime_secs,
            zip64_local: size >= ZIP64_LOCAL_THRESHOLD,
        };
        let header = fields.encode_local();
        self.write(&header)?;
        let offset = self.pos;
        self.write(data)?;
        self.central.push(fields);
        Ok(offset)
    }

    #[allow(clippy::too_many_arguments)]
    fn push_entry(
        &mut self,
        meta: EntryMeta,
        kind: EntryKind,
        offset: u64,
        compression: Compression,
        size: u64,
        crc32: u32,
        link_target: Option<Vec<u8>>,
        frames: Vec<Frame>,
        content_hash: Option<[u8; 32]>,
    ) {
        self.index.entries.push(Entry {
            name: meta.name,
            kind,
            mode: meta.mode & 0o7777,
            uid: meta.uid,
            gid: meta.gid,
            mtime: meta.mtime,
            size,
            link_target,
            xattrs: meta.xattrs,
            offset: DataOffset::Data(offset),
            compressed_size: size,
            compression,
            crc32,
            frame_size: 0,
            frames,
            content_hash,
        });
    }
}

/// What readers refuse in an entry (name, xattrs), refused at save instead.
fn check_meta(meta: &EntryMeta) -> io::Result<()> {
    limits::check_name(&meta.name)
        .and_then(|()| limits::check_xattrs(&meta.name, &meta.xattrs))
        .map_err(unsavable)
}

/// A limit error as a save error: the entry cannot be saved (the reader's
/// wording blames the archive).
fn unsavable(e: FormatError) -> io::Error {
    match e {
        FormatError::EntryOverLimit { name, reason } => {
            io::Error::other(format!("cannot save {name}: {reason}"))
        }
        other => io::Error::other(other),
    }
}

fn check_len(frame: &CompressedFrame, size: u64) -> io::Result<()> {
    if u64::from(frame.len) != size {
        return Err(io::Error::other(format!(
            "file changed size while being saved ({size} expected, {} read)",
            frame.len
        )));
    }
    Ok(())
}

/// The content checksum a zstd frame ends with (the frame is written with it on).
fn trailer(frame: &[u8]) -> u32 {
    u32::from_le_bytes(frame[frame.len() - 4..].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, xattr_len: usize) -> EntryMeta {
        EntryMeta {
            name: name.as_bytes().to_vec(),
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            xattrs: vec![(b"user.a".to_vec(), vec![7; xattr_len])],
        }
    }

    fn writer() -> ArchiveWriter<io::Cursor<Vec<u8>>> {
        let out = io::Cursor::new(Vec::new());
        ArchiveWriter::new(out, Manifest::default(), WriterOptions::default()).unwrap()
    }

    /// What readers would refuse is refused at save, naming the entry.
    #[test]
    fn entries_over_the_read_limits_are_not_saved() {
        let mut w = writer();
        let err = w.add_dir(meta("_0/d", limits::MAX_XATTRS_LEN)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot save \"_0/d\": its xattrs take"),
            "{err}"
        );
        let err = w
            .add_symlink(meta("_0/l", 0), &[b'x'; limits::MAX_PATH + 1])
            .unwrap_err();
        assert!(err.to_string().contains("over PATH_MAX"), "{err}");
        let long = format!("_0/{}", "n".repeat(limits::MAX_NAME + 1));
        assert!(w.add_dir(meta(&long, 0)).is_err());
    }

    /// Xattrs are the one part of an index no archive bytes pay for: an
    /// archive whose entries carry more than the allowance is refused by the
    /// writer rather than written for readers to refuse.
    #[test]
    fn an_index_over_its_bound_is_not_written() {
        let mut w = writer();
        for i in 0..20 {
            w.add_dir(meta(&format!("_0/d{i}"), 60_000)).unwrap();
        }
        let err = w.finish().unwrap_err();
        assert!(err.to_string().contains("too many xattr bytes"), "{err}");
        let mut w = writer();
        for i in 0..10 {
            w.add_dir(meta(&format!("_0/d{i}"), 60_000)).unwrap();
        }
        assert_eq!(w.finish().unwrap().index.entries.len(), 10);
    }
}
